r"""Linear-stability thresholds of SGD and SAM in terms of sharpness and coherence.

Notation (docs/theory.md §1, §4): n data-set size, B batch size, eta learning rate, lambda_1 the
sharpness lambda_1(H) of the mean Hessian, sigma the coherence measure, r = n/B - 1.

Every "threshold" below is a value of the sharpness above which the linearized dynamics
**diverge in mean square** (E||w_k||^2 -> infinity): that is what the proofs establish.
Paper 000 prints Theorem 1 with the first moment E||J_k ... J_1||_2, which is not true in
general: with n = 3, d = 1, per-sample curvatures (1, 1/4, 1/4), B = 1, eta = 2.25 the
condition holds and E w_k^2 grows while E|w_k| shrinks (docs/theory.md §4).

* GD (full batch): lambda_1 > 2 / eta; heavy-ball momentum beta: 2 (1 + beta) / eta.
* Theorem 1 (paper 000): lambda_1 > (sigma / eta) r^(-1/2).
* Theorem 2 (paper 000): for lambda_1 < (2 sigma / eta) (sigma + r)^(-1) *some* set of
  Hessians with coherence sigma converges; between the two curves sigma cannot decide.
* SAM (paper 002, Theorem C.8), Jacobian I - eta H_t (I + (rho/alpha) H):
  lambda_1 >= (sigma / eta) r^(-1/2) (1 + (rho/alpha) lambda_min(H))^(-1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ._validation import (
    check_batch_size,
    check_momentum,
    check_nonnegative,
    check_positive,
    check_sample_count,
    check_sigma,
)

__all__ = [
    "StabilityReport",
    "critical_batch_size",
    "critical_lr",
    "gd_threshold",
    "sam_threshold",
    "stability_report",
    "theorem1_threshold",
    "theorem2_bound",
]


def _ratio_minus_one(batch_size: object, n: object) -> tuple[float, int, float]:
    """Validate (B, n) and return (B, n, r = n/B - 1)."""
    n = check_sample_count("n", n)
    b = check_batch_size(batch_size, n)
    return b, n, n / b - 1.0


def _sam_factor(sam_rho: object | None, sam_alpha: object, lambda_min: object) -> float:
    """1 + (rho/alpha) lambda_min(H), the SAM factor of Theorem C.8 (1 without SAM)."""
    lmin = check_nonnegative("lambda_min", lambda_min)
    alpha = check_positive("sam_alpha", sam_alpha)
    if sam_rho is None:
        return 1.0
    rho = check_nonnegative("sam_rho", sam_rho)
    return 1.0 + rho / alpha * lmin


def theorem1_threshold(sigma: float, lr: float, batch_size: float, n: int) -> float:
    """Theorem 1 of paper 000: (sigma / eta) (n/B - 1)^(-1/2).

    Sharpness above this value guarantees mean-square divergence of linearized SGD with
    Bernoulli sampling. Infinite at B = n (full batch: only the GD condition remains).
    """
    sigma = check_sigma(sigma)
    lr = check_positive("lr", lr)
    _, _, r = _ratio_minus_one(batch_size, n)
    if r <= 0:
        return math.inf
    return sigma / lr / math.sqrt(r)


def theorem2_bound(sigma: float, lr: float, batch_size: float, n: int) -> float:
    """Theorem 2 of paper 000: (2 sigma / eta) (sigma + n/B - 1)^(-1).

    Below this sharpness there *exists* a set of PSD Hessians with coherence sigma whose
    linearized SGD converges (the construction of the proof: sigma copies of m e_1 e_1^T).
    It is not a guarantee of stability for the user's Hessians. Always <= the Theorem 1
    threshold, since (sqrt(r) - 1)^2 + sigma - 1 >= 0.
    """
    sigma = check_sigma(sigma)
    lr = check_positive("lr", lr)
    _, _, r = _ratio_minus_one(batch_size, n)
    return 2.0 * sigma / lr / (sigma + r)


def gd_threshold(
    lr: float,
    momentum: float = 0.0,
    *,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
) -> float:
    """Sharpness above which full-batch gradient descent diverges: 2 (1 + beta) / eta.

    For heavy-ball momentum beta the iteration on an eigen-direction with curvature lambda
    is stable iff 0 < eta lambda < 2 (1 + beta). With SAM (Jacobian I - eta H (I + (rho /
    alpha) H)) the effective curvature is lambda (1 + (rho/alpha) lambda); setting it equal
    to c = 2 (1 + beta) / eta gives the positive root
    lambda = (sqrt(1 + 4 (rho/alpha) c) - 1) / (2 rho / alpha).
    """
    lr = check_positive("lr", lr)
    beta = check_momentum(momentum)
    c = 2.0 * (1.0 + beta) / lr
    if sam_rho is None:
        return c
    q = check_nonnegative("sam_rho", sam_rho) / check_positive("sam_alpha", sam_alpha)
    if q == 0:
        return c
    return (math.sqrt(1.0 + 4.0 * q * c) - 1.0) / (2.0 * q)


def sam_threshold(
    sigma: float,
    lr: float,
    batch_size: float,
    n: int,
    rho: float,
    alpha: float = 1.0,
    lambda_min: float = 0.0,
) -> float:
    """Theorem C.8 of paper 002: (sigma/eta)(n/B - 1)^(-1/2) (1 + (rho/alpha) lambda_min)^(-1).

    Sharpness at or above this value guarantees mean-square divergence of linearized SAM
    (Jacobian I - eta H_t (I + (rho/alpha) H)). ``alpha`` is SAM's normaliser (the gradient
    norm; 1 for unnormalised SAM). For an over-parameterised network lambda_min(H) is
    about 0 and this equals the SGD threshold of Theorem 1.
    """
    factor = _sam_factor(rho, alpha, lambda_min)
    return theorem1_threshold(sigma, lr, batch_size, n) / factor


def critical_lr(
    sharpness: float,
    sigma: float,
    batch_size: float,
    n: int,
    *,
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    lambda_min: float = 0.0,
) -> float:
    """Smallest learning rate at which divergence is guaranteed (GD condition or Theorem 1).

    Solving lambda_1 = threshold(eta) for eta (docs/theory.md §4):
    eta_1 = min(2 (1 + beta) / lambda_1, sigma / (lambda_1 sqrt(n/B - 1))).
    With SAM the Theorem C.8 factor divides the second term and the GD term becomes
    2 (1 + beta) / (lambda_1 (1 + (rho/alpha) lambda_1)). Every eta above eta_1 diverges in
    mean square; ``inf`` for zero sharpness. Momentum enters only the GD condition:
    Theorem 1 is proven for plain SGD.
    """
    lam = check_nonnegative("sharpness", sharpness)
    sigma = check_sigma(sigma)
    beta = check_momentum(momentum)
    _, _, r = _ratio_minus_one(batch_size, n)
    factor = _sam_factor(sam_rho, sam_alpha, lambda_min)
    if lam == 0:
        return math.inf
    q = 0.0 if sam_rho is None else float(sam_rho) / float(sam_alpha)
    eta_gd = 2.0 * (1.0 + beta) / (lam * (1.0 + q * lam))
    eta_t1 = math.inf if r <= 0 else sigma / (lam * math.sqrt(r) * factor)
    return min(eta_gd, eta_t1)


def critical_batch_size(
    sharpness: float,
    sigma: float,
    lr: float,
    n: int,
    *,
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    lambda_min: float = 0.0,
) -> float:
    """Batch size below which divergence is guaranteed: B_1 = n / (1 + (sigma / (eta lambda_1))^2).

    From Theorem 1 solved for B (docs/theory.md §4); with SAM, eta lambda_1 is multiplied by the
    Theorem C.8 factor. ``inf`` when the GD condition already fails
    (eta lambda_1 > 2 (1 + beta)): then no batch size helps. B proportional to eta^2 leaves
    B_1 / B unchanged. 0 for zero sharpness. Always <= n.
    """
    lam = check_nonnegative("sharpness", sharpness)
    sigma = check_sigma(sigma)
    lr = check_positive("lr", lr)
    n = check_sample_count("n", n)
    factor = _sam_factor(sam_rho, sam_alpha, lambda_min)
    if lam == 0:
        return 0.0
    if lam > gd_threshold(lr, momentum, sam_rho=sam_rho, sam_alpha=sam_alpha):
        return math.inf
    x = sigma / (lr * lam * factor)
    return n / (1.0 + x * x)


@dataclass(frozen=True)
class StabilityReport:
    """Where the current (learning rate, batch size) sits relative to the thresholds.

    Attributes:
        sharpness, sigma, lr, batch_size, n, momentum, sam_rho, sam_alpha, lambda_min: inputs.
        gd_threshold: full-batch divergence threshold (with momentum / SAM when given).
        theorem1_threshold: Theorem 1 threshold (plain SGD).
        theorem2_bound: Theorem 2 bound.
        sam_threshold: Theorem C.8 threshold, or ``None`` without SAM.
        divergence_threshold: the smallest applicable threshold (GD and Theorem 1, or GD
            and Theorem C.8 with SAM).
        binding: which condition gives it: ``"gd"``, ``"theorem1"`` or ``"sam"``.
        margin: sharpness / divergence_threshold; > 1 means the theory guarantees
            mean-square divergence of the linearized dynamics.
        unstable: ``margin > 1``.
        regime: ``"divergent"`` (margin > 1), ``"undetermined"`` (between the Theorem 2
            bound and the threshold: sigma alone cannot decide) or ``"below_theorem2"``.
        critical_lr, critical_batch_size: the values at which divergence sets in with the
            other hyperparameters fixed.
    """

    sharpness: float
    sigma: float
    lr: float
    batch_size: float
    n: int
    momentum: float
    sam_rho: float | None
    sam_alpha: float
    lambda_min: float
    gd_threshold: float
    theorem1_threshold: float
    theorem2_bound: float
    sam_threshold: float | None
    divergence_threshold: float
    binding: str
    margin: float
    unstable: bool
    regime: str
    critical_lr: float
    critical_batch_size: float

    def as_dict(self) -> dict[str, object]:
        """All fields as a plain dictionary."""
        return asdict(self)

    def explain(self) -> str:
        """One plain-English paragraph with the numbers and what to change."""
        optim = "SAM" if self.sam_rho is not None else "SGD"
        setting = (
            f"learning rate {self.lr:.4g}, batch size {_fmt_b(self.batch_size)}, "
            f"n = {self.n}, sigma = {self.sigma:.4g}"
        )
        names = {"gd": "full-batch (GD)", "theorem1": "Theorem 1", "sam": "SAM (Theorem C.8)"}
        where = names[self.binding]
        fix = f"lower the learning rate below {self.critical_lr:.4g}"
        if math.isinf(self.critical_batch_size):
            fix += " (no batch size helps: even full-batch GD diverges at this learning rate)"
        else:
            fix += f" or raise the batch size above {_fmt_b(self.critical_batch_size)}"
        if self.unstable:
            return (
                f"UNSTABLE: sharpness {self.sharpness:.4g} exceeds the {where} threshold "
                f"{self.divergence_threshold:.4g} (margin {self.margin:.3g}) for {setting}: "
                f"the linearized {optim} dynamics diverge in mean square (E||w||^2 grows "
                f"without bound). To restore stability, {fix}."
            )
        tail = (
            "Below the Theorem 2 bound "
            f"{self.theorem2_bound:.4g}, so some Hessians with this sigma are stable; no "
            "guarantee either way."
            if self.regime == "below_theorem2"
            else f"Above the Theorem 2 bound {self.theorem2_bound:.4g}: sigma alone cannot "
            "decide stability here."
        )
        b_note = (
            "for any batch size"
            if self.critical_batch_size < 1
            else f"below batch size {_fmt_b(self.critical_batch_size)}"
        )
        return (
            f"No guaranteed divergence: sharpness {self.sharpness:.4g} is {self.margin:.1%} of "
            f"the {where} threshold {self.divergence_threshold:.4g} for {setting}. Mean-square "
            f"divergence of the linearized {optim} dynamics is guaranteed above learning "
            f"rate {self.critical_lr:.4g} or {b_note}. " + tail
        )


def _fmt_b(b: float) -> str:
    return f"{b:.0f}" if float(b).is_integer() or b >= 100 else f"{b:.3g}"


def stability_report(
    sharpness: float,
    sigma: float,
    lr: float,
    batch_size: float,
    n: int,
    *,
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    lambda_min: float = 0.0,
) -> StabilityReport:
    """All thresholds, the margin and the critical hyperparameters in one report.

    Args:
        sharpness: lambda_1 of the mean Hessian (>= 0).
        sigma: coherence measure (>= 1).
        lr: learning rate eta (> 0).
        batch_size: B in [1, n].
        n: data-set size the sharpness and sigma refer to.
        momentum: heavy-ball momentum beta in [0, 1) (enters the GD condition only).
        sam_rho: SAM radius rho, or ``None`` for SGD.
        sam_alpha: SAM normaliser alpha (> 0).
        lambda_min: lambda_min(H) for Theorem C.8 (>= 0; about 0 for large networks).
    """
    lam = check_nonnegative("sharpness", sharpness)
    sigma = check_sigma(sigma)
    lr = check_positive("lr", lr)
    n = check_sample_count("n", n)
    b = check_batch_size(batch_size, n)
    beta = check_momentum(momentum)
    sam = dict(sam_rho=sam_rho, sam_alpha=sam_alpha, lambda_min=lambda_min)
    _sam_factor(sam_rho, sam_alpha, lambda_min)  # validates the SAM arguments

    gd = gd_threshold(lr, beta, sam_rho=sam_rho, sam_alpha=sam_alpha)
    t1 = theorem1_threshold(sigma, lr, b, n)
    t2 = theorem2_bound(sigma, lr, b, n)
    sam_t = (
        None if sam_rho is None else sam_threshold(sigma, lr, b, n, sam_rho, sam_alpha, lambda_min)
    )
    stochastic, name = (t1, "theorem1") if sam_t is None else (sam_t, "sam")
    threshold, binding = (gd, "gd") if gd <= stochastic else (stochastic, name)
    margin = 0.0 if lam == 0 else lam / threshold
    unstable = margin > 1.0
    regime = "divergent" if unstable else ("undetermined" if lam >= t2 else "below_theorem2")
    return StabilityReport(
        sharpness=lam,
        sigma=sigma,
        lr=lr,
        batch_size=b,
        n=n,
        momentum=beta,
        sam_rho=None if sam_rho is None else float(sam_rho),
        sam_alpha=float(sam_alpha),
        lambda_min=float(lambda_min),
        gd_threshold=gd,
        theorem1_threshold=t1,
        theorem2_bound=t2,
        sam_threshold=sam_t,
        divergence_threshold=threshold,
        binding=binding,
        margin=margin,
        unstable=unstable,
        regime=regime,
        critical_lr=critical_lr(lam, sigma, b, n, momentum=beta, **sam),
        critical_batch_size=critical_batch_size(lam, sigma, lr, n, momentum=beta, **sam),
    )
