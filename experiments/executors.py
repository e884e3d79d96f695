"""Run the configs of a grid, resumably, on one machine or a Ray cluster.

Layout of a results directory (shared storage when several machines write to it)::

    RESULTS_DIR/
      grids/<grid name>.json       manifest: the grid's configs and matched-compute pairs
      runs/<run_id>/               one folder per RunConfig.run_id()
        config.json                the full config (written when a worker first claims the run)
        lock.json                  present while a worker trains it: pid, host, start, token
        checkpoint.pt              written by run_training after every epoch (resume point)
        results.json, per_image.npz   written atomically by run_training when it finishes
        error.json, traceback.txt  the last failure, removed when a retry succeeds

State of a run: ``done`` (complete results.json and per_image.npz), ``running`` (a live lock),
``failed`` (error.json and no results), otherwise ``pending`` (a stale lock counts as pending).

**Claiming.** A worker claims a run by hard-linking a fully written temporary file to
``lock.json`` (``os.link`` fails atomically if the lock exists, also on NFS), so two workers
never train the same run. The owner refreshes the lock's mtime every ``heartbeat_s`` seconds.
A lock is *stale*, and may be broken, when its owner's pid is gone on this host or its
heartbeat is older than ``stale_after_s`` seconds (a worker on another host that was killed).
Breaking renames the lock aside and checks its token, so of two workers that both see a stale
lock only one takes the run.

A run that raises records its traceback in ``error.json``/``traceback.txt`` and the grid goes
on; the next ``grid run`` retries it. A run killed halfway leaves its checkpoint, from which
``run_training`` resumes. Finished runs are skipped, so re-running a grid (or a larger grid
sharing runs) never trains a run twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experiments.config import RunConfig

__all__ = [
    "RUN_STATES",
    "RunLock",
    "RunOutcome",
    "atomic_write_text",
    "run_dir",
    "run_state",
    "read_lock",
    "lock_is_stale",
    "claim_run",
    "run_one",
    "run_local",
    "run_ray",
    "scan_states",
]

RUN_STATES = ("done", "running", "failed", "pending")
LOCK_NAME = "lock.json"
DEFAULT_STALE_AFTER_S = 600.0
DEFAULT_HEARTBEAT_S = 30.0

TrainFn = Callable[..., dict]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (atomic rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_dir(results_dir: str | Path, config: RunConfig | str) -> Path:
    """``RESULTS_DIR/runs/<run_id>`` for a config or a run id."""
    rid = config if isinstance(config, str) else config.run_id()
    return Path(results_dir) / "runs" / rid


def is_complete(rdir: Path) -> bool:
    """True when ``results.json`` parses with its result keys and ``per_image.npz`` exists."""
    try:
        res = json.loads((rdir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    needed = ("test_accuracy", "robustness", "config")
    return all(k in res for k in needed) and (rdir / "per_image.npz").is_file()


# --------------------------------------------------------------------------- locks


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    started: str
    token: str
    mtime: float


def read_lock(rdir: Path) -> LockInfo | None:
    """The lock of a run folder, or None when there is none (or it vanished meanwhile)."""
    path = rdir / LOCK_NAME
    try:
        mtime = path.stat().st_mtime
        d = json.loads(path.read_text())
        return LockInfo(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["token"]), mtime)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # unreadable content: judge by age only (pid -1 never matches a live process)
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
        self.path = rdir / LOCK_NAME
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def owned(self) -> bool:
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
    rdir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    body = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso(), "token": token}
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
    moved = read_lock_file(aside)
    if moved is not None and moved != info.token:
        with contextlib.suppress(FileExistsError):
            os.link(aside, rdir / LOCK_NAME)
    aside.unlink(missing_ok=True)


def read_lock_file(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- states


def run_state(rdir: Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> str:
    """One of :data:`RUN_STATES` for a run folder (which need not exist)."""
    if is_complete(rdir):
        return "done"
    info = read_lock(rdir)
    if info is not None and not lock_is_stale(info, stale_after_s):
        return "running"
    if (rdir / "error.json").is_file():
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
            with contextlib.suppress(OSError, ValueError, KeyError):
                ids.update(dict.fromkeys(json.loads(manifest.read_text())["run_ids"]))
        if (root / "runs").is_dir():
            ids.update(dict.fromkeys(sorted(p.name for p in (root / "runs").iterdir())))
        run_ids = list(ids)
    return {rid: run_state(run_dir(root, rid), stale_after_s) for rid in run_ids}


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one run in this ``grid run``: trained, skipped, busy or failed."""

    run_id: str
    status: str  # "done" (trained now), "skipped" (already done), "busy" (other worker), "failed"
    seconds: float = 0.0
    error: str = ""


def _default_train() -> TrainFn:
    from experiments.training import run_training

    return run_training


def run_one(
    config: RunConfig | dict[str, Any],
    results_dir: str | Path,
    *,
    data_root: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    train_fn: TrainFn | None = None,
) -> RunOutcome:
    """Claim, train and record one run; never raises for a failing training.

    ``train_fn(config, out_dir, *, data_root, device, progress)`` defaults to
    :func:`experiments.training.run_training`; it must write ``results.json`` and
    ``per_image.npz`` into ``out_dir`` and resume from whatever it left there before.
    An exception from it is recorded in ``error.json`` and ``traceback.txt`` (with the attempt
    number) and returned as a ``failed`` outcome. ``KeyboardInterrupt`` releases the lock and
    propagates (the checkpoint stays for the next attempt).
    """
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    rid = cfg.run_id()
    rdir = run_dir(results_dir, rid)
    if is_complete(rdir):
        return RunOutcome(rid, "skipped")
    lock = claim_run(rdir, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s)
    if lock is None:
        return RunOutcome(rid, "busy")
    start = time.perf_counter()
    try:
        if is_complete(rdir):  # finished by another worker between the check and the claim
            return RunOutcome(rid, "skipped")
        cfg_path = rdir / "config.json"
        if not cfg_path.is_file():
            atomic_write_text(cfg_path, json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
        train = train_fn or _default_train()
        try:
            train(cfg, rdir, data_root=data_root, device=device, progress=progress)
            if not is_complete(rdir):
                raise RuntimeError(f"training returned but {rdir} holds no complete result")
        except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
            _record_failure(rdir, exc)
            return RunOutcome(rid, "failed", time.perf_counter() - start, repr(exc))
        for name in ("error.json", "traceback.txt"):
            (rdir / name).unlink(missing_ok=True)
        return RunOutcome(rid, "done", time.perf_counter() - start)
    finally:
        lock.release()


def _record_failure(rdir: Path, exc: BaseException) -> None:
    tb = "".join(traceback.format_exception(exc))
    attempts = 1
    with contextlib.suppress(OSError, ValueError, KeyError):
        attempts = int(json.loads((rdir / "error.json").read_text())["attempts"]) + 1
    atomic_write_text(rdir / "traceback.txt", tb)
    atomic_write_text(
        rdir / "error.json",
        json.dumps(
            {
                "error": repr(exc),
                "time": _now_iso(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "attempts": attempts,
                "traceback": tb,
            },
            indent=1,
        ),
    )


# --------------------------------------------------------------------------- executors


def _pending(configs: Sequence[RunConfig], results_dir: Path) -> list[RunConfig]:
    return [c for c in configs if not is_complete(run_dir(results_dir, c))]


@contextlib.contextmanager
def _bar(total: int, initial: int, show: bool, desc: str) -> Iterator[tqdm]:
    bar = tqdm(total=total, initial=initial, disable=not show, desc=desc, unit="run")
    try:
        yield bar
    finally:
        bar.close()


def _tally(bar: tqdm, counts: dict[str, int], outcome: RunOutcome) -> None:
    counts[outcome.status] = counts.get(outcome.status, 0) + 1
    bar.update(1)
    bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=True)
    if outcome.status == "failed":
        bar.write(f"run {outcome.run_id} failed: {outcome.error}")


def _run_kwargs(
    data_root: str | None,
    device: str,
    progress: bool,
    stale_after_s: float,
    heartbeat_s: float,
    train_fn: TrainFn | None,
) -> dict[str, Any]:
    """Keyword arguments of :func:`run_one` shared by every run of an executor."""
    return {
        "data_root": data_root,
        "device": device,
        "progress": progress,
        "stale_after_s": stale_after_s,
        "heartbeat_s": heartbeat_s,
        "train_fn": train_fn,
    }


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def run_local(
    configs: Sequence[RunConfig],
    results_dir: str | Path,
    *,
    workers: int = 1,
    data_root: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    run_progress: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    threads_per_worker: int | None = None,
    train_fn: TrainFn | None = None,
) -> list[RunOutcome]:
    """Run every unfinished config here: in this process (``workers=1``) or a process pool.

    Worker processes are spawned (not forked) and each gets
    ``threads_per_worker`` (default ``cpu_count // workers``) torch threads. ``train_fn`` must
    be picklable (a module-level function) when ``workers > 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(results_dir).resolve()
    todo = _pending(configs, root)
    kw = _run_kwargs(data_root, device, run_progress, stale_after_s, heartbeat_s, train_fn)
    outcomes: list[RunOutcome] = []
    counts: dict[str, int] = {}
    with _bar(len(configs), len(configs) - len(todo), progress, "grid") as bar:
        if workers == 1:
            for cfg in todo:
                outcome = run_one(cfg, root, **kw)
                outcomes.append(outcome)
                _tally(bar, counts, outcome)
            return outcomes
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads,),
        )
        try:
            futures = {pool.submit(run_one, cfg.to_dict(), root, **kw) for cfg in todo}
            while futures:
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for fut in finished:
                    outcome = fut.result()
                    outcomes.append(outcome)
                    _tally(bar, counts, outcome)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def _ray_task(config: dict[str, Any], results_dir: str, kw: dict[str, Any]) -> RunOutcome:
    return run_one(config, results_dir, **kw)


def run_ray(
    configs: Sequence[RunConfig],
    results_dir: str | Path,
    *,
    address: str | None = None,
    gpus_per_run: float = 0.0,
    cpus_per_run: float = 1.0,
    data_root: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    init_kwargs: dict[str, Any] | None = None,
    train_fn: TrainFn | None = None,
) -> list[RunOutcome]:
    """Run every unfinished config as one Ray task with its CPU/GPU request.

    Connects to ``address`` (``"auto"``, ``"ray://host:10001"``, ...) unless Ray is already
    initialized in this process; a local instance is started when ``address`` is None. Ray is
    shut down at the end only if this call started it. ``results_dir`` must be storage that
    every Ray node sees at the same path (the locks and results are files there).

    Raises:
        ImportError: Ray is not installed (``pip install 'momentkit[ray]'``).
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "the Ray executor needs Ray: pip install 'momentkit[ray]' (or 'ray[default]')"
        ) from exc
    root = Path(results_dir).resolve()
    todo = _pending(configs, root)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, **(init_kwargs or {"include_dashboard": False}))
    kw = _run_kwargs(data_root, device, False, stale_after_s, heartbeat_s, train_fn)
    task = ray.remote(_ray_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
    outcomes: list[RunOutcome] = []
    counts: dict[str, int] = {}
    try:
        with _bar(len(configs), len(configs) - len(todo), progress, "grid (ray)") as bar:
            refs = [task.remote(cfg.to_dict(), str(root), kw) for cfg in todo]
            while refs:
                ready, refs = ray.wait(refs, num_returns=1)
                for ref in ready:
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - worker died; the run stays pending
                        outcome = RunOutcome("?", "failed", 0.0, f"ray task lost: {exc!r}")
                    outcomes.append(outcome)
                    _tally(bar, counts, outcome)
    finally:
        if started_here:
            ray.shutdown()
    return outcomes
