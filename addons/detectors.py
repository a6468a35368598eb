"""Sensitive-value detectors: one combined regular-expression scan, then a check per hit.

Each detector is a candidate pattern plus a validator that checks more than the shape: Luhn for
cards, mod-97 and the country's length for IBANs, the SSA rules for SSNs, `ipaddress` for IPv6
addresses, a decodable JSON header for JWTs. Where the pattern itself already checks it all
(IPv4 octets, phones of a fixed digit count, key blocks) the alternative is `decided` and no
validator runs. All candidate patterns are joined into ONE compiled
alternation, so a text is scanned once whatever the number of detectors. A candidate that fails
its validator does not hide another detector's hit at the same position: the other detectors'
patterns are tried there before the scan moves on.

How the combined pattern is shaped (this is what makes it fast with the stdlib `re`; see
docs/masking.md, "Performance"):
- it starts with ONE character class (the union of every detector's anchor character), so `re`
  skips every other character in C without entering the matcher;
- each alternative then starts with a plain character class for the SECOND character (which
  `re` tests before it even tries the alternative) and only then checks the anchor character
  and the character before it with a look-behind;
- detectors without a cheap first character are anchored elsewhere and widened by their
  validator: e-mail on "@", JWT on the "J" of "eyJ", IPv6 on its first ":".
Long ASCII texts with few digit runs take the candidate scan (`_scan_candidates`): literal
searches in C find where a match can start, and the combined pattern is tried only there,
with exactly the same result. Other long ASCII texts are scanned with a combined pattern that
leaves out the alternatives that match nowhere in them (`_absent`), again with the same result.
No pattern matches NUL, so `addons.masking` scans all string values of a JSON document joined
by NUL in a single call (`find(..., mode="joined")`); no hit can span two values. In mode
"json" no hit can span a '"' either, which lets the raw text of a JSON body be scanned as is.

Pure module: no I/O, no mitmproxy, no asyncio.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, NamedTuple

DETECTORS = ("private_key", "jwt", "aws_access_key", "email", "iban", "credit_card", "ssn",
             "phone", "ip_address")


class Hit(NamedTuple):
    start: int
    end: int
    detector: str


class _Alt(NamedTuple):
    detector: str
    kind: str  # "plain" | "digit" | "mixed": where it sits in the combined pattern (see _scanner)
    first: str  # class of the anchor character
    second: str  # class of the character after it (cheap pre-test inside `re`)
    rest: str  # the remainder of the candidate
    before: str  # class of characters that must not precede the anchor ("" = no check)
    # True when a match of the pattern always passes the detector's validator, which is then
    # not called (see `_check`; tests/test_detectors.py checks the claim)
    decided: bool = False


_PEM = (r"---BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        # a BEGIN without its END masks everything after it: a truncated key is still a key
        r"(?:ANY*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|ANY*)")
_PHONE_END = r"(?![\w-]|\.[0-9])"
_IP_END = r"(?![\w]|\.[0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros, like ipaddress
_OCTETS3 = rf"{_OCTET}\.{_OCTET}\.{_OCTET}"
# The rest of a first octet of two or three digits whose first two were read as the anchor and
# the second character.
_OCTET1_REST = r"(?:(?<=[1-9][0-9])|(?<=1[0-9])[0-9]|(?<=2[0-4])[0-9]|(?<=25)[0-5])\."

# Order = priority between alternatives that match at the same position.
_ALTS = (
    # "plain": the second character is never a digit, so `re` rejects these in one test.
    _Alt("private_key", "plain", r"\-", "-", _PEM, "", True),
    # anchored on the "y" of "eyJ" (base64 of '{"'); the validator widens it by one. Every
    # unbounded candidate is possessive and starts only where its run starts: linear time.
    _Alt("jwt", "plain", "y", "J", r"[A-Za-z0-9_-]++(?:\.[A-Za-z0-9_-]*+){2,4}+", ""),
    _Alt("aws_access_key", "plain", "A", "[KS]", r"IA[A-Z2-7]{16}(?![A-Za-z0-9])", "[A-Za-z0-9]",
         True),
    _Alt("iban", "plain", "[A-Z]", "[A-Z]", r"[0-9]{2}(?: ?[A-Z0-9]){11,30}", "[A-Za-z0-9]"),
    # "digit": tried only at the start of a run of at least 7 digits and separators.
    _Alt("ssn", "digit", "[0-9]", "[0-9]", r"[0-9]-[0-9]{2}-[0-9]{4}(?![0-9-])", "[0-9-]"),
    # Phones: E.164 with optional separators; North-American 3-3-4 with separators (optionally
    # "1-" first); trunk-prefixed national numbers ("020 7946 0958"). A bare run of digits is
    # never a phone number: that is what ids look like.
    # (the phone patterns marked True fix the count of digits inside 7..15: 10, 11, 7..15, 10)
    _Alt("phone", "digit", "[0-9]", "[0-9]", r"[0-9][ .-][0-9]{3}[ .-][0-9]{4}" + _PHONE_END,
         r"[\w.()+-]", True),
    _Alt("phone", "digit", "1", "[ .-]",
         r"(?:\([0-9]{3}\) ?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}" + _PHONE_END, r"[\w.()+-]",
         True),
    _Alt("phone", "digit", "0", "[1-9]",
         r"[0-9]{0,3}[ -][0-9]{2,4}(?:[ -]?[0-9]{2,4}){1,4}" + _PHONE_END, r"[\w.+-]"),
    # IPv4: the octets' values are checked by the pattern itself (the end look-ahead makes
    # each octet take all its digits)
    _Alt("ip_address", "digit", "[0-9]", "[.]", _OCTETS3 + _IP_END, r"[\w.]", True),
    _Alt("ip_address", "digit", "[0-9]", "[0-9]", _OCTET1_REST + _OCTETS3 + _IP_END, r"[\w.]",
         True),
    _Alt("credit_card", "digit", "[1-9]", "[0-9 -]", r"[0-9 -]{10,34}(?<=[0-9])(?![0-9])", ""),
    # "mixed": non-digit anchors whose second character may be a digit.
    _Alt("email", "mixed", "@", r"[\w-]",
         r"[\w-]{0,62}\.(?:[\w-]{1,63}\.){0,8}(?:xn--[A-Za-z0-9-]{1,59}|[^\W\d_]{2,63})", ""),
    _Alt("phone", "mixed", r"\+", "[1-9]", r"(?:[ .()-]{0,2}[0-9]){6,14}(?![0-9])", r"[\w+]",
         True),
    _Alt("phone", "mixed", r"\(", "[0-9]", r"[0-9]{2}\) ?[0-9]{3}[ .-][0-9]{4}" + _PHONE_END,
         r"[\w.()+-]", True),
    # IPv6, anchored on its first ":" (the validator widens it over up to four hex digits);
    # possessive, so a clock time such as 10:11:00Z is rejected without backtracking.
    _Alt("ip_address", "mixed", ":", "[0-9A-Fa-f:]",
         r"[0-9A-Fa-f:]{0,40}+(?:(?:\.[0-9]{1,3}){3})?(?:%[\w.-]{1,32}+)?(?![\w:]|\.[0-9])",
         ""),
)
assert {a.detector for a in _ALTS} == set(DETECTORS)


# ---------------------------------------------------------------------------------------------
# Validators: (text, start, end) -> (start, end) of the real value, or None.

Span = tuple[int, int] | None


# Each digit counted once by sum(raw); a doubled digit adds digit-sum(2d) - d, stored + 4 so
# that it fits in a byte: 0..9 -> 4, 5, 6, 7, 8, 0, 1, 2, 3, 4.
_DOUBLED_EXTRA = bytes.maketrans(b"0123456789", bytes([4, 5, 6, 7, 8, 0, 1, 2, 3, 4]))


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of an ASCII digit string (byte sums: no Python loop per digit)."""
    return _luhn(digits.encode("ascii"))


def _luhn(raw: bytes) -> bool:
    doubled = raw[-2::-2]
    total = sum(raw) - 48 * len(raw) + sum(doubled.translate(_DOUBLED_EXTRA)) - 4 * len(doubled)
    return total % 10 == 0


_DASH_TO_SPACE = bytes.maketrans(b"-", b" ")


_CARD_SHAPE = re.compile(r"[0-9]+(?:[ -][0-9]+)*")


def _credit_card(text: str, start: int, end: int) -> Span:
    # 13-19 digits with at most one space or dash between two digits. The candidate pattern
    # already holds only digits, spaces and dashes and starts and ends with a digit, so its
    # shape is right unless two separators touch.
    candidate = text[start:end]
    if candidate.isdigit():  # one bare run (an order id...): no shorter prefix to try
        if len(candidate) > 19:
            return None
        raw = candidate.encode("ascii")
        doubled = raw[-2::-2]
        total = (sum(raw) - 48 * len(raw) + sum(doubled.translate(_DOUBLED_EXTRA))
                 - 4 * len(doubled))  # `_luhn`, inlined: this is the hot path
        return (start, end) if total % 10 == 0 and len(raw) >= 13 else None
    spaced = candidate.encode("ascii").translate(_DASH_TO_SPACE)
    if b"  " not in spaced:
        digits = spaced.replace(b" ", b"")
        if 13 <= len(digits) <= 19 and _luhn(digits):
            return start, end
    # Slow path (rare): shorter prefixes ending at a group end, so "4111 1111 1111 1111 2024"
    # still finds the card that is followed by another number.
    shape = _CARD_SHAPE.match(text, start, end)
    if shape is None:
        return None
    groups = shape.group().replace("-", " ").split(" ")
    stop = shape.end()
    while len(groups) > 1:
        stop -= len(groups.pop()) + 1
        prefix = "".join(groups)
        if 13 <= len(prefix) <= 19 and luhn_ok(prefix):
            return start, stop
    return None


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
_IBAN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def iban_ok(iban: str) -> bool:
    """ISO 13616 check of a compact upper-case IBAN: known country, its length, mod 97 == 1."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban(text: str, start: int, end: int) -> Span:
    # The country fixes the length: take exactly that many characters (single spaces allowed
    # between them), so a following word does not spoil the checksum.
    want = IBAN_LENGTHS.get(text[start:start + 2])
    if want is None:
        return None
    chars: list[str] = []
    i, n = start, len(text)
    while i < n and len(chars) < want:
        ch = text[i]
        if ch in _IBAN_CHARS:
            chars.append(ch)
        elif not (ch == " " and i + 1 < n and text[i + 1] in _IBAN_CHARS):
            break
        i += 1
    if len(chars) != want or (i < n and text[i].isalnum()):
        return None
    return (start, i) if iban_ok("".join(chars)) else None


def ssn_ok(ssn: str) -> bool:
    """SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = ssn[0:3], ssn[4:6], ssn[7:11]
    return not (area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000")


def _ssn(text: str, start: int, end: int) -> Span:
    return (start, end) if ssn_ok(text[start:end]) else None


_LOCAL_RUN = re.compile(r"[\w.%+'-]{1,64}")  # RFC 5321: a local part has at most 64 octets


def _email(text: str, start: int, end: int) -> Span:
    # Anchored on "@": widen to the left over the local part (matched on the reversed text
    # before the "@", which costs one short C call instead of a backwards search).
    local = _LOCAL_RUN.match(text[start - 64 if start > 64 else 0:start][::-1])
    if local is None:
        return None
    begin = start - local.end()
    if text[begin] == ".":
        while begin < start and text[begin] == ".":
            begin += 1
        if begin == start:
            return None
    if text[start - 1] == ".":
        return None
    return begin, end


def _phone(text: str, start: int, end: int) -> Span:
    # the candidate holds ASCII digits and " .()+-" only: count the digits in C
    count = len(text[start:end].encode("ascii", "replace").translate(None, b" -.()+"))
    return (start, end) if 7 <= count <= 15 else None


def _jwt(text: str, start: int, end: int) -> Span:
    # Anchored on the "y" of "eyJ" (base64 of '{"'): widen by one and decode the header.
    begin = start - 1
    if begin < 0 or text[begin] != "e":
        return None
    if begin > 0 and (text[begin - 1].isalnum() or text[begin - 1] in "_-"):
        return None
    header = text[begin:text.index(".", start)]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return (begin, end) if isinstance(decoded, dict) else None


_HEX = frozenset("0123456789abcdefABCDEF")
_IPV4 = re.compile(rf"{_OCTET}\.{_OCTETS3}")


def _ip(text: str, start: int, end: int) -> Span:
    return _ipv6(text, start, end) if text[start] == ":" else _ipv4(text, start, end)


def _ipv4(text: str, start: int, end: int) -> Span:
    return (start, end) if _IPV4.fullmatch(text, start, end) else None


def _ipv6(text: str, start: int, end: int) -> Span:
    # anchored on its first ":": widen to the left over at most four hex digits
    begin = start
    while begin > 0 and start - begin < 5 and text[begin - 1] in _HEX:
        begin -= 1
    if start - begin > 4 or (begin > 0 and (text[begin - 1].isalnum()
                                           or text[begin - 1] in "_:.")):
        return None
    try:
        ipaddress.IPv6Address(text[begin:end])
    except ValueError:
        return None
    return begin, end


def _accept(text: str, start: int, end: int) -> Span:
    return start, end


_VALIDATORS: dict[str, Callable[[str, int, int], Span]] = {
    "private_key": _accept,
    "jwt": _jwt,
    "aws_access_key": _accept,
    "email": _email,
    "iban": _iban,
    "credit_card": _credit_card,
    "ssn": _ssn,
    "phone": _phone,
    "ip_address": _ip,
}


# ---------------------------------------------------------------------------------------------
# Scanning


Check = Callable[[str, int, int], Span]


class _Scanner(NamedTuple):
    combined: re.Pattern[str]
    alts: tuple[_Alt, ...]
    # Indexed by the capture group number of an alternative (Match.lastindex); slot 0 unused.
    checks: tuple[Check | None, ...]  # its validator, None when the pattern decides
    names: tuple[str, ...]  # its detector's name
    # The alternatives that come after it in the combined pattern and share its anchors: their
    # group, stand-alone pattern and check. Only those can still match where it failed (the
    # ones before it were already tried there by the combined pattern).
    retries: tuple[tuple[tuple[int, re.Pattern[str], Check | None], ...], ...]
    sources: frozenset[str]  # where `_candidates` looks for starts (see there)


# What a private key's body may contain, per scanning mode: plain text; values joined by NUL;
# the raw text of a JSON document without backslashes (a body never crosses a '"').
_BODY = {"text": r"[\s\S]", "joined": r"[^\x00]", "json": r'[^"\x00]'}
MODES = tuple(_BODY)


@lru_cache(maxsize=256)
def _scanner(detectors: frozenset[str], mode: str, absent: frozenset[str] = frozenset()
             ) -> _Scanner:
    """The scanner of `detectors` in `mode`, without the alternatives whose `_SOURCE` is in
    `absent` (the caller checked that they match nowhere in the text: see `_absent`)."""
    alts = tuple(a for a in _ALTS if a.detector in detectors and _SOURCE[a.first] not in absent)
    # `first` is a class ("[0-9]") or one escaped character ("\\+"): either fits in a class.
    anchors = "".join(sorted({a.first[1:-1] if a.first[0] == "[" else a.first for a in alts}))
    groups: dict[str, list[str]] = {"plain": [], "digit": [], "mixed": []}
    order: dict[str, list[int]] = {"plain": [], "digit": [], "mixed": []}
    exact = []
    for i, a in enumerate(alts):
        rest = a.rest.replace("ANY", _BODY[mode])
        guard = "" if a.first == "[0-9]" else f"(?<={a.first}.)"
        if a.detector == "jwt":
            # only where a base64url run starts with "eyJ": each run is scanned once
            guard = r"(?<=ey.)(?<![A-Za-z0-9_-]...)"
        if a.before:
            guard += f"(?<!{a.before}..)"
        # The empty group a<i> closes last, so Match.lastindex tells which alternative matched.
        groups[a.kind].append(f"{a.second}{guard}{rest}(?P<a{i}>)")
        order[a.kind].append(i)
        lookbehind = f"(?<!{a.before})" if a.before else ""
        exact.append(re.compile(f"{lookbehind}{a.first}{a.second}{rest}"))
    branches = list(groups["plain"])
    if groups["digit"]:
        # One test instead of one per alternative: digit detectors need 7+ characters.
        branches.append(f"(?<=[0-9])(?=[0-9 ().-]{{6}})(?:{'|'.join(groups['digit'])})")
    if groups["mixed"]:
        branches.append(f"(?<![0-9])(?:{'|'.join(groups['mixed'])})")
    # A digit right after a digit never starts a hit: reject it before trying alternatives.
    combined = f"[{anchors}](?<![0-9][0-9])(?:{'|'.join(branches)})"
    compiled = re.compile(combined, re.DOTALL)
    group = {int(name[1:]): number for name, number in compiled.groupindex.items()}
    checks: list[Check | None] = [None] * (compiled.groups + 1)
    names = [""] * (compiled.groups + 1)
    retries: list[tuple[tuple[int, re.Pattern[str], Check | None], ...]] = [()] * len(checks)
    for i, a in enumerate(alts):
        checks[group[i]] = _check(a)
        names[group[i]] = a.detector
    for indices in order.values():
        for pos, i in enumerate(indices):
            retries[group[i]] = tuple((group[j], exact[j], _check(alts[j]))
                                      for j in indices[pos + 1:])
    sources = frozenset(_SOURCE[a.first] if a.kind != "digit" else "runs" for a in alts)
    return _Scanner(compiled, alts, tuple(checks), tuple(names), tuple(retries), sources)


def _check(alt: _Alt) -> Check | None:
    if alt.decided:
        return None
    if alt.detector == "ip_address":
        return _ipv6 if alt.first == ":" else _ipv4
    return _VALIDATORS[alt.detector]


# How `_candidates` finds the places where an alternative can start, by its anchor class.
_SOURCE = {r"\-": "pem", "y": "jwt", "A": "aws", "[A-Z]": "iban", "@": "email", r"\+": "plus",
           r"\(": "runs", ":": "colon", "[0-9]": "runs", "1": "runs", "0": "runs", "[1-9]": "runs"}


def check_detectors(names: Iterable[str]) -> tuple[str, ...]:
    """Validate detector names (ValueError names the bad one and the known ones); dedupe."""
    out: list[str] = []
    for name in names:
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
        if name not in out:
            out.append(name)
    return tuple(out)


def find(text: str, detectors: Iterable[str] = DETECTORS, *, mode: str = "text") -> list[Hit]:
    """Every validated hit in `text`, left to right, overlapping hits merged.

    mode "text": any text. "joined": several values separated by NUL (the caller makes sure the
    values hold no NUL); no hit spans a NUL. "json": the raw text of a JSON document without
    backslash escapes; no hit spans a '"', so every hit lies in one string or number token.
    """
    return [Hit(*h) for h in scan(text, detectors, mode)]


def scan(text: str, detectors: Iterable[str] = DETECTORS, mode: str = "text"
         ) -> list[tuple[int, int, str]]:
    """`find` as plain (start, end, detector) tuples: the hot path of `addons.masking`."""
    wanted = detectors if isinstance(detectors, frozenset) else frozenset(detectors)
    if not text or not wanted:
        return []
    scanner = _scanner(wanted, mode)
    if len(text) >= CANDIDATES_MIN and text.isascii():
        copy = text.encode("ascii").translate(_COPY_TABLE)
        # Both scans find the same hits; which is faster depends on the text. The candidate
        # scan pays a Python step per run of 7+ digits and separators, the combined scan a
        # matcher entry (in C) per digit: with many runs (PII-dense text) the latter wins.
        if not _dense(copy):
            return _scan_candidates(text, scanner, copy)
        # Leave out of the combined pattern what matches nowhere in this text: fewer anchor
        # characters where the matcher stops, fewer alternatives tried at each stop.
        absent = _absent(text, copy, scanner.sources)
        if absent == scanner.sources:
            return []
        if absent:
            scanner = _scanner(wanted, mode, absent)
    if mode == "json" and "colon" in scanner.sources:
        # A ':' right after a '"' and before a space or a '"' (a member's separator) starts no
        # candidate and is part of none, so it need not cost the combined scan a stop.
        text = text.replace('": ', _NO_STOP[0]).replace('":"', _NO_STOP[1])
    return _scan_combined(text, scanner)


# The separators that `scan` rewrites in mode "json", same length (hits are offsets). Why this
# cannot change a hit: only the IPv6 alternative starts at a ':', and only when a hex digit or
# a ':' follows; its body is a run of hex digits and ':' that cannot take in a ':' after a '"';
# its validator looks left for a ':' only next to a hex digit. No other pattern or validator
# reads ':' or \x01 differently (neither is a word, digit, separator or base64 character, and
# a private key's body never spans a '"' in this mode).
_NO_STOP = ('"\x01 ', '"\x01"')


def _retry(text: str, at: int, group: int, scanner: _Scanner) -> tuple[int, int, str] | None:
    """After a match of alternative `group` at `at` failed its validator: the hit of another
    alternative that matches there and validates, or None (shared by both scans)."""
    for j, pattern, check in scanner.retries[group]:
        again = pattern.match(text, at)
        if again is not None:
            span = (at, again.end()) if check is None else check(text, at, again.end())
            if span is not None:
                return span[0], span[1], scanner.names[j]
    return None


def _scan_combined(text: str, scanner: _Scanner) -> list[tuple[int, int, str]]:
    """`scan` with one left-to-right search of the combined pattern (any text)."""
    finditer = scanner.combined.finditer
    checks, names, retries = scanner.checks, scanner.names, scanner.retries
    hits: list[tuple[int, int, str]] = []
    append = hits.append
    pos = 0
    last_end = -1
    ordered = True
    while True:
        restart = -1
        for m in finditer(text, pos):
            group = m.lastindex
            at, end = m.span()
            check = checks[group]  # type: ignore[index]
            if check is None:
                start, stop = at, end
                name = names[group]  # type: ignore[index]
            elif (span := check(text, at, end)) is not None:
                start, stop = span
                name = names[group]  # type: ignore[index]
            else:
                hit = (_retry(text, at, group, scanner)  # type: ignore[arg-type]
                       if retries[group] else None)  # type: ignore[index]
                if hit is None:
                    if text[at:end].isdigit():
                        continue  # no hit starts inside a run of digits: scan on from its end
                    restart = at + 1
                    break
                start, stop, name = hit
            if start < last_end:
                ordered = False
            append((start, stop, name))
            last_end = stop
            if stop != end:  # the validator ended the hit early: scan on from there
                restart = max(stop, at + 1)
                break
        if restart < 0:
            break
        pos = restart
    return hits if ordered else _merge(hits)


# Where a match of the combined pattern can start, found with fast literal searches instead of
# entering the matcher at every anchor character (every digit, colon and capital letter):
# - "runs": every digit-run alternative (and "(415) 555-2671") needs its anchor and the six
#   characters after it in [0-9 ().-], and consists of such characters only. In an ASCII copy
#   where those characters are "0" (capitals "A", the rest "x"), one literal search finds the
#   runs of 7+; the combined pattern is then searched inside each run only, with the end
#   position two characters past it (its look-aheads read at most two characters further).
# - "iban": two capitals and two digits ("AA00" in the copy); "pem", "jwt", "aws", "email",
#   "plus": the literal text each alternative starts with; "colon": where the IPv6 pattern
#   matches.
# Extra candidates only cost a failed `match`. A missed place would be a missed hit, so each
# source is a superset of the places where its alternatives match (a bare run of under 13
# digits is skipped: it matches at most a card candidate that cannot pass Luhn's length).
# tests/test_detectors.py checks `_scan_candidates` against `_scan_combined`.
_COPY_TABLE = bytes(48 if chr(c) in "0123456789 ().-" else 65 if chr(c).isupper() and c < 128
                    else 120 for c in range(256))
_RUN = re.compile(b"0000000+")
# the IPv6 alternative's own pattern, as a look-ahead: every place where it matches
_COLON = re.compile("".join(f":(?={a.second}{a.rest})" for a in _ALTS if a.first == ":"))
_LITERALS = {"pem": ("-----BEGIN", 0), "jwt": ("eyJ", 1), "email": ("@", 0),
             "plus": ("+", 0)}
CANDIDATES_MIN = 256  # shorter texts: one combined scan costs less than the set-up
RUN_SPACING = 80  # the candidate scan while there is under one 7-run per 80 characters
SAMPLE = 2048  # a text whose start is dense is dense enough: no need to count all its runs


def _dense(copy: bytes) -> bool:
    """At least one run of 7+ digits and separators per RUN_SPACING characters (in the copy
    made with `_COPY_TABLE`): then the combined scan is the faster one."""
    n = len(copy)
    if n > SAMPLE and copy.count(b"0000000", 0, SAMPLE) * RUN_SPACING >= SAMPLE:
        return True
    return copy.count(b"0000000") * RUN_SPACING >= n


def _absent(text: str, copy: bytes, sources: frozenset[str]) -> frozenset[str]:
    """The sources (see `_SOURCE`) whose alternatives cannot match anywhere in `text`: each
    test looks for something that every match of those alternatives contains. Only the cheap
    tests (a few microseconds per 10 KB) that pay for themselves are made."""
    out = []
    if "pem" in sources and ("K" not in text or "-----BEGIN" not in text):
        out.append("pem")
    if "jwt" in sources and ("J" not in text or "eyJ" not in text):
        out.append("jwt")
    if "iban" in sources and _IBAN_START.search(copy) is None:
        out.append("iban")
    if "colon" in sources and _COLON.search(text) is None:
        out.append("colon")
    return frozenset(out)


_IBAN_START = re.compile(b"AA00")  # in the copy: two capitals, two digits (faster than `in`)


def _find_all(haystack: Any, needle: Any, shift: int, out: list[int]) -> None:
    i = haystack.find(needle)
    while i >= 0:
        out.append((i + shift) * 2 + 1)
        i = haystack.find(needle, i + 1)


def _candidates(text: str, sources: frozenset[str], copy: bytes
                ) -> tuple[list[int], dict[int, int]]:
    """Sorted events: 2*start+1 for a place to try, 2*start for a run (its end in `runs`).
    `copy` is the text translated with `_COPY_TABLE`."""
    events: list[int] = []
    runs: dict[int, int] = {}
    if "runs" in sources or "iban" in sources:
        if "runs" in sources:
            for m in _RUN.finditer(copy):
                a, b = m.span()
                runs[a] = b
                events.append(a * 2)
        if "iban" in sources:
            _find_all(copy, b"AA00", 0, events)
    for source in sources:
        lit = _LITERALS.get(source)
        if lit is not None:
            _find_all(text, lit[0], lit[1], events)
    if "aws" in sources:
        _find_all(text, "AKIA", 0, events)
        _find_all(text, "ASIA", 0, events)
    if "colon" in sources:
        events += [m.start() * 2 + 1 for m in _COLON.finditer(text)]
    events.sort()
    return events, runs


def _scan_candidates(text: str, scanner: _Scanner, copy: bytes) -> list[tuple[int, int, str]]:
    """`scan` of a long ASCII text, trying the combined pattern only where `_candidates` says
    a match can start: the same matches, in the same order, so the same hits."""
    events, runs = _candidates(text, scanner.sources, copy)
    combined = scanner.combined
    checks, names = scanner.checks, scanner.names
    n = len(text)
    hits: list[tuple[int, int, str]] = []
    pos = 0  # where the original left-to-right scan would search next
    last_end = -1
    ordered = True
    for event in events:
        at = event >> 1
        if event & 1:
            if at < pos:
                continue
            m = combined.match(text, at)
            if m is None:
                continue
            run_end = -1
        else:
            run_start, run_end = at, runs[at]
            if run_end - at < 13 and text[at:run_end].isdigit():
                continue  # a bare run of under 13 digits holds no hit
            m = None
        while True:
            if run_end >= 0:  # the next match inside the run, if any
                start = pos if pos > run_start else run_start
                if start > run_end - 7:
                    break
                m = combined.search(text, start, run_end + 2 if run_end + 2 < n else n)
                if m is None or m.start() >= run_end:
                    break
            at, end = m.span()  # type: ignore[union-attr]
            group = m.lastindex  # type: ignore[union-attr]
            check = checks[group]  # type: ignore[index]
            span = (at, end) if check is None else check(text, at, end)
            hit = ((span[0], span[1], names[group]) if span is not None  # type: ignore[index]
                   else _retry(text, at, group, scanner))  # type: ignore[arg-type]
            if hit is None:
                # no hit starts inside a run of digits: scan on from its end
                pos = end if text[at:end].isdigit() else at + 1
                if run_end < 0:
                    break
                continue
            start, stop, name = hit
            if start < last_end:
                ordered = False
            hits.append((start, stop, name))
            last_end = stop
            pos = end if stop == end else max(stop, at + 1)
            if run_end < 0:
                break
    return hits if ordered else _merge(hits)


def _merge(hits: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Union of overlapping hits (the widest one names the merged hit)."""
    out: list[tuple[int, int, str]] = []
    for hit in sorted(hits):
        if out and hit[0] < out[-1][1]:
            prev = out[-1]
            widest = prev if prev[1] - prev[0] >= hit[1] - hit[0] else hit
            out[-1] = (prev[0], max(prev[1], hit[1]), widest[2])
        else:
            out.append(hit)
    return out


PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
