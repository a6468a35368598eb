"""Sensitive-value detectors: one combined regular-expression scan, then a checksum per hit.

Each detector is a candidate pattern plus a validator that checks more than the shape (Luhn for
cards, mod-97 and the country's length for IBANs, the SSA rules for SSNs, `ipaddress` for IPs,
a decodable JSON header for JWTs). All enabled candidate patterns are joined into ONE compiled
alternation with a named group per detector, so a string is scanned once whatever the number
of detectors. A candidate that fails its validator does not hide another detector's hit at the
same position: the other detectors' patterns are tried there before the scan moves on.

Every pattern starts with a negative look-behind for its own character class, so the regex
engine only tries a detector at the start of a run (no quadratic rescans of long tokens), and
no pattern can match NUL, which lets `addons.masking` scan many JSON strings joined by NUL in a
single call (`find(..., joined=True)`).

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
from typing import NamedTuple

# Alternation order = priority when two detectors match at the same position.
DETECTORS = ("private_key", "jwt", "aws_access_key", "email", "iban", "credit_card", "ssn",
             "phone", "ip_address")

_PEM_LABEL = r"-----(?:BEGIN|END) (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
# A BEGIN line without its END still masks everything after it (a truncated key is still a key).
_PEM_SINGLE = (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
               r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*)")
_PEM_JOINED = _PEM_SINGLE.replace(r"[\s\S]", r"[^\x00]")

_PATTERNS: dict[str, str] = {
    "private_key": _PEM_SINGLE,
    # header.payload.signature (JWS) or the five segments of a JWE; the header is JSON ("eyJ").
    "jwt": r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2,4}",
    "aws_access_key": r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z2-7]{16}(?![A-Za-z0-9])",
    "email": r"(?<![\w.%+'-])[\w.%+'-]+@(?:[\w-]+\.)+[\w-]{2,63}",
    # Length and checksum are checked by the validator, which may end the hit earlier.
    "iban": r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}",
    "credit_card": r"(?<![0-9])[1-9](?:[ -]?[0-9]){12,18}(?![0-9])",
    "ssn": r"(?<![0-9-])[0-9]{3}-[0-9]{2}-[0-9]{4}(?![0-9-])",
    # E.164 (+ country code, optional separators); North-American 3-3-4 with separators;
    # trunk-prefixed national numbers (0 + area code) with separators. A bare run of digits is
    # never a phone number: that is what ids look like.
    "phone": (r"(?<![\w+])\+[1-9](?:[ .()-]{0,2}[0-9]){6,14}(?![0-9])"
              r"|(?<![\w.()+-])(?:1[ .-])?(?:\([0-9]{3}\) ?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}"
              r"(?![\w-]|\.[0-9])"
              r"|(?<![\w.+-])0[1-9][0-9]{0,3}[ -][0-9]{2,4}(?:[ -]?[0-9]{2,4}){1,4}(?![\w-]|\.[0-9])"),
    "ip_address": (r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![\w]|\.[0-9])"
                   r"|(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
                   r"(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.-]+)?(?![\w:])"),
}
assert tuple(_PATTERNS) == DETECTORS


class Hit(NamedTuple):
    start: int
    end: int
    detector: str


# ---------------------------------------------------------------------------------------------
# Validators: (text, start, end) -> the hit's real end, or None when it is not a real value.


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i & 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _credit_card(text: str, start: int, end: int) -> int | None:
    # Try the whole run first, then shorter prefixes ending at a group separator, so
    # "4111 1111 1111 1111 2024" still finds the card followed by another number.
    digits: list[str] = []
    ends: list[tuple[int, int]] = []  # (number of digits, end offset) at group ends
    for i in range(start, end):
        ch = text[i]
        if ch.isdigit():
            digits.append(ch)
            if i + 1 == end or not text[i + 1].isdigit():
                ends.append((len(digits), i + 1))
    number = "".join(digits)
    for n, stop in reversed(ends):
        if 13 <= n <= 19 and luhn_ok(number[:n]):
            return stop
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
_IBAN_CHAR = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def iban_ok(iban: str) -> bool:
    """mod-97 check (ISO 13616) of a compact upper-case IBAN of the right length."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not 2 <= int(iban[2:4]) <= 98:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban(text: str, start: int, end: int) -> int | None:
    want = IBAN_LENGTHS.get(text[start:start + 2])
    if want is None:
        return None
    chars: list[str] = []
    i, n = start, len(text)
    while i < n and len(chars) < want:
        ch = text[i]
        if ch in _IBAN_CHAR:
            chars.append(ch)
        elif not (ch == " " and chars and i + 1 < n and text[i + 1] in _IBAN_CHAR):
            break
        i += 1
    if len(chars) != want or (i < n and text[i].isalnum()):
        return None
    return i if iban_ok("".join(chars)) else None


def _ssn(text: str, start: int, end: int) -> int | None:
    area, group, serial = text[start:start + 3], text[start + 4:start + 6], text[start + 7:end]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return end


def _email(text: str, start: int, end: int) -> int | None:
    # The top-level domain is alphabetic (or punycode); trim a trailing "_suffix" or digits.
    dot = text.rfind(".", start, end)
    tld = text[dot + 1:end]
    if tld[:4].lower() == "xn--" and len(tld) > 4:
        return end
    n = 0
    while n < len(tld) and tld[n].isalpha():
        n += 1
    local = text[start:text.index("@", start)]
    if n < 2 or local.startswith(".") or local.endswith("."):
        return None
    return dot + 1 + n


def _phone(text: str, start: int, end: int) -> int | None:
    count = sum(1 for i in range(start, end) if text[i].isdigit())
    return end if 7 <= count <= 15 else None


def _jwt(text: str, start: int, end: int) -> int | None:
    header = text[start:text.index(".", start)]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return end if isinstance(decoded, dict) else None


def _ip(text: str, start: int, end: int) -> int | None:
    candidate = text[start:end]
    try:
        if ":" in candidate:
            ipaddress.IPv6Address(candidate)
        else:
            ipaddress.IPv4Address(candidate)
    except ValueError:
        return None
    return end


def _accept(text: str, start: int, end: int) -> int | None:
    return end


_VALIDATORS: dict[str, Callable[[str, int, int], int | None]] = {
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


class _Scanner(NamedTuple):
    combined: re.Pattern[str]
    single: dict[str, re.Pattern[str]]  # per-detector pattern, tried after a failed validation
    order: tuple[str, ...]


def _pattern(name: str, joined: bool) -> str:
    return _PEM_JOINED if (joined and name == "private_key") else _PATTERNS[name]


@lru_cache(maxsize=128)
def _scanner(detectors: frozenset[str], joined: bool) -> _Scanner:
    order = tuple(d for d in DETECTORS if d in detectors)
    combined = re.compile("|".join(f"(?P<{d}>{_pattern(d, joined)})" for d in order))
    single = {d: re.compile(_pattern(d, joined)) for d in order}
    return _Scanner(combined, single, order)


def check_detectors(names: Iterable[str]) -> tuple[str, ...]:
    """Validate detector names (raises ValueError naming the bad one and the known ones)."""
    out = []
    for name in names:
        if name not in _PATTERNS:
            raise ValueError(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
        if name not in out:
            out.append(name)
    return tuple(out)


def find(text: str, detectors: Iterable[str] = DETECTORS, *, joined: bool = False) -> list[Hit]:
    """Every validated, non-overlapping hit in `text`, left to right.

    `joined=True` is for a text made of several values separated by NUL: no hit spans a NUL.
    (It is the caller's job to make sure the values themselves contain no NUL.)
    """
    wanted = detectors if isinstance(detectors, frozenset) else frozenset(detectors)
    if not text or not wanted:
        return []
    scanner = _scanner(wanted, joined)
    search = scanner.combined.search
    hits: list[Hit] = []
    pos = 0
    while True:
        m = search(text, pos)
        if m is None:
            return hits
        start = m.start()
        name = m.lastgroup
        assert name is not None
        stop = _VALIDATORS[name](text, start, m.end())
        if stop is None:
            name, stop = _retry(text, start, name, scanner)
        if stop is None or name is None:
            pos = start + 1
            continue
        hits.append(Hit(start, stop, name))
        pos = stop if stop > start else start + 1


def _retry(text: str, start: int, failed: str, scanner: _Scanner) -> tuple[str | None, int | None]:
    for name in scanner.order:
        if name == failed:
            continue
        m = scanner.single[name].match(text, start)
        if m is not None:
            stop = _VALIDATORS[name](text, start, m.end())
            if stop is not None:
                return name, stop
    return None, None


def contains_any(text: str, detectors: Iterable[str] = DETECTORS) -> bool:
    return bool(find(text, detectors))


PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
PEM_LABEL = re.compile(_PEM_LABEL)
