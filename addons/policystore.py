"""The policy in force, reloaded when its files change (SPEC §4: hot reload).

Engine-level (no mitmproxy, no asyncio): `check()` compares the files' signature with the last
load and reloads; an invalid new version is rejected with a logged error naming file and line,
and the last good version stays in force. Adapters call `check()` periodically.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from addons.policy import PolicyError, PolicySet, load_policies, policy_files

log = logging.getLogger("portcullis.policy")


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        files = policy_files(directory)
    except PolicyError:
        return ()
    sig = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        sig.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(sig)


class PolicyStore:
    def __init__(self, directory: str | Path, known_targets: Iterable[str] | None = None) -> None:
        self.directory = Path(directory)
        self.known_targets = list(known_targets) if known_targets is not None else None
        self.lock = threading.Lock()
        self.version = 0
        self.last_error: str | None = None
        self._sig = _signature(self.directory)
        # The first load must succeed: a gateway never starts without a valid policy.
        self.current: PolicySet = load_policies(self.directory, self.known_targets)
        self.version = 1

    def check(self) -> bool:
        """Reload if files changed. Returns True when a new version was installed."""
        sig = _signature(self.directory)
        if sig == self._sig:
            return False
        with self.lock:
            self._sig = sig
            try:
                new = load_policies(self.directory, self.known_targets)
            except PolicyError as e:
                self.last_error = str(e)
                log.error("policy reload rejected, keeping version %d: %s", self.version, e)
                return False
            self.current = new
            self.version += 1
            self.last_error = None
            log.info("policy version %d loaded: %d rules, %d masks from %d files", self.version,
                     len(new.rules), len(new.masks), len(new.files))
            return True
