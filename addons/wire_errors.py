"""Make mitmproxy's own error answers speak Portcullis JSON (SPEC §5: upstream failure = 502 JSON).

mitmproxy builds the response for a failed upstream connection (or a malformed request) itself,
as an HTML page, after every addon hook has run, so no hook can replace it. We swap the two small
formatting functions it uses for ones that return `{"error": ..., "reason": ...}`. This is adapter
code and only touches presentation: the refusal itself is mitmproxy's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

ERRORS = {502: "upstream_failure", 504: "upstream_timeout", 400: "bad_request"}


def json_error(status_code: int, message: str) -> bytes:
    return json.dumps({"error": ERRORS.get(status_code, "proxy_error"),
                       "reason": message or "request failed"}).encode()


def install() -> None:
    from mitmproxy import http, version
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1, _http2

    def make_error_response(status_code: int, message: str = "") -> bytes:
        resp = http.Response.make(
            status_code, json_error(status_code, message),
            http.Headers(Server=version.MITMPROXY, Connection="close",
                         Content_Type="application/json"))
        return http1.assemble_response(resp)

    _http1.make_error_response = make_error_response
    _http2.format_error = json_error
    try:  # presentation only: a mitmproxy without these internals keeps its text/html label
        from mitmproxy.proxy.layers.http import _http_h2

        _label_error_headers_json(_http_h2.BufferedH2Connection, version.MITMPROXY.encode())
    except (ImportError, AttributeError) as e:  # pragma: no cover - other mitmproxy versions
        logging.getLogger("portcullis").warning("HTTP/2 error answers keep mitmproxy's "
                                                "content-type label: %s", e)
    try:
        from mitmproxy.proxy.layers.http import _http3, _http_h3

        _http3.format_error = json_error
        _label_error_headers_json(_http_h3.LayeredH3Connection, version.MITMPROXY.encode())
    except (ImportError, AttributeError):  # pragma: no cover - HTTP/3 layer absent or moved
        pass


_HTML = (b"content-type", b"text/html")
_JSON = (b"content-type", b"application/json")


def _label_error_headers_json(cls: Any, server: bytes) -> None:
    """HTTP/2 and HTTP/3 error answers are sent as exactly `:status`, `server: mitmproxy <v>`,
    `content-type: text/html` (the body is ours, JSON). Relabel that one header list; any other
    response's headers pass untouched.

    `cls` is typed Any on purpose: we replace a method of a mitmproxy (h2/aioquic-derived) class
    whose signature mypy would otherwise hold us to."""
    if getattr(cls.send_headers, "_portcullis", False):
        return
    original = cls.send_headers

    def send_headers(self: object, stream_id: int, headers: list, *args: object,
                     **kwargs: object) -> object:
        if (isinstance(headers, list) and len(headers) == 3 and headers[2] == _HTML
                and headers[1] == (b"server", server) and headers[0][0] == b":status"):
            headers = [headers[0], headers[1], _JSON]
        return original(self, stream_id, headers, *args, **kwargs)

    # A marker on the replacement so a second install() does not wrap it twice; functions carry
    # no declared attributes, hence the ignore.
    send_headers._portcullis = True  # type: ignore[attr-defined]
    cls.send_headers = send_headers
