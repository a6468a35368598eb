"""Identity engine (`addons.identity.Verifier`): every hostile token is refused for its own
reason, keys come from discovery / jwks_uri / jwks_file, rotation is picked up by a refresh that
is rate-limited per issuer, and a slow key fetch never holds up other verifications."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from addons.config import IdentityConfig, IssuerConfig, Secret
from addons.identity import (
    DEV_ISSUER,
    REFRESH_INTERVAL,
    DevIssuer,
    NeedsKeys,
    Verifier,
    parse_duration,
    still_valid,
    token_from_authorization,
    token_from_proxy_authorization,
)
from addons.model import AuthError
from tests.fixtures.authcases import (
    BAD_TOKENS,
    OTHER_KID,
    BadToken,
    Minter,
    b64u,
    basic,
    claims_for,
    hs256_with_public_key,
)
from tests.fixtures.oidc import rsa_jwk


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Fetch:
    """A counting stand-in for the HTTP fetch: url -> document (or a callable, or an error)."""

    def __init__(self, docs: dict[str, Any]) -> None:
        self.docs = docs
        self.calls: list[str] = []

    def __call__(self, url: str) -> Any:
        self.calls.append(url)
        doc = self.docs[url]
        doc = doc() if callable(doc) else doc
        if isinstance(doc, Exception):
            raise doc
        return doc


@pytest.fixture(scope="module")
def trusted() -> Minter:
    return Minter("https://trusted.test")


@pytest.fixture(scope="module")
def attacker() -> Minter:
    return Minter("https://attacker.test", kid=OTHER_KID)


def issuer_cfg(issuer: Minter, **kw: Any) -> IssuerConfig:
    kw.setdefault("jwks_uri", issuer.issuer + "/jwks")
    return IssuerConfig(issuer=issuer.issuer, audience=issuer.AUDIENCE, **kw)


def make_verifier(*cfgs: IssuerConfig, fetch: Callable[[str], Any], clock: Clock | None = None,
                  **kw: Any) -> Verifier:
    return Verifier(IdentityConfig(issuers=cfgs, **kw), fetch=fetch, clock=clock or Clock())


def jwks_fetch(*issuers: Minter) -> Fetch:
    docs: dict[str, Any] = {}
    for i in issuers:
        docs[i.issuer + "/jwks"] = i.jwks
        docs[i.issuer + "/.well-known/openid-configuration"] = {"jwks_uri": i.issuer + "/jwks"}
    return Fetch(docs)


def refused(verifier: Verifier, token: str, **kw: Any) -> str:
    with pytest.raises(AuthError) as exc:
        verifier.verify(token, **kw)
    assert exc.value.status == 401 and exc.value.error == "unauthenticated"
    return exc.value.reason


# --- every hostile token, each its own test --------------------------------------------------


@pytest.mark.parametrize("case", BAD_TOKENS, ids=lambda c: c.name)
def test_bad_token_refused(case: BadToken, trusted: Minter, attacker: Minter) -> None:
    fetch = jwks_fetch(trusted, attacker)
    verifier = make_verifier(issuer_cfg(trusted), fetch=fetch)
    verifier.verify(trusted.token())  # keys are loaded: refusals below are not fetch failures
    reason = refused(verifier, case.make(trusted, attacker))
    assert case.reason in reason
    # Nothing in a token makes the verifier fetch keys from anywhere but the configured issuer.
    assert not [u for u in fetch.calls if u.startswith(attacker.issuer)]


def test_valid_token_gives_identity(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted), fetch=jwks_fetch(trusted))
    token = trusted.token(sub="agent-7", groups=["agents", "readers"], ttl=120)
    ident = verifier.verify(token)
    assert (ident.sub, ident.iss, ident.groups) == ("agent-7", trusted.issuer,
                                                    ("agents", "readers"))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert ident.exp == exp + 30  # default leeway


def test_embedded_jwk_header_is_ignored(trusted: Minter, attacker: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted), fetch=jwks_fetch(trusted))
    token = trusted.token(key=attacker.key, headers={"jwk": rsa_jwk(attacker.key, trusted.kid),
                                                     "x5u": attacker.issuer + "/cert.pem"})
    assert refused(verifier, token) == "bad signature"


def test_tampered_payload_refused(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted), fetch=jwks_fetch(trusted))
    head, _, rest = trusted.token(groups=["agents"]).partition(".")
    _, _, sig = rest.partition(".")
    import json

    forged = b64u(json.dumps(claims_for(trusted, groups=["admins"])).encode())
    assert refused(verifier, f"{head}.{forged}.{sig}") == "bad signature"


def test_algorithm_allow_list(trusted: Minter) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = jwt.PyJWK.from_dict(
        {**jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True),
         "kid": "ec-1"})
    docs = {trusted.issuer + "/jwks": {"keys": [rsa_jwk(trusted.key, trusted.kid),
                                                {**ec_jwk._jwk_data, "kid": "ec-1"}]}}
    token = trusted.token(key=ec_key, alg="ES256", headers={"kid": "ec-1"})
    only_rs = make_verifier(issuer_cfg(trusted, algorithms=("RS256",)), fetch=Fetch(docs))
    assert "algorithm ES256 not allowed" in refused(only_rs, token)
    both = make_verifier(issuer_cfg(trusted, algorithms=("RS256", "ES256")), fetch=Fetch(docs))
    assert both.verify(token).sub == "agent-1"


def test_hs256_only_with_configured_secret(trusted: Minter) -> None:
    secret = "a-shared-secret-of-32-bytes-long!"
    cfg = issuer_cfg(trusted, algorithms=("HS256",), secret=Secret(secret, "$HS_SECRET"))
    verifier = make_verifier(cfg, fetch=Fetch({}))
    good = jwt.encode(claims_for(trusted), secret, algorithm="HS256")
    assert verifier.verify(good).sub == "agent-1"
    # Even where HS256 is allowed, the issuer's public key is never an HMAC secret.
    assert refused(verifier, hs256_with_public_key(trusted)) == "bad signature"
    assert "algorithm RS256 not allowed" in refused(verifier, trusted.token())


def test_iat_in_future_refused(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted, leeway_seconds=0), fetch=jwks_fetch(trusted))
    assert "not yet valid" in refused(verifier, trusted.token(iat=int(time.time()) + 600))


def test_missing_sub_refused(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted), fetch=jwks_fetch(trusted))
    assert refused(verifier, trusted.token(sub=None)) == "token has no sub claim"


def test_leeway(trusted: Minter) -> None:
    now = int(time.time())
    token = trusted.token(iat=now - 100, nbf=now - 100, exp=now - 10)
    lenient = make_verifier(issuer_cfg(trusted, leeway_seconds=30), fetch=jwks_fetch(trusted))
    assert lenient.verify(token).exp == now - 10 + 30
    strict = make_verifier(issuer_cfg(trusted, leeway_seconds=0), fetch=jwks_fetch(trusted))
    assert refused(strict, token) == "token expired"


def test_continuous_verification_rechecks_expiry(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted, leeway_seconds=0), fetch=jwks_fetch(trusted))
    token = trusted.token(ttl=60)
    ident = verifier.verify(token)
    assert still_valid(ident, now=time.time())
    assert not still_valid(ident, now=time.time() + 61)
    assert refused(verifier, token, now=time.time() + 61) == "token expired"


def test_groups_claim(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted, groups_claim="roles"), fetch=jwks_fetch(trusted))
    assert verifier.verify(trusted.token(roles=["dba", "oncall"])).groups == ("dba", "oncall")
    assert verifier.verify(trusted.token(roles="dba")).groups == ("dba",)
    assert verifier.verify(trusted.token(groups=["agents"])).groups == ()


def test_max_token_bytes_is_configurable(trusted: Minter) -> None:
    verifier = make_verifier(issuer_cfg(trusted), fetch=jwks_fetch(trusted), max_token_bytes=600)
    assert verifier.verify(trusted.token()).sub == "agent-1"
    assert refused(verifier, trusted.token(pad="x" * 600)) == "token too large"


# --- where keys come from ----------------------------------------------------------------------


def test_keys_from_oidc_discovery(trusted: Minter) -> None:
    elsewhere = "http://127.0.0.1:9/keys/elsewhere.json"
    fetch = Fetch({trusted.issuer + "/.well-known/openid-configuration": {"jwks_uri": elsewhere},
                   elsewhere: trusted.jwks})
    verifier = make_verifier(issuer_cfg(trusted, jwks_uri=None), fetch=fetch)
    assert verifier.verify(trusted.token()).sub == "agent-1"
    assert fetch.calls == [trusted.issuer + "/.well-known/openid-configuration", elsewhere]


def test_discovery_without_jwks_uri_refuses(trusted: Minter) -> None:
    fetch = Fetch({trusted.issuer + "/.well-known/openid-configuration": {"issuer": "x"}})
    verifier = make_verifier(issuer_cfg(trusted, jwks_uri=None), fetch=fetch)
    assert "cannot fetch signing keys" in refused(verifier, trusted.token())


def test_keys_from_jwks_uri_skip_discovery(trusted: Minter) -> None:
    fetch = jwks_fetch(trusted)
    verifier = make_verifier(issuer_cfg(trusted), fetch=fetch)
    verifier.verify(trusted.token())
    verifier.verify(trusted.token(sub="again"))
    assert fetch.calls == [trusted.issuer + "/jwks"]


def test_keys_from_jwks_file_never_fetch(trusted: Minter, tmp_path: Path) -> None:
    import json

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(trusted.jwks()))
    fetch = Fetch({})
    verifier = make_verifier(issuer_cfg(trusted, jwks_uri=None, jwks_file=path), fetch=fetch)
    assert verifier.verify(trusted.token()).sub == "agent-1"
    other = Minter()
    assert refused(verifier, trusted.token(key=other.key, headers={"kid": "new"})) == (
        "unknown signing key")
    assert fetch.calls == []


def test_rotation_is_picked_up_by_refresh_and_rate_limited() -> None:
    issuer = Minter()
    clock = Clock(1000.0)
    fetch = jwks_fetch(issuer)
    verifier = make_verifier(issuer_cfg(issuer), fetch=fetch, clock=clock)
    old = issuer.token()
    assert verifier.verify(old).sub == "agent-1"
    assert len(fetch.calls) == 1
    # The issuer rotates: a new kid replaces the old key.
    from cryptography.hazmat.primitives.asymmetric import rsa

    issuer.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.kid = "test-key-2"
    new = issuer.token()
    clock.t += 10  # a refresh happened 10 s ago: not yet
    assert refused(verifier, new) == "unknown signing key"
    assert len(fetch.calls) == 1
    clock.t += REFRESH_INTERVAL - 10  # exactly 30 s after the last fetch
    assert verifier.verify(new).sub == "agent-1"
    assert len(fetch.calls) == 2
    # The retired key is gone with the refresh.
    assert refused(verifier, old) == "unknown signing key"
    assert len(fetch.calls) == 2


def test_unknown_kid_refresh_at_most_every_30s(trusted: Minter,
                                               attacker: Minter) -> None:
    clock = Clock(5000.0)
    fetch = jwks_fetch(trusted)
    verifier = make_verifier(issuer_cfg(trusted), fetch=fetch, clock=clock)
    verifier.verify(trusted.token())
    unknown = trusted.token(key=attacker.key, headers={"kid": "never-published"})
    for _ in range(29):
        clock.t += 1
        assert refused(verifier, unknown) == "unknown signing key"
    assert len(fetch.calls) == 1
    clock.t += 1
    assert refused(verifier, unknown) == "unknown signing key"
    assert len(fetch.calls) == 2
    for _ in range(50):
        refused(verifier, unknown)
    assert len(fetch.calls) == 2


def test_rate_limit_is_per_issuer(trusted: Minter) -> None:
    second = Minter("https://second.test")
    clock = Clock()
    fetch = jwks_fetch(trusted, second)
    verifier = make_verifier(issuer_cfg(trusted), issuer_cfg(second), fetch=fetch,
                             clock=clock)
    verifier.verify(trusted.token())
    verifier.verify(second.token())
    assert fetch.calls == [trusted.issuer + "/jwks", second.issuer + "/jwks"]


def test_fetch_failure_refuses_and_is_rate_limited(trusted: Minter) -> None:
    clock = Clock()
    state = {"up": False}
    fetch = Fetch({trusted.issuer + "/jwks":
                   lambda: trusted.jwks() if state["up"] else OSError("connection refused")})
    verifier = make_verifier(issuer_cfg(trusted), fetch=fetch, clock=clock)
    token = trusted.token()
    assert "cannot fetch signing keys of issuer: OSError" == refused(verifier, token)
    clock.t += 5
    state["up"] = True
    assert refused(verifier, token) == "unknown signing key"  # no hammering a failing issuer
    assert len(fetch.calls) == 1
    clock.t += REFRESH_INTERVAL
    assert verifier.verify(token).sub == "agent-1"
    assert len(fetch.calls) == 2


def test_event_loop_path_never_fetches(trusted: Minter) -> None:
    fetch = jwks_fetch(trusted)
    verifier = make_verifier(issuer_cfg(trusted), fetch=fetch)
    with pytest.raises(NeedsKeys):
        verifier.verify(trusted.token(), allow_fetch=False)
    assert fetch.calls == []
    verifier.verify(trusted.token())  # the worker-thread path
    assert verifier.verify(trusted.token(), allow_fetch=False).sub == "agent-1"
    assert len(fetch.calls) == 1


def test_slow_fetch_blocks_neither_other_issuers_nor_waiting_tokens(trusted: Minter) -> None:
    slow = Minter("https://slow.test")
    release = threading.Event()
    entered = threading.Event()

    def slow_jwks() -> Any:
        entered.set()
        release.wait(10)
        return slow.jwks()

    fetch = Fetch({trusted.issuer + "/jwks": trusted.jwks, slow.issuer + "/jwks": slow_jwks})
    verifier = make_verifier(issuer_cfg(trusted), issuer_cfg(slow), fetch=fetch)
    verifier.verify(trusted.token())  # trusted keys cached
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = verifier.verify(slow.token(sub="first"))

    t1 = threading.Thread(target=first)
    t1.start()
    assert entered.wait(5)
    # While the slow issuer's fetch hangs, other issuers verify at once on the loop path.
    started = time.monotonic()
    for _ in range(20):
        assert verifier.verify(trusted.token(), allow_fetch=False).sub == "agent-1"
    assert time.monotonic() - started < 1.0
    # A second token of the slow issuer is sent off the loop (NeedsKeys), not refused...
    with pytest.raises(NeedsKeys):
        verifier.verify(slow.token(sub="second"), allow_fetch=False)

    def second() -> None:
        try:
            results["second"] = verifier.verify(slow.token(sub="second"))
        except AuthError as e:
            results["second"] = e

    t2 = threading.Thread(target=second)
    t2.start()
    time.sleep(0.1)
    release.set()
    t1.join(5)
    t2.join(5)
    # ...and waits for the fetch in flight instead of being refused for "unknown key".
    assert results["first"].sub == "first"
    assert getattr(results["second"], "sub", results["second"]) == "second"
    assert fetch.calls.count(slow.issuer + "/jwks") == 1


# --- token sources ----------------------------------------------------------------------------


def test_token_from_proxy_authorization() -> None:
    assert token_from_proxy_authorization("Bearer abc.def.ghi") == "abc.def.ghi"
    assert token_from_proxy_authorization("bearer   abc.def.ghi ") == "abc.def.ghi"
    assert token_from_proxy_authorization(basic("agent", "abc.def.ghi")) == "abc.def.ghi"
    assert token_from_proxy_authorization(basic("", "abc.def.ghi")) == "abc.def.ghi"
    assert token_from_proxy_authorization(None) is None
    assert token_from_proxy_authorization("") is None
    # present but unusable -> "" so that it is refused, never silently ignored
    assert token_from_proxy_authorization("Basic %%%not-base64") == ""
    assert token_from_proxy_authorization("Digest username=x") == ""


def test_token_from_authorization() -> None:
    assert token_from_authorization("Bearer abc.def.ghi") == "abc.def.ghi"
    assert token_from_authorization(basic("agent", "abc.def.ghi")) is None
    assert token_from_authorization(None) is None
    assert token_from_authorization("Bearer ") is None


# --- development issuer -----------------------------------------------------------------------


def test_dev_issuer_tokens_trusted_only_when_enabled(tmp_path: Path) -> None:
    dev = DevIssuer(tmp_path)
    token = dev.token("x", ["a", "b"], ttl_seconds=900)
    on = Verifier(IdentityConfig(dev_issuer=True), dev_jwks=dev.jwks(), fetch=Fetch({}))
    ident = on.verify(token)
    assert (ident.sub, ident.iss, ident.groups) == ("x", DEV_ISSUER, ("a", "b"))
    # The key persists under state_dir: a second instance signs with the same key.
    assert on.verify(DevIssuer(tmp_path).token("y")).sub == "y"
    assert (tmp_path / "dev-issuer" / "signing-key.pem").stat().st_mode & 0o077 == 0
    other = Minter()
    off = Verifier(IdentityConfig(issuers=(issuer_cfg(other),)), fetch=jwks_fetch(other))
    assert refused(off, token) == "untrusted issuer"
    with pytest.raises(ValueError):
        Verifier(IdentityConfig(dev_issuer=True), dev_jwks=None)


def test_parse_duration() -> None:
    assert parse_duration("15m") == 900
    assert parse_duration("30s") == 30
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    assert parse_duration("45") == 45
    for bad in ("", "m", "-5m", "0", "ten minutes"):
        with pytest.raises(ValueError):
            parse_duration(bad)
