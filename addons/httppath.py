"""Request-path normalisation for policy matching (SPEC §4). Pure.

Paths are matched after percent-decoding, removing dot segments and empty segments. Anything
whose meaning an upstream could read differently from us is refused instead of guessed:
encoded slashes or backslashes, NUL and control characters, double encoding, invalid UTF-8, and
`..` that climbs above the root. The normalised path is what goes upstream.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

from addons.model import BadRequest

_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
SAFE = "/:@!$&'()*+,;=-._~"


def normalise_path(raw: str) -> str:
    """Return the canonical path (without query). Raises BadRequest when ambiguous."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        if path in ("", "*"):
            return "/"
        raise BadRequest("request path must start with /")
    if _PCT.search(path):
        raise BadRequest("malformed percent-encoding in path")
    if _DOUBLE.search(path):
        raise BadRequest("double percent-encoding in path is ambiguous")
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in path:
        raise BadRequest("encoded slash or backslash in path is ambiguous")
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("path is not valid UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise BadRequest("control characters in path")
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


def encode_path(path: str) -> str:
    """Percent-encode a normalised path for the upstream request line."""
    return quote(path, safe=SAFE)
