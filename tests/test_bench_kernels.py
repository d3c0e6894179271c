"""The selection benchmark: both methods pick the same channels, and the run prints its table."""

from __future__ import annotations

import numpy as np
import pytest

from envs.runtime import kernels

pytestmark = pytest.mark.skipif(kernels.BACKEND != "numba", reason="the selection kernels need numba")


def test_the_comparison_form_picks_what_the_radix_select_picks():
    from experiments.bench.kernels import _comparison_top_idx, _differences

    rng = np.random.default_rng(3)
    vs = (rng.standard_t(3, (64, 300)) * np.where(rng.random((64, 300)) < 0.2, 0.0, 1.0)).astype(np.float32)
    for k in (1, 7, 150, 299, 300):
        assert _differences(vs, k) == 0
    s = np.array([3.0, 1.0, 3.0, 3.0], dtype=np.float32)
    assert _comparison_top_idx(s, 2).tolist() == kernels._top_idx_nb(s, 2).tolist() == [0, 2]


def test_a_quick_run_prints_the_table(capsys):
    from experiments.bench import kernels as bench

    bench.main(["--quick", "--model", "tiny-llama", "--no-write"])
    out = capsys.readouterr().out
    assert "## Channel selection: radix select vs comparisons" in out
    rows = [line for line in out.splitlines() if line.startswith(("| hidden", "| MLP activation"))]
    assert len(rows) == 2 * len(bench.KEEPS)
    assert all(line.rstrip(" |").endswith("| 0") for line in rows)  # no vector whose sets differ
