"""Maximum relative error of the ReLU moments against mpmath, per dtype and function.

    python -m benchmarks.relu_accuracy [--points 801] [--scales 20]   (from the repo root)

Scans mean/std over [-40, 40] and std over [1e-30, 1e8] (log-spaced) and reports, for
each function and dtype, the largest relative error over the points where the true
value is a normal number of that dtype, and where it occurred. The reference is the
textbook formula evaluated with mpmath at 30 significant digits.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from tqdm import tqdm

import momentkit
from momentkit.relu import relu_mean, relu_mean_std, relu_moments
from tests.mp_reference import relu_moments_ref


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=801, help="z values in [-40, 40]")
    parser.add_argument("--scales", type=int, default=20, help="std values in [1e-30, 1e8]")
    args = parser.parse_args(argv)
    zs = np.linspace(-40, 40, args.points)
    ss = np.logspace(-30, 8, args.scales)
    print(f"momentkit {momentkit.__version__}: {len(zs) * len(ss)} points per dtype")
    for dtype in (torch.float64, torch.float32):
        info = torch.finfo(dtype)
        mu = torch.tensor([z * s for s in ss for z in zs], dtype=dtype)
        s = torch.tensor([s for s in ss for _ in zs], dtype=dtype)
        var = s * s
        results = {
            "relu_mean_std": relu_mean_std(mu, s),
            "relu_mean": relu_mean(mu, var),
            "relu_moments.mean": relu_moments(mu, var)[0],
            "relu_moments.var": relu_moments(mu, var)[1],
        }
        worst = {k: (0.0, None) for k in results}
        for i in tqdm(range(mu.numel()), desc=str(dtype), leave=False):
            m_i = float(mu[i])
            ref_std = relu_moments_ref(m_i, float(s[i]))
            ref_var = relu_moments_ref(m_i, math.sqrt(float(var[i])))
            refs = {
                "relu_mean_std": ref_std[0],
                "relu_mean": ref_var[0],
                "relu_moments.mean": ref_var[0],
                "relu_moments.var": ref_var[1],
            }
            for name, out in results.items():
                true = float(refs[name])
                if not info.tiny <= abs(true) <= info.max:
                    continue
                err = abs(float(out[i]) - true) / abs(true)
                if err > worst[name][0]:
                    worst[name] = (err, (m_i / float(s[i]), float(s[i])))
        for name, (err, where) in worst.items():
            loc = f"at z={where[0]:.4g}, std={where[1]:.3g}" if where else ""
            print(f"{str(dtype):14s} {name:18s} max rel err {err:.3e} {loc}")


if __name__ == "__main__":
    main()
