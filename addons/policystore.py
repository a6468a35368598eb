"""The policy in force, reloaded when its files change (SPEC §4: hot reload).

Engine-level (no mitmproxy, no asyncio): adapters call `check()` periodically (the gateway every
0.5 s). An invalid new version is rejected with a logged error naming file and line, and the last
good version stays in force. Connections are never touched: requests simply start being decided
by the new `PolicySet` (readers take `store.current`, which is replaced in one assignment).

Change detection, and why it is more than an mtime check:
- `stat()` of every policy file (path, mtime_ns, size, inode) is compared with the last check.
  Adding, removing, renaming or rewriting a file changes it.
- Timestamps can be coarse (1-2 s on some filesystems), so two same-size writes within one tick
  look identical to `stat()`. Like git's "racy clean" entries, a file modified within the last
  `RACY_SECONDS` is also compared by content (SHA-256) on every check.
- A changed set of contents is installed only after it has been seen unchanged on two consecutive
  checks (`settle`), so a file caught half-written (truncated, then written) is never loaded:
  a truncated deny file would otherwise be a valid policy with the deny missing.
- If the files change while being loaded, the result is discarded and retried on the next check.
- The same broken content is reported once, not on every check.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from addons.policy import PolicyError, PolicySet, load_policies, policy_files

log = logging.getLogger("portcullis.policy")

RACY_SECONDS = 3.0

Stats = tuple[tuple[str, int, int, int], ...]


def _files(directory: Path) -> list[Path]:
    try:
        return policy_files(directory)
    except (PolicyError, OSError):
        return []


def _stats(files: list[Path]) -> Stats:
    out = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError as e:
            h.update(f"<unreadable: {e.errno}>".encode())
        h.update(b"\0\0")
    return h.hexdigest()


class PolicyStore:
    def __init__(self, directory: str | Path, known_targets: Iterable[str] | None = None,
                 settle: bool = True) -> None:
        self.directory = Path(directory)
        self.known_targets = list(known_targets) if known_targets is not None else None
        self.settle = settle
        self.lock = threading.Lock()
        self.version = 0
        self.last_error: str | None = None
        files = _files(self.directory)
        self._stats = _stats(files)
        self._digest = _digest(files)
        self._pending: str | None = None  # content seen once, waiting to be seen settled
        self._rejected: str | None = None  # content whose load failed (reported once)
        # The first load must succeed: a gateway never starts without a valid policy.
        self.current: PolicySet = load_policies(self.directory, self.known_targets)
        self.version = 1

    def _racy(self, stats: Stats, now_ns: int) -> bool:
        return any(now_ns - mtime < RACY_SECONDS * 1e9 for _, mtime, _, _ in stats)

    def check(self) -> bool:
        """Reload if files changed. Returns True when a new version was installed."""
        with self.lock:
            files = _files(self.directory)
            stats = _stats(files)
            if stats == self._stats and self._pending is None and not self._racy(
                    stats, time.time_ns()):
                return False
            self._stats = stats
            digest = _digest(files)
            if digest == self._digest:  # touched, or edited back to the version in force
                self._pending = None
                self.last_error = None
                return False
            if digest == self._rejected:
                self._pending = None
                return False
            if self.settle and digest != self._pending:
                self._pending = digest
                return False
            self._pending = None
            try:
                new = load_policies(self.directory, self.known_targets)
            except Exception as e:  # noqa: BLE001 - any failure keeps the last good version
                if _stats(_files(self.directory)) != stats:
                    self._stats = ()  # changed while loading: look again next time
                    return False
                self._rejected = digest
                self.last_error = str(e) if isinstance(e, PolicyError) else (
                    f"{self.directory}: {type(e).__name__}: {e}")
                log.error("policy reload rejected, keeping version %d: %s", self.version,
                          self.last_error)
                return False
            if _stats(_files(self.directory)) != stats or _digest(files) != digest:
                self._stats = ()  # changed while loading: not this version, look again
                return False
            self.current = new
            self._digest = digest
            self._rejected = None
            self.version += 1
            self.last_error = None
            log.info("policy version %d loaded: %d rules, %d masks from %d files", self.version,
                     len(new.rules), len(new.masks), len(new.files))
            return True
