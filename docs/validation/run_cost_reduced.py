"""A reduced full ``cost`` run, for the accuracy-against-time frontier after a change in
``network_moments``' speed; outputs in ``docs/validation/cost-reduced/``.

``PYTHONPATH=. MOMENTKIT_DATA=/path/to/data python docs/validation/run_cost_reduced.py``
from the repository root: the full grid of ``validation.suite_cost`` with the overrides
below. The frontier keeps the full run's sigmas (0.01, 0.1, 1) and network (the
LeNet-shaped network at width 1/4, one MNIST image); its Monte Carlo curve stops at
10,000 samples and its reference at 100,000 (200,000 in the full run); the first part
(Theorem 1 against Monte Carlo, the full-width LeNet) is shrunk, since its numbers are
in ``docs/validation/cost.md`` already.
"""

from pathlib import Path

from experiments.data import resolve_data_root
from validation import suite_cost
from validation.reporting import SuiteConfig, write_report

OVERRIDES = {
    "p": 256,
    "mc_samples": [1000, 10_000],
    "lenet_width": 0.25,
    "lenet_mc_samples": [1000],
    "frontier_mc_samples": [100, 300, 1000, 3000, 10_000],
    "frontier_reference_samples": 100_000,
}
cfg = SuiteConfig(
    out_dir=Path("docs/validation/cost-reduced"),
    quick=False,
    seed=0,
    data_root=resolve_data_root(None),
    progress=False,
)
report = write_report(cfg, suite_cost.run(cfg, OVERRIDES))
print(f"{report.seconds:.1f} s")
