"""Side by side: the converged Gaussian-trained, 2-fold-augmented and moment-regularized
LeNets certified the same way (sigma 0.25, n = 10,000, n0 = 100, alpha = 0.001, seed 0,
the first 200 MNIST test images), with paired comparisons on the same images.

    python docs/results/certify/compare.py

Reads the certificate files of this folder. Per model: certified accuracy at radii 0 to
1, the exact (Clopper-Pearson) 95% interval of the certified accuracy at radius 0.5 over
the choice of images, and the ACR. Per pair: the images certified at radius 0.5 by one
model and not the other, with the exact McNemar test (a binomial test on those
discordant images, ``scipy.stats.binomtest``), and the ACR difference with a 95% paired
percentile bootstrap interval over the images (``scipy.stats.bootstrap``, 2,000
resamples, seed 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, bootstrap

HERE = Path(__file__).resolve().parent
MODELS = {
    "Gaussian training, sigma 0.25": "lenet-gaussian0.25-converged",
    "2-fold augmentation, sigma 0.25": "lenet-augment2-s0.25-converged",
    "regularizer alpha 1, sigma 0.5": "lenet-moment-a1-s0.5-converged",
}
RADII = ("0.0", "0.25", "0.5", "0.75", "1.0")


def load(prefix: str) -> tuple[dict, list[int], np.ndarray]:
    cert = json.loads((HERE / f"{prefix}-certify-sigma0.25-n10000.json").read_text())
    images = sorted(cert["images"], key=lambda e: e["index"])
    radius = np.array([e["radius"] if e["correct"] else 0.0 for e in images])
    return cert, [e["index"] for e in images], radius


def main() -> None:
    data = {name: load(prefix) for name, prefix in MODELS.items()}
    indices = [idx for _, idx, _ in data.values()]
    if any(idx != indices[0] for idx in indices):
        raise SystemExit("compare.py: the certificate files do not cover the same images")
    print("| model | " + " | ".join(f"r = {r}" for r in RADII) + " | 95% CI at r = 0.5 | ACR |")
    print("|" + " --- |" * (len(RADII) + 3))
    for name, (cert, _, radius) in data.items():
        acc = cert["summary"]["certified_accuracy"]
        k, n = int((radius >= 0.5).sum()), len(radius)
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        cells = " | ".join(f"{acc[r]:.3f}" for r in RADII)
        print(f"| {name} | {cells} | [{ci.low:.3f}, {ci.high:.3f}] | {radius.mean():.3f} |")
    print()
    names = list(data)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = data[a][2], data[b][2]
            only_a = int(((ra >= 0.5) & (rb < 0.5)).sum())
            only_b = int(((rb >= 0.5) & (ra < 0.5)).sum())
            p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
            boot = bootstrap((ra, rb), lambda x, y: x.mean() - y.mean(), paired=True,
                             n_resamples=2000, random_state=0, method="percentile")
            ci = boot.confidence_interval
            print(f"- {a} against {b}: certified at r = 0.5 by only one of them {only_a} / "
                  f"{only_b} images (exact McNemar p = {p:.3f}); ACR difference "
                  f"{ra.mean() - rb.mean():+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]")


if __name__ == "__main__":
    main()
