"""Hot reload of the policy in force (addons/policystore.py), without a gateway."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons import policystore
from addons.model import Identity
from addons.policy import PolicyError, evaluate, http_operation
from addons.policystore import PolicyStore

WHO = Identity("agent-1", "test", ("agents",))

ALLOW_X = """rules:
  - id: allow-x
    effect: allow
    when: {http: {paths: ["/x/**"]}}
"""
DENY_X = """rules:
  - id: deny-x
    effect: deny
    reason: x is closed
    when: {http: {paths: ["/x/secret/**"]}}
"""


def decide(store: PolicyStore, path: str) -> tuple[str, str]:
    d = evaluate(store.current, WHO, [http_operation("t", "GET", path)])
    return d.effect, d.rule


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def logs() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("portcullis.policy")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "allow.yaml").write_text(ALLOW_X)
    (d / "deny.yaml").write_text(DENY_X)
    return d


def settle(store: PolicyStore, checks: int = 2) -> bool:
    """Call check() `checks` times (an edit is installed once seen unchanged twice)."""
    return any([store.check() for _ in range(checks)])


def test_initial_load_and_no_change_means_no_reload(pdir: Path) -> None:
    store = PolicyStore(pdir)
    assert store.version == 1
    assert decide(store, "/x/1") == ("allow", "allow-x")
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")
    before = store.current
    assert not settle(store, 4)
    assert store.current is before and store.version == 1


def test_initial_load_must_succeed(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("rules: [\n")
    with pytest.raises(PolicyError) as exc:
        PolicyStore(tmp_path)
    assert "bad.yaml" in str(exc.value)


def test_edit_is_installed_once_settled(pdir: Path, logs: Records) -> None:
    store = PolicyStore(pdir)
    (pdir / "deny.yaml").write_text(DENY_X.replace("/x/secret/**", "/x/**"))
    assert store.check() is False  # first sighting: wait one check for the write to settle
    assert decide(store, "/x/1") == ("allow", "allow-x")
    assert store.check() is True
    assert store.version == 2
    assert decide(store, "/x/1") == ("deny", "deny-x")
    assert any("policy version 2 loaded" in r.getMessage() for r in logs.records)


def test_without_settle_one_check_installs(pdir: Path) -> None:
    store = PolicyStore(pdir, settle=False)
    (pdir / "deny.yaml").write_text(DENY_X.replace("/x/secret/**", "/x/**"))
    assert store.check() is True
    assert decide(store, "/x/1") == ("deny", "deny-x")


@pytest.mark.parametrize("broken,line,needle", [
    ("rules:\n  - id: deny-x\n    effect: deny\n    when: {http: {paths: [\"/x/**\"]\n", None,
     "invalid YAML"),
    ("rules:\n  - id: deny-x\n    effect: deny\n    when: {http: {pathz: [\"/x/**\"]}}\n", 4,
     "pathz"),
    ("rules:\n  - id: deny-x\n    effect: maybe\n    when: {}\n", 2, "effect"),
    ("rules:\n  - id: allow-x\n    effect: deny\n    when: {}\n", 2, "duplicate rule id"),
])
def test_broken_edit_is_rejected_and_last_good_stays(pdir: Path, logs: Records, broken: str,
                                                     line: int | None, needle: str) -> None:
    store = PolicyStore(pdir)
    good = store.current
    path = pdir / "deny.yaml"
    path.write_text(broken)
    assert not settle(store, 3)
    assert store.current is good and store.version == 1
    assert decide(store, "/x/1") == ("allow", "allow-x")
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")
    assert store.last_error is not None and needle in store.last_error
    assert str(path) in store.last_error
    if line is not None:
        assert f"{path}:{line}" in store.last_error
    errors = logs.errors()
    assert len(errors) == 1, errors  # reported once, not on every check
    assert "rejected" in errors[0] and str(path) in errors[0] and needle in errors[0]
    assert not settle(store, 3)
    assert len(logs.errors()) == 1
    # fixing the file installs it
    path.write_text(DENY_X.replace("/x/secret/**", "/x/**"))
    assert settle(store)
    assert store.last_error is None and store.version == 2
    assert decide(store, "/x/1") == ("deny", "deny-x")


def test_unknown_target_in_edit_is_rejected(pdir: Path) -> None:
    store = PolicyStore(pdir, known_targets=["t"])
    (pdir / "deny.yaml").write_text(DENY_X.replace("when: {", "when: {targets: [nope], "))
    assert not settle(store)
    assert store.last_error is not None and "unknown target 'nope'" in store.last_error
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")


def test_same_size_same_mtime_edit_is_detected(pdir: Path) -> None:
    """Coarse timestamps: a same-size rewrite within one tick keeps (mtime, size, inode)."""
    store = PolicyStore(pdir)
    path = pdir / "deny.yaml"
    st = path.stat()
    new = DENY_X.replace("/x/secret/**", "/x/public/**")
    assert len(new) == len(DENY_X)
    with open(path, "r+") as f:  # same inode
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = path.stat()
    assert (st2.st_mtime_ns, st2.st_size, st2.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert settle(store)
    assert decide(store, "/x/public/1") == ("deny", "deny-x")
    assert decide(store, "/x/secret/1") == ("allow", "allow-x")


def test_touch_without_change_does_not_reload(pdir: Path, logs: Records) -> None:
    store = PolicyStore(pdir)
    os.utime(pdir / "deny.yaml")
    assert not settle(store, 3)
    assert store.version == 1 and not logs.records


def test_adding_and_removing_files(pdir: Path) -> None:
    store = PolicyStore(pdir)
    (pdir / "sub").mkdir()
    (pdir / "sub" / "more.yml").write_text(
        "rules:\n  - id: deny-y\n    effect: deny\n    when: {http: {paths: ['/x/y']}}\n")
    assert settle(store)
    assert decide(store, "/x/y") == ("deny", "deny-y")
    (pdir / "deny.yaml").unlink()
    assert settle(store)
    assert decide(store, "/x/secret/1") == ("allow", "allow-x")
    assert store.version == 3


def test_atomic_rename_is_detected(pdir: Path) -> None:
    store = PolicyStore(pdir)
    tmp = pdir / "deny.yaml.tmp"
    tmp.write_text(DENY_X.replace("/x/secret/**", "/x/public/**"))
    st = (pdir / "deny.yaml").stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, pdir / "deny.yaml")
    assert settle(store)
    assert decide(store, "/x/public/1") == ("deny", "deny-x")


def test_half_written_file_is_never_installed(pdir: Path) -> None:
    """An editor truncates, then writes: the empty deny file is a valid policy without the
    deny; it must not be installed even for one check."""
    store = PolicyStore(pdir)
    path = pdir / "deny.yaml"
    path.write_text("")  # truncated ...
    assert store.check() is False
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")
    path.write_text(DENY_X + "  - id: deny-z\n    effect: deny\n    when: {http: {paths: "
                    "['/z']}}\n")  # ... then written
    assert store.check() is False
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")
    assert store.check() is True
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")
    assert decide(store, "/z") == ("deny", "deny-z")


def test_change_during_load_is_not_installed(pdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PolicyStore(pdir)
    path = pdir / "deny.yaml"
    path.write_text(DENY_X.replace("/x/secret/**", "/x/a/**"))
    real = policystore.load_policies
    calls = []

    def racing_load(*args, **kwargs):  # noqa: ANN002, ANN003
        result = real(*args, **kwargs)
        if not calls:
            path.write_text(DENY_X.replace("/x/secret/**", "/x/bb/**"))
        calls.append(1)
        return result

    monkeypatch.setattr(policystore, "load_policies", racing_load)
    assert store.check() is False  # first sighting
    assert store.check() is False  # loaded /x/a, but the file changed meanwhile: discarded
    assert calls and store.version == 1
    assert decide(store, "/x/a/1") == ("allow", "allow-x")
    assert settle(store, 3)
    assert decide(store, "/x/bb/1") == ("deny", "deny-x")
    assert decide(store, "/x/a/1") == ("allow", "allow-x")


def test_directory_removed_keeps_last_good(tmp_path: Path, pdir: Path, logs: Records) -> None:
    store = PolicyStore(pdir)
    moved = tmp_path / "elsewhere"
    pdir.rename(moved)
    assert not settle(store, 3)
    assert store.last_error is not None and "does not exist" in store.last_error
    assert decide(store, "/x/secret/1") == ("deny", "deny-x")
    assert decide(store, "/x/1") == ("allow", "allow-x")
    moved.rename(pdir)
    assert not settle(store, 3)  # the same content as in force: nothing to install
    assert store.last_error is None and store.version == 1


def test_unexpected_loader_failure_keeps_last_good(pdir: Path, logs: Records,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = PolicyStore(pdir)

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(policystore, "load_policies", boom)
    (pdir / "deny.yaml").write_text(DENY_X.replace("/x/secret/**", "/x/**"))
    assert not settle(store, 3)
    assert store.last_error is not None and "RecursionError" in store.last_error
    assert decide(store, "/x/1") == ("allow", "allow-x")
    assert len(logs.errors()) == 1
