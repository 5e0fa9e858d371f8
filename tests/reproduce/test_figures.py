"""The reproduction figures: boundaries from the theory, the drawn contours, the CLI files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from torch_coherence import theory
from torch_coherence.reproduce import FigureRun, figure_panels, phase_diagram, theorem_lines

N = 100


def _old_sigma_lines(eta, b):
    """The closed forms for lambda_1 = 2 (Theorem 1: 2 eta sqrt(r); Theorem 2: eta r/(1-eta))."""
    r = N / b - 1.0
    return 2.0 * eta * np.sqrt(r), eta * r / (1.0 - eta)


@pytest.mark.parametrize("eta", [0.8, 0.5])
def test_figure1_lines_are_the_theorems_closed_forms(eta):
    panel = figure_panels("figure1")[[0.8, 0.5].index(eta)]
    bs = np.linspace(1, N, 37)
    l1, l2 = theorem_lines(panel, bs, N)
    w1, w2 = _old_sigma_lines(eta, bs)
    seen = 0
    for got, want in ((l1, w1), (l2, w2)):
        for g, w in zip(got, want, strict=True):
            if w < 1:  # below the axis (sigma >= 1): not drawn
                assert math.isnan(g)
            else:
                seen += 1
                assert g == pytest.approx(w, rel=1e-8)
    assert seen > 20


def test_figure2_lines_are_the_critical_lr_and_theorem2():
    panel = figure_panels("figure2")[0]
    bs = np.array([1.0, 5.0, 13.0, 50.0, 100.0])
    l1, l2 = theorem_lines(panel, bs, N)
    r = N / bs - 1
    with np.errstate(divide="ignore"):
        assert np.allclose(l1, np.minimum(1.0, 5.0 / (2.0 * np.sqrt(r))), rtol=1e-12)
    assert np.allclose(l2, 5.0 / (5.0 + r), rtol=1e-12)
    for b, v in zip(bs, l1, strict=True):
        assert v == theory.critical_lr(2.0, 5.0, b, N)


def test_sam_panel_draws_theorem_c8_where_the_column_says_diverges():
    sgd, sam, _ = figure_panels("sam", rho=0.1)
    pd = phase_diagram([0.8], [2, 6, 20, 60], [4, 40, 90], n=N, steps=3, repeats=1,
                       optimizer="sam", sam_rho=0.1, seed=0)  # fmt: skip
    line_sam, _ = theorem_lines(sam, [4.0, 40.0, 90.0], N)
    line_sgd, _ = theorem_lines(sgd, [4.0, 40.0, 90.0], N)
    assert not np.allclose(line_sam, line_sgd)  # SAM's boundary is its own
    for row in pd.rows:
        below = row["sigma"] < line_sam[[4, 40, 90].index(row["B"])]
        assert row["theorem1_diverges"] == below


def test_figures_draw_the_gamma_zero_contour(tmp_path, monkeypatch):
    """The phase-diagram plot draws a gamma = 0 contour (dash-dot) with its legend entry."""
    from matplotlib.figure import Figure

    from torch_coherence.reproduce.plot import plot_figure

    seen = {}

    def capture(self, path, **kw):
        ax = self.axes[0]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["levels"] = sorted(float(lv) for c in ax.collections if hasattr(c, "levels")
                                for lv in c.levels)  # fmt: skip

    monkeypatch.setattr(Figure, "savefig", capture)
    panel = dict(title="sigma = 5", lrs=[0.05, 0.2, 0.5, 1.0], sigmas=[5], batch_sizes=[2, 5, 10])
    pd = phase_diagram(panel["lrs"], [5], panel["batch_sizes"], n=10, steps=5, repeats=1, seed=0)
    lyap = [r["lyapunov"] for r in pd.rows]
    assert min(lyap) < 0 < max(lyap)
    run = FigureRun("figure2", [panel], {("bernoulli", 0): list(pd.rows)}, {}, 0.0, n=10)
    plot_figure(run, tmp_path / "f.png")
    assert "gamma = 0 (typical run)" in seen["legend"]
    assert "rho(T) = 1 (mean square)" in seen["legend"]
    assert 0.0 in seen["levels"] and 1.0 in seen["levels"]
