"""Admin listener: GET /healthz (no auth), GET /metrics (Prometheus text), and the approvals
API (SPEC §6; Bearer token of a member of `approvals.approver_groups`):
`GET /v1/approvals?state=pending`, `POST /v1/approvals/{id}/approve|deny` with optional JSON
`{"reason": ..., "grant_minutes": N}`.

A deliberately small HTTP/1.1 server on asyncio (adapter code); request size is capped and every
connection is closed after one response.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from addons.metrics import REGISTRY

log = logging.getLogger("portcullis.admin")
MAX_HEAD = 16 * 1024


MAX_BODY = 64 * 1024


def _response(status: int, body: bytes, ctype: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
              404: "Not Found", 405: "Method Not Allowed", 409: "Conflict"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _json(status: int, body: Any) -> bytes:
    return _response(status, json.dumps(body).encode())


def handle_approvals(method: str, target: str, identity: Any, body: bytes, runtime: Any
                     ) -> bytes:
    from urllib.parse import parse_qs

    from addons.approvals import ApprovalConflict

    path, _, query = target.partition("?")
    parts = [p for p in path.split("/") if p]
    if parts == ["v1", "approvals"]:
        if method != "GET":
            return _json(405, {"error": "method_not_allowed"})
        states = parse_qs(query).get("state")
        state = states[0] if states else None
        items = sorted(runtime.approvals.list(state), key=lambda a: a.created)
        return _json(200, {"approvals": [a.to_json() for a in items]})
    if len(parts) == 4 and parts[:2] == ["v1", "approvals"] and parts[3] in ("approve", "deny"):
        if method != "POST":
            return _json(405, {"error": "method_not_allowed"})
        try:
            doc = json.loads(body) if body.strip() else {}
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            return _json(400, {"error": "bad_request", "reason": "body must be a JSON object"})
        reason = doc.get("reason")
        grant = doc.get("grant_minutes")
        if reason is not None and not isinstance(reason, str):
            return _json(400, {"error": "bad_request", "reason": "reason must be a string"})
        try:
            a = runtime.approvals.decide(parts[2], identity, parts[3] == "approve", reason,
                                         grant)
        except ApprovalConflict as e:
            status = 404 if "no such" in str(e) else 409
            return _json(status, {"error": "conflict", "reason": str(e)})
        log.info("approval %s %s by %s", a.id, a.state, identity.sub)
        return _json(200, a.to_json())
    return _json(404, {"error": "not_found"})


def handle(method: str, path: str, runtime: Any) -> bytes:
    path = path.split("?", 1)[0]
    if path == "/healthz":
        if method != "GET":
            return _response(405, b'{"error":"method_not_allowed"}')
        body = {"status": "ok", "policy_version": runtime.policies.version,
                "policy_error": runtime.policies.last_error}
        return _response(200, json.dumps(body).encode())
    if path == "/metrics":
        if method != "GET":
            return _response(405, b'{"error":"method_not_allowed"}')
        return _response(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
    return _response(404, b'{"error":"not_found"}')


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


async def _approvals(reader: asyncio.StreamReader, head: bytes, method: str, path: str,
                     runtime: Any) -> bytes:
    from addons.identity import token_from_authorization
    from addons.model import AuthError

    headers = _headers(head)
    length = int(headers.get("content-length") or 0)
    if not 0 <= length <= MAX_BODY:
        return _json(400, {"error": "bad_request", "reason": "body too large"})
    body = await asyncio.wait_for(reader.readexactly(length), timeout=10) if length else b""
    token = token_from_authorization(headers.get("authorization"))
    try:
        if token is None:
            raise AuthError("send Authorization: Bearer <reviewer token>")
        identity = await asyncio.to_thread(runtime.verifier.verify, token)
    except AuthError as e:
        return _json(401, e.to_json())
    groups = set(runtime.config.approvals.approver_groups)
    if not groups.intersection(identity.groups):
        return _json(403, {"error": "forbidden",
                           "reason": "only members of approvals.approver_groups may review"})
    return handle_approvals(method, path, identity, body, runtime)


async def serve(runtime: Any) -> asyncio.AbstractServer:
    host, port = runtime.config.listen_admin

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            if len(head) > MAX_HEAD:
                raise ValueError("head too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if path.startswith("/v1/approvals"):
                writer.write(await _approvals(reader, head, method, path, runtime))
            else:
                writer.write(handle(method, path, runtime))
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, UnicodeDecodeError):
            writer.write(_response(400, b'{"error":"bad_request"}'))
        except Exception:  # noqa: BLE001
            log.exception("admin request failed")
        finally:
            try:
                await writer.drain()
                writer.close()
            except Exception:  # noqa: BLE001, S110 - client went away
                pass

    return await asyncio.start_server(on_conn, host, port, limit=MAX_HEAD)
