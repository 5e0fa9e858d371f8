"""Curvature engine: per-sample Gauss-Newton block Gram, coherence and sharpness of real models."""

from .measure import CurvatureReport, measure_curvature
from .sharpness import DatasetSharpness, SharpnessResult, dataset_sharpness, hessian_sharpness
from .sigma_estimate import SigmaEstimate, estimate_sigma, exact_sigma

__all__ = [
    "CurvatureReport",
    "DatasetSharpness",
    "SharpnessResult",
    "SigmaEstimate",
    "dataset_sharpness",
    "estimate_sigma",
    "exact_sigma",
    "hessian_sharpness",
    "measure_curvature",
]
