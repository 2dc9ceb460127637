"""RunLock: exclusive creation, clear refusal, stale-lock takeover, safe release."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from batchwbc.ops import run_lock
from batchwbc.ops.run_lock import LockedError, LockFileError, RunLock, lock_path_for


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path, **info):
    path.write_text(json.dumps(info))


def test_creates_and_releases(tmp_path):
    target = tmp_path / "report.xlsx"
    with RunLock(target) as lk:
        info = json.loads(lock_path_for(target).read_text())
        assert info["pid"] == os.getpid()
        assert info["hostname"] == run_lock._hostname()
        assert info["started"]
        assert lk.held
    assert not lock_path_for(target).exists()


def test_released_on_exception(tmp_path):
    target = tmp_path / "report.xlsx"
    with pytest.raises(RuntimeError):
        with RunLock(target):
            raise RuntimeError("boom")
    assert not lock_path_for(target).exists()


def test_second_lock_refused_with_clear_message(tmp_path):
    target = tmp_path / "report.xlsx"
    with RunLock(target):
        with pytest.raises(LockedError) as ei:
            RunLock(target).acquire()
        msg = str(ei.value)
        assert f"process {os.getpid()}" in msg and run_lock._hostname() in msg
        assert "report.xlsx.lock" in msg and "\n" not in msg
        assert lock_path_for(target).exists()  # the refused run did not remove the holder's lock
    assert not lock_path_for(target).exists()


def test_lock_held_by_live_process_in_other_interpreter(tmp_path):
    target = tmp_path / "r.xlsx"
    code = (
        "import sys, time; from batchwbc.ops.run_lock import RunLock\n"
        f"with RunLock({str(target)!r}):\n    print('locked', flush=True); sys.stdin.readline()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"process {p.pid}"):
            RunLock(target).acquire()
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(timeout=30)
    with RunLock(target):  # free after the holder exits
        pass


def test_stale_lock_of_dead_pid_is_replaced(tmp_path, caplog):
    target = tmp_path / "r.xlsx"
    dead = _dead_pid()
    _write_lock(lock_path_for(target), pid=dead, hostname=run_lock._hostname(), started="2020-01-01T02:00:00")
    with RunLock(target) as lk:
        assert json.loads(lock_path_for(target).read_text())["pid"] == os.getpid()
        assert lk.replaced_stale and str(dead) in lk.replaced_stale
    assert "stale lock" in caplog.text.lower()
    assert not lock_path_for(target).exists()


def test_killed_holder_lock_is_taken_over(tmp_path):
    """A run killed with SIGKILL leaves its lock; the next run takes it over."""
    target = tmp_path / "r.xlsx"
    code = (
        "import os; from batchwbc.ops.run_lock import RunLock\n"
        f"RunLock({str(target)!r}).acquire(); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert lock_path_for(target).exists()
    with RunLock(target) as lk:
        assert lk.replaced_stale


def test_reused_pid_detected_by_start_time(tmp_path):
    if run_lock._process_start_token(os.getpid()) is None:
        pytest.skip("process start time not available on this platform")
    target = tmp_path / "r.xlsx"
    _write_lock(lock_path_for(target), pid=os.getpid(), hostname=run_lock._hostname(), started="x", process_start="1")
    with RunLock(target) as lk:
        assert "another process" in lk.replaced_stale


def test_garbage_lock_young_is_respected_old_is_replaced(tmp_path):
    target = tmp_path / "r.xlsx"
    lp = lock_path_for(target)
    lp.write_bytes(b"\x00garbage")
    with pytest.raises(LockedError, match="cannot be read"):
        RunLock(target).acquire()
    old = time.time() - run_lock.GARBAGE_STALE_AFTER_S - 10
    os.utime(lp, (old, old))
    with RunLock(target) as lk:
        assert "unreadable" in lk.replaced_stale


def test_foreign_host_lock(tmp_path):
    target = tmp_path / "r.xlsx"
    lp = lock_path_for(target)
    _write_lock(lp, pid=1, hostname="other-lab-pc", started="2024-01-01T02:00:00")
    with pytest.raises(LockedError, match="other-lab-pc"):
        RunLock(target).acquire()
    old = time.time() - run_lock.FOREIGN_STALE_AFTER_S - 10
    os.utime(lp, (old, old))
    with RunLock(target) as lk:
        assert "other-lab-pc" in lk.replaced_stale


def test_release_does_not_remove_someone_elses_lock(tmp_path):
    target = tmp_path / "r.xlsx"
    lk = RunLock(target)
    lk.acquire()
    _write_lock(lock_path_for(target), pid=12345, hostname="h", started="s", token="theirs")
    lk.release()
    assert lock_path_for(target).exists()


def test_unwritable_folder(tmp_path):
    with pytest.raises(LockFileError, match="cannot create the lock file"):
        RunLock(tmp_path / "missing-folder" / "r.xlsx").acquire()
    assert issubclass(LockFileError, LockedError)


def test_pid_alive():
    assert run_lock.pid_alive(os.getpid())
    assert not run_lock.pid_alive(_dead_pid())
    assert not run_lock.pid_alive(0)


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "42", "null", '{"pid": "x"}'])
def test_young_lock_that_is_not_a_readable_record_is_refused_in_one_sentence(tmp_path, content):
    """A lock file holding valid JSON that is not a lock record is still a refusal with a
    sentence, never a traceback (the check must not be an assert: it holds under python -O)."""
    target = tmp_path / "r.xlsx"
    lock_path_for(target).write_text(content)
    with pytest.raises(LockedError) as err:
        RunLock(target).acquire()
    assert str(err.value).endswith(".") and target.name in str(err.value)
