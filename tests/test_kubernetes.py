"""Kubernetes classification (addons/kubernetes.py) and the API look-alike fixture."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons import kubernetes as k8s
from addons.model import BadRequest, Identity, Operation
from addons.policy import PolicyError, evaluate, load_policies
from tests.fixtures.k8s_api import FakeKubeAPI

WS = {"Connection": "Upgrade", "Upgrade": "websocket",
      "Sec-WebSocket-Protocol": "v5.channel.k8s.io,v4.channel.k8s.io"}
WS_V4_B64 = {"Connection": "Upgrade", "Upgrade": "websocket",
             "Sec-WebSocket-Protocol": "v4.base64.channel.k8s.io,base64.channel.k8s.io"}
SPDY = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
        "X-Stream-Protocol-Version": "v4.channel.k8s.io"}
EXEC_Q = [("command", "ls"), ("command", "-la"), ("stdout", "true"), ("stderr", "true")]

# (method, path, query, headers, expected fields)
CASES = [
    # core group, namespaced collection and objects
    ("GET", "/api/v1/namespaces/team-a/pods", {}, {},
     dict(verb="list", group="", version="v1", resource="pods", namespace="team-a", name=None)),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["true"]}, {},
     dict(verb="watch", resource="pods", namespace="team-a")),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["1"]}, {}, dict(verb="watch")),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["false"]}, {}, dict(verb="list")),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["FALSE"]}, {}, dict(verb="list")),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["0"]}, {}, dict(verb="list")),
    # the API server reads any other value, even an empty one, as true
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": [""]}, {}, dict(verb="watch")),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["f"]}, {}, dict(verb="watch")),
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": ["yes"]}, {}, dict(verb="watch")),
    ("GET", "/api/v1/namespaces/team-a/pods/web-1", {"watch": ["false"]}, {}, dict(verb="get")),
    ("GET", "/api/v1/namespaces/team-a/pods/web-1", {}, {},
     dict(verb="get", name="web-1", subresource=None)),
    ("HEAD", "/api/v1/namespaces/team-a/pods/web-1", {}, {}, dict(verb="get")),
    ("POST", "/api/v1/namespaces/team-a/pods", {}, {}, dict(verb="create", name=None)),
    ("PUT", "/api/v1/namespaces/team-a/pods/web-1", {}, {}, dict(verb="update")),
    ("PATCH", "/api/v1/namespaces/team-a/pods/web-1", {}, {}, dict(verb="patch")),
    ("DELETE", "/api/v1/namespaces/team-a/pods/web-1", {}, {}, dict(verb="delete")),
    ("DELETE", "/api/v1/namespaces/team-a/pods", {}, {},
     dict(verb="deletecollection", name=None)),
    ("get", "/api/v1/namespaces/team-a/pods/", {}, {}, dict(verb="list", resource="pods")),
    # all namespaces, cluster-scoped, the namespace object itself
    ("GET", "/api/v1/pods", {}, {}, dict(verb="list", namespace=None)),
    ("GET", "/api/v1/nodes/node-1", {}, {},
     dict(verb="get", resource="nodes", name="node-1", namespace=None)),
    ("GET", "/api/v1/namespaces", {}, {}, dict(verb="list", resource="namespaces", name=None,
                                               namespace=None)),
    ("DELETE", "/api/v1/namespaces/team-a", {}, {},
     dict(verb="delete", resource="namespaces", name="team-a", namespace="team-a")),
    ("PUT", "/api/v1/namespaces/team-a/finalize", {}, {},
     dict(verb="update", resource="namespaces", name="team-a", subresource="finalize")),
    ("PATCH", "/api/v1/namespaces/team-a/status", {}, {},
     dict(resource="namespaces", subresource="status")),
    # named groups
    ("GET", "/apis/apps/v1/namespaces/a/deployments/web", {}, {},
     dict(verb="get", group="apps", version="v1", resource="deployments", name="web")),
    ("PUT", "/apis/apps/v1/namespaces/a/deployments/web/scale", {}, {},
     dict(verb="update", subresource="scale")),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:admin", {}, {},
     dict(group="rbac.authorization.k8s.io", resource="clusterroles", name="system:admin",
          namespace=None)),
    ("GET", "/apis/example.com/v1alpha1/namespaces/a/widgets", {}, {},
     dict(verb="list", group="example.com", version="v1alpha1", resource="widgets")),
    # field selector names the object for list/watch (as the API server's authorizer does)
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=web-1"],
                                          "watch": ["true"]}, {},
     dict(verb="watch", name="web-1")),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["status.phase=Running"]}, {},
     dict(verb="list", name=None)),
    ("GET", "/api/v1/namespaces/a/pods",
     {"fieldSelector": ["status.phase!=Failed,metadata.name==web-2"]}, {},
     dict(verb="list", name="web-2")),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name!=web-2"]}, {},
     dict(verb="list", name=None)),
    # the API server does not trim: " metadata.name" is another field
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": [" metadata.name=web-2"]}, {},
     dict(verb="list", name=None)),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=x==y"]}, {},
     dict(verb="list", name=None)),  # lhs is "metadata.name=x"
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=a!=b"]}, {},
     dict(verb="list", name=None)),  # lhs is "metadata.name=a"
    ("DELETE", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=web-2"]}, {},
     dict(verb="deletecollection", name="web-2")),
    # deprecated watch path
    ("GET", "/api/v1/watch/namespaces/a/pods/x", {}, {}, dict(verb="watch", name="x")),
    # plain subresources
    ("GET", "/api/v1/namespaces/a/pods/web-1/log", {"container": ["app"]}, {},
     dict(verb="get", subresource="log", container="app")),
    ("PATCH", "/api/v1/namespaces/a/pods/web-1/ephemeralcontainers", {}, {},
     dict(verb="patch", subresource="ephemeralcontainers")),
    ("PUT", "/api/v1/namespaces/a/pods/web-1/status", {}, {}, dict(subresource="status")),
    ("POST", "/api/v1/namespaces/a/serviceaccounts/default/token", {}, {},
     dict(verb="create", resource="serviceaccounts", name="default", subresource="token")),
    ("POST", "/api/v1/namespaces/a/pods/web-1/eviction", {}, {},
     dict(verb="create", subresource="eviction")),
    ("POST", "/api/v1/namespaces/a/pods/web-1/binding", {}, {}, dict(subresource="binding")),
    # exec is exec on every transport
    ("GET", "/api/v1/namespaces/team-a/pods/web-1/exec", EXEC_Q, WS,
     dict(verb="exec", subresource="exec", resource="pods", name="web-1", command="ls -la")),
    ("GET", "/api/v1/namespaces/team-a/pods/web-1/exec", EXEC_Q, WS_V4_B64,
     dict(verb="exec", command="ls -la")),
    ("POST", "/api/v1/namespaces/team-a/pods/web-1/exec", EXEC_Q, SPDY,
     dict(verb="exec", command="ls -la")),
    ("POST", "/api/v1/namespaces/team-a/pods/web-1/exec", EXEC_Q, {},
     dict(verb="exec", command="ls -la")),
    ("GET", "/api/v1/namespaces/a/pods/p/exec",
     {"command": ["sh", "-c", "ls /; cat /etc/passwd"], "container": ["app"]}, WS,
     dict(verb="exec", command="sh -c ls /; cat /etc/passwd", container="app")),
    ("GET", "/api/v1/namespaces/a/pods/p/exec", {}, WS, dict(verb="exec", command=None)),
    # attach runs no command: a command= on attach must not look like one
    ("POST", "/api/v1/namespaces/a/pods/p/attach", {"command": ["ls"], "stdin": ["true"]}, SPDY,
     dict(verb="attach", subresource="attach", command=None)),
    ("GET", "/api/v1/namespaces/a/pods/p/portforward", {"ports": ["8080", "9090"]}, WS,
     dict(verb="portforward", subresource="portforward", port="8080,9090")),
    ("POST", "/api/v1/namespaces/a/pods/p/portforward", {"ports": ["80"]}, SPDY,
     dict(verb="portforward")),
    # proxy: pods, services, nodes, with a remainder and [scheme:]name[:port]
    ("GET", "/api/v1/namespaces/a/services/https:web:443/proxy/api/health", {}, {},
     dict(verb="proxy", resource="services", name="web", port="443",
          proxy_path="/api/health")),
    ("POST", "/api/v1/namespaces/a/pods/web-1:8080/proxy", {}, {},
     dict(verb="proxy", name="web-1", port="8080", proxy_path="/")),
    ("DELETE", "/api/v1/nodes/node-1/proxy/logs/x", {}, {},
     dict(verb="proxy", resource="nodes", namespace=None, proxy_path="/logs/x")),
    # impersonation is flagged (the policy refuses it unless a rule allows it)
    ("GET", "/api/v1/namespaces/a/secrets", {}, {"Impersonate-User": "admin"},
     dict(verb="list", impersonate=True)),
    ("GET", "/api/v1/namespaces/a/secrets", {}, {"impersonate-extra-scopes": "x"},
     dict(impersonate=True)),
    ("GET", "/api/v1/namespaces/a/secrets", {}, {"X-Impersonate-User": "admin"},
     dict(impersonate=False)),
    # non-resource URLs
    ("GET", "/version", {}, {}, dict(verb="get", nonresource=True, resource=None)),
    ("GET", "/api", {}, {}, dict(verb="get", nonresource=True)),
    ("GET", "/apis", {}, {}, dict(nonresource=True)),
    ("GET", "/api/v1", {}, {}, dict(nonresource=True, resource=None)),
    ("GET", "/apis/apps", {}, {}, dict(nonresource=True)),
    ("GET", "/apis/apps/v1", {}, {}, dict(nonresource=True)),
    ("GET", "/openapi/v3/apis/apps/v1", {}, {}, dict(nonresource=True)),
    ("HEAD", "/healthz", {}, {}, dict(verb="get", nonresource=True)),
    ("POST", "/logs", {}, {}, dict(verb="post", nonresource=True)),
    ("GET", "/", {}, {}, dict(nonresource=True)),
]


@pytest.mark.parametrize(("method", "path", "query", "headers", "expected"), CASES,
                         ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_classify(method, path, query, headers, expected):
    got = k8s.classify(method, path, query, headers)
    assert set(got) >= {"verb", "group", "version", "resource", "subresource", "namespace",
                        "name", "command", "impersonate", "nonresource"}
    for key, value in expected.items():
        assert got[key] == value, (key, got)
    if "nonresource" not in expected:
        assert got["nonresource"] is False


REJECTED = [
    ("GET", "/api/v1/namespaces//pods", {}),  # empty segment
    ("GET", "//api/v1/pods", {}),
    ("GET", "/api/v1/namespaces/a/../b/pods", {}),  # dot segments left in
    ("GET", "/api/v1/namespaces/./pods", {}),
    ("GET", "/api/v1/namespaces/a/pods/%2e%2e", {}),  # escapes left in
    ("GET", "/api/v1/namespaces/a/secrets/x%2Fy", {}),
    ("GET", "/API/v1/namespaces/a/secrets", {}),  # mixed-case prefix
    ("GET", "/Apis/apps/v1/deployments", {}),
    ("GET", "/api/v1/namespaces/A/pods", {}),  # namespaces are DNS labels
    ("GET", "/api/v1/namespaces/a/Pods", {}),
    ("GET", "/api/v1/namespaces/a/pods/we b", {}),
    ("GET", "/api/v1/namespaces/a/pods/x\\y", {}),
    ("GET", "/api/v1/namespaces/a/pods/x\x00", {}),
    ("GET", "api/v1/pods", {}),  # relative
    ("GET", "/api/v1/pods?watch=1", {}),  # query must be passed separately
    ("GET", "/api/v1/namespaces/a/pods/x/log/extra", {}),  # junk after a subresource
    ("GET", "/api/v1/namespaces/a/pods/x", {"watch": ["true"]}),  # named watch is ambiguous
    ("GET", "/api/v1/namespaces/a/pods/x", {"watch": [""]}),
    ("GET", "/api/v1/namespaces/a/pods", {"watch": ["true", "false"]}),  # disagreeing repeats
    ("GET", "/api/v1/namespaces/a/pods/x/exec", {"container": ["a", "b"]}),
    ("GET", "/api/v1/namespaces/a/pods/x/exec", {"command": ["ls\x00"]}),
    ("PUT", "/api/v1/namespaces/a/pods/x/exec", {"command": ["ls"]}),  # not a connect method
    ("DELETE", "/api/v1/namespaces/a/pods/x/attach", {}),
    ("GET", "/api/v1/namespaces/a/secrets/x/exec", {}),  # exec only on pods
    ("GET", "/api/v1/namespaces/a/secrets/x/proxy", {}),
    ("GET", "/api/v1/namespaces/a/services/ftp:web:21/proxy", {}),  # bad proxy scheme
    ("GET", "/api/v1/namespaces/a/services/a:b:c:d/proxy", {}),
    ("GET", "/api/v1/proxy/namespaces/a/pods/x", {}),  # deprecated proxy path
    ("POST", "/api/v1/watch/namespaces/a/pods", {}),
    ("GET", "/api/v1/namespaces/a/namespaces/b", {}),
    ("TRACE", "/api/v1/pods", {}),
    ("CONNECT", "/version", {}),
    ("BREW", "/api/v1/namespaces/a/pods/x/proxy", {}),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=.."]}),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=a,metadata.name=b"]}),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["garbage"]}),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": ["metadata.name=a\\,b"]}),
]


@pytest.mark.parametrize(("method", "path", "query"), REJECTED,
                         ids=[f"{c[0]} {c[1]!r} {c[2]}" for c in REJECTED])
def test_classify_rejects_ambiguous(method, path, query):
    with pytest.raises(ValueError):
        k8s.classify(method, path, query, {})


def test_to_operation_refusal_is_a_value_error_and_a_bad_request():
    with pytest.raises(k8s.UnclassifiableRequest) as err:
        k8s.to_operation("t", "GET", "/api/v1/namespaces//pods", {}, {})
    assert isinstance(err.value, ValueError) and isinstance(err.value, BadRequest)
    assert err.value.status == 400 and err.value.to_json()["error"] == "bad_request"
    assert "empty or dot segment" in err.value.reason


def test_query_as_list_of_pairs_keeps_argv_order():
    got = k8s.classify("GET", "/api/v1/namespaces/a/pods/p/exec",
                       [("command", "cat"), ("stdout", "1"), ("command", "/var/log/a b")], WS)
    assert got["command"] == "cat /var/log/a b"


def test_exec_same_classification_on_every_transport():
    path = "/api/v1/namespaces/team-a/pods/web-1/exec"
    seen = [k8s.classify(m, path, EXEC_Q, h)
            for m, h in (("GET", WS), ("GET", WS_V4_B64), ("POST", SPDY), ("POST", {}),
                         ("GET", {}))]
    assert all(s == seen[0] for s in seen)
    assert k8s.transport(WS) == "websocket" and k8s.transport(SPDY) == "spdy"
    assert k8s.transport({}) == "http"


def test_to_operation():
    op = k8s.to_operation("prod-k8s", "get", "/api/v1/namespaces/team-a/pods/web-1/exec",
                          {"command": ["ls", "-la"]}, WS)
    assert isinstance(op, Operation)
    assert op.protocol == "kubernetes" and op.target == "prod-k8s"
    assert op.http == {"method": "GET", "path": "/api/v1/namespaces/team-a/pods/web-1/exec"}
    assert op.kubernetes["verb"] == "exec" and op.kubernetes["command"] == "ls -la"
    assert op.summary == "exec pods/web-1 -n team-a -- ls -la"
    spdy = k8s.to_operation("prod-k8s", "POST", "/api/v1/namespaces/team-a/pods/web-1/exec",
                            [("command", "ls"), ("command", "-la")], SPDY)
    assert spdy.fingerprint == op.fingerprint  # a grant covers kubectl's SPDY retry
    other = k8s.to_operation("prod-k8s", "GET", "/api/v1/namespaces/team-a/pods/web-1/exec",
                             {"command": ["sh"]}, WS)
    assert other.fingerprint != op.fingerprint
    assert json.loads(json.dumps(op.to_json()))["kubernetes"]["verb"] == "exec"


@pytest.mark.parametrize(("method", "path", "query", "headers", "summary"), [
    ("GET", "/api/v1/namespaces/a/pods", {}, {}, "list pods -n a"),
    ("GET", "/apis/apps/v1/namespaces/a/deployments/web", {}, {}, "get deployments.apps/web -n a"),
    ("DELETE", "/api/v1/namespaces/team-a", {}, {}, "delete namespaces/team-a"),
    ("GET", "/api/v1/namespaces/a/pods/x/log", {"container": ["app"]}, {},
     "get pods/x/log -n a -c app"),
    ("GET", "/api/v1/namespaces/a/services/web:80/proxy/metrics", {}, {},
     "proxy services/web:80 -n a /metrics"),
    ("GET", "/version", {}, {}, "get /version"),
    ("GET", "/api/v1/namespaces/a/secrets/s", {}, {"Impersonate-User": "root"},
     "get secrets/s -n a --as=root"),
])
def test_summary(method, path, query, headers, summary):
    assert k8s.to_operation("t", method, path, query, headers).summary == summary


SHORTHAND = [
    ("list pods -n team-a", "GET", "/api/v1/namespaces/team-a/pods",
     dict(verb="list", resource="pods", namespace="team-a")),
    ("exec pods/x -n ns -- cmd args", "GET", "/api/v1/namespaces/ns/pods/x/exec",
     dict(verb="exec", name="x", command="cmd args")),
    ("exec x -n ns -it -- sh -c 'ls /tmp'", "GET", "/api/v1/namespaces/ns/pods/x/exec",
     dict(verb="exec", command="sh -c ls /tmp")),
    ("get deployments.apps/web -n a", "GET", "/apis/apps/v1/namespaces/a/deployments/web",
     dict(verb="get", group="apps", resource="deployments", name="web")),
    ("get deploy web -n a", "GET", "/apis/apps/v1/namespaces/a/deployments/web",
     dict(group="apps")),
    ("get deployments.v1beta1.apps/web -n a", "GET",
     "/apis/apps/v1beta1/namespaces/a/deployments/web", dict(version="v1beta1")),
    ("delete pod x -n a", "DELETE", "/api/v1/namespaces/a/pods/x", dict(verb="delete", name="x")),
    ("delete pods -n a", "DELETE", "/api/v1/namespaces/a/pods", dict(verb="deletecollection")),
    ("get /version", "GET", "/version", dict(verb="get", nonresource=True)),
    ("GET /api/v1/namespaces/a/pods?watch=true", "GET", "/api/v1/namespaces/a/pods",
     dict(verb="watch")),
    ("get pods", "GET", "/api/v1/namespaces/default/pods", dict(verb="list",
                                                                namespace="default")),
    ("get pods -A", "GET", "/api/v1/pods", dict(verb="list", namespace=None)),
    ("get pods -w -n a", "GET", "/api/v1/namespaces/a/pods", dict(verb="watch")),
    ("watch pods/web-1 -n a", "GET", "/api/v1/namespaces/a/pods",
     dict(verb="watch", name="web-1")),
    ("get nodes", "GET", "/api/v1/nodes", dict(verb="list", namespace=None)),
    ("delete namespace team-a", "DELETE", "/api/v1/namespaces/team-a",
     dict(resource="namespaces", name="team-a", namespace="team-a")),
    ("logs web-1 -n a -c app", "GET", "/api/v1/namespaces/a/pods/web-1/log",
     dict(verb="get", subresource="log", container="app")),
    ("attach pods/x -n a -i", "GET", "/api/v1/namespaces/a/pods/x/attach",
     dict(verb="attach", command=None)),
    ("port-forward pods/x -n a 8080:80", "GET", "/api/v1/namespaces/a/pods/x/portforward",
     dict(verb="portforward", port="80")),
    ("proxy services/https:web:443 -n a /healthz", "GET",
     "/api/v1/namespaces/a/services/https:web:443/proxy/healthz",
     dict(verb="proxy", name="web", proxy_path="/healthz")),
    ("create serviceaccounts/default/token -n a", "POST",
     "/api/v1/namespaces/a/serviceaccounts/default/token",
     dict(verb="create", subresource="token")),
    ("patch pods/x/ephemeralcontainers -n a", "PATCH",
     "/api/v1/namespaces/a/pods/x/ephemeralcontainers", dict(subresource="ephemeralcontainers")),
    ("create pods -n a", "POST", "/api/v1/namespaces/a/pods", dict(verb="create", name=None)),
    ("get secrets/db -n a --as admin", "GET", "/api/v1/namespaces/a/secrets/db",
     dict(impersonate=True)),
    ("get widgets.example.com -n a", "GET", "/apis/example.com/v1/namespaces/a/widgets",
     dict(verb="list", group="example.com", resource="widgets")),
]


@pytest.mark.parametrize(("text", "method", "path", "expected"), SHORTHAND,
                         ids=[c[0] for c in SHORTHAND])
def test_parse_shorthand(text, method, path, expected):
    op = k8s.parse_shorthand(text, "prod-k8s")
    assert op.protocol == "kubernetes" and op.target == "prod-k8s"
    assert op.http == {"method": method, "path": path}
    for key, value in expected.items():
        assert op.kubernetes[key] == value, (key, op.kubernetes)


@pytest.mark.parametrize("text", [
    "", "pods", "frobnicate pods -n a", "get gizmos -n a", "exec pods/x -n a",
    "exec -n a -- ls", "get nodes -n a", "update pods -n a", "create pods/x -n a",
    "list pods -n a -A", "get pods -n a --bogus", "get pods -n", "get /version extra",
    "get pods/x -n a -- ls", "exec secrets/x -n a -- ls", "get 'unterminated",
    "get pods/x/log/more -n a", "get /api/v1/namespaces//pods", "proxy secrets/x -n a /",
])
def test_parse_shorthand_rejects(text):
    with pytest.raises(ValueError):
        k8s.parse_shorthand(text, "t")


def test_shorthand_matches_what_clients_send():
    """The shorthand decides exactly like the request kubectl sends (same classified dict)."""
    real = k8s.to_operation("t", "GET", "/api/v1/namespaces/team-a/pods/web-1/exec",
                            [("command", "ls"), ("container", "app"), ("stderr", "true"),
                             ("stdout", "true")], {"Upgrade": "websocket"})
    short = k8s.parse_shorthand("exec pods/web-1 -n team-a -c app -- ls", "t")
    assert short.kubernetes == real.kubernetes
    assert short.fingerprint == real.fingerprint


POLICY = """
rules:
  - id: sre-read
    effect: allow
    reason: read-only for SRE agents
    when:
      groups: [sre]
      targets: [prod-k8s]
      kubernetes: {verbs: [get, list, watch], resources: [pods, deployments.apps],
                   namespaces: ["team-*"]}
  - id: sre-exec-ls
    effect: allow
    reason: agents may list files
    when:
      groups: [sre]
      kubernetes: {verbs: [exec], resources: [pods], namespaces: ["team-*"],
                   commands: ["ls", "ls *"]}
  - id: discovery
    effect: allow
    when: {http: {methods: [GET], paths: ["/version", "/api", "/apis", "/api/v1", "/apis/*/*"]}}
  - id: no-impersonation
    effect: deny
    reason: impersonation is not allowed
    when: {kubernetes: {impersonate: true}}
tests:
  - name: read pods
    identity: {sub: agent-7, groups: [sre]}
    request: {target: prod-k8s, kubernetes: "list pods -n team-a"}
    expect: allow
"""


@pytest.mark.parametrize(("text", "effect", "rule"), [
    ("list pods -n team-a", "allow", "sre-read"),
    ("get deployments.apps/web -n team-b", "allow", "sre-read"),
    ("get deployments.apps/web -n kube-system", "deny", "default-deny"),
    ("delete pod web-1 -n team-a", "deny", "default-deny"),
    ("exec pods/web-1 -n team-a -- ls -la", "allow", "sre-exec-ls"),
    ("exec pods/web-1 -n team-a -- sh", "deny", "default-deny"),
    ("attach pods/web-1 -n team-a -i", "deny", "default-deny"),
    ("get /version", "allow", "discovery"),
    ("get /apis/apps/v1", "allow", "discovery"),
    ("list pods -n team-a --as admin", "deny", "no-impersonation"),
    ("get secrets/db -n team-a", "deny", "default-deny"),
])
def test_policy_engine_decides_classified_operations(tmp_path, text, effect, rule):
    (tmp_path / "k8s.yaml").write_text(POLICY)
    policy = load_policies(tmp_path)
    ident = Identity(sub="agent-7", iss="test", groups=("sre",))
    decision = evaluate(policy, ident, [k8s.parse_shorthand(text, "prod-k8s")])
    assert (decision.effect, decision.rule) == (effect, rule)


def test_policy_error_is_not_shadowed():
    assert issubclass(PolicyError, ValueError)  # adapters catch ValueError from both modules


def test_status_body():
    body = k8s.status_body(403, "Forbidden", "denied by rule k8s-read: read only",
                           {"error": "denied", "rule": "k8s-read", "request_id": "r1",
                            "code": 999})
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "denied by rule k8s-read: read only", "reason": "Forbidden",
                    "code": 403, "error": "denied", "rule": "k8s-read", "request_id": "r1"}
    assert k8s.status_body(401, "", "no token", {})["reason"] == "Unauthorized"
    assert k8s.status_body(418, "", "?", {})["reason"] == "Unknown"


def test_decode_channel_frame():
    assert k8s.decode_channel_frame(b"\x01hello", "v5.channel.k8s.io") == (1, b"hello")
    assert k8s.decode_channel_frame(b"\xff\x00", "v5.channel.k8s.io") == (255, b"\x00")
    enc = "2" + base64.b64encode(b"oops").decode()
    assert k8s.decode_channel_frame(enc, "v4.base64.channel.k8s.io") == (2, b"oops")
    assert k8s.decode_channel_frame(enc.encode(), "base64.channel.k8s.io") == (2, b"oops")
    for data, proto in ((b"", "v4.channel.k8s.io"), ("x", "v4.base64.channel.k8s.io"),
                        ("1!!", "v4.base64.channel.k8s.io"), (b"\x01", "chat")):
        with pytest.raises(ValueError):
            k8s.decode_channel_frame(data, proto)
    assert k8s.CHANNEL_NAMES[3] == "error"


_seg = st.text(alphabet="abcz09-.%:/\\ \x00AZ", min_size=0, max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "FOO"]),
       st.lists(_seg, max_size=8),
       st.lists(st.tuples(st.sampled_from(["watch", "command", "container", "fieldSelector"]),
                          _seg), max_size=4),
       st.booleans())
def test_classify_only_raises_value_error(method, segments, query, upgrade):
    path = "/" + "/".join(segments)
    headers = WS if upgrade else {}
    try:
        got = k8s.classify(method, path, query, headers)
    except ValueError:
        return
    if got["nonresource"]:
        assert got["resource"] is None
        return
    assert got["verb"] in {"get", "list", "watch", "create", "update", "patch", "delete",
                           "deletecollection", "exec", "attach", "portforward", "proxy"}
    for key in ("namespace", "name", "resource", "subresource"):
        value = got[key]
        assert value is None or (value not in ("", ".", "..") and "/" not in value
                                 and "%" not in value)


@given(st.lists(st.text(min_size=0, max_size=6), min_size=1, max_size=5))
def test_exec_argv_round_trips_through_query(argv):
    if any("\x00" in a for a in argv):
        return
    got = k8s.classify("GET", "/api/v1/namespaces/a/pods/p/exec",
                       [("command", a) for a in argv], WS)
    assert got["command"] == " ".join(argv)


# ---------------------------------------------------------------------------------------------
# The look-alike fixture itself


@pytest.fixture(scope="module")
def api():
    with FakeKubeAPI(token="fixture-token") as server:
        yield server


def _client(api):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = api.url
    cfg.ssl_ca_cert = str(api.ca_path)
    cfg.api_key = {"authorization": "Bearer fixture-token"}
    cfg.proxy = None
    return client.CoreV1Api(client.ApiClient(cfg))


def test_fixture_python_client_get_list_exec(api):
    from kubernetes.stream import stream

    core = _client(api)
    names = [p.metadata.name for p in core.list_namespaced_pod("team-a").items]
    assert {"web-1", "web-2"} <= set(names)
    assert core.read_namespaced_pod("web-1", "team-a").status.phase == "Running"
    api.clear()
    out = stream(core.connect_get_namespaced_pod_exec, "web-1", "team-a",
                 command=["ls", "/var/log"], stdout=True, stderr=True, stdin=False, tty=False)
    assert out == "app.log\n"
    assert api.execs == [["ls", "/var/log"]]
    req = api.requests[-1]
    assert req.is_exec and req.headers["upgrade"].lower() == "websocket"
    resp = stream(core.connect_get_namespaced_pod_exec, "web-1", "team-a",
                  command=["sh"], stdout=True, stderr=True, stdin=True, tty=False,
                  _preload_content=False)
    resp.write_stdin("echo hi\ncat /etc/hostname\nexit 3\n")
    resp.run_forever(timeout=10)
    assert resp.returncode == 3
    assert resp.read_stdout() == "hi\nweb-1\n"


def test_fixture_requires_token_and_records_first(api):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert, cfg.proxy = api.url, str(api.ca_path), None
    api.clear()
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(client.ApiClient(cfg)).list_namespaced_pod("team-a")
    assert err.value.status == 401
    assert json.loads(err.value.body)["kind"] == "Status"
    assert [r.path for r in api.requests] == ["/api/v1/namespaces/team-a/pods"]


def _raw_ws(api, path, protocol, extra=b""):
    ctx = ssl.create_default_context(cafile=str(api.ca_path))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", api.port), timeout=10),
                           server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n"
                  "Authorization: Bearer fixture-token\r\n\r\n").encode() + extra)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return sock, head.decode()


def _read_frames(sock):
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    frames = []
    while buf:
        b0, b1 = buf[0], buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            n, off = struct.unpack("!H", buf[2:4])[0], 4
        frames.append((b0 & 0x0F, buf[off:off + n]))
        buf = buf[off + n:]
    return frames


def _masked(opcode, payload):
    mask = os.urandom(4)
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"])
def test_fixture_exec_frames_and_exit_status(api, protocol):
    path = "/api/v1/namespaces/team-a/pods/web-1/exec?command=ls&command=/nope&stdout=1"
    sock, head = _raw_ws(api, path, protocol)
    assert head.startswith("HTTP/1.1 101") and protocol in head
    sock.sendall(_masked(8, struct.pack("!H", 1000)))  # our close after the server's
    frames = _read_frames(sock)
    sock.close()
    data = [f for f in frames if f[0] in (1, 2)]
    decoded = [k8s.decode_channel_frame(p, protocol) for _, p in data]
    assert (2, b"ls: cannot access '/nope': No such file or directory\n") in decoded
    status = json.loads(next(p for ch, p in decoded if ch == 3))
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"][0] == {"reason": "ExitCode", "message": "2"}
    assert frames[-1][0] == 8


def test_fixture_v5_stdin_close_signal_ends_shell(api):
    path = "/api/v1/namespaces/team-a/pods/web-1/exec?command=sh&stdin=true&stdout=true"
    sock, head = _raw_ws(api, path, "v5.channel.k8s.io")
    assert "v5.channel.k8s.io" in head
    sock.sendall(_masked(2, b"\x00echo one\nhostname") + _masked(9, b"hb")
                 + _masked(2, b"\xff\x00"))
    time.sleep(0.2)
    sock.sendall(_masked(8, struct.pack("!H", 1000)))
    frames = _read_frames(sock)
    sock.close()
    assert (10, b"hb") in frames  # pong
    payloads = [p for op, p in frames if op == 2]
    assert payloads[:2] == [b"\x01one\n", b"\x01web-1\n"]
    assert json.loads(payloads[2][1:]) == {"metadata": {}, "status": "Success"}


def test_fixture_refuses_spdy_and_plain_exec(api):
    from kubernetes.client.rest import ApiException

    core = _client(api)
    api.clear()
    with pytest.raises(ApiException) as err:  # plain POST, no upgrade
        core.connect_post_namespaced_pod_exec("web-1", "team-a", command=["ls"], stdout=True)
    assert err.value.status == 400
    conn = http.client.HTTPSConnection(
        "127.0.0.1", api.port, timeout=10,
        context=ssl.create_default_context(cafile=str(api.ca_path)))
    conn.request("POST", "/api/v1/namespaces/team-a/pods/web-1/exec?command=ls", body=b"",
                 headers={"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                          "X-Stream-Protocol-Version": "v4.channel.k8s.io",
                          "Authorization": "Bearer fixture-token"})
    reply = conn.getresponse()
    body = json.loads(reply.read())
    conn.close()
    assert reply.status == 400 and body["kind"] == "Status"
    assert "SPDY is not supported" in body["message"]
    assert api.execs == []
    assert [r.method for r in api.requests if r.is_exec] == ["POST", "POST"]


def test_fixture_kubectl(tmp_path: Path):
    with FakeKubeAPI(token="tok") as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": api.url,
                                                   "certificate-authority": str(api.ca_path)}}],
            "users": [{"name": "u", "user": {"token": "tok"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u",
                                                   "namespace": "team-a"}}],
            "current-context": "x"}))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
        env.pop("HTTPS_PROXY", None)
        env.pop("https_proxy", None)

        def kubectl(*args, stdin=None):
            return subprocess.run(["kubectl", *args], env=env, input=stdin, text=True,
                                  capture_output=True, timeout=60)

        got = kubectl("get", "pods")
        assert got.returncode == 0, got.stderr
        assert "web-1" in got.stdout and "Running" in got.stdout
        got = kubectl("exec", "web-1", "--", "ls")
        assert (got.returncode, got.stdout) == (0, "app\nbin\netc\ntmp\nvar\n"), got.stderr
        got = kubectl("exec", "-i", "web-1", "--", "sh", stdin="echo hello\nls /app\n")
        assert (got.returncode, got.stdout) == (0, "hello\nconfig.yaml\nserver\n"), got.stderr
        got = kubectl("exec", "web-1", "--", "cat", "/nope")
        assert got.returncode == 1 and "command terminated with exit code 1" in got.stderr
        got = kubectl("delete", "pod", "web-2")
        assert got.returncode == 0 and 'pod "web-2" deleted' in got.stdout
        assert ("team-a", "web-2") not in api.state.pods
        assert api.execs == [["ls"], ["sh"], ["cat", "/nope"]]
