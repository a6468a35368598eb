"""The cheap decision-line path writes exactly what logging would, and steps aside for any
other handler configuration."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from addons import decisionlog
from addons.decisionlog import DecisionLines, DecisionLogHandler

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO portcullis\.decisions: (.*)$")


@pytest.fixture
def stdout() -> Iterator[io.StringIO]:
    root = logging.getLogger("portcullis")
    saved = (root.handlers[:], root.level, root.propagate)
    buf = io.StringIO()
    decisionlog.setup_logging(buf)
    try:
        yield buf
    finally:
        root.handlers[:], root.level, root.propagate = saved


def only_ours() -> None:
    """pytest's log capture adds its handlers for the test call: take them off again."""
    root = logging.getLogger("portcullis")
    root.handlers[:] = [h for h in root.handlers if type(h) is DecisionLogHandler]


def test_direct_line_equals_the_logging_line(stdout: io.StringIO) -> None:
    only_ours()
    lines = DecisionLines()
    assert isinstance(lines._direct(), DecisionLogHandler)
    args = ("%s %s sub=%s id=%s", "ALLOW", "SELECT 1", "agent", "abc")
    lines.info(*args)
    logging.getLogger("portcullis.decisions").info(*args)
    direct, via_logging = stdout.getvalue().splitlines()
    m1, m2 = LINE.match(direct), LINE.match(via_logging)
    assert m1 and m2, (direct, via_logging)
    assert m1.group(1) == m2.group(1) == "ALLOW SELECT 1 sub=agent id=abc"
    assert direct[:16] == via_logging[:16]  # same local-time stamp (to the minute)
    assert logging.getLogger("portcullis").handlers[0].dirty  # flushed by flush_logs()


def test_other_handlers_get_every_line(stdout: io.StringIO) -> None:
    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    cap = Capture()
    logger = logging.getLogger("portcullis.decisions")
    logger.addHandler(cap)
    try:
        DecisionLines().info("%s %s", "DENY", "DROP TABLE t")
    finally:
        logger.removeHandler(cap)
    assert seen == ["DENY DROP TABLE t"]
    assert "DENY DROP TABLE t" in stdout.getvalue()  # and still on stdout, through logging


def test_disabled_level_writes_nothing(stdout: io.StringIO) -> None:
    only_ours()
    logging.getLogger("portcullis").setLevel(logging.WARNING)
    DecisionLines().info("%s", "ALLOW")
    assert stdout.getvalue() == ""
