"""Request-path normalisation for policy matching (SPEC §4). Pure.

Paths are matched after percent-decoding, removing dot segments and empty segments. Anything
whose meaning an upstream could read differently from us is refused (BadRequest) instead of
guessed:

- encoded `/` `\\` `?` `#` `%` and `;` (`%2F %5C %3F %23 %25 %3B`): servers disagree on whether
  they split segments, end the path or get decoded twice (`%252e%252e` → `%2e%2e` → `..`);
- a raw backslash, a raw `#`, a `;` anywhere (Tomcat/Jetty/Spring strip `;params` from a
  segment, so `/admin;x/keys` and `/..;/admin` reach `/admin/keys` there);
- malformed escapes (`%zz`, `%u002e`), invalid or overlong UTF-8 (`%c0%ae`), lone surrogates;
- control, format and line/paragraph-separator characters (NUL, CR, LF, TAB, C1, U+200B, U+202E);
- non-ASCII characters whose compatibility form (NFKC) contains `. / \\ % ; ? #` (fullwidth
  `．．`, `／`, one-dot leader): some stacks apply NFKC and would see `..` or `/`;
- dot-like segments (`...`, `. .`) and `..` climbing above the root.

The result never contains `.`/`..` segments, `//`, `%`, `?`, `#`, `;` or `\\`, so
`normalise_path` is idempotent and `normalise_path(encode_path(p)) == p`. The normalised path is
what goes upstream (re-encoded by `encode_path`).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote_to_bytes

from addons.model import BadRequest

_MALFORMED = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Escapes whose decoded character has URL syntax meaning.
_SYNTAX_ESCAPES = re.compile(r"%(?:2[fF]|5[cC]|3[fF]|23|25|3[bB])")
_SYNTAX_NAMES = {"2f": "slash", "5c": "backslash", "3f": "question mark", "23": "hash",
                 "25": "percent sign (double encoding)", "3b": "semicolon"}
# Characters that must never be in a decoded path, or come out of NFKC of a non-ASCII character.
_NFKC_TRAPS = frozenset("./\\%;?#")
_BAD_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs", "Cn"))
SAFE = "/:@!$&'()*+,;=-._~"


def normalise_path(raw: str) -> str:
    """Return the canonical path (without query). Raises BadRequest when ambiguous."""
    path = raw.split("?", 1)[0]
    if "#" in path:
        raise BadRequest("'#' in a request path is ambiguous")
    if not path.startswith("/"):
        if path in ("", "*"):
            return "/"
        raise BadRequest("request path must start with /")
    if _MALFORMED.search(path):
        raise BadRequest("malformed percent-encoding in path")
    m = _SYNTAX_ESCAPES.search(path)
    if m:
        what = _SYNTAX_NAMES[m.group(0)[1:].lower()]
        raise BadRequest(f"encoded {what} in path is ambiguous")
    if "\\" in path:
        raise BadRequest("backslash in path is ambiguous")
    try:
        decoded = unquote_to_bytes(path.encode("utf-8")).decode("utf-8")
    except UnicodeError:  # invalid/overlong UTF-8, or lone surrogates from the wire
        raise BadRequest("path is not valid UTF-8") from None
    _check_characters(decoded)
    out: list[str] = []
    for seg in decoded.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not out:
                raise BadRequest("path climbs above the root")
            out.pop()
            continue
        if seg.strip(" .") == "":
            raise BadRequest("ambiguous dot segment in path")
        out.append(seg)
    normal = "/" + "/".join(out)
    if decoded.endswith("/") and out:
        normal += "/"
    return normal


def _check_characters(decoded: str) -> None:
    if ";" in decoded:
        raise BadRequest("';' (path parameters) in path is ambiguous")
    for ch in decoded:
        if ch.isascii():
            if ord(ch) < 0x20 or ord(ch) == 0x7F:
                raise BadRequest("control characters in path")
            continue
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            raise BadRequest("control, format or unassigned characters in path")
        if _NFKC_TRAPS.intersection(unicodedata.normalize("NFKC", ch)):
            raise BadRequest("character that normalises to URL syntax in path is ambiguous")


def encode_path(path: str) -> str:
    """Percent-encode a normalised path for the upstream request line."""
    return quote(path, safe=SAFE)
