"""Make mitmproxy's own error answers speak Portcullis JSON (SPEC §5: upstream failure = 502 JSON).

mitmproxy builds the response for a failed upstream connection (or a malformed request) itself,
as an HTML page, after every addon hook has run, so no hook can replace it. We swap the two small
formatting functions it uses for ones that return `{"error": ..., "reason": ...}`. This is adapter
code and only touches presentation: the refusal itself is mitmproxy's.
"""

from __future__ import annotations

import json

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
    _http2.format_error = json_error  # HTTP/2 keeps its text/html content-type header
    try:
        from mitmproxy.proxy.layers.http import _http3

        _http3.format_error = json_error
    except ImportError:  # pragma: no cover - HTTP/3 layer absent in some builds
        pass
