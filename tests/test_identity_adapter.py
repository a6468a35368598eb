"""IdentityAddon on mitmproxy test flows: expiry ends open WebSocket sessions."""

from __future__ import annotations

import time

from mitmproxy.test import tflow

from addons import flows
from addons.config import IdentityConfig
from addons.identity import IdentityAddon, Verifier
from addons.model import Identity


def addon() -> IdentityAddon:
    return IdentityAddon(Verifier(IdentityConfig(issuers=())))


def test_expired_token_ends_websocket_session() -> None:
    f = tflow.twebsocketflow()
    f.live = True
    f.metadata[flows.IDENTITY] = Identity("agent", "iss", (), exp=time.time() - 1)
    addon().websocket_message(f)
    assert f.error is not None and "killed" in f.error.msg.lower()


def test_valid_token_keeps_websocket_session() -> None:
    f = tflow.twebsocketflow()
    f.live = True
    f.metadata[flows.IDENTITY] = Identity("agent", "iss", (), exp=time.time() + 60)
    addon().websocket_message(f)
    assert f.error is None
