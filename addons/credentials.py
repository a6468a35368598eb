"""Upstream credentials: strip what the agent sent, inject the target's own (SPEC §3).

The agent's token and any Authorization / Proxy-Authorization / Impersonate-* header never go
upstream; the target's bearer / basic / header credential is injected instead. Upstream TLS is
set per target (`tls.verify`, `tls.ca_file`), and the upstream SNI is always the target host, so an
agent cannot pick another virtual host behind the same address.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from addons.config import Credentials

STRIP_PREFIXES = ("impersonate-",)
STRIP_HEADERS = ("authorization", "proxy-authorization")


REDACTED = "[REDACTED:credential]"


def redact_secrets(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED)
    return text


def headers_to_strip(names: list[str], keep_impersonate: bool = False) -> list[str]:
    return [n for n in names if n.lower() in STRIP_HEADERS or (
        not keep_impersonate and n.lower().startswith(STRIP_PREFIXES))]


def injected_headers(creds: Credentials) -> dict[str, str]:
    if creds.type == "bearer" and creds.token:
        return {"Authorization": f"Bearer {creds.token.reveal()}"}
    if creds.type == "basic" and creds.password:
        raw = f"{creds.username}:{creds.password.reveal()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    if creds.type == "header" and creds.value and creds.header:
        return {creds.header: creds.value.reveal()}
    return {}


class CredentialsAddon:
    def __init__(self, targets: Any) -> None:
        self.targets = targets  # TargetIndex

    def request(self, flow) -> None:  # noqa: ANN001
        from addons import flows

        with flows.guard(flow):
            if flow.response is not None:
                return
            target = flow.metadata[flows.TARGET]
            ops = flow.metadata.get(flows.OPERATIONS) or []
            # Impersonation reaches the upstream only when a rule allowed it explicitly (the
            # policy engine denies it otherwise, so an allowed decision here means explicit).
            keep = any(op.kubernetes and op.kubernetes.get("impersonate") for op in ops)
            for name in headers_to_strip(list(flow.request.headers.keys()), keep):
                flow.request.headers.pop(name, None)
            for name, value in injected_headers(target.credentials).items():
                flow.request.headers[name] = value

    def response(self, flow) -> None:  # noqa: ANN001
        """An upstream that reflects the injected credential (debug echo, error text) must not
        hand it to the agent: exact occurrences are redacted from headers and body."""
        from addons import flows

        with flows.guard(flow):
            target = flow.metadata.get(flows.TARGET)
            if target is None or flow.response is None or flow.metadata.get(flows.REFUSED):
                return
            secrets = [s for s in target.credentials.secrets() if len(s) >= 4]
            if not secrets:
                return
            for name, value in list(flow.response.headers.items()):
                if any(s in value for s in secrets):
                    flow.response.headers[name] = redact_secrets(value, secrets)
            if flow.response.stream:
                return
            body = flow.response.get_content(strict=False) or b""
            if any(s.encode() in body for s in secrets):
                text = body
                for s in secrets:
                    text = text.replace(s.encode(), REDACTED.encode())
                flow.response.set_content(text)

    def tls_start_server(self, tls_start) -> None:  # noqa: ANN001
        """Replace mitmproxy's global upstream TLS settings by the target's own."""
        from mitmproxy.addons.tlsconfig import DEFAULT_HOSTFLAGS
        from mitmproxy.net import tls as net_tls
        from OpenSSL import SSL

        try:
            self._start(tls_start, DEFAULT_HOSTFLAGS, net_tls, SSL)
        except Exception:  # noqa: BLE001 - fail closed: no upstream TLS without our settings
            import logging

            logging.getLogger("portcullis").exception("upstream TLS setup failed")
            tls_start.ssl_conn = None

    def _start(self, tls_start, DEFAULT_HOSTFLAGS, net_tls, SSL) -> None:  # noqa: ANN001, N803
        server = tls_start.conn
        host, port = server.address
        target = self.targets.by_server_address(host, port)
        if target is None:
            raise RuntimeError(f"no target for upstream {host}:{port}")
        verify = net_tls.Verify.VERIFY_PEER if target.tls.verify else net_tls.Verify.VERIFY_NONE
        ctx = net_tls.create_proxy_server_context(
            method=net_tls.Method.TLS_CLIENT_METHOD,
            min_version=net_tls.Version.TLS1_2,
            max_version=net_tls.Version.UNBOUNDED,
            cipher_list=None,
            ecdh_curve=None,
            verify=verify,
            ca_path=None,
            ca_pemfile=str(target.tls.ca_file) if target.tls.ca_file else None,
            client_cert=None,
            legacy_server_connect=False,
        )
        conn = SSL.Connection(ctx)
        sni = host
        server.sni = sni
        if server.alpn_offers:
            conn.set_alpn_protos(list(server.alpn_offers))
        if target.tls.verify:
            param = SSL._lib.SSL_get0_param(conn._ssl)
            SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, DEFAULT_HOSTFLAGS)
            try:
                ip = ipaddress.ip_address(sni).packed
            except ValueError:
                name = sni.encode("idna")
                conn.set_tlsext_host_name(name)
                ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
            else:
                ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))
            if ok != 1:
                raise RuntimeError("cannot enable upstream hostname verification")
        else:
            try:
                ipaddress.ip_address(sni)
            except ValueError:
                conn.set_tlsext_host_name(sni.encode("idna"))
        conn.set_connect_state()
        tls_start.ssl_conn = conn
