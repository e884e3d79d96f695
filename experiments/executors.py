"""Run the configs of a grid, resumably, on one machine or a Ray cluster.

:func:`run_one` claims a run folder (:func:`experiments.locks.claim_run`), trains it and
records the outcome; :func:`run_local` runs every unfinished config in this process or a
process pool, :func:`run_ray` as Ray tasks. The results directory's layout and the run
states are described in :mod:`experiments.locks`, a run folder's files in
:mod:`experiments.rundir`.

A run that raises records the error in ``error.json`` (``kind`` ``"exception"``, or
``"diverged"`` for :class:`experiments.training.RunDiverged`) and ``traceback.txt``, and
the grid goes on; the next ``grid run`` retries it. A run killed halfway leaves its
checkpoint, from which ``run_training`` resumes. Finished runs are skipped, so re-running
a grid (or a larger grid sharing runs) never trains a run twice.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from experiments import rundir
from experiments.cli import Progress
from experiments.config import RunConfig
from experiments.locks import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_STALE_AFTER_S,
    RUN_STATES,
    claim_run,
    read_lock,
    run_dir,
    run_state,
    scan_states,
)

__all__ = [
    "RUN_STATES",
    "RunOutcome",
    "run_dir",
    "run_state",
    "read_lock",
    "scan_states",
    "run_one",
    "run_local",
    "run_ray",
]

TrainFn = Callable[..., dict]


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
    if rundir.is_complete(rdir):
        return RunOutcome(rid, "skipped")
    lock = claim_run(rdir, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s)
    if lock is None:
        return RunOutcome(rid, "busy")
    start = time.perf_counter()
    try:
        if rundir.is_complete(rdir):  # finished by another worker between check and claim
            return RunOutcome(rid, "skipped")
        if not (rdir / rundir.CONFIG_FILE).is_file():
            rundir.write_json_atomic(rdir / rundir.CONFIG_FILE, cfg.to_dict())
        train = train_fn or _default_train()
        try:
            train(cfg, rdir, data_root=data_root, device=device, progress=progress)
            if not rundir.is_complete(rdir):
                raise RuntimeError(f"training returned but {rdir} holds no complete result")
        except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
            _record_failure(rdir, exc)
            error = f"{type(exc).__name__}: {exc}"
            return RunOutcome(rid, "failed", time.perf_counter() - start, error)
        rundir.clear_error(rdir)
        return RunOutcome(rid, "done", time.perf_counter() - start)
    finally:
        lock.release()


def _record_failure(rdir: Path, exc: BaseException) -> None:
    """``error.json`` and ``traceback.txt`` of a failed attempt.

    A diverged run has already written its ``error.json`` (``kind: "diverged"``, its
    epoch); only the traceback and the worker are added then, so attempts count once.
    """
    tb = "".join(traceback.format_exception(exc))
    where = {"host": socket.gethostname(), "pid": os.getpid(), "traceback": tb}
    if getattr(exc, "recorded", False):
        record = rundir.read_error(rdir) or {}
        rundir.write_text_atomic(rdir / rundir.TRACEBACK_FILE, tb)
        rundir.write_json_atomic(rdir / rundir.ERROR_FILE, {**record, **where})
        return
    kind = getattr(exc, "kind", "exception")
    rundir.record_error(rdir, repr(exc), kind if kind in rundir.ERROR_KINDS else "exception",
                        getattr(exc, "epoch", None), tb, **where)


# --------------------------------------------------------------------------- executors


def _pending(configs: Sequence[RunConfig], results_dir: Path) -> list[RunConfig]:
    return [c for c in configs if not rundir.is_complete(run_dir(results_dir, c))]


def _tally(bar: Progress, counts: dict[str, int], outcome: RunOutcome) -> None:
    counts[outcome.status] = counts.get(outcome.status, 0) + 1
    bar.update(1, postfix={k: v for k, v in counts.items() if v})
    if outcome.status == "failed":
        bar.write(f"run {outcome.run_id} failed: {outcome.error}")


def _grid_bar(configs: Sequence[RunConfig], todo: Sequence[RunConfig], show: bool,
              desc: str) -> Progress:
    """A bar over the grid's runs; in a log, one line per finished run."""
    return Progress(len(configs), desc, enabled=show, initial=len(configs) - len(todo),
                    unit="run", lines=None, leave=True)


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

    Raises:
        ValueError: ``workers`` below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(results_dir).resolve()
    todo = _pending(configs, root)
    kw = _run_kwargs(data_root, device, run_progress, stale_after_s, heartbeat_s, train_fn)
    outcomes: list[RunOutcome] = []
    counts: dict[str, int] = {}
    with _grid_bar(configs, todo, progress, "grid") as bar:
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
        with _grid_bar(configs, todo, progress, "grid (ray)") as bar:
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
