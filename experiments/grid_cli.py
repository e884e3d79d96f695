"""``python -m experiments grid run|status|list|show|export``: the grid command line.

Grids (presets and TOML/YAML files) are :mod:`experiments.grids`; running them is
:mod:`experiments.executors`; the states of their runs :mod:`experiments.locks`.
``grid run`` exits 0 when every run it tried finished, 1 when some failed (they are
retried by the next ``grid run``), 2 on a user error.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments import locks, rundir
from experiments.cli import UsageError, add_runtime_args, check_device
from experiments.data import resolve_data_root
from experiments.grids import Grid, list_presets, load_grid, write_manifest
from experiments.locks import RUN_STATES

EXPORTED_FILES = (rundir.CONFIG_FILE, rundir.RESULTS_FILE, rundir.PER_IMAGE_FILE,
                  rundir.ERROR_FILE)
"""The small files of a run folder that ``grid export`` copies (never checkpoints)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``grid run|status|list|show|export``."""
    grid = subparsers.add_parser(
        "grid", help="run or inspect a resumable grid of training runs (presets or TOML/YAML)"
    )
    sub = grid.add_subparsers(dest="grid_command", required=True)

    run = sub.add_parser("run", help="train every unfinished run of a grid")
    run.add_argument("grid", help="preset name (see 'grid list') or a .toml/.yaml grid file")
    run.add_argument("--results-dir", default=None, help="default: results/<grid name>")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--workers", type=int, default=1, help="local worker processes")
    run.add_argument("--address", default=None, help="Ray address (default: local instance)")
    run.add_argument("--gpus-per-run", type=float, default=0.0)
    run.add_argument("--cpus-per-run", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None, help="override every run's seed")
    run.add_argument("--epochs", type=int, default=None, help="epochs of the paper-* presets")
    run.add_argument("--limit", type=int, default=None,
                     help="run at most this many of the grid's runs that are not done or "
                          "running, in the grid's order")
    run.add_argument("--stale-after", type=float, default=600.0, help="seconds without heartbeat")
    run.add_argument("--run-progress", action="store_true", help="per-epoch progress")
    run.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    # --device defaults to cuda with --gpus-per-run > 0, else cpu; --threads sets the
    # threads of this process (workers=1) or of each worker process (--workers > 1)
    add_runtime_args(run, device_default=None)
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="done/running/failed/pending runs")
    status.add_argument("target", help="a results directory, a preset or a grid file")
    status.add_argument("--results-dir", default=None, help="with a preset/file: its results")
    status.add_argument("--stale-after", type=float, default=600.0)
    status.set_defaults(func=_cmd_status)

    lst = sub.add_parser("list", help="list the presets")
    lst.set_defaults(func=_cmd_list)

    export = sub.add_parser(
        "export", help="copy the small result files (no checkpoints) of a results directory"
    )
    export.add_argument("results_dir")
    export.add_argument("dest", help="destination folder (e.g. under docs/results/)")
    export.set_defaults(func=_cmd_export)

    show = sub.add_parser("show", help="print a grid's expanded runs")
    show.add_argument("grid")
    show.set_defaults(func=_cmd_show)

    for parser in (status, lst, export, show):
        add_runtime_args(parser, device=False, data_root=False)


def _results_dir(args: Any, grid: Grid) -> Path:
    return Path(args.results_dir) if args.results_dir else Path("results") / grid.name


def _print_runs(grid: Grid, configs: list | None = None) -> None:
    for c in grid.configs if configs is None else configs:
        print(c.run_id(), json.dumps(c.to_dict(), sort_keys=True))


def _cmd_run(args: Any) -> int:
    from experiments import executors

    grid = load_grid(args.grid, epochs=args.epochs)
    if args.seed is not None:
        grid = grid.with_overrides(seed=args.seed)
    results = _results_dir(args, grid)
    configs = list(grid.configs)
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError(f"--limit: must be at least 1, got {args.limit}")
        open_states = ("pending", "failed")
        configs = [c for c in configs if locks.run_state(locks.run_dir(results, c),
                                                         args.stale_after) in open_states]
        configs = configs[: args.limit]
    counts = ", ".join(f"{k} {v}" for k, v in grid.count_by_method().items())
    print(f"grid {grid.name}: {len(grid)} runs ({counts}) -> {results}")
    if args.dry_run:
        _print_runs(grid, configs)
        return 0
    device = args.device or ("cuda" if args.gpus_per_run > 0 else "cpu")
    if args.executor == "local":  # Ray workers may have devices this machine lacks
        check_device(device)
    if args.workers < 1:
        raise UsageError(f"--workers: must be at least 1, got {args.workers}")
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results-dir: {str(results)!r} exists and is not a folder")
    write_manifest(grid, results)
    data_root = str(resolve_data_root(args.data_root).resolve())
    common = dict(data_root=data_root, device=device, stale_after_s=args.stale_after,
                  progress=not args.no_progress)
    if args.executor == "ray":
        outcomes = executors.run_ray(
            configs,
            results,
            address=args.address,
            gpus_per_run=args.gpus_per_run,
            cpus_per_run=args.cpus_per_run,
            **common,
        )
    else:
        outcomes = executors.run_local(
            configs, results, workers=args.workers, run_progress=args.run_progress,
            threads_per_worker=args.threads, **common
        )
    states = executors.scan_states(results, [c.run_id() for c in configs], args.stale_after)
    _print_counts(states)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed (see runs/<id>/error.json); rerun to retry them")
    return 1 if failed else 0


def _print_counts(states: Mapping[str, str]) -> None:
    counts = {s: 0 for s in RUN_STATES}
    for s in states.values():
        counts[s] += 1
    print(" ".join(f"{s}={counts[s]}" for s in RUN_STATES) + f" total={len(states)}")


def _cmd_status(args: Any) -> int:
    from experiments import locks

    target = Path(args.target)
    if target.is_dir():
        results, ids = target, None
    else:
        grid = load_grid(args.target)
        results, ids = _results_dir(args, grid), grid.run_ids()
    states = locks.scan_states(results, ids, args.stale_after)
    print(f"results: {results}")
    _print_counts(states)
    for rid, state in states.items():
        rdir = locks.run_dir(results, rid)
        if state == "running":
            info = locks.read_lock(rdir)
            if info is not None:
                print(f"  running {rid}: pid {info.pid} on {info.host} since {info.started}")
        elif state == "failed":
            err = rundir.read_error(rdir)
            if err is None or "error" not in err:
                print(f"  failed  {rid}: unreadable error.json")
            else:
                print(f"  failed  {rid} ({err.get('kind', 'exception')}): {err['error']} "
                      f"(attempts {err.get('attempts', '?')})")
    return 0


def export_results(results_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy each run's small files (:data:`EXPORTED_FILES` and its certificates,
    ``certify-sigma*.json``; never checkpoints) to ``dest/run_results/<run_id>/`` and the
    grid manifests to ``dest/grids/``.

    The copy is what a report needs (``python -m experiments report DEST``) and small
    enough to commit. Returns the copied paths.
    """
    src, out = Path(results_dir), Path(dest)
    copied = []
    for rdir in sorted((src / "runs").glob("*")):
        names = [*EXPORTED_FILES, *(p.name for p in sorted(rdir.glob(rundir.CERTIFY_PATTERN)))]
        for name in names:
            if (rdir / name).is_file():
                target = out / "run_results" / rdir.name / name
                target.parent.mkdir(parents=True, exist_ok=True)
                copied.append(Path(shutil.copy2(rdir / name, target)))
    for manifest in sorted((src / "grids").glob("*.json")):
        (out / "grids").mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copy2(manifest, out / "grids" / manifest.name)))
    return copied


def _cmd_export(args: Any) -> int:
    copied = export_results(args.results_dir, args.dest)
    print(f"copied {len(copied)} files to {args.dest}")
    return 0


def _cmd_list(args: Any) -> int:
    for name, desc in list_presets().items():
        print(f"{name:28s} {desc}")
    return 0


def _cmd_show(args: Any) -> int:
    grid = load_grid(args.grid)
    counts = ", ".join(f"{k} {v}" for k, v in grid.count_by_method().items())
    print(f"grid {grid.name}: {len(grid)} runs ({counts})")
    _print_runs(grid)
    for m in grid.matched:
        print(f"matched: {m.run_id} ~ {m.reference_run_id} by {m.by} (cost ratio {m.cost_ratio})")
    return 0
