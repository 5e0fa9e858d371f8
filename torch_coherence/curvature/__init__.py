"""Curvature engine: per-sample Gauss-Newton block Gram, coherence and sharpness of real models."""

from .measure import CurvatureReport, measure_curvature
from .sharpness import DatasetSharpness, SharpnessResult, dataset_sharpness, hessian_sharpness
from .sigma_estimate import SigmaEstimate, estimate_sigma, exact_sigma
from .tracked_sharpness import TrackedSharpness, tracked_sharpness

__all__ = [
    "CurvatureReport",
    "DatasetSharpness",
    "SharpnessResult",
    "SigmaEstimate",
    "TrackedSharpness",
    "dataset_sharpness",
    "estimate_sigma",
    "exact_sigma",
    "hessian_sharpness",
    "measure_curvature",
    "tracked_sharpness",
]
