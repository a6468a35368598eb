"""Kubernetes exec output is masked (stdout/stderr) when a mask with detectors applies to the
exec call: through the real gateway, with the kubernetes Python client (WebSocket v4/v5 channel
protocols) and kubectl when installed. The agent's output, the audit log, the recordings and
the gateway's output never hold the value."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gateway import Gateway, free_port
from tests.fixtures.k8s_api import FakeKubeAPI

pytestmark = pytest.mark.e2e

K8S_TOKEN = "k8s-upstream-t0ken-5d2a"
CARD = "4111111111111111"
EMAIL = "ada@example.com"
POLICY = """
rules:
  - id: k8s-discovery
    effect: allow
    reason: API discovery (kubectl)
    when:
      targets: [k8s]
      http: {methods: [GET], paths: ["/version", "/api", "/apis", "/api/v1", "/apis/*/*"]}
  - id: read-pods
    effect: allow
    reason: kubectl exec reads the pod first
    when: {groups: [agents], kubernetes: {verbs: [get], resources: [pods], namespaces: [team-a]}}
  - id: exec-echo
    effect: allow
    reason: agents may echo and list
    when:
      groups: [agents]
      kubernetes: {verbs: [exec], resources: [pods], namespaces: [team-a],
                   commands: ["echo *", "echo * *", "echo * * * *", "ls *"]}
masks:
  - id: exec-pii
    reason: no card numbers or e-mails in terminal output
    when: {targets: [k8s], kubernetes: {verbs: [exec]}}
    detectors: [credit_card, email]
    strategy: redact
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, oidc: Any, test_ca: Any) -> Any:
    work = tmp_path_factory.mktemp("exec-masking")
    api = FakeKubeAPI(token=K8S_TOKEN, ca=test_ca, directory=work / "api",
                      hostnames=("localhost",)).start()
    rport = free_port()
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [{"name": "k8s", "protocol": "kubernetes",
                        "hosts": [f"127.0.0.1:{api.port}"],
                        "listen": f"127.0.0.1:{rport}", "upstream": api.url,
                        "credentials": {"type": "bearer", "token_env": "K8S_TOKEN"},
                        "tls": {"verify": True, "ca_file": str(test_ca.cert_path)}}]}
    gw = Gateway(work / "gw", cfg, env={"K8S_TOKEN": K8S_TOKEN}, policies={"k8s.yaml": POLICY})
    gw.start()
    try:
        yield api, gw, rport, oidc.token(sub="agent-1", groups=["agents"], ttl=3600), work
    finally:
        gw.stop()
        api.stop()


def exec_argv(gw: Gateway, rport: int, token: str, argv: list[str]) -> str:
    from kubernetes import client
    from kubernetes.stream import stream

    cfg = client.Configuration()
    cfg.host = f"https://127.0.0.1:{rport}"
    cfg.api_key = {"authorization": f"Bearer {token}"}
    cfg.ssl_ca_cert = str(gw.ca)
    core = client.CoreV1Api(client.ApiClient(cfg))
    return stream(core.connect_get_namespaced_pod_exec, "web-1", "team-a", command=argv,
                  stdout=True, stderr=True, stdin=False, tty=False, _request_timeout=30)


def test_python_client_exec_output_is_masked(env: Any) -> None:
    api, gw, rport, token, _ = env
    out = exec_argv(gw, rport, token, ["echo", "card", CARD, "mail", EMAIL])
    assert out == "card [MASKED:credit_card] mail [MASKED:email]\n"
    assert ["echo", "card", CARD, "mail", EMAIL] in api.execs  # the pod saw it
    # output without a hit passes unchanged
    assert exec_argv(gw, rport, token, ["ls", "/var/log"]) == "app.log\n"
    recs = _audit(gw)
    execs = [r["id"] for r in recs if r.get("type") == "decision"
             and (r["operation"].get("kubernetes") or {}).get("subresource") == "exec"]
    outcomes = [r for r in recs if r.get("type") == "outcome" and r["decision_id"] == execs[0]]
    # the upgrade's outcome when the session opened, then what was masked when it ended
    assert [o["outcome"] for o in outcomes][0] == {"status": 101}
    for _ in range(50):  # websocket_end runs as the connection winds down
        ends = [r for r in _audit(gw) if r.get("type") == "outcome"
                and r["decision_id"] == execs[0] and (r.get("masked") or {}).get("count")]
        if ends:
            break
        time.sleep(0.1)
    assert ends and ends[-1]["masked"]["rules"] == ["exec-pii"]
    assert ends[-1]["outcome"] == {"status": 101, "websocket": "closed"}


def test_kubectl_exec_output_is_masked(env: Any, tmp_path: Path) -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed")
    _, gw, rport, token, _ = env
    kc = tmp_path / "kubeconfig"
    kc.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:{rport}",
  certificate-authority: "{gw.ca}"}}}}]
users: [{{name: u, user: {{token: "{token}"}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u, namespace: team-a}}}}]
current-context: x
""")
    res = subprocess.run(["kubectl", "--kubeconfig", str(kc), "exec", "web-1", "--", "echo",
                          "paid", CARD], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "paid [MASKED:credit_card]\n"


def test_no_masked_value_in_audit_recordings_or_logs(env: Any) -> None:
    _, gw, rport, token, work = env
    exec_argv(gw, rport, token, ["echo", CARD])
    gw.stop()  # flushes recordings and logs
    files = [gw.audit_path, *sorted((gw.state_dir / "recordings").glob("*.mitm"))]
    assert len(files) >= 2
    for f in files:
        data = f.read_bytes()
        assert CARD.encode() not in data and EMAIL.encode() not in data, f
    assert CARD not in gw.stdout and EMAIL not in gw.stdout


def _audit(gw: Gateway) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in gw.audit_text().splitlines()]
