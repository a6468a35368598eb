"""`./mitm.sh demo`: the gateway with `gateway.yaml` plus built-in sample upstreams, and the
copy-paste commands an agent would run to see allow, deny, masking, review and audit."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from addons.config import GatewayConfig, TargetConfig


def prepare_state(config_path: Path) -> Path:
    """Create what gateway.yaml's demo targets refer to: the upstream CA file and certs."""
    from addons.ca import issue

    raw = yaml.safe_load(config_path.read_text()) or {}
    state_dir = Path(raw.get("state_dir", ".portcullis"))
    if not state_dir.is_absolute():
        state_dir = config_path.resolve().parent / state_dir
    demo_dir = state_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store, entry = issue(state_dir, "localhost")
    (demo_dir / "upstream-cert.pem").write_bytes(entry.cert.to_pem())
    key_path = demo_dir / "upstream-key.pem"
    key_path.write_bytes(entry.privatekey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    (demo_dir / "upstream-ca.pem").write_bytes(store.default_ca.to_pem())
    from demo.pg_cluster import PASSWORDS

    (demo_dir / "pg.password").write_text(PASSWORDS["gw_scram"] or "")
    (demo_dir / "pg.password").chmod(0o600)
    for name in ("sample-api.token", "k8s.token"):
        token_file = demo_dir / name
        if not token_file.exists():
            token_file.write_text(secrets.token_urlsafe(24))
            token_file.chmod(0o600)
    return demo_dir


def write_kubeconfig(config: GatewayConfig, k8s: TargetConfig) -> Path:
    """A kubeconfig for the reverse listener; the agent passes its JWT with --token."""
    assert k8s.listen is not None
    host, port = k8s.listen
    path = config.state_dir / "demo" / "kubeconfig"
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "demo",
        "clusters": [{"name": "demo", "cluster": {
            "server": f"https://{host}:{port}",
            "certificate-authority": str(config.state_dir / "mitmproxy-ca-cert.pem")}}],
        "users": [{"name": "agent", "user": {}}],
        "contexts": [{"name": "demo", "context": {"cluster": "demo", "user": "agent",
                                                  "namespace": "team-a"}}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _target(config: GatewayConfig, protocol: str) -> TargetConfig | None:
    return next((t for t in config.targets if t.protocol == protocol), None)


def start_upstreams(config: GatewayConfig, demo_dir: Path) -> list[Any]:
    from demo.sample_api import SampleAPI

    started: list[Any] = []
    api = _target(config, "http")
    if api is not None and api.hosts:
        host, port = api.hosts[0]
        token = api.credentials.token
        if token is None:
            raise ValueError(f"demo: target {api.name!r} needs bearer credentials "
                             "(the sample API checks its token)")
        started.append(SampleAPI("127.0.0.1", port or 443, str(demo_dir / "upstream-cert.pem"),
                                 str(demo_dir / "upstream-key.pem"), token.reveal()).start())
    k8s = _target(config, "kubernetes")
    if k8s is not None and k8s.hosts:
        from demo.k8s_api import FakeKubeAPI

        started.append(FakeKubeAPI(
            port=k8s.hosts[0][1] or 443, directory=demo_dir / "k8s",
            token=k8s.credentials.token.reveal() if k8s.credentials.token else None,
            tls_files=(demo_dir / "upstream-cert.pem", demo_dir / "upstream-key.pem",
                       demo_dir / "upstream-ca.pem")).start())
    pg = _target(config, "postgres")
    if pg is not None:
        from demo import pg_cluster

        if pg_cluster.available():
            cluster = pg_cluster.PgCluster(port=pg.upstream.port).start()
            started.append(cluster)
            cluster.create_database(pg.upstream.dbname)
        else:
            print("portcullis demo: no PostgreSQL server binaries (initdb/pg_ctl); the "
                  "Postgres part of the demo is skipped", flush=True)
    return started


def commands(config: GatewayConfig) -> str:
    ca = config.state_dir / "mitmproxy-ca-cert.pem"
    cfg = f" --config {config.path}" if config.path.name != "gateway.yaml" or \
        config.path.resolve().parent != Path.cwd() else ""
    lines = ["", "=== Portcullis demo: copy-paste these in another terminal ===", ""]
    lines += [f"export TOKEN=$(./mitm.sh token{cfg} --sub agent-7 --groups agents)"]
    if config.listen_proxy:
        host, port = config.listen_proxy
        lines += [f"export HTTPS_PROXY=http://agent:$TOKEN@{host}:{port}",
                  f"export SSL_CERT_FILE={ca} CURL_CA_BUNDLE={ca} REQUESTS_CA_BUNDLE={ca}"]
    api = _target(config, "http")
    if api is not None and api.hosts:
        h, p = api.hosts[0]
        base = f"https://{h}:{p}" if p else f"https://{h}"
        lines += ["",
                  "# allowed: the gateway injects the API's token; sensitive fields are masked",
                  f"curl -s {base}/v1/users",
                  "# denied by rule sample-api-admin-deny (dot segments do not help)",
                  f"curl -s --path-as-is {base}/v1/users/../admin/keys",
                  "# review: deleting a user waits for a human approval (in the background)",
                  f"curl -s -X DELETE {base}/v1/users/2 &",
                  "# ...a reviewer (a member of approvers) lists and approves it; it then runs",
                  f"export PORTCULLIS_TOKEN=$(./mitm.sh token{cfg} --sub alice --groups "
                  "approvers)",
                  f"./mitm.sh approvals list{cfg}",
                  f"./mitm.sh approvals approve <ID> --reason 'ticket 42'{cfg}",
                  "# no token, no access",
                  f"curl -s --proxy http://{config.listen_proxy[0]}:{config.listen_proxy[1]} "
                  f"{base}/v1/users" if config.listen_proxy else ""]
    k8s = _target(config, "kubernetes")
    if k8s is not None and k8s.listen:
        kc = write_kubeconfig(config, k8s)
        kubectl = f"kubectl --kubeconfig {kc} --token \"$TOKEN\""
        lines += ["",
                  "# Kubernetes (look-alike API) through the reverse listener",
                  f"{kubectl} get pods",
                  f"{kubectl} exec web-1 -- ls",
                  "# denied: a shell is not an allowed command",
                  f"{kubectl} exec -i web-1 -- sh"]
    pg = _target(config, "postgres")
    from demo import pg_cluster

    if pg is not None and config.listen_postgres and pg_cluster.available():
        host, port = config.listen_postgres
        conn = f"host={host} port={port} dbname={pg.database} user=agent-7 sslmode=require"
        lines += ["",
                  "# PostgreSQL: the token is the password; the gateway logs in upstream itself",
                  f"export PGPASSWORD=$TOKEN PGSSLROOTCERT={ca}",
                  "# allowed; ssn and card are masked, emails hashed",
                  f"psql \"{conn}\" -c 'SELECT name, email, ssn, card FROM customers'",
                  "# denied: agents never drop tables",
                  f"psql \"{conn}\" -c 'DROP TABLE customers'",
                  "# review: a DELETE waits for a human approval (in the background)",
                  f"psql \"{conn}\" -c 'DELETE FROM orders WHERE id = 3' &",
                  "# ...the reviewer approves it; psql then prints DELETE 1",
                  f"./mitm.sh approvals list{cfg}",
                  f"./mitm.sh approvals approve <ID> --reason 'cleanup ticket 7'{cfg}"]
    lines += ["", "# what masks and rules apply, and why",
              f"./mitm.sh policy explain{cfg} --sub agent-7 --groups agents "
              f"--target {api.name if api else 'sample-api'} --http 'GET /v1/users'",
              "", "# the tamper-evident audit log",
              f"./mitm.sh audit show{cfg}", f"./mitm.sh audit verify{cfg}", ""]
    return "\n".join(x for x in lines if x is not None)


def main(args: argparse.Namespace) -> int:
    from addons.config import ConfigError, load_config
    from addons.gateway import Ready, run, setup_logging
    from addons.policy import PolicyError
    from addons.runtime import build_runtime

    config_path = Path(args.config)
    if not config_path.exists():
        print(f"portcullis: no config at {config_path}", file=sys.stderr)
        return 2
    try:
        demo_dir = prepare_state(config_path)
        config = load_config(config_path)
        runtime = build_runtime(config)
    except (ConfigError, PolicyError, OSError, ValueError) as e:
        print(f"portcullis: configuration error: {e}", file=sys.stderr)
        return 2
    upstreams = start_upstreams(config, demo_dir)
    Ready.after_banner = commands(config)
    setup_logging()
    try:
        return asyncio.run(run(config, runtime))
    except KeyboardInterrupt:
        return 0
    finally:
        for u in upstreams:
            u.stop()
