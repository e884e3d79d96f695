"""Shared test configuration: Hypothesis profiles and the data root.

Profiles: ``ci`` (derandomized, the default, so CI is reproducible) and ``dev``
(random, more examples); choose with ``HYPOTHESIS_PROFILE``.
The data root is resolved as everywhere else (:func:`experiments.data.resolve_data_root`:
``MOMENTKIT_DATA``, else ``./data``); when ``MOMENTKIT_DATA`` is unset, this file sets it
to the offline data copies beside the repository. Tests that need a data
set skip, saying where they looked, when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parent.parent
if not os.environ.get("MOMENTKIT_DATA"):
    os.environ["MOMENTKIT_DATA"] = str(REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The resolved data root; skips (naming it) when the folder does not exist."""
    from experiments.data import resolve_data_root

    root = resolve_data_root(None)
    if not root.is_dir():
        pytest.skip(f"data root {root.resolve()} not found (set MOMENTKIT_DATA)")
    return root
