"""The phase-plane figure draws the theory's thresholds, SAM and momentum included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from torch_coherence import stability_report
from torch_coherence.plotting import phase_plane_figure


def _curves(report):
    fig = phase_plane_figure([], report)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    return lines["divergence (Thm 1 / GD)"], lines["Theorem 2 bound"]


def _at(line, b: float) -> float:
    xs, ys = (np.asarray(v, float) for v in line.get_data())
    hit = np.flatnonzero(np.isclose(xs, b, rtol=0, atol=1e-12))
    assert hit.size == 1, "the current batch size is one of the plotted points"
    return float(ys[hit[0]])


def test_sam_case_draws_the_reports_critical_lr():
    """sharpness 10, sigma 5, B 32, n 1000, rho 0.5: the SAM GD limit 2/(10 (1 + 5)) binds."""
    rep = stability_report(10.0, 5.0, 0.01, 32, 1000, sam_rho=0.5)
    assert rep.critical_lr == pytest.approx(2.0 / 60.0)
    solid, _ = _curves(rep)
    assert _at(solid, 32.0) == pytest.approx(rep.critical_lr, rel=1e-12)
    # the SGD Theorem 1 value 5 / (10 sqrt(1000/32 - 1)) = 0.0909 is not what is drawn
    assert abs(_at(solid, 32.0) - 5.0 / (10.0 * math.sqrt(1000 / 32 - 1))) > 0.05


@pytest.mark.parametrize(
    "kw",
    [{}, {"momentum": 0.9}, {"sam_rho": 0.05}, {"sam_rho": 0.2, "sam_alpha": 2.0,
                                                  "lambda_min": 0.5}],
)  # fmt: skip
@pytest.mark.parametrize("b", [4, 900])
def test_solid_curve_is_the_theory_at_every_setting(kw, b):
    rep = stability_report(3.0, 4.0, 0.1, b, 1000, **kw)
    solid, dashed = _curves(rep)
    assert _at(solid, float(b)) == pytest.approx(rep.critical_lr, rel=1e-12)
    # the dashed Theorem 2 curve: sharpness equals the bound at that lr, or the GD cap
    eta2 = _at(dashed, float(b))
    gd = stability_report(3.0, 4.0, eta2, b, 1000, **kw).gd_threshold
    t2 = stability_report(3.0, 4.0, eta2, b, 1000, **kw).theorem2_bound
    assert min(t2, gd) == pytest.approx(3.0, rel=1e-9) or eta2 == pytest.approx(
        stability_report(3.0, 4.0, 0.1, 1000, 1000, **kw).critical_lr, rel=1e-12
    )
    assert eta2 <= _at(solid, float(b)) * (1 + 1e-12)
