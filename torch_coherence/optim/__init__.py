"""Optimizers whose stability torch-coherence can analyse (SAM: paper 002, Theorem C.8)."""

from .sam import SAM

__all__ = ["SAM"]
