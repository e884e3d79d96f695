"""Cost of certifying one image against plain batched forward passes of the same model.

    python benchmarks/bench_certify.py [--n 2000] [--n0 100] [--batch-size 1000]
        [--threads 2] [--repeat 3] [--device cpu] [--seed 0] [--out benchmarks/results]

On the paper's MNIST LeNet (:func:`experiments.models.lenet`, float32, untrained: the
cost does not depend on the weights) and one MNIST-sized image it times, in one run on
the same cores:

1. ``certify``: :func:`momentkit.smoothing.certify` of the image with ``n0`` selection
   and ``n`` estimation copies;
2. ``forward``: ``n`` plain forward passes in batches of ``batch_size`` (a fixed input
   tensor, ``argmax`` and ``bincount`` of the logits, no noise): the floor any Monte
   Carlo certificate pays;
3. ``noise``: generating the ``n0 + n`` noisy copies alone (the block generators,
   ``normal_``, scaling and shifting), without the model.

Repeats are interleaved (each round runs all three once) and the best time of each is
kept, so that load from other processes hits all alike. The goal is
``certify / forward <= 1.2`` (the ``n0`` selection copies are part of the cost).
Writes ``bench_certify.csv`` (with a commented header) into ``--out`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.models import lenet
from momentkit.smoothing import SAMPLE_BLOCK, _block_generator, certify
from validation.reporting import package_version


def plain_forward(model: torch.nn.Module, x: torch.Tensor, n: int, batch_size: int) -> None:
    """``n`` forward passes of copies of ``x`` in batches of ``batch_size`` (no noise)."""
    batch = x.expand(batch_size, *x.shape[1:]).contiguous()
    with torch.no_grad():
        counts = None
        for start in range(0, n, batch_size):
            out = model(batch[: min(batch_size, n - start)])
            c = torch.bincount(out.argmax(1), minlength=out.shape[1])
            counts = c if counts is None else counts + c


def noise_only(x: torch.Tensor, total: int, batch_size: int, sigma: float) -> None:
    """The noise generation of ``total`` copies exactly as certify does it, without a model."""
    per_chunk = max(1, batch_size // SAMPLE_BLOCK)
    blocks = -(-total // SAMPLE_BLOCK)
    for first in range(0, blocks, per_chunk):
        last = min(first + per_chunk, blocks)
        noise = torch.empty((last - first) * SAMPLE_BLOCK, *x.shape[1:], device=x.device)
        for b in range(first, last):
            rows = noise[(b - first) * SAMPLE_BLOCK : (b - first + 1) * SAMPLE_BLOCK]
            rows.normal_(generator=_block_generator(x.device, 0, 0, 1, b))
        noise.mul_(sigma).add_(x[0])


def _time(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="estimation copies")
    parser.add_argument("--n0", type=int, default=100, help="selection copies")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = lenet("mnist").to(device).eval()
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)

    tasks = {
        "certify": lambda: certify(model, x, args.sigma, n0=args.n0, n=args.n,
                                   batch_size=args.batch_size, seed=args.seed),
        "forward": lambda: plain_forward(model, x, args.n, args.batch_size),
        "noise": lambda: noise_only(x, args.n0 + args.n, args.batch_size, args.sigma),
    }
    for fn in tasks.values():  # warm-up (allocator, kernels, scipy imports)
        fn()
    best = {k: float("inf") for k in tasks}
    for _ in range(args.repeat):
        for name, fn in tasks.items():
            best[name] = min(best[name], _time(fn, device))
    ratio = {k: best[k] / best["forward"] for k in tasks}

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_certify.csv"
    with path.open("w") as fh:
        fh.write(f"# momentkit_version: {package_version()}\n# torch: {torch.__version__}\n")
        fh.write(f"# config: {vars(args)}\n# cpu_count: {os.cpu_count()}\n")
        fh.write(f"# load_average: {os.getloadavg()}\n")
        fh.write("task,best_seconds,ratio_to_forward\n")
        for name in tasks:
            fh.write(f"{name},{best[name]:.4g},{ratio[name]:.4f}\n")
    print(f"LeNet (MNIST), {device}, {args.threads} threads, n={args.n}, n0={args.n0}, "
          f"batch {args.batch_size}, best of {args.repeat}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| task | best seconds | ratio to n plain forwards |\n|---|---|---|")
    for name in tasks:
        print(f"| {name} | {best[name]:.4g} | {ratio[name]:.3f} |")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
