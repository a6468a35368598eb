"""The demo's sample HTTP API: user records with personal data (names, emails, card numbers,
an API key), served over HTTPS with a certificate from the gateway's CA. It checks the bearer
token the gateway injects, so the demo shows that the agent never holds it."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USERS = [
    {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "card": "4111 1111 1111 1111",
     "ssn": "123-45-6789", "api_key": "AKIAIOSFODNN7EXAMPLE"},
    {"id": 2, "name": "Alan Turing", "email": "alan@example.org", "card": "5500 0000 0000 0004",
     "ssn": "219-09-9999", "api_key": "AKIAI44QH8DHBEXAMPLE"},
    {"id": 3, "name": "Grace Hopper", "email": "grace@example.net",
     "card": "3400 0000 0000 009", "ssn": "078-05-1120", "api_key": "AKIAJ2QH8DHBEXAMPLE7"},
]


class SampleAPI:
    def __init__(self, host: str, port: int, cert: str, key: str, token: str) -> None:
        self.token = token
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests.append({"method": self.command, "path": self.path})
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._send(401, {"error": "the sample API wants the gateway's token"})
                path = self.path.split("?", 1)[0].rstrip("/")
                if path == "/v1/users":
                    return self._send(200, {"users": USERS})
                if path.startswith("/v1/users/"):
                    uid = path.rsplit("/", 1)[1]
                    for u in USERS:
                        if str(u["id"]) == uid:
                            if self.command == "DELETE":
                                return self._send(200, {"deleted": u["id"]})
                            return self._send(200, u)
                    return self._send(404, {"error": "no such user"})
                if path.startswith("/v1/admin"):
                    return self._send(200, {"admin": "you should never see this"})
                return self._send(404, {"error": "not found"})

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> SampleAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
