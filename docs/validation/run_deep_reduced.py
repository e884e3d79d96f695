"""The reduced full ``deep`` run whose outputs are in this folder (see docs/validation.md).

``PYTHONPATH=. MOMENTKIT_DATA=/path/to/data python docs/validation/run_deep_reduced.py``
from the repository root: the full grid of ``validation.suite_deep`` with the overrides
below (smaller networks, no AlexNet), sized for a busy 2-core machine.
"""

from pathlib import Path

from experiments.data import resolve_data_root
from validation import suite_deep
from validation.reporting import SuiteConfig, write_report

OVERRIDES = {
    "mlp_width": 128,
    "lenet_width": 0.25,
    "resnet_width": 4,
    "alexnet": False,
}
cfg = SuiteConfig(
    out_dir=Path("docs/validation"),
    quick=False,
    seed=0,
    data_root=resolve_data_root(None),
    progress=True,
)
report = write_report(cfg, suite_deep.run(cfg, OVERRIDES))
print(f"{report.seconds:.1f} s")
