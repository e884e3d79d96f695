"""Cost of ``network_moments`` on the paper's LeNet (MNIST shapes), ratios from one run.

Timed interleaved, round by round, so that a busy machine slows every method alike:

* ``forward``: ``model(x)`` on a batch, and ``diagonal``: ``network_moments(...,
  covariance="diagonal")`` on the same batch (goal: at most 3 forward passes);
* ``factor_1``: the default mode (``"factor"`` on LeNet) for one image (goal: under
  1 s on a 2-core CPU);
* ``plain_step``: one Adam step of ``CE(model(x), y)``; ``network_step``: the same with
  :func:`momentkit.moment_regularized_loss` and ``moments="network"`` (goal: at most
  3 plain steps); ``first_relu_step`` for comparison.

Peak memory of the default mode for one image: the largest tensor it keeps is the
factor, ``K x D`` numbers (``K = 784`` input pixels, ``D`` units of the widest layer),
reported with the process's peak-RSS increase over the first call (``resource``).

    python -m benchmarks.bench_network_moments --rounds 5 --batch 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from experiments.models import lenet
from momentkit import moment_regularized_loss, network_moments


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model = lenet("mnist").to(dev).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=dev)
    y = torch.randint(10, (args.batch,), device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        network_moments(model, x[:1], args.sigma, covariance="factor")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    widest = 32 * 28 * 28
    factor_mib = 784 * widest * 4 / 2**20

    def step(kind: str) -> None:
        opt.zero_grad()
        if kind == "plain":
            loss = F.cross_entropy(model(x), y)
        else:
            loss = moment_regularized_loss(model, x, y, args.sigma, 1.0, moments=kind)[0]
        loss.backward()
        opt.step()

    methods = {
        "forward": lambda: torch.no_grad()(model)(x),
        "diagonal": lambda: torch.no_grad()(network_moments)(
            model, x, args.sigma, covariance="diagonal"),
        "factor_1": lambda: torch.no_grad()(network_moments)(
            model, x[:1], args.sigma, covariance="factor"),
        "plain_step": lambda: step("plain"),
        "network_step": lambda: step("network"),
        "first_relu_step": lambda: step("first_relu"),
    }
    for fn in methods.values():  # warm-up (tracing, caches)
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": {**vars(args), "torch": torch.__version__, "machine": platform.platform(),
                   "threads": torch.get_num_threads()},
        "median_s": med,
        "diagonal_over_forward": med["diagonal"] / med["forward"],
        "network_step_over_plain": med["network_step"] / med["plain_step"],
        "first_relu_step_over_plain": med["first_relu_step"] / med["plain_step"],
        "factor_seconds_per_image": med["factor_1"],
        "factor_tensor_mib": factor_mib,
        "factor_peak_rss_increase_mib": rss_kib / 1024,
    }
    for k, v in result.items():
        if k != "config":
            print(f"{k}: {v}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
