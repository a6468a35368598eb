"""The server's write order for one socket read (`Connection.pump`): upstream bytes first,
then the audit outcome lines of the answers about to leave, then the client bytes, so a client
never sees an answer whose outcome line is not on disk yet (tests and auditors read the log
right after a client returns)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from proxy_db import messages as fe
from proxy_db.server import Connection, Gateway
from tests.proxy_db.transcript import ready_session, rows_answer


class RecordingTransport:
    def __init__(self, name: str, events: list[tuple[str, int]], audit: Path) -> None:
        self.name, self.events, self.audit = name, events, audit

    def write(self, data: bytes) -> None:
        outcomes = self.audit.read_text().count('"type":"outcome"')
        self.events.append((self.name, outcomes))

    def is_closing(self) -> bool:
        return False


def test_outcome_line_is_on_disk_before_the_answer_is_written(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path, defer_outcomes=True)
    runtime: Any = SimpleNamespace(audit=env.audit, config=SimpleNamespace(), recorder=None)
    conn = Connection(Gateway(runtime))
    conn.session = s
    events: list[tuple[str, int]] = []
    audit = Path(env.audit.path)
    conn.transport = RecordingTransport("client", events, audit)  # type: ignore[assignment]
    conn.up = RecordingTransport("upstream", events, audit)  # type: ignore[assignment]
    s.take()  # the login answer
    for i in range(3):
        s.client_data(fe.Query(f"SELECT name FROM customers WHERE id = {i}").encode())
        conn.pump()
        s.upstream_data(rows_answer(("Ada",), fields=("name",)))
        conn.pump()
    assert events == [("upstream", 0), ("client", 1), ("upstream", 1), ("client", 2),
                      ("upstream", 2), ("client", 3)]
