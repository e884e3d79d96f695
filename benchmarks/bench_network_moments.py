"""Cost of ``network_moments`` on the paper's LeNet (MNIST shapes), ratios from one run.

Timed interleaved, round by round, so that a busy machine slows every method alike:

* ``forward``: ``model(x)`` on a batch, and ``diagonal``: ``network_moments(...,
  covariance="diagonal")`` on the same batch (goal: at most 3 forward passes);
* ``factor_1``: the default mode (``"factor"`` on LeNet) for one image (goal: under
  1 s on a 2-core CPU);
* ``plain_step``: one Adam step of ``CE(model(x), y)``; ``network_step``: the same with
  :func:`momentkit.moment_regularized_loss` and ``moments="network"`` (goal: at most
  3 plain steps); ``first_relu_step`` for comparison; ``network_step_autograd_chain``:
  the network step with the max-pooling chains differentiated by autograd through
  their operations instead of in closed form (``momentkit.network._chain``), the same
  values, to measure what the closed-form backward pass saves.

Peak memory of the default mode for one image: the largest tensor it keeps is the
factor, ``K x D`` numbers (``K = 784`` input pixels, ``D`` units of the widest layer),
reported with the process's peak-RSS increase over the first call (``resource``).

Where the time of ``"diagonal"`` goes: after the interleaved rounds, the same call is
timed again with the max-pooling layers (chained Clark maxima) and the ReLU moments
timed on their own (``diagonal_breakdown_s``: medians; the rest is the affine layers'
mean and variance passes and the graph walk), and the ``moments="network"`` step split
into its forward (loss) and backward passes (``network_step_split_s``).

    python -m benchmarks.bench_network_moments --rounds 5 --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from experiments.models import lenet
from momentkit import moment_regularized_loss, network_moments
from momentkit.network import _chain
from momentkit.network import layers as _layers
from momentkit.network import pooling as _pooling
from momentkit.network import propagate as _propagate


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _stage_timers(acc: dict[str, float]):
    """Time ``network_moments``'s max-pooling and ReLU layers on their own (into ``acc``)."""
    patched = [(_propagate, "max_pool2d", "max_pool"), (_layers, "leaky_relu", "relu")]
    originals = [getattr(mod, name) for mod, name, _ in patched]

    def wrap(fn, key):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            return out
        return timed

    for (mod, name, key), fn in zip(patched, originals, strict=True):
        setattr(mod, name, wrap(fn, key))
    try:
        yield
    finally:
        for (mod, name, _), fn in zip(patched, originals, strict=True):
            setattr(mod, name, fn)


@contextlib.contextmanager
def _autograd_chain():
    """Pooling chains through autograd (``_chain.diagonal_chain_reference``)."""
    fast = _pooling.diagonal_chain

    def reference(ms, vs, oks, zero_first=False):
        return _chain.diagonal_chain_reference(ms, vs, oks, zero_first)

    _pooling.diagonal_chain = reference
    try:
        yield
    finally:
        _pooling.diagonal_chain = fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
        "network_step_autograd_chain": lambda: _with_autograd_chain(step),
    }
    for fn in methods.values():  # warm-up (tracing, caches)
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    parts: dict[str, list[float]] = {"total": [], "max_pool": [], "relu": []}
    split: dict[str, list[float]] = {"forward": [], "backward": []}
    for _ in range(args.rounds):
        acc: dict[str, float] = {}
        with _stage_timers(acc):
            parts["total"].append(_timed(methods["diagonal"]))
        for key in ("max_pool", "relu"):
            parts[key].append(acc.get(key, 0.0))
        opt.zero_grad()
        t0 = time.perf_counter()
        loss = moment_regularized_loss(model, x, y, args.sigma, 1.0, moments="network")[0]
        t1 = time.perf_counter()
        loss.backward()
        split["forward"].append(t1 - t0)
        split["backward"].append(time.perf_counter() - t1)
    breakdown = {k: statistics.median(v) for k, v in parts.items()}
    breakdown["rest"] = breakdown["total"] - breakdown["max_pool"] - breakdown["relu"]
    result = {
        "config": {**vars(args), "torch": torch.__version__, "machine": platform.platform(),
                   "threads": torch.get_num_threads()},
        "median_s": med,
        "diagonal_over_forward": med["diagonal"] / med["forward"],
        "network_step_over_plain": med["network_step"] / med["plain_step"],
        "first_relu_step_over_plain": med["first_relu_step"] / med["plain_step"],
        "network_step_autograd_chain_over_plain":
            med["network_step_autograd_chain"] / med["plain_step"],
        "autograd_chain_over_closed_form_per_round": statistics.median(
            a / b for a, b in zip(times["network_step_autograd_chain"],
                                  times["network_step"], strict=True)),
        "factor_seconds_per_image": med["factor_1"],
        "factor_tensor_mib": factor_mib,
        "factor_peak_rss_increase_mib": rss_kib / 1024,
        "diagonal_breakdown_s": breakdown,
        "diagonal_breakdown_in_forward_passes": {
            k: v / med["forward"] for k, v in breakdown.items()},
        "network_step_split_s": {k: statistics.median(v) for k, v in split.items()},
    }
    for k, v in result.items():
        if k != "config":
            print(f"{k}: {v}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


def _with_autograd_chain(step) -> None:
    with _autograd_chain():
        step("network")


if __name__ == "__main__":
    main()
