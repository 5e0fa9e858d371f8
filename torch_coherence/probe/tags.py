"""The one list of metric tags a probe logs, with one sentence each.

The Lightning callback, :class:`~torch_coherence.CoherenceMonitor` and the TensorBoard layout
all read :data:`TAGS` and :data:`TAG_DESCRIPTIONS` from here; nothing else spells a tag.
"""

from __future__ import annotations

__all__ = ["CONDITIONAL_TAGS", "TAGS", "TAG_DESCRIPTIONS"]

#: Every metric tag a probe can log, in logging order.
TAGS = (
    "coherence/sigma",
    "coherence/sigma_n",
    "coherence/sigma_stderr",
    "coherence/sigma_probe",
    "coherence/lambda_S",
    "coherence/max_sample_sharpness",
    "sharpness/hessian",
    "sharpness/ggn",
    "sharpness/samples",
    "sharpness/tracked",
    "sharpness/tracked_stderr",
    "stability/gd_threshold",
    "stability/theorem1_threshold",
    "stability/theorem2_bound",
    "stability/margin",
    "stability/critical_lr",
    "stability/critical_batch_size",
    "stability/mean_square_rate",
    "stability/lyapunov",
    "stability/lyapunov_stderr",
    "stability/typical_critical_lr",
    "stability/blowup_lr",
    "noise/gradient_noise_scale",
    "probe/size",
    "probe/seconds",
)

#: Tags present only under a condition (all others are logged by every successful probe at a
#: positive learning rate): ``coherence/sigma_stderr`` when the sigma estimate has one,
#: ``sharpness/hessian`` when the engine computed the Hessian sharpness,
#: ``stability/mean_square_rate`` with ``mean_square_rate=True``, the three Lyapunov tags
#: when gamma was computed (``lyapunov=True``, the probe's Gram available, the time budget
#: allowing), ``stability/blowup_lr`` when the lookahead ran, ``noise/gradient_noise_scale``
#: when it is finite. At learning rate 0 only the curvature tags, ``stability/critical_lr``
#: and the ``probe/`` tags are logged. A light probe (:mod:`.light`, history ``kind``
#: ``"light"``) logs only ``sharpness/tracked``, ``sharpness/tracked_stderr`` and the
#: ``probe/`` tags; no full probe logs those two.
CONDITIONAL_TAGS = (
    "coherence/sigma_stderr",
    "sharpness/hessian",
    "sharpness/tracked",
    "sharpness/tracked_stderr",
    "stability/mean_square_rate",
    "stability/lyapunov",
    "stability/lyapunov_stderr",
    "stability/typical_critical_lr",
    "stability/blowup_lr",
    "noise/gradient_noise_scale",
)

#: One sentence per tag, shown by TensorBoard (summary metadata) and in the docs.
TAG_DESCRIPTIONS: dict[str, str] = {
    "coherence/sigma": "Hessian coherence sigma used by the thresholds (over coherence/sigma_n)",
    "coherence/sigma_n": "number of examples the logged sigma refers to",
    "coherence/sigma_stderr": "standard error of the logged sigma",
    "coherence/sigma_probe": "sigma of the probe's own examples (probe/size of them)",
    "coherence/lambda_S": "top eigenvalue of the probe's coherence matrix S_ij = sqrt(tr(H_i H_j))",
    "coherence/max_sample_sharpness": "max_i lambda_1(H_i) over the probe examples",
    "sharpness/hessian": "top eigenvalue of the Hessian of the loss over sharpness/samples",
    "sharpness/ggn": "top eigenvalue of the Gauss-Newton matrix over sharpness/samples",
    "sharpness/samples": "number of examples the logged sharpness is computed over",
    "sharpness/tracked": "light probe: Rayleigh quotient of the last full probe's top "
    "eigenvector on a fresh batch of probe/size examples (unbiased for v^T G v <= sharpness)",
    "sharpness/tracked_stderr": "standard error of sharpness/tracked over batch draws",
    "stability/gd_threshold": "2 (1 + momentum) / lr: full-batch gradient descent's bound",
    "stability/theorem1_threshold": "sharpness above which Theorem 1 proves mean-square "
    "divergence of the linearized dynamics",
    "stability/theorem2_bound": "sharpness below which some Hessians with this sigma converge",
    "stability/margin": "sharpness / Theorem 1 threshold (1: the linearized boundary)",
    "stability/critical_lr": "learning rate at which Theorem 1's margin reaches 1",
    "stability/critical_batch_size": "batch size below which Theorem 1 proves mean-square "
    "divergence of the linearized dynamics",
    "stability/mean_square_rate": "rho(T): spectral radius of the linearized second-moment map",
    "stability/lyapunov": "gamma: top Lyapunov exponent of the linearized dynamics (per step)",
    "stability/lyapunov_stderr": "standard error of gamma",
    "stability/typical_critical_lr": "learning rate at which gamma crosses 0",
    "stability/blowup_lr": "smallest learning rate at which real lookahead steps on a copy of "
    "the model blew up (inf: none of those tried)",
    "noise/gradient_noise_scale": "B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018)",
    "probe/size": "number of examples in the probe batch (m)",
    "probe/seconds": "wall time of the probe (seconds)",
}
