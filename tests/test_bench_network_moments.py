"""``benchmarks/bench_network_moments.py`` runs end to end at a tiny size and writes its JSON."""

from __future__ import annotations

import json
import sys

from benchmarks import bench_network_moments
from momentkit.network import _chain, pooling


def test_tiny_run_writes_every_ratio_and_restores_the_chain(tmp_path, monkeypatch) -> None:
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--rounds", "1", "--batch", "2",
                                      "--threads", "1", "--out", str(out)])
    bench_network_moments.main()
    result = json.loads(out.read_text())
    times = result["median_s"]
    assert set(times) == {"forward", "diagonal", "factor_1", "plain_step", "network_step",
                          "first_relu_step", "network_step_autograd_chain"}
    assert all(t > 0 for t in times.values())
    assert result["network_step_autograd_chain_over_plain"] == (
        times["network_step_autograd_chain"] / times["plain_step"])
    assert result["autograd_chain_over_closed_form_per_round"] == (
        times["network_step_autograd_chain"] / times["network_step"])  # one round
    # The comparison patches the pooling chain only while it runs.
    assert pooling.diagonal_chain is _chain.diagonal_chain
