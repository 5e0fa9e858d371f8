"""Curvature engine: per-sample Gauss-Newton block Gram, coherence and sharpness of real models."""

from .measure import CurvatureReport, measure_curvature
from .sharpness import DatasetSharpness, SharpnessResult, dataset_sharpness, hessian_sharpness

__all__ = [
    "CurvatureReport",
    "DatasetSharpness",
    "SharpnessResult",
    "dataset_sharpness",
    "hessian_sharpness",
    "measure_curvature",
]
