"""Tests of experiments.locks: claiming run folders, stale-lock recovery, run states."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from experiments import locks, rundir
from tests.experiments.fakes import Recorder, small_grid


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(rdir: Path, pid: int, host: str, age_s: float = 0.0) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    path = rdir / locks.LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "then", "token": "old"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_claimed_run_cannot_be_claimed_again(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    lock = locks.claim_run(rdir)
    assert lock is not None and lock.owned()
    assert locks.claim_run(rdir) is None
    assert locks.run_state(rdir) == "running"
    lock.release()
    assert not (rdir / locks.LOCK_NAME).exists()
    assert locks.run_state(rdir) == "pending"


def test_concurrent_claims_have_one_winner(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    barrier = threading.Barrier(8)
    won = []

    def claim() -> None:
        barrier.wait()
        lock = locks.claim_run(rdir)
        if lock is not None:
            won.append(lock)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()


def test_stale_locks_are_broken(tmp_path: Path) -> None:
    host = socket.gethostname()
    # a killed worker on this host: its pid is gone
    dead = tmp_path / "dead"
    _write_lock(dead, _dead_pid(), host)
    assert locks.run_state(dead) == "pending"
    lock = locks.claim_run(dead)
    assert lock is not None and lock.owned()
    lock.release()
    # a worker on another host with a fresh heartbeat holds its run
    remote = tmp_path / "remote"
    _write_lock(remote, 1, "other-host.invalid")
    assert locks.run_state(remote) == "running"
    assert locks.claim_run(remote, stale_after_s=600) is None
    # ... until its heartbeat is older than stale_after
    _write_lock(remote, 1, "other-host.invalid", age_s=700)
    assert locks.run_state(remote, stale_after_s=600) == "pending"
    lock = locks.claim_run(remote, stale_after_s=600)
    assert lock is not None
    lock.release()
    # a live process on this host keeps its lock however old its heartbeat... up to stale_after
    live = tmp_path / "live"
    _write_lock(live, os.getpid(), host, age_s=10)
    assert locks.claim_run(live, stale_after_s=600) is None


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    lock = locks.claim_run(rdir, heartbeat_s=0.05)
    path = rdir / locks.LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


def test_run_states_follow_the_run_folder(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    assert locks.run_state(rdir) == "pending"  # need not exist
    rundir.record_error(rdir, "boom", "exception")
    assert locks.run_state(rdir) == "failed"
    Recorder()(small_grid()[0], rdir)
    assert locks.run_state(rdir) == "done"  # complete results win over an old error
    assert locks.scan_states(tmp_path / "nothing-here") == {}


def test_unreadable_lock_is_judged_by_age(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    rdir.mkdir()
    (rdir / locks.LOCK_NAME).write_text("{not json")
    info = locks.read_lock(rdir)
    assert info is not None and info.pid == -1
    assert locks.run_state(rdir) == "running"  # fresh: someone may be writing it
    then = time.time() - 700
    os.utime(rdir / locks.LOCK_NAME, (then, then))
    assert locks.run_state(rdir, stale_after_s=600) == "pending"
    lock = locks.claim_run(rdir, stale_after_s=600)
    assert lock is not None
    assert json.loads((rdir / locks.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
