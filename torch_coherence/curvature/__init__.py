"""Curvature engine: per-sample Gauss-Newton block Gram, coherence and sharpness of real models."""

from .measure import CurvatureReport, measure_curvature
from .sharpness import SharpnessResult, hessian_sharpness

__all__ = ["CurvatureReport", "SharpnessResult", "hessian_sharpness", "measure_curvature"]
