"""Identity: verify agent JWTs against configured issuers (SPEC §3).

Engine: `Verifier.verify(token)` is synchronous and pure apart from fetching JWKS documents over
HTTP when a key id is unknown (at most once per 30 s per issuer). Adapters call it with
`allow_fetch=False` on the event loop first and fall back to a worker thread only on
`NeedsKeys`, so a slow issuer never blocks other traffic.

The mitmproxy adapter (`IdentityAddon`) takes the token from Proxy-Authorization (Bearer, or
Basic with the JWT as password) at CONNECT / absolute-form requests, remembers it per client
connection, and re-verifies it on every request in the tunnel (continuous verification).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from addons.config import IdentityConfig, IssuerConfig
from addons.model import AuthError, Identity

REFRESH_INTERVAL = 30.0
DEV_ISSUER = "urn:portcullis:dev-issuer"
DEV_AUDIENCE = "portcullis"
DEV_KID = "portcullis-dev-1"


class NeedsKeys(Exception):
    """Verification needs a JWKS fetch; retry with allow_fetch=True off the event loop."""


def _http_get_json(url: str, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - configured URL
        body = resp.read(1024 * 1024 + 1)
    if len(body) > 1024 * 1024:
        raise ValueError("JWKS document too large")
    return json.loads(body)


class KeySet:
    """The keys of one issuer, refreshed on unknown kid at most every REFRESH_INTERVAL."""

    def __init__(self, cfg: IssuerConfig, fetch: Callable[[str], Any], clock: Callable[[], float]):
        self.cfg = cfg
        self.fetch = fetch
        self.clock = clock
        self.keys: dict[str | None, list[jwt.PyJWK]] = {}
        self.loaded_at: float | None = None
        self.last_attempt = -1e18
        self.lock = threading.Lock()
        if cfg.jwks is not None:
            self._install(cfg.jwks)
        elif cfg.jwks_file is not None:
            self._install(json.loads(Path(cfg.jwks_file).read_text()))

    @property
    def static(self) -> bool:
        return self.cfg.jwks is not None or self.cfg.jwks_file is not None

    def _install(self, doc: Any) -> None:
        keys: dict[str | None, list[jwt.PyJWK]] = {}
        for raw in (doc or {}).get("keys", []):
            try:
                key = jwt.PyJWK(raw)
            except Exception:  # noqa: BLE001 - skip keys we cannot use (unknown kty, bad data)
                continue
            keys.setdefault(raw.get("kid"), []).append(key)
        self.keys = keys
        self.loaded_at = self.clock()

    def _jwks_uri(self) -> str:
        if self.cfg.jwks_uri:
            return self.cfg.jwks_uri
        disc = self.fetch(self.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if not isinstance(disc, dict) or not isinstance(disc.get("jwks_uri"), str):
            raise ValueError("OIDC discovery document has no jwks_uri")
        return disc["jwks_uri"]

    def refresh(self) -> None:
        with self.lock:
            now = self.clock()
            if now - self.last_attempt < REFRESH_INTERVAL:
                return
            self.last_attempt = now
            self._install(self.fetch(self._jwks_uri()))

    def candidates(self, kid: str | None, allow_fetch: bool) -> list[jwt.PyJWK]:
        found = self._lookup(kid)
        if found or self.static:
            return found
        due = self.clock() - self.last_attempt >= REFRESH_INTERVAL
        if not due:
            # A refresh in flight may bring this very key (the first fetch after start-up):
            # wait for it off the event loop instead of refusing the token.
            if self.lock.locked():
                if not allow_fetch:
                    raise NeedsKeys(self.cfg.issuer)
                with self.lock:
                    pass
            return self._lookup(kid)
        if not allow_fetch:
            raise NeedsKeys(self.cfg.issuer)
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001 - any fetch problem = cannot verify = refuse
            raise AuthError(f"cannot fetch signing keys of issuer: {type(e).__name__}") from e
        return self._lookup(kid)

    def _lookup(self, kid: str | None) -> list[jwt.PyJWK]:
        if kid is not None:
            return list(self.keys.get(kid, []))
        return [k for ks in self.keys.values() for k in ks]


class Verifier:
    """Verifies tokens for a set of issuers. Holds only key caches; no global state."""

    def __init__(self, config: IdentityConfig, dev_jwks: dict[str, Any] | None = None,
                 fetch: Callable[[str], Any] = _http_get_json,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = config.max_token_bytes
        self.clock = clock
        issuers = list(config.issuers)
        if config.dev_issuer:
            if dev_jwks is None:
                raise ValueError("dev_issuer is on but no dev key set was given")
            issuers.append(IssuerConfig(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, jwks=dev_jwks,
                                        algorithms=("RS256",)))
        self.issuers = {c.issuer: c for c in issuers}
        self.keysets = {c.issuer: KeySet(c, fetch, clock) for c in issuers}

    def verify(self, token: str, allow_fetch: bool = True, now: float | None = None) -> Identity:
        if not token:
            raise AuthError("no token")
        if len(token) > self.max_bytes:
            raise AuthError("token too large")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthError("unsigned tokens are not accepted")
        iss = claims.get("iss")
        cfg = self.issuers.get(iss) if isinstance(iss, str) else None
        if cfg is None:
            raise AuthError("untrusted issuer")
        if alg not in cfg.algorithms:
            raise AuthError(f"algorithm {alg} not allowed for this issuer")
        # jku / x5u / jwk / x5c headers are never used to find keys.
        if alg.startswith("HS"):
            if cfg.secret is None:
                raise AuthError(f"algorithm {alg} not allowed for this issuer")
            keys: list[Any] = [cfg.secret.reveal().encode()]
        else:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise AuthError("malformed token")
            keys = [k.key for k in self.keysets[cfg.issuer].candidates(kid, allow_fetch)
                    if k.algorithm_name in (None, alg) or _key_fits(k, alg)]
            if not keys:
                raise AuthError("unknown signing key")
        return self._decode(token, alg, cfg, keys, now)

    def _decode(self, token: str, alg: str, cfg: IssuerConfig, keys: list[Any],
                now: float | None) -> Identity:
        last: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token, key=key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                    leeway=cfg.leeway_seconds,
                    options={"require": ["exp", "iss", "sub"], "verify_iat": True},
                )
                break
            except jwt.InvalidSignatureError as e:
                last = e
                continue
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("token not yet valid") from None
            except jwt.InvalidAudienceError:
                raise AuthError("token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise AuthError("untrusted issuer") from None
            except jwt.MissingRequiredClaimError as e:
                raise AuthError(f"token has no {e.claim} claim") from None
            except jwt.PyJWTError as e:
                raise AuthError(f"invalid token: {type(e).__name__}") from None
        else:
            raise AuthError("bad signature") from last
        if now is not None and claims["exp"] + cfg.leeway_seconds < now:
            raise AuthError("token expired")
        groups = claims.get(cfg.groups_claim) or []
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list):
            groups = []
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("token has no sub claim")
        return Identity(sub=sub, iss=cfg.issuer, groups=tuple(str(g) for g in groups),
                        exp=float(claims["exp"]) + cfg.leeway_seconds)


def _key_fits(key: jwt.PyJWK, alg: str) -> bool:
    kty = key.key_type
    return (alg.startswith(("RS", "PS")) and kty == "RSA") or (
        alg.startswith("ES") and kty == "EC") or (alg == "EdDSA" and kty == "OKP")


def still_valid(identity: Identity, now: float | None = None) -> bool:
    """Continuous verification: is the token behind this identity still unexpired?"""
    return identity.exp is None or identity.exp > (time.time() if now is None else now)


# ---------------------------------------------------------------------------------------------
# Token extraction (plain header values in, token out)


def token_from_proxy_authorization(value: str | None) -> str | None:
    """Bearer JWT, or Basic whose password is the JWT (HTTPS_PROXY=http://agent:JWT@host)."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    rest = rest.strip()
    if scheme == "bearer":
        return rest or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return ""  # present but garbage -> refused as malformed
        _, _, password = decoded.partition(":")
        return password
    return ""


def token_from_authorization(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return rest.strip() or None


# ---------------------------------------------------------------------------------------------
# Development issuer


def _b64u(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class DevIssuer:
    """An embedded issuer for demos and tests; trusted only with identity.dev_issuer: true."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "dev-issuer"
        self.key_path = self.dir / "signing-key.pem"

    def _private_key(self) -> rsa.RSAPrivateKey:
        if not self.key_path.exists():
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            tmp = self.key_path.with_suffix(".tmp")
            tmp.write_bytes(pem)
            tmp.chmod(0o600)
            tmp.replace(self.key_path)
        loaded = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        return loaded

    def jwks(self) -> dict[str, Any]:
        pub = self._private_key().public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "kid": DEV_KID, "use": "sig", "alg": "RS256",
                          "n": _b64u(pub.n), "e": _b64u(pub.e)}]}

    def token(self, sub: str, groups: list[str] | None = None, ttl_seconds: int = 900,
              audience: str = DEV_AUDIENCE, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = {"iss": DEV_ISSUER, "sub": sub, "aud": audience, "iat": int(now),
                  "nbf": int(now), "exp": int(now + ttl_seconds), "groups": groups or []}
        return jwt.encode(claims, self._private_key(), algorithm="RS256",
                          headers={"kid": DEV_KID})


def parse_duration(text: str) -> int:
    """'15m' -> 900; accepts s, m, h, d suffixes or plain seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            value = int(text[:-1]) * units[text[-1]]
        else:
            value = int(text)
    except ValueError:
        raise ValueError(f"bad duration {text!r} (use e.g. 30s, 15m, 2h)") from None
    if value <= 0:
        raise ValueError("duration must be positive")
    return value


# ---------------------------------------------------------------------------------------------
# mitmproxy adapter


class IdentityAddon:
    """Verifies the agent's token on CONNECT and on every request (continuous verification)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        # client connection id -> token presented at CONNECT (kept in memory only, never logged)
        self.conn_tokens: dict[str, str | None] = {}

    async def _verify(self, token: str) -> Identity:
        try:
            return self.verifier.verify(token, allow_fetch=False)
        except NeedsKeys:
            import asyncio

            return await asyncio.to_thread(self.verifier.verify, token)

    async def http_connect(self, flow) -> None:  # noqa: ANN001
        from addons import flows

        flows.request_id(flow)
        with flows.guard(flow, proxy=True):
            token = token_from_proxy_authorization(flow.request.headers.get("Proxy-Authorization"))
            flow.request.headers.pop("Proxy-Authorization", None)
            self.conn_tokens[flow.client_conn.id] = None
            if flow.response is not None:
                return  # already refused (unknown target): no key fetch for a dead tunnel
            if token is None:
                return  # the token may still come inside the tunnel (Authorization: Bearer)
            flow.metadata[flows.IDENTITY] = await self._verify(token)
            self.conn_tokens[flow.client_conn.id] = token

    async def request(self, flow) -> None:  # noqa: ANN001
        from addons import flows

        flows.request_id(flow)
        # A forward-proxy request on a connection that never sent CONNECT is absolute-form: it
        # is refused with 407. (mitmproxy has already rewritten it to origin-form for HTTP/1
        # by the time hooks run, so the request line cannot tell.)
        absolute_form = (not flows.is_reverse(flow)
                         and flow.client_conn.id not in self.conn_tokens)
        with flows.guard(flow, proxy=absolute_form):
            if flow.response is not None:
                return
            token = None
            if not flows.is_reverse(flow):
                token = token_from_proxy_authorization(
                    flow.request.headers.get("Proxy-Authorization"))
                if token is None:
                    token = self.conn_tokens.get(flow.client_conn.id)
            if token is None:
                token = token_from_authorization(flow.request.headers.get("Authorization"))
            if token is None:
                raise AuthError("no token: send Proxy-Authorization or Authorization: Bearer")
            flow.metadata[flows.IDENTITY] = await self._verify(token)

    def websocket_message(self, flow) -> None:  # noqa: ANN001
        """Continuous verification for long-lived streams (exec sessions): when the token behind
        an open WebSocket expires, the session ends."""
        from addons import flows

        identity = flow.metadata.get(flows.IDENTITY)
        if identity is None or not still_valid(identity):
            flows.log.info("ending WebSocket %s: token expired", flows.request_id(flow))
            if flow.killable:
                flow.kill()

    def client_disconnected(self, client) -> None:  # noqa: ANN001
        self.conn_tokens.pop(client.id, None)
