"""Cost of one training step: plain vs moment-regularized vs noisy augmentation (LeNet, MNIST).

Ways to train the paper's LeNet on MNIST (``experiments.models.lenet``), each
timed per mini-batch (forming the batch, forward, backward, Adam step) on the same
model, interleaved round by round so that a busy machine slows all of them alike:

* ``plain``: ``CE(Phi(x), y)`` on clean batches;
* ``moment``: ``CE(Phi(x), y) + alpha CE(Omega(mu3), y)``
  (:func:`momentkit.regularizer.moment_regularized_loss`);
* ``augment``: ``CE(Phi(x~), y)`` on batches of :func:`experiments.augment.augmented_batches`
  (``folds``-fold augmentation: clean images and noisy copies, noise drawn per batch);
* ``gaussian``: Gaussian noise training in the style of Cohen et al. (2019),
  ``CE(Phi(x + sigma z), y)`` with one fresh draw per image and epoch,
  the batches of :func:`experiments.augment.gaussian_noise_batches` (the training
  loop's own), noise added in place by :func:`experiments.augment.add_counter_normal_`;
* ``moment_network`` (only when named in ``--methods``): the regularized step on
  whole-network moments, ``moment_regularized_loss(..., moments="network")``.

``--batch-sizes`` times several batch sizes in the same rounds (one model per batch
size), so that all ratios of a run are measured under the same load. Reported per
batch size: the median time per step of each method, the ratios to ``plain`` (the
medians' ratio and the median of the per-round ratios; the requirements are at most
2.5 for ``moment`` and at most 1.1 for ``augment`` and ``gaussian``), the time of one
epoch over the 90 % training split (``ceil(n / batch)`` steps, ``folds`` times as many
for augmentation; extrapolated from the step times, not run), the load average of the
machine around every round, and the peak memory of
each method, measured in a fresh subprocess per method (peak RSS from
``resource.getrusage`` on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
``--profile`` adds a profile of the regularized step. ``--naive-relu-mean`` adds a
diagnostic method, ``moment_naive``: the same regularized step with
:func:`momentkit.relu.relu_mean` swapped for a plain float32 formula with no guards
(:func:`naive_relu_mean`), to show how much of the step's cost is the rectified
Gaussian mean; it is not a method to train with.

Results go to a JSON file whose ``config`` records the arguments, the versions and the
machine. Run by hand, never in CI::

    MOMENTKIT_DATA=../shared/data python benchmarks/bench_train_step.py --device cpu \
        --batch-sizes 100 200 1000 --folds 2 --no-memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine_info, proc_status_kb, reset_peak_rss
from torch import nn
from tqdm.auto import tqdm

from experiments import _philox_numba
from experiments.augment import augmented_batches, gaussian_noise_batches
from experiments.data import ImageSet, iterate_batches, load_dataset
from experiments.models import lenet
from momentkit import regularizer
from momentkit.regularizer import moment_regularized_loss

METHODS = ("plain", "moment", "augment", "gaussian", "moment_network")
DEFAULT_METHODS = METHODS[:4]
REPO = Path(__file__).resolve().parent.parent


class _NaiveReluMean(torch.autograd.Function):
    """``mu Phi(z) + s phi(z)``, ``z = mu / s``, in the input dtype; needs ``s > 0``."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        z = mu / s
        cdf = torch.special.ndtr(z)
        pdf = z.square_().mul_(-0.5).exp_().mul_(1.0 / math.sqrt(2.0 * math.pi))
        ctx.save_for_backward(cdf, pdf)
        ctx.s_shape = s.shape
        return torch.addcmul(mu * cdf, s, pdf)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cdf, pdf = ctx.saved_tensors
        return grad * cdf, (grad * pdf).sum_to_size(ctx.s_shape)


def naive_relu_mean(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Diagnostic stand-in for :func:`momentkit.relu.relu_mean` (no checks, no tails)."""
    return _NaiveReluMean.apply(mean, var.sqrt())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None,
                   help="data root holding MNIST/raw (default: $MOMENTKIT_DATA, else ./data)")
    p.add_argument("--synthetic", action="store_true",
                   help="uniform random images instead of MNIST (changes the cost of the "
                        "rectified-Gaussian mean, which depends on the data)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="time these batch sizes in the same rounds (overrides --batch-size; "
                        "memory and profile use the first)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="methods to time (plain is always timed; moment_network only "
                        "when named)")
    p.add_argument("--sigma", type=float, default=0.5, help="training noise std (pixels)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--folds", type=int, default=21, help="augmentation folds N~")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", action="store_true", help="profile the regularized step")
    p.add_argument("--naive-relu-mean", action="store_true",
                   help="also time the regularized step with a naive float32 relu_mean")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--output", default=str(REPO / "out" / "bench_train_step.json"))
    p.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or [args.batch_size]
    args.batch_size = args.batch_sizes[0]
    args.methods = ["plain", *(m for m in METHODS[1:] if m in args.methods)]
    return args


def load_train(args: argparse.Namespace) -> tuple[ImageSet, int]:
    """The training images (uint8) and the size of the 90 % training split."""
    if args.synthetic:
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (60000, 1, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (60000,), generator=gen)
        train = ImageSet(images, labels)
    else:
        train = load_dataset("mnist", args.data_root).train
    return train, len(train) - round(0.1 * len(train))


def batch_stream(method: str, train: ImageSet, args: argparse.Namespace
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches as the method's training loop forms them (epoch after epoch)."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        if method == "augment":
            yield from augmented_batches(train, args.batch_size, args.folds, args.sigma,
                                         args.seed, gen)
        elif method == "gaussian":
            yield from gaussian_noise_batches(train, args.batch_size, args.sigma, args.seed,
                                              epoch, gen)
        else:
            yield from iterate_batches(train, args.batch_size, generator=gen)
        epoch += 1


def make_step(method: str, model: nn.Module, opt: torch.optim.Optimizer,
              batches: Iterator, args: argparse.Namespace, device: torch.device
              ) -> Callable[[], float]:
    def step() -> float:
        """One training step; returns the seconds spent forming the batch (noise included)."""
        t0 = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        sync(device)
        formed = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        if method == "moment":
            loss = moment_regularized_loss(model, x, y, args.sigma, args.alpha)[0]
        elif method == "moment_network":
            loss = moment_regularized_loss(model, x, y, args.sigma, args.alpha,
                                           moments="network")[0]
        elif method == "moment_naive":
            real = regularizer.relu_mean
            regularizer.relu_mean = naive_relu_mean
            try:
                loss = moment_regularized_loss(model, x, y, args.sigma, args.alpha)[0]
            finally:
                regularizer.relu_mean = real
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return formed
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(args: argparse.Namespace, train: ImageSet, device: torch.device):
    torch.manual_seed(args.seed)
    train = train.to(device)
    model = lenet("mnist").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    _philox_numba.warm_up()  # compile (or load) the noise kernel outside the timed steps
    methods = (*args.methods, "moment_naive") if args.naive_relu_mean else args.methods
    steps = {m: make_step(m, model, opt, batch_stream(m, train, args), args, device)
             for m in methods}
    return model, steps


def time_steps(args: argparse.Namespace, train: ImageSet, device: torch.device):
    """Step and batch-forming times per batch size and method; load averages per round.

    A round runs one step of every method at every batch size, so all of them see the
    same load; each round runs the methods in a fresh random order (seeded by ``--seed``
    and the round), so that no method always follows the same one: a rotation of one
    cyclic order would not do that (each method would follow its cyclic predecessor in
    every round, and a step after a memory-hungry one finds the caches cold). The first
    ``args.warmup`` rounds are not kept.
    Returns ``(step_times, forming_times, load)``: ``{batch: {method: [seconds]}}``
    twice and the 1/5/15-minute load averages before every round and after the last.
    """
    steps = {bs: setup(argparse.Namespace(**{**vars(args), "batch_size": bs}), train,
                       device)[1] for bs in args.batch_sizes}
    times = {bs: {m: [] for m in steps[bs]} for bs in steps}
    forming = {bs: {m: [] for m in steps[bs]} for bs in steps}
    load = []
    for r in tqdm(range(args.warmup + args.repeats), desc="timing rounds"):
        load.append(list(os.getloadavg()))
        for bs in steps:
            methods = list(steps[bs])
            random.Random(args.seed * 100_003 + r).shuffle(methods)
            for method in methods:
                sync(device)
                t0 = time.perf_counter()
                formed = steps[bs][method]()
                sync(device)
                if r >= args.warmup:
                    times[bs][method].append(time.perf_counter() - t0)
                    forming[bs][method].append(formed)
    load.append(list(os.getloadavg()))
    return times, forming, load


def summarize(times: dict[str, list[float]], forming: dict[str, list[float]],
              batch_size: int, args: argparse.Namespace, n_train: int) -> dict:
    """Medians, ratios to ``plain`` and extrapolated epochs of one batch size's times."""
    median = {m: statistics.median(t) for m, t in times.items()}
    steps_per_epoch = math.ceil(n_train / batch_size)
    epoch = {m: steps_per_epoch * median[m] * (args.folds if m == "augment" else 1)
             for m in median}
    results: dict = {"batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
                     "step_seconds": times, "median_step_seconds": median,
                     "batch_forming_seconds": forming,
                     "median_batch_forming_seconds": {
                         m: statistics.median(t) for m, t in forming.items()}}
    for m in median:
        if m == "plain":
            continue
        per_round = [a / p for a, p in zip(times[m], times["plain"], strict=True)]
        results[f"step_ratio_{m}_over_plain"] = median[m] / median["plain"]
        results[f"step_ratio_{m}_over_plain_min"] = min(times[m]) / min(times["plain"])
        results[f"step_ratio_{m}_over_plain_per_round"] = per_round
        results[f"step_ratio_{m}_over_plain_median_of_rounds"] = statistics.median(per_round)
    results["epoch_seconds_extrapolated"] = epoch
    for m in ("augment", "gaussian"):
        if m in epoch and "moment" in epoch:
            results[f"epoch_ratio_{m}_over_moment"] = epoch[m] / epoch["moment"]
    if "moment" in epoch:
        results["epoch_ratio_moment_over_plain"] = epoch["moment"] / epoch["plain"]
    return results


def worker(args: argparse.Namespace) -> None:
    """Run a few steps of one method and print its peak memory as JSON.

    Loading the data set has a peak of its own, so the peak-RSS mark is reset after
    the setup (Linux ``/proc/self/clear_refs``) and the peak of the steps is read from
    ``VmHWM``. Where that is unavailable, the process-lifetime ``ru_maxrss`` of
    ``resource.getrusage`` is reported instead (it includes the setup).
    """
    device = torch.device(args.device)
    train, _ = load_train(args)
    _, steps = setup(args, train, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before_kb = proc_status_kb("VmRSS")
    reset = reset_peak_rss()
    for _ in range(args.memory_steps):
        steps[args.worker]()
    sync(device)
    peak_kb = proc_status_kb("VmHWM") if reset else None
    out = {
        "method": args.worker,
        "rss_before_steps_mib": before_kb / 1024 if before_kb is not None else None,
        "peak_rss_mib": (peak_kb if peak_kb is not None
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
        "peak_rss_source": "VmHWM after reset" if peak_kb is not None else "ru_maxrss",
    }
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for method in tqdm(args.methods, desc="memory subprocesses"):
        cmd = [sys.executable, __file__, "--worker", method, "--device", args.device,
               "--seed", str(args.seed), "--batch-size", str(args.batch_size),
               "--sigma", str(args.sigma), "--alpha", str(args.alpha),
               "--folds", str(args.folds), "--memory-steps", str(args.memory_steps)]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        if args.synthetic:
            cmd.append("--synthetic")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {method} failed:\n{done.stderr}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def profile_moment_step(args: argparse.Namespace, train: ImageSet, device: torch.device
                        ) -> dict:
    """Self time per operator over a few regularized steps, and a phase breakdown."""
    from momentkit.regularizer import _cached_split, input_variance
    from momentkit.relu import relu_mean

    model, steps = setup(args, train, device)
    for _ in range(args.warmup):
        steps["moment"]()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            steps["moment"]()
        sync(device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)

    # relu_mean alone (forward + backward) on the real pre-activation of one batch.
    x, _ = next(iterate_batches(train.to(device), args.batch_size))
    upsilon, _ = _cached_split(model)
    with torch.no_grad():
        pre = upsilon(x)
        var = upsilon.variance(input_variance(args.sigma, x))
    z = (pre / var.sqrt()).abs()
    tail_fraction = float((z > 3).double().mean())

    def relu_mean_fwd_bwd() -> None:
        p = pre.detach().requires_grad_()
        v = var.detach().requires_grad_()
        relu_mean(p, v).sum().backward()

    def relu_fwd_bwd() -> None:
        p = pre.detach().requires_grad_()
        torch.relu(p).sum().backward()

    timings = {}
    for name, fn in (("relu_mean_fwd_bwd_s", relu_mean_fwd_bwd), ("relu_fwd_bwd_s", relu_fwd_bwd)):
        fn()
        runs = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - t0)
        timings[name] = statistics.median(runs)
    return {"table": table, "pre_activation_shape": list(pre.shape),
            "fraction_abs_z_above_3": tail_fraction, **timings}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    device = torch.device(args.device)
    info = machine_info(device)  # before the run: the code state that was imported
    train, n_train = load_train(args)
    times, forming, load = time_steps(args, train, device)
    by_size = {bs: summarize(times[bs], forming[bs], bs, args, n_train)
               for bs in args.batch_sizes}
    results = dict(by_size[args.batch_size])
    results["load_average_before_rounds"] = load
    results["results_by_batch_size"] = {str(bs): r for bs, r in by_size.items()}
    if not args.no_memory:
        results["memory"] = measure_memory(args)
    if args.profile:
        prof = profile_moment_step(args, train, device)
        print(prof.pop("table"))
        results["profile"] = prof
    config = {**{k: v for k, v in vars(args).items() if k != "worker"},
              "n_train": n_train, "steps_per_epoch": results["steps_per_epoch"], **info}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    one_min = [la[0] for la in load]
    print(f"\nLeNet/MNIST training step, device {device}, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats} interleaved rounds; 1-min load average "
          f"{min(one_min):.1f} to {max(one_min):.1f}")
    for bs, r in by_size.items():
        print(f"batch {bs}:")
        for m, t in r["median_step_seconds"].items():
            line = (f"  {m:12s} step {t:8.3f} s (forming the batch "
                    f"{r['median_batch_forming_seconds'][m]:.4f} s)   epoch (extrapolated) "
                    f"{r['epoch_seconds_extrapolated'][m]:9.1f} s")
            if m != "plain":
                per_round = sorted(r[f"step_ratio_{m}_over_plain_per_round"])
                line += (f"   / plain {r[f'step_ratio_{m}_over_plain']:.3f} (median of rounds "
                         f"{r[f'step_ratio_{m}_over_plain_median_of_rounds']:.3f}, rounds "
                         f"{per_round[0]:.2f} to {per_round[-1]:.2f})")
            print(line)
    for m, mem in results.get("memory", {}).items():
        line = (f"  {m:8s} peak RSS {mem['peak_rss_mib']:8.0f} MiB "
                f"({mem['peak_rss_source']}; RSS before the steps "
                f"{mem['rss_before_steps_mib']:.0f} MiB)")
        if "cuda_peak_allocated_mib" in mem:
            line += f", CUDA peak allocated {mem['cuda_peak_allocated_mib']:.0f} MiB"
        print(line)
    if "profile" in results:
        p = results["profile"]
        print(f"  relu_mean fwd+bwd on {p['pre_activation_shape']}: "
              f"{p['relu_mean_fwd_bwd_s']:.3f} s (ReLU fwd+bwd {p['relu_fwd_bwd_s']:.3f} s); "
              f"|z| > 3 for {100 * p['fraction_abs_z_above_3']:.1f} % of entries")
    print(f"results written to {out}")

if __name__ == "__main__":
    main()
