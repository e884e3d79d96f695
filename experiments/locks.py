"""Run folders of a results directory: who is training which run, and in what state each is.

Layout of a results directory (shared storage when several machines write to it)::

    RESULTS_DIR/
      grids/<grid name>.json       manifest: the grid's configs and matched-compute pairs
      runs/<run_id>/               one run folder per RunConfig.run_id() (see experiments.rundir)
        lock.json                  present while a worker trains it: pid, host, start, token

State of a run (:data:`RUN_STATES`): ``done`` (complete ``results.json`` and
``per_image.npz``), ``running`` (a live lock), ``failed`` (``error.json`` and no results:
an exception or a diverged training), otherwise ``pending`` (a stale lock counts as
pending).

**Claiming.** A worker claims a run by hard-linking a fully written temporary file to
``lock.json`` (``os.link`` fails atomically if the lock exists, also on NFS), so two workers
never train the same run. The owner refreshes the lock's mtime every ``heartbeat_s`` seconds.
A lock is *stale*, and may be broken, when its owner's pid is gone on this host or its
heartbeat is older than ``stale_after_s`` seconds (a worker on another host that was killed).
Breaking renames the lock aside and checks its token, so of two workers that both see a stale
lock only one takes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from experiments import rundir
from experiments.config import RunConfig

__all__ = [
    "RUN_STATES",
    "LOCK_NAME",
    "DEFAULT_STALE_AFTER_S",
    "DEFAULT_HEARTBEAT_S",
    "LockInfo",
    "RunLock",
    "run_dir",
    "read_lock",
    "lock_is_stale",
    "claim_run",
    "run_state",
    "scan_states",
]

RUN_STATES = ("done", "running", "failed", "pending")
LOCK_NAME = rundir.LOCK_FILE
DEFAULT_STALE_AFTER_S = 600.0
DEFAULT_HEARTBEAT_S = 30.0


def run_dir(results_dir: str | Path, config: RunConfig | str) -> Path:
    """``RESULTS_DIR/runs/<run_id>`` for a config or a run id."""
    rid = config if isinstance(config, str) else config.run_id()
    return Path(results_dir) / "runs" / rid


# --------------------------------------------------------------------------- locks


@dataclass(frozen=True)
class LockInfo:
    """The content of a ``lock.json`` and its modification time (the last heartbeat)."""

    pid: int
    host: str
    started: str
    token: str
    mtime: float


def read_lock(rdir: Path) -> LockInfo | None:
    """The lock of a run folder, or None when there is none (or it vanished meanwhile).

    A lock whose content cannot be read is returned with pid -1 (never a live process),
    so only its age decides whether it is stale.
    """
    path = Path(rdir) / LOCK_NAME
    try:
        mtime = path.stat().st_mtime
        d = json.loads(path.read_text())
        return LockInfo(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["token"]), mtime)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return LockInfo(-1, "?", "?", "?", mtime)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(info: LockInfo, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> bool:
    """A lock is stale when its pid is dead on this host or its heartbeat is too old."""
    if time.time() - info.mtime > stale_after_s:
        return True
    return info.host == socket.gethostname() and not _pid_alive(info.pid)


class RunLock:
    """An owned lock on a run folder, with a heartbeat thread that refreshes its mtime."""

    def __init__(self, rdir: Path, token: str, heartbeat_s: float) -> None:
        self.path = Path(rdir) / LOCK_NAME
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def owned(self) -> bool:
        """True while ``lock.json`` still holds this lock's token."""
        info = read_lock(self.path.parent)
        return info is not None and info.token == self.token

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def claim_run(
    rdir: Path,
    *,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
) -> RunLock | None:
    """Atomically claim a run folder; None when another live worker holds it."""
    rdir = Path(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    body = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "token": token,
        }
    )
    tmp = rdir / f".lock.{token}.tmp"
    tmp.write_text(body)
    try:
        for _ in range(3):
            try:
                os.link(tmp, rdir / LOCK_NAME)
                return RunLock(rdir, token, heartbeat_s)
            except FileExistsError:
                info = read_lock(rdir)
                if info is None:
                    continue  # released meanwhile: try again
                if not lock_is_stale(info, stale_after_s):
                    return None
                _break_stale(rdir, info)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _break_stale(rdir: Path, info: LockInfo) -> None:
    """Move a stale lock aside; if what we moved was a fresh lock (a race), put it back."""
    aside = rdir / f".lock.stale.{uuid.uuid4().hex}"
    try:
        os.rename(rdir / LOCK_NAME, aside)
    except FileNotFoundError:
        return
    moved = rundir.read_json(aside)
    if moved is not None and str(moved.get("token")) != info.token:
        with contextlib.suppress(FileExistsError):
            os.link(aside, rdir / LOCK_NAME)
    aside.unlink(missing_ok=True)


# --------------------------------------------------------------------------- states


def run_state(rdir: Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> str:
    """One of :data:`RUN_STATES` for a run folder (which need not exist)."""
    if rundir.is_complete(rdir):
        return "done"
    info = read_lock(rdir)
    if info is not None and not lock_is_stale(info, stale_after_s):
        return "running"
    if (Path(rdir) / rundir.ERROR_FILE).is_file():
        return "failed"
    return "pending"


def scan_states(
    results_dir: str | Path,
    run_ids: Sequence[str] | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> dict[str, str]:
    """run_id -> state for ``run_ids`` (default: every run folder and every manifest's runs)."""
    root = Path(results_dir)
    if run_ids is None:
        ids: dict[str, None] = {}
        for manifest in sorted((root / "grids").glob("*.json")):
            listed = (rundir.read_json(manifest) or {}).get("run_ids")
            if isinstance(listed, list):
                ids.update(dict.fromkeys(str(rid) for rid in listed))
        if (root / "runs").is_dir():
            ids.update(dict.fromkeys(sorted(p.name for p in (root / "runs").iterdir())))
        run_ids = list(ids)
    return {rid: run_state(run_dir(root, rid), stale_after_s) for rid in run_ids}
