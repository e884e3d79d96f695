"""Command line of the experiments: ``python -m experiments <command> ...``.

Commands: ``train`` (one run), ``evaluate`` (re-evaluate a trained run), ``demo``
(baseline vs. regularizer vs. augmentation on an MNIST subset). Each command is added
by a ``register(subparsers)`` function listed in :data:`REGISTRARS`; a new command is
one more entry there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from experiments import certify, demo, grids, report
from experiments.cli import add_runtime_args, apply_runtime_args, format_robustness
from experiments.config import METHODS, RunConfig
from experiments.data import DATASETS, DatasetNotFoundError
from experiments.models import MODELS
from experiments.training import (
    CheckpointError,
    best_model_from_checkpoint,
    default_sigmas,
    evaluate_model,
    load_checkpoint,
    package_version,
    prepare_test_data,
    run_training,
    write_json_atomic,
)

# --------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    config = RunConfig(
        dataset=args.dataset,
        model=args.model,
        method=args.method,
        sigma=args.sigma,
        alpha=args.alpha,
        folds=args.folds,
        epochs=args.epochs,
        seed=args.seed,
        train_subset=args.train_subset,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_sigmas=args.eval_sigmas,
        eval_samples=args.eval_samples,
        test_subset=args.test_subset,
    )
    out = Path(args.out) if args.out else Path("runs") / (
        f"{config.dataset}-{config.model}-{config.method}-{config.run_id()}"
    )
    results = run_training(
        config,
        out,
        data_root=args.data_root,
        device=args.device,
        progress=not args.no_progress,
        tensorboard=args.tensorboard,
    )
    print(
        f"run {results['run_id']} ({out}): test accuracy {results['test_accuracy']:.4f}, "
        f"robustness {format_robustness(results)}, {results['epochs_run']} epochs "
        f"(best {results['best_epoch']}), train time {results['train_time_s']:.1f}s"
    )
    return 0


def register_train(subparsers: argparse._SubParsersAction) -> None:
    """The ``train`` command: one run of :func:`experiments.training.run_training`."""
    p = subparsers.add_parser(
        "train",
        help="train and evaluate one model",
        description="Train one model (resuming from OUT/checkpoint.pt if present), then "
        "write OUT/results.json and OUT/per_image.npz.",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sigma", type=float, default=0.0, help="training noise std (pixels)")
    p.add_argument("--alpha", type=float, default=0.0, help="regularizer weight (moment)")
    p.add_argument("--folds", type=int, default=1, help="N~ of augment (clean + N~-1 noisy)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="use K training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on K test images")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset")
    p.add_argument("--lr", type=float, default=None, help="override the preset")
    p.add_argument("--eval-sigmas", type=int, default=30)
    p.add_argument("--eval-samples", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default runs/<name>-<id>)")
    p.add_argument("--tensorboard", action="store_true", help="log to OUT/tensorboard")
    add_runtime_args(p)
    p.set_defaults(func=_train)


# --------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    path = Path(args.run)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt.exists():
        raise FileNotFoundError(f"--run: no checkpoint at {str(ckpt)!r}")
    state = load_checkpoint(ckpt)
    config, model = best_model_from_checkpoint(state, args.device)
    overrides = {
        k: v
        for k, v in (
            ("eval_sigmas", args.eval_sigmas),
            ("eval_samples", args.eval_samples),
            ("test_subset", args.test_subset),
        )
        if v is not None
    }
    config = RunConfig.from_dict({**config.to_dict(), **overrides})
    test = prepare_test_data(config, args.data_root, args.device)
    evaluation = evaluate_model(
        model,
        test,
        sigmas=default_sigmas(config.eval_sigmas),
        samples=config.eval_samples,
        device=args.device,
    )
    report = {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "version": package_version(),
        "checkpoint": str(ckpt),
        "checkpoint_epoch": int(state["epoch"]),
        "best_epoch": int(state["early_stopping"]["best_epoch"]),
        "device": str(args.device),
        "n_test": evaluation["n_test"],
        "test_accuracy": evaluation["test_accuracy"],
        "robustness": evaluation["robustness"],
    }
    out = Path(args.output) if args.output else ckpt.parent / "evaluation.json"
    write_json_atomic(out, report)
    print(json.dumps({k: report[k] for k in ("run_id", "n_test", "test_accuracy")}))
    print(f"robustness {format_robustness(report)}; written to {out}")
    return 0


def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    """The ``evaluate`` command: accuracy and robustness of a trained run's best model."""
    p = subparsers.add_parser(
        "evaluate",
        help="re-evaluate a trained run",
        description="Evaluate the best-validation model of a run folder (or checkpoint "
        "file) on the test set and write JSON (default RUN/evaluation.json).",
    )
    p.add_argument("--run", required=True, help="run folder or checkpoint.pt path")
    p.add_argument("--eval-sigmas", type=int, default=None, help="default: the run's")
    p.add_argument("--eval-samples", type=int, default=None, help="default: the run's")
    p.add_argument("--test-subset", type=int, default=None, help="default: the run's")
    p.add_argument("--output", default=None, help="JSON file to write")
    add_runtime_args(p)
    p.set_defaults(func=_evaluate)


# --------------------------------------------------------------------------- main

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_train,
    register_evaluate,
    demo.register,
    grids.add_grid_parser,
    report.add_report_parser,
    certify.register,
]
"""Functions that each add one sub-command to the parser."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="momentkit experiments: Gaussian-robust training with the analytic "
        "moment regularizer, noisy augmentation and baselines.",
    )
    parser.add_argument("--version", action="version", version=package_version())
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        apply_runtime_args(args)
        return int(args.func(args) or 0)
    except (DatasetNotFoundError, CheckpointError, FileNotFoundError, ImportError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
