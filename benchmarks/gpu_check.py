"""The GPU check: everything momentkit should do on a CUDA device, in one script, with
the numbers written to one JSON file.

    python -m benchmarks.gpu_check [--device cuda] [--out docs/results/gpu-check]
        [--data-root DIR] [--quick]

In order (each step is timed, and a failing step is recorded with its error while the
later steps still run, so that one short session on a GPU machine gives every number it
can):

1. ``tests``: the test functions marked ``cuda`` (``pytest -m cuda``), which compare the
   ReLU moments, Monte Carlo, certification and ``network_moments`` on the device with
   the CPU;
2. ``train_plain`` and ``train_moment``: one epoch of the paper's LeNet on MNIST (the
   54,000 / 6,000 split, batch 100, Adam 1e-3) without and with the moment regularizer
   (alpha 1, sigma 0.5, the paper's ``first_relu`` surrogate), each followed by the
   run's evaluation (clean accuracy and the Eq. 6 robustness curve at 30 sigmas on the
   10,000 test images): the JSON keeps the training time, the time per epoch, the
   accuracy and the robustness;
3. ``certify``: randomized-smoothing certificates (sigma 0.25, n = 10,000, n0 = 100,
   alpha = 0.001) of the regularized model on the first 100 test images, with the time;
4. ``network_moments``: the diagonal mode on a batch of 64 against 64-image forward
   passes, the default mode for one image, and the regularizer's training step with
   ``moments="network"`` against a plain step (medians of interleaved rounds).

``--quick`` shrinks every step (1,000 training images, 100 test images, 10
certified images with n = 200, a batch of 4 and one round for the timings) so that
the script itself can be checked on a CPU in about a minute (``tests/test_gpu_check.py``
does); its numbers are not the GPU check's.
The JSON (``gpu_check.json`` in ``--out``) holds the machine, the settings and each
step's numbers or error. About 3 minutes on one current GPU (estimated from the CPU
times; the first run on a GPU states the real time in the JSON's ``wall_s``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._machine import REPO, machine_info

OUT_NAME = "gpu_check.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(fns: dict[str, Callable[[], Any]], rounds: int,
                  device: torch.device) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` interleaved rounds (one warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_tests(device: torch.device, quick: bool, **_: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           "-rs", str(REPO / "tests")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
            "summary": lines[-1] if lines else proc.stderr[-2000:],
            "skipped": [ln for ln in lines if ln.startswith("SKIPPED")]}


def _train(method: str, device: torch.device, quick: bool, data_root: str | None,
           workdir: Path) -> dict[str, Any]:
    from experiments.config import RunConfig
    from experiments.training import run_training

    extra = {"alpha": 1.0, "sigma": 0.5} if method == "moment" else {}
    config = RunConfig("mnist", "lenet", method, epochs=1, batch_size=100, lr=1e-3,
                       train_subset=1000 if quick else None,
                       test_subset=100 if quick else None, **extra)
    out = workdir / method
    res = run_training(config, out, data_root=data_root, device=device, progress=False)
    rob = res["robustness"]
    return {"config": config.to_dict(), "run_dir": str(out),
            "train_time_s": res["train_time_s"], "wall_time_s": res["wall_time_s"],
            "epoch_s": [h["seconds"] for h in res["history"]],
            "gradient_steps": res["gradient_steps"], "test_accuracy": res["test_accuracy"],
            "robustness": {k: rob[k] for k in ("auc", "mean", "ci") if k in rob}}


def step_train_plain(device: torch.device, quick: bool, data_root: str | None,
                     workdir: Path, **_: Any) -> dict[str, Any]:
    return _train("baseline", device, quick, data_root, workdir)


def step_train_moment(device: torch.device, quick: bool, data_root: str | None,
                      workdir: Path, **_: Any) -> dict[str, Any]:
    return _train("moment", device, quick, data_root, workdir)


def step_certify(device: torch.device, quick: bool, data_root: str | None,
                 workdir: Path, **_: Any) -> dict[str, Any]:
    from experiments.certify import certify_run

    run = workdir / "moment"
    if not (run / "checkpoint.pt").is_file():
        raise RuntimeError("the regularized model of step train_moment is missing")
    n, images = (200, 10) if quick else (10_000, 100)
    t0 = time.perf_counter()
    out = certify_run(run, 0.25, n=n, n0=100, alpha=0.001, test_subset=images,
                      device=device, data_root=data_root, progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "seconds_per_image": seconds / images, "n": n,
            "images": images, **out["summary"]}


def step_network_moments(device: torch.device, quick: bool, **_: Any) -> dict[str, Any]:
    from experiments.models import lenet
    from momentkit import moment_regularized_loss, network_moments

    torch.manual_seed(0)
    model = lenet("mnist").to(device)
    batch = 4 if quick else 64
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def plain_step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def network_step() -> None:
        opt.zero_grad()
        moment_regularized_loss(model, x, y, 0.5, 1.0, moments="network")[0].backward()
        opt.step()

    with torch.no_grad():
        fns = {
            "forward": lambda: model(x),
            "diagonal": lambda: network_moments(model, x, 0.1, covariance="diagonal"),
            "default_1": lambda: network_moments(model, x[:1], 0.1),
        }
        t = _median_times(fns, 1 if quick else 5, device)
    t.update(_median_times({"plain_step": plain_step, "network_step": network_step},
                           1 if quick else 5, device))
    mode = network_moments(model, x[:1], 0.1).mode
    return {"batch": batch, "seconds": t, "default_mode": mode,
            "diagonal_over_forward": t["diagonal"] / t["forward"],
            "network_step_over_plain": t["network_step"] / t["plain_step"]}


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "tests": step_tests,
    "train_plain": step_train_plain,
    "train_moment": step_train_moment,
    "certify": step_certify,
    "network_moments": step_network_moments,
}


def run_checks(device: torch.device, out_dir: Path, *, quick: bool = False,
               data_root: str | None = None, steps: list[str] | None = None) -> dict[str, Any]:
    """Run the steps (all by default) and write ``out_dir/gpu_check.json`` after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(device), "quick": quick, "steps": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in steps or list(STEPS):
            t0 = time.perf_counter()
            try:
                result = {"ok": True, **STEPS[name](device=device, quick=quick,
                                                    data_root=data_root, workdir=Path(tmp))}
            except Exception as exc:  # record and go on: later steps still give numbers
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["step_s"] = time.perf_counter() - t0
            report["steps"][name] = result
            report["wall_s"] = time.perf_counter() - start
            (out_dir / OUT_NAME).write_text(json.dumps(report, indent=1, default=str) + "\n")
            print(f"{name}: {'ok' if result['ok'] else result['error']} "
                  f"({result['step_s']:.1f} s)", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import check_device
    from experiments.data import resolve_data_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "gpu-check"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=None)
    args = p.parse_args(argv)
    device = check_device(args.device)
    report = run_checks(device, Path(args.out), quick=args.quick,
                        data_root=str(resolve_data_root(args.data_root)), steps=args.steps)
    failed = [k for k, v in report["steps"].items() if not v["ok"]]
    print(f"wrote {Path(args.out) / OUT_NAME} ({report['wall_s']:.0f} s)"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
