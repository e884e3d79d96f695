"""``python -m experiments certify``: randomized-smoothing certificates of a trained run.

Certifies the best-validation model of a run folder with
:func:`momentkit.smoothing.certify` (Cohen et al. 2019's CERTIFY) on the first
``--test-subset`` images of the run's own test part (the fixed subset its evaluation
uses, drawn with ``experiments.training.TEST_SUBSET_SEED``; image ``index`` is the
position in that part) and writes ``RUN/certify-sigma<S>.json`` (``S`` formatted with
``:g``): the settings ``sigma, n0, n, alpha, seed``, the package ``version``, the run's
``run_id`` and ``best_epoch``, one entry ``{index, label, prediction, radius, p_lower,
correct}`` per certified image, and a ``summary`` ``{certified_accuracy: {"0.0": ..,
"0.25": .., "0.5": .., "0.75": .., "1.0": ..}, acr, abstain_rate, n_images}``.

Resumable: the file is rewritten (atomically) after every :data:`CHUNK_IMAGES` images,
and a later call with the same settings certifies only the images not yet in it (the
file and its summary cover every image certified so far, also when a later call asks
for fewer).
Because the noise of an image depends only on ``(seed, index, sample)``, a resumed
file holds exactly what one uninterrupted call would have written. A file with other
settings (or from another best model) is refused, never mixed.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch

from experiments.checkpoints import best_model_from_checkpoint, load_checkpoint
from experiments.cli import Progress, add_runtime_args, check_device
from experiments.rundata import prepare_test_data
from experiments.rundir import CHECKPOINT_FILE, package_version, read_json, write_json_atomic
from momentkit.certification import DEFAULT_RADII, summarize_certificates
from momentkit.smoothing import certify

CHUNK_IMAGES = 10
"""Images certified between two saves of the results file."""

SETTINGS = ("sigma", "n0", "n", "alpha", "seed", "run_id", "best_epoch")
"""Keys that must match for an existing file to be resumed."""


def certify_file(run_dir: str | os.PathLike[str], sigma: float) -> Path:
    """``RUN/certify-sigma<S>.json`` with ``S = f"{sigma:g}"``."""
    return Path(run_dir) / f"certify-sigma{sigma:g}.json"


def _summary(images: list[dict[str, Any]]) -> dict[str, Any]:
    if not images:
        return {"certified_accuracy": {str(float(r)): 0.0 for r in DEFAULT_RADII},
                "acr": 0.0, "abstain_rate": 0.0, "n_images": 0}
    s = summarize_certificates([im["prediction"] for im in images],
                               [im["label"] for im in images],
                               [im["radius"] for im in images], DEFAULT_RADII)
    return {"certified_accuracy": {str(r): a for r, a in s.certified_accuracy.items()},
            "acr": s.acr, "abstain_rate": s.abstain_rate, "n_images": s.n_images}


def certify_run(
    run_dir: str | os.PathLike[str],
    sigma: float,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    test_subset: int | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    chunk: int = CHUNK_IMAGES,
) -> dict[str, Any]:
    """Certify the first ``test_subset`` test images of a run; return the file's content.

    Raises ``FileNotFoundError`` (no checkpoint), ``ValueError`` (bad settings, a
    ``test_subset`` larger than the run's test part, an existing file with other
    settings), :class:`experiments.checkpoints.CheckpointError` and
    :class:`experiments.data.DatasetNotFoundError`.
    """
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"--sigma: must be finite and >= 0, got {sigma}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"--alpha: must lie in (0, 1), got {alpha}")
    for name, value in (("--n", n), ("--n0", n0), ("--batch-size", batch_size),
                        ("chunk", chunk)):
        if value < 1:
            raise ValueError(f"{name}: must be at least 1, got {value}")
    if seed < 0:
        raise ValueError(f"--seed: must be >= 0, got {seed}")
    ckpt = Path(run_dir) / CHECKPOINT_FILE
    if not ckpt.is_file():
        raise FileNotFoundError(f"--run: no checkpoint at {str(ckpt)!r}")
    state = load_checkpoint(ckpt)
    config, model = best_model_from_checkpoint(state, device)
    test = prepare_test_data(config, data_root, device)
    count = len(test) if test_subset is None else int(test_subset)
    if not 1 <= count <= len(test):
        raise ValueError(
            f"--test-subset: must lie in [1, {len(test)}] (the run's test images), got {count}")
    out = certify_file(run_dir, sigma)
    settings = {"sigma": float(sigma), "n0": n0, "n": n, "alpha": float(alpha), "seed": seed,
                "run_id": config.run_id(),
                "best_epoch": int(state["early_stopping"]["best_epoch"])}
    images: dict[int, dict[str, Any]] = {}
    old = read_json(out) if out.exists() else None
    if out.exists() and old is None:
        raise ValueError(f"{out}: exists but is not readable JSON; remove it to start over")
    if old is not None:
        differ = [k for k in SETTINGS if old.get(k) != settings[k]]
        if differ:
            raise ValueError(
                f"{out}: holds certificates with other settings ({', '.join(differ)}: "
                f"{[old.get(k) for k in differ]} != {[settings[k] for k in differ]}); remove "
                "it or use the same settings")
        images = {int(im["index"]): im for im in old["images"]}
    todo = [i for i in range(count) if i not in images]

    def document() -> dict[str, Any]:
        done = [images[i] for i in sorted(images)]
        return {**settings, "version": package_version(), "images": done,
                "summary": _summary(done)}

    with Progress(count, f"certify sigma={sigma:g}", enabled=progress,
                  initial=count - len(todo), unit="image") as bar:
        for start in range(0, len(todo), chunk):
            index = torch.tensor(todo[start : start + chunk])
            x, y = test.batch(index)
            res = certify(model, x, sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                          seed=seed, indices=index)
            for j, i in enumerate(index.tolist()):
                pred, label = int(res.prediction[j]), int(y[j])
                images[i] = {"index": i, "label": label, "prediction": pred,
                             "radius": float(res.radius[j]), "p_lower": float(res.p_lower[j]),
                             "correct": pred == label}
            write_json_atomic(out, document())
            bar.update(len(index))
    result = document()
    if not todo:
        write_json_atomic(out, result)  # nothing new; rewrite with this version's summary
    return result


def _certify_command(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    result = certify_run(
        args.run, args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
        test_subset=args.test_subset, batch_size=args.batch_size, seed=args.seed,
        device=device, data_root=args.data_root, progress=not args.no_progress,
    )
    s = result["summary"]
    acc = ", ".join(f"{r}: {a:.4f}" for r, a in s["certified_accuracy"].items())
    print(f"certified {s['n_images']} images at sigma {args.sigma:g} (n={args.n}): "
          f"certified accuracy {{{acc}}}, ACR {s['acr']:.4f}, abstain {s['abstain_rate']:.4f}; "
          f"written to {certify_file(args.run, args.sigma)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``certify`` command (see the module docstring)."""
    p = subparsers.add_parser(
        "certify",
        help="randomized-smoothing certificates of a trained run",
        description="Certify the best model of a run folder on its test images "
        "(Cohen et al. 2019) and write RUN/certify-sigma<S>.json; resumable.",
    )
    p.add_argument("--run", required=True, help="run folder holding checkpoint.pt")
    p.add_argument("--sigma", type=float, required=True, help="smoothing noise std (pixels)")
    p.add_argument("--n", type=int, default=100_000, help="estimation copies per image")
    p.add_argument("--n0", type=int, default=100, help="selection copies per image")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--test-subset", type=int, default=None,
                   help="certify the first K images of the run's test part (default all)")
    p.add_argument("--batch-size", type=int, default=1000, help="noisy copies per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the smoothing noise")
    add_runtime_args(p)
    p.set_defaults(func=_certify_command)
