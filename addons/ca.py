"""The gateway's certificate authority (mitmproxy's CertStore in state_dir).

Agents trust `state_dir/mitmproxy-ca-cert.pem`; the Postgres listener's certificate is issued by
the same CA so `sslmode=verify-full sslrootcert=...` works against the gateway.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path


def ensure_ca(state_dir: Path):  # noqa: ANN201 - mitmproxy CertStore
    from mitmproxy import certs

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return certs.CertStore.from_store(str(state_dir), "mitmproxy", 2048)


def san_names(*names: str) -> list:  # noqa: ANN201 - x509.GeneralName list
    """Subject alternative names as x509 objects (mitmproxy deprecates plain strings)."""
    import ipaddress

    from cryptography import x509

    out: list = []
    for n in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def issue(state_dir: Path, hostname: str = "localhost"):  # noqa: ANN201 - CertStoreEntry
    """A certificate from the gateway CA for `hostname`, localhost and 127.0.0.1."""
    store = ensure_ca(state_dir)
    return store, store.get_cert(hostname, san_names(hostname, "localhost", "127.0.0.1"))


def issue_server_context(state_dir: Path, hostname: str = "localhost") -> ssl.SSLContext:
    from cryptography.hazmat.primitives import serialization

    store, entry = issue(state_dir, hostname)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as tmp:
        cert = Path(tmp) / "cert.pem"
        key = Path(tmp) / "key.pem"
        cert.write_bytes(entry.cert.to_pem() + store.default_ca.to_pem())
        key.write_bytes(entry.privatekey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key.chmod(0o600)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx
