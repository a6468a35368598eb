"""Admin listener: GET /healthz (no auth) and GET /metrics (Prometheus text).

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


def _response(status: int, body: bytes, ctype: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
        status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


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


async def serve(runtime: Any) -> asyncio.AbstractServer:
    host, port = runtime.config.listen_admin

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            if len(head) > MAX_HEAD:
                raise ValueError("head too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
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
