"""Path normalisation (addons/httppath.py): every trick either lands on the path a deny catches
or is refused as ambiguous (SPEC §4)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from addons.httppath import encode_path, normalise_path
from addons.model import BadRequest
from addons.policy import Rule, evaluate, http_operation, path_match

ADMIN_DENY = ["/v1/admin/**"]

# Each of these must normalise to a path under /v1/admin (so the deny catches it) ...
CAUGHT = [
    "/v1/admin/keys",
    "/v1/users/../admin/keys",
    "/v1/users/%2e%2e/admin/keys",
    "/v1/users/%2E%2e/admin/keys",
    "/v1/users/%2e%2E/admin/keys/",
    "/v1/users/.%2e/admin/keys",
    "/v1/./admin/keys",
    "/v1/%2e/admin/keys",
    "//v1//admin//keys",
    "///v1/admin/keys",
    "/v1/admin",
    "/v1/admin/",
    "/V1/ADMIN/keys",
    "/v1/Admin/Keys",
    "/v1/%61dmin/keys",  # %61 = a
    "/v1/%41DMIN/keys",
    "/v1/users/x/../../admin/keys",
    "/v1/admin/keys?x=/../../users",
]

# ... and each of these must be refused outright.
REFUSED = {
    "encoded slash": "/v1/users%2f..%2fadmin/keys",
    "encoded slash upper": "/v1/users%2F..%2Fadmin/keys",
    "encoded backslash": "/v1/users/..%5cadmin/keys",
    "raw backslash": "/v1/users/..\\admin/keys",
    "NUL": "/v1/admin%00/keys",
    "raw NUL": "/v1/admin\x00/keys",
    "CR LF": "/v1/admin%0d%0aX-Injected:%201",
    "tab": "/v1/ad%09min",
    "DEL": "/v1/ad%7fmin",
    "C1 control": "/v1/ad%c2%85min",
    "double encoded dot": "/v1/users/%252e%252e/admin/keys",
    "double encoded slash": "/v1/users%252fadmin",
    "encoded percent": "/v1/100%25",
    "malformed escape": "/v1/%zz/admin",
    "truncated escape": "/v1/admin%2",
    "IIS unicode escape": "/v1/users/%u002e%u002e/admin",
    "overlong dot": "/v1/users/%c0%ae%c0%ae/admin",
    "overlong slash": "/v1/users%c0%af..%c0%afadmin",
    "invalid utf-8": "/v1/%ff/admin",
    "lone surrogate": "/v1/\udcff/admin",
    "truncated utf-8": "/v1/%e2%82",
    "above root": "/../v1/admin",
    "encoded above root": "/%2e%2e/v1/admin",
    "triple dot": "/v1/.../admin",
    "dot space": "/v1/. ./admin",
    "encoded question mark": "/v1/admin%3f/keys",
    "encoded hash": "/v1/admin%23/keys",
    "raw hash": "/v1/users#/../admin",
    "tomcat dot-dot-semicolon": "/v1/users/..;/admin/keys",
    "matrix parameter": "/v1/admin;jsessionid=1/keys",
    "encoded semicolon": "/v1/admin%3bx/keys",
    "fullwidth dots": "/v1/users/%ef%bc%8e%ef%bc%8e/admin",
    "fullwidth slash": "/v1/users%ef%bc%8f..%ef%bc%8fadmin",
    "one dot leader": "/v1/users/%e2%80%a5/admin",
    "zero width space": "/v1/ad%e2%80%8bmin/keys",
    "right-to-left override": "/v1/%e2%80%aenimda/keys",
    "line separator": "/v1/admin%e2%80%a8",
    "relative": "v1/admin",
}


@pytest.mark.parametrize("raw", CAUGHT)
def test_tricks_normalise_onto_the_denied_path(raw: str) -> None:
    path = normalise_path(raw)
    assert path_match(ADMIN_DENY, path), path
    deny = Rule("deny-admin", "deny", "no", {"http": {"paths": ADMIN_DENY}}, None, "t.yaml", 1)
    allow = Rule("allow-all", "allow", "", {}, None, "t.yaml", 2)
    from addons.policy import PolicySet

    decision = evaluate(PolicySet(rules=[allow, deny]), None, [http_operation("t", "GET", path)])
    assert decision.effect == "deny" and decision.rule == "deny-admin"


@pytest.mark.parametrize("raw", list(REFUSED.values()), ids=list(REFUSED))
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest) as exc:
        normalise_path(raw)
    assert exc.value.status == 400 and exc.value.reason


@pytest.mark.parametrize("raw,expected", [
    ("/", "/"),
    ("", "/"),
    ("*", "/"),
    ("/v1/users", "/v1/users"),
    ("/v1/users/", "/v1/users/"),
    ("/v1/users/7?x=1&y=%2f..", "/v1/users/7"),
    ("/a/b/../../c", "/c"),
    ("/a/./b/.", "/a/b"),
    ("/a/..", "/"),
    ("/caf%C3%A9/x", "/café/x"),
    ("/café/x", "/café/x"),
    ("/a%20b", "/a b"),
    ("/files/v1.2.json", "/files/v1.2.json"),
    ("/a/..b/c..", "/a/..b/c.."),
    ("/api/v1/namespaces/a/pods/x:8080/proxy/", "/api/v1/namespaces/a/pods/x:8080/proxy/"),
])
def test_canonical_forms(raw: str, expected: str) -> None:
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("path", ["/a b", "/café/x", "/v1/users/a+b@c:d", "/x/<y>/\"z\"", "/~u/"])
def test_encode_round_trips(path: str) -> None:
    wire = encode_path(path)
    assert all(ord(c) < 128 and c not in ' "<>' for c in wire)
    assert normalise_path(wire) == path


# --- property tests ---------------------------------------------------------------------------

_PIECES = st.sampled_from(
    ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%5c", "%25", "%00", "%c0%ae", "%ef%bc%8e",
     "%41", "a", "B", "z", "-", "~", " ", ";", "?", "#", "\\", "%", "%e2%80%8b", "%C3%A9", "é",
     "%3f", "%zz", "ſ", "\x00", "\udcff"])
_RAW = st.lists(_PIECES, max_size=24).map("".join) | st.text(max_size=40)


def _check_normal(p: str) -> None:
    assert p.startswith("/")
    assert "//" not in p
    segments = p.split("/")
    assert ".." not in segments and "." not in segments
    for bad in ("%", "?", "#", "\\", ";", "\x00"):
        assert bad not in p


@settings(max_examples=600, deadline=None)
@given(_RAW.map(lambda s: "/" + s) | _RAW)
@example("/v1/users/%2e%2e/admin")
@example("/a/b/")
def test_normalise_is_idempotent_and_never_returns_dot_segments(raw: str) -> None:
    try:
        p = normalise_path(raw)
    except BadRequest:
        return
    _check_normal(p)
    assert normalise_path(p) == p
    # what goes upstream, read back, is exactly what was decided on
    assert normalise_path(encode_path(p)) == p


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abcAB.é ", min_size=1, max_size=6), max_size=6),
       st.booleans())
def test_simple_paths_always_normalise(segments: list[str], trailing: bool) -> None:
    raw = "/" + "/".join(encode_path(s) for s in segments) + ("/" if trailing else "")
    try:
        p = normalise_path(raw)
    except BadRequest as e:
        # only dot-like segments or climbing above the root may be refused here
        assert "dot" in e.reason or "root" in e.reason
        return
    _check_normal(p)
    assert normalise_path(p) == p
