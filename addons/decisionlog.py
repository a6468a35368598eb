"""The gateway's log on stdout, and a cheap path for per-statement decision lines.

Every decided request logs one line (`ALLOW ... id=...` / `DENY ...`) on the
`portcullis.decisions` logger. Through `logging` each line costs a LogRecord, a caller lookup
and a formatter pass: for a Postgres statement that was about a tenth of the gateway's CPU.
`DecisionLines.info()` writes the same line, byte for byte, straight into the stdout handler
when that handler is the only one in the way (the gateway as started by `portcullis run`), and
goes through `logging` otherwise (tests and embedders that attach handlers see every line).
"""

from __future__ import annotations

import logging
import time
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DECISIONS = "portcullis.decisions"


class DecisionLogHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """stdout handler that does not flush after every per-request decision line (one write
    system call per statement is a large share of a Postgres statement's cost): those lines are
    flushed by `flush_logs()` every LOG_FLUSH_INTERVAL, or by the next other line. Everything
    else (warnings, errors, other loggers) is flushed at once, as logging normally does."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.dirty = False
        self._second = -1
        self._stamp = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == DECISIONS and record.levelno < logging.WARNING:
            try:
                self.stream.write(self.format(record) + self.terminator)
                self.dirty = True
            except Exception:  # noqa: BLE001 - as logging.StreamHandler does
                self.handleError(record)
            return
        super().emit(record)
        self.dirty = False

    def flush(self) -> None:
        self.dirty = False
        super().flush()

    def info_line(self, message: str) -> None:
        """What `emit()` writes for an INFO record of `portcullis.decisions` with this message
        under FORMAT (local time, milliseconds truncated, as logging.Formatter does)."""
        now = time.time()
        sec = int(now)
        if sec != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
            self._second = sec
        ms = int((now - sec) * 1000)
        try:
            self.stream.write(f"{self._stamp},{ms:03d} INFO {DECISIONS}: {message}\n")
            self.dirty = True
        except Exception:  # noqa: BLE001 - stdout gone: as logging.StreamHandler does
            pass


class DecisionLines:
    """A stand-in for the `portcullis.decisions` logger with the cheap path described above."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(DECISIONS)

    def _direct(self) -> DecisionLogHandler | None:
        lg = self.logger
        parent = lg.parent
        if lg.handlers or lg.filters or not lg.propagate or parent is None:
            return None
        if parent.name != "portcullis" or parent.filters or parent.propagate:
            return None
        hs = parent.handlers
        if len(hs) != 1 or type(hs[0]) is not DecisionLogHandler or hs[0].filters:
            return None
        h = hs[0]
        if h.level > logging.INFO or getattr(h.formatter, "_fmt", None) != FORMAT:
            return None
        return h

    def info(self, msg: str, *args: Any) -> None:
        lg = self.logger
        if not lg.isEnabledFor(logging.INFO):
            return
        h = self._direct()
        if h is None:
            lg.info(msg, *args)
        else:
            h.info_line(msg % args if args else msg)

    def warning(self, msg: str, *args: Any) -> None:
        self.logger.warning(msg, *args)


def setup_logging(stream: Any) -> None:
    handler = DecisionLogHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger("portcullis")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def flush_logs() -> None:
    for h in logging.getLogger("portcullis").handlers:
        if getattr(h, "dirty", False):
            h.flush()
