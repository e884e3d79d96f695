"""The reduced full `deep` run recorded in docs/validation (see docs/validation.md)."""
from pathlib import Path

from validation import suite_deep
from validation.reporting import SuiteConfig, write_report

OVERRIDES = {
    "mlp_width": 128,
    "lenet_width": 0.25,
    "resnet_width": 4,
    "alexnet": False,
}
cfg = SuiteConfig(out_dir=Path("docs/validation"), quick=False, seed=0,
                  data_root=Path("/work/shared/data"), progress=True)
report = write_report(cfg, suite_deep.run(cfg, OVERRIDES))
print(f"{report.seconds:.1f} s")
