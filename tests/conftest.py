"""Shared test configuration: Hypothesis profiles and the data root.

Profiles: ``ci`` (derandomized, the default, so CI is reproducible) and ``dev``
(random, more examples); choose with ``HYPOTHESIS_PROFILE``.
The data root is ``MOMENTKIT_DATA`` or, by default, ``../shared/data`` beside the
repository; tests that need a dataset skip, saying where they looked, when it is absent.
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


def default_data_root() -> Path:
    env = os.environ.get("MOMENTKIT_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not root.is_dir():
        pytest.skip(f"dataset root {root} not found (set MOMENTKIT_DATA)")
    return root
