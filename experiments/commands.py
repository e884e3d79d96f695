"""``python -m experiments train`` (one run) and ``evaluate`` (re-evaluate a trained run).

``train`` checks ``--device`` and ``--out`` before anything is created, so a bad value
leaves nothing behind. A diverged run prints ``error: run diverged at epoch E (...)``,
records ``error.json`` and exits 1; user errors exit 2 (see :mod:`experiments.__main__`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import rundir
from experiments.checkpoints import best_model_from_checkpoint, load_checkpoint
from experiments.cli import UsageError, add_runtime_args, check_device, format_robustness
from experiments.config import METHODS, MOMENTS, RunConfig
from experiments.data import DATASETS
from experiments.evaluation import default_sigmas, degenerate_warning, evaluate_model
from experiments.models import MODELS
from experiments.rundata import prepare_test_data
from experiments.training import run_training


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``evaluate`` commands."""
    _register_train(subparsers)
    _register_evaluate(subparsers)


# --------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    device = check_device(args.device)
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
        moments=args.moments,
        patience=args.patience,
    )
    out = Path(args.out) if args.out else Path("runs") / (
        f"{config.dataset}-{config.model}-{config.method}-{config.run_id()}"
    )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} exists and is not a folder")
    results = run_training(
        config,
        out,
        data_root=args.data_root,
        device=device,
        progress=not args.no_progress,
        tensorboard=args.tensorboard,
    )
    flag = results.get("degenerate_predictions") or {}
    degenerate = (f" [degenerate: {flag['top_class_fraction']:.0%} of predictions one class]"
                  if flag.get("flagged") else "")
    print(
        f"run {results['run_id']} ({out}): test accuracy {results['test_accuracy']:.4f}, "
        f"robustness {format_robustness(results)}{degenerate}, {results['epochs_run']} epochs "
        f"(best {results['best_epoch']}), train time {results['train_time_s']:.1f}s"
    )
    return 0


def _register_train(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--moments",
        choices=MOMENTS,
        default="first_relu",
        help="surrogate of the moment regularizer: the paper's first-ReLU split, or every "
        "layer's moments (momentkit.network_moments)",
    )
    p.add_argument("--folds", type=int, default=1, help="N~ of augment (clean + N~-1 noisy)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None,
                   help="use K training images (at most the training set's size)")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on K test images (at most the test set's size)")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset")
    p.add_argument("--lr", type=float, default=None, help="override the preset")
    p.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience in epochs (override the preset)")
    p.add_argument("--eval-sigmas", type=int, default=30)
    p.add_argument("--eval-samples", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default runs/<name>-<id>)")
    p.add_argument("--tensorboard", action="store_true", help="log to OUT/tensorboard")
    add_runtime_args(p)
    p.set_defaults(func=_train)


# --------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    path = Path(args.run)
    ckpt = path / rundir.CHECKPOINT_FILE if path.is_dir() else path
    if not ckpt.exists():
        raise FileNotFoundError(f"--run: no checkpoint at {str(ckpt)!r}")
    state = load_checkpoint(ckpt)
    config, model = best_model_from_checkpoint(state, device)
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
    test = prepare_test_data(config, args.data_root, device)
    evaluation = evaluate_model(
        model,
        test,
        sigmas=default_sigmas(config.eval_sigmas),
        samples=config.eval_samples,
        device=device,
    )
    warning = degenerate_warning(evaluation)
    if warning is not None:
        print(warning, file=sys.stderr)
    report = {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "version": rundir.package_version(),
        "checkpoint": str(ckpt),
        "checkpoint_epoch": int(state["epoch"]),
        "best_epoch": int(state["early_stopping"]["best_epoch"]),
        "device": str(device),
        "n_test": evaluation["n_test"],
        "test_accuracy": evaluation["test_accuracy"],
        "robustness": evaluation["robustness"],
        "degenerate_predictions": evaluation["degenerate_predictions"],
    }
    out = Path(args.output) if args.output else ckpt.parent / "evaluation.json"
    rundir.write_json_atomic(out, report)
    print(json.dumps({k: report[k] for k in ("run_id", "n_test", "test_accuracy")}))
    print(f"robustness {format_robustness(report)}; written to {out}")
    return 0


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
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
