"""Monte Carlo throughput, memory, and analytic-vs-Monte-Carlo cost at matched accuracy.

    python benchmarks/bench_montecarlo.py [--n 256 --p 512 --d 10] [--samples 200000]
        [--threads 2] [--repeat 3] [--seed 0] [--out benchmarks/results]

On one Affine-ReLU-Affine network ``g(x) = B ReLU(A x + c1) + c2`` (float64, diagonal
input covariance, one input point) it measures, in one run and on the same cores:

1. samples per second of the Numba kernel
   (:func:`momentkit.references.montecarlo.monte_carlo_affine_relu_affine`, mean only
   and with the full covariance), of a chunked torch GEMM Monte Carlo and of a
   chunked plain NumPy one (both accumulate the mean and second moments only); the
   repeats are interleaved and the best of each is kept, so that load from other
   processes affects all estimators alike;
2. the Numba kernel's peak resident-memory growth at 1e4, 1e5 and 1e6 samples;
3. the time of Theorem 1 (:func:`momentkit.shallow.affine_relu_affine_mean`) against
   the time Monte Carlo needs for a standard error of 1e-3 on every output
   (``N = (max output std / 1e-3)^2`` samples at the measured Numba throughput).

Writes ``bench_montecarlo.csv`` (with a commented header) into ``--out`` and prints a
markdown table for ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from momentkit.references.montecarlo import monte_carlo_affine_relu_affine
from momentkit.shallow import affine_relu_affine_mean
from validation.reporting import package_version
from validation.suite_cost import measure


def torch_gemm_mc(mean, std, A, c1, B, c2, n_samples: int, seed: int, chunk: int = 4096):
    """Chunked torch Monte Carlo: one ``randn`` and two GEMMs per chunk; mean and
    second-moment sums only."""
    gen = torch.Generator(device=mean.device).manual_seed(seed)
    At, Bt = A.T.contiguous(), B.T.contiguous()
    s1 = torch.zeros(B.shape[0], dtype=torch.float64, device=mean.device)
    s2 = torch.zeros_like(s1)
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        x = torch.randn(m, mean.numel(), generator=gen, dtype=mean.dtype, device=mean.device)
        y = torch.relu(torch.addmm(c1, x * std + mean, At)) @ Bt + c2
        s1 += y.sum(0)
        s2 += (y * y).sum(0)
        done += m
    return s1 / n_samples


def numpy_mc(mean, std, A, c1, B, c2, n_samples: int, seed: int, chunk: int = 4096):
    """The same in plain NumPy (``default_rng().standard_normal``, ``@``)."""
    rng = np.random.default_rng(seed)
    At, Bt = np.ascontiguousarray(A.T), np.ascontiguousarray(B.T)
    s1 = np.zeros(B.shape[0])
    s2 = np.zeros(B.shape[0])
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        x = rng.standard_normal((m, mean.size)) * std + mean
        y = np.maximum(x @ At + c1, 0.0) @ Bt + c2
        s1 += y.sum(0)
        s2 += (y * y).sum(0)
        done += m
    return s1 / n_samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="input size")
    parser.add_argument("--p", type=int, default=512, help="hidden width")
    parser.add_argument("--d", type=int, default=10, help="output size")
    parser.add_argument("--sigma", type=float, default=0.5, help="input noise std")
    parser.add_argument("--samples", type=int, default=200_000, help="samples per timing")
    parser.add_argument("--threads", type=int, default=2, help="threads for every estimator")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device of the torch estimator")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    n, p, d = args.n, args.p, args.d
    A = rng.standard_normal((p, n)) / math.sqrt(n)
    c1 = rng.standard_normal(p)
    B = rng.standard_normal((d, p)) / math.sqrt(p)
    c2 = rng.standard_normal(d)
    mean = rng.standard_normal(n)
    std = np.full(n, args.sigma)
    t = {
        k: torch.from_numpy(v).to(dev)
        for k, v in {"A": A, "c1": c1, "B": B, "c2": c2, "mean": mean, "std": std}.items()
    }
    N = args.samples

    def numba_mean():
        return monte_carlo_affine_relu_affine(
            mean, std**2, A, c1, B, c2, N, seed=args.seed, compute_cov=False, n_threads=args.threads
        )

    def numba_cov():
        return monte_carlo_affine_relu_affine(
            mean, std**2, A, c1, B, c2, N, seed=args.seed, compute_cov=True, n_threads=args.threads
        )

    def torch_gemm():
        return torch_gemm_mc(t["mean"], t["std"], t["A"], t["c1"], t["B"], t["c2"], N, args.seed)

    def plain_numpy():
        return numpy_mc(mean, std, A, c1, B, c2, N, args.seed)

    estimators = {
        "numba (mean)": numba_mean,
        "numba (mean + full cov)": numba_cov,
        "torch GEMM": torch_gemm,
        "numpy": plain_numpy,
    }
    monte_carlo_affine_relu_affine(mean, std**2, A, c1, B, c2, 100, seed=0)  # compile
    best = dict.fromkeys(estimators, math.inf)
    for _ in tqdm(range(args.repeat), desc="throughput", file=sys.stderr):
        for name, fn in estimators.items():
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best[name] = min(best[name], time.perf_counter() - t0)
    rate = {k: N / v for k, v in best.items()}

    cpu = torch.device("cpu")
    memory = {}
    for m in tqdm([10_000, 100_000, 1_000_000], desc="memory", file=sys.stderr):
        _, peak, _ = measure(
            lambda m=m: monte_carlo_affine_relu_affine(
                mean,
                std**2,
                A,
                c1,
                B,
                c2,
                m,
                seed=args.seed,
                compute_cov=False,
                n_threads=args.threads,
            ),
            cpu,
        )
        memory[m] = peak / 2**20

    res = numba_mean()
    max_std = float((res.stderr * math.sqrt(N)).max())
    target = 1e-3
    n_needed = (max_std / target) ** 2
    mc_seconds = n_needed / rate["numba (mean)"]
    mt = {k: torch.from_numpy(v) for k, v in {"A": A, "c1": c1, "B": B, "c2": c2}.items()}
    x = torch.from_numpy(mean)
    var = torch.from_numpy(std**2)
    analytic, _, _ = measure(
        lambda: affine_relu_affine_mean(x, var, mt["A"], mt["c1"], mt["B"], mt["c2"]),
        cpu,
        repeat=20,
    )
    speedup = mc_seconds / analytic

    rows = [(k, f"{rate[k]:.4g}", f"{rate[k] / rate['torch GEMM']:.3f}") for k in estimators]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_montecarlo.csv"
    with path.open("w") as fh:
        fh.write(f"# momentkit_version: {package_version()}\n# torch: {torch.__version__}\n")
        fh.write(f"# config: {vars(args)}\n# cpu_count: {os.cpu_count()}\n")
        fh.write(f"# load_average: {os.getloadavg()}\n")
        fh.write("quantity,value,ratio_to_torch_gemm\n")
        for name, r, ratio in rows:
            fh.write(f"samples_per_second[{name}],{r},{ratio}\n")
        for m, mib in memory.items():
            fh.write(f"numba_peak_mib[{m}],{mib:.3f},\n")
        fh.write(f"analytic_seconds,{analytic:.4g},\nmc_samples_for_1e-3,{n_needed:.4g},\n")
        fh.write(f"mc_seconds_for_1e-3,{mc_seconds:.4g},\nanalytic_speedup,{speedup:.4g},\n")
    print(
        f"network {n}-{p}-{d}, float64, {args.threads} threads, {N} samples per timing, "
        f"best of {args.repeat}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| estimator | samples / s | ratio to torch GEMM |\n|---|---|---|")
    for name, r, ratio in rows:
        print(f"| {name} | {r} | {ratio} |")
    print("\n| samples | Numba peak memory growth (MiB) |\n|---|---|")
    for m, mib in memory.items():
        print(f"| {m:.0e} | {mib:.2f} |")
    print(
        f"\nTheorem 1: {analytic * 1e3:.3f} ms. Monte Carlo for standard error {target:g}: "
        f"{n_needed:.3g} samples, {mc_seconds:.3g} s at the Numba rate. "
        f"Analytic is {speedup:.3g}x faster.\nwritten: {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
