r"""Output-Hessian square roots that are never formed whole: columns on demand.

The Gram engine needs the columns :math:`b_{ir}` of :math:`B_i` (m, C, R) one at a time (one
backward pass each) and, for the ``torch.func`` fallback, the dense :math:`B_i` of a few
samples. For a language model C = T V and R = T (k + 1), so the dense (m, C, R) tensor would
be :math:`m T^2 V (k+1)` numbers (34 GB at m = 16, T = 128, V = 8000, k = 1) although each
column is non-zero on one token only. These classes hold the compact data and build columns
when asked. :func:`column`, :func:`sample_block`, :func:`append_columns` and :func:`is_finite`
accept a dense tensor or a lazy factor alike, so the engine treats both the same way.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LazyFactor",
    "SampledSequenceFactor",
    "TokenBlockFactor",
    "TopKTokenFactor",
    "append_columns",
    "column",
    "is_finite",
    "sample_block",
]


class LazyFactor:
    """A (m, C, R) square root whose columns are built on demand.

    Subclasses implement :meth:`_column` for their own R0 columns; columns appended with
    :meth:`with_columns` (the per-sample gradients of the engine) follow them.

    Attributes:
        m: samples. out_shape: the model output shape (m, ...) whose flattening is C.
    """

    def __init__(self, m: int, out_shape: tuple[int, ...], r0: int) -> None:
        self.m = m
        self.out_shape = tuple(out_shape)
        self.C = math.prod(self.out_shape[1:])
        self._r0 = r0
        self.extra: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        e = 0 if self.extra is None else self.extra.shape[2]
        return (self.m, self.C, self._r0 + e)

    def _column(self, r: int, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def column(self, r: int, rows: slice = slice(None)) -> torch.Tensor:
        """Column r for the samples ``rows``, (n, C): float64, or the model's float32 where a
        factor is built in it (:class:`SampledSequenceFactor`)."""
        if r < self._r0:
            return self._column(r, rows)
        assert self.extra is not None
        return self.extra[rows, :, r - self._r0]

    def block(self, rows: slice) -> torch.Tensor:
        """Dense (n, C, R) for the samples ``rows`` (the fallback's chunks)."""
        cols = [self.column(r, rows) for r in range(self.shape[2])]
        dtype = cols[0].dtype if all(c.dtype == cols[0].dtype for c in cols) else torch.float64
        return torch.stack([c.to(dtype) for c in cols], 2)

    def dense(self) -> torch.Tensor:
        return self.block(slice(None))

    def with_columns(self, cols: torch.Tensor) -> LazyFactor:
        """A shallow copy with dense columns (m, C, E) appended."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.extra = cols if self.extra is None else torch.cat([self.extra, cols], 2)
        return new

    def _compact(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def isfinite(self) -> torch.Tensor:
        """(m,) whether every stored number of sample i is finite."""
        ok = torch.ones(self.m, dtype=torch.bool)
        for t in self._compact() + ([self.extra] if self.extra is not None else []):
            ok &= torch.isfinite(t).reshape(self.m, -1).all(1).cpu()
        return ok


def _scatter_tokens(vals: torch.Tensor, tok: torch.Tensor, T: int) -> torch.Tensor:
    """(n, T, V) zeros with row tok[i] of sample i set to vals[i] (tok < 0: all zero)."""
    n, V = vals.shape
    out = vals.new_zeros(n, T, V)
    idx = torch.arange(n, device=vals.device)
    out[idx, tok.clamp_min(0)] = vals * (tok >= 0).unsqueeze(1).to(vals.dtype)
    return out


class _TokenLayout(LazyFactor):
    """Shared by the per-token factors: logits (m, T, V) seen in the model's layout."""

    def __init__(self, out_shape: tuple[int, ...], T: int, V: int, last: bool, r0: int) -> None:
        super().__init__(out_shape[0], out_shape, r0)
        self.T, self.V, self.last = T, V, last

    def _to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(n, T, V) -> (n, C) in the model's output order."""
        if not self.last:
            x = x.transpose(1, 2)  # torch's (n, V, positions)
        return x.reshape(x.shape[0], -1)


class TopKTokenFactor(_TokenLayout):
    r"""Per-token factor :math:`\sqrt{\omega_t}\,[\sqrt{p_c}(e_c - p)]_{c \in K_t}` plus the
    remainder column :math:`\sqrt{\omega_t}\,(p_{R}/\sqrt{s} - \sqrt{s}\,p)` (see
    :mod:`.sequence`). Column r of sample i is token ``tok[i, r]`` and class ``cls[i, r]``
    (-1: the remainder column); ``tok = -1`` pads samples with fewer columns.
    """

    def __init__(
        self,
        p: torch.Tensor,
        omega: torch.Tensor,
        topidx: torch.Tensor,
        k: torch.Tensor,
        rest: torch.Tensor,
        tok: torch.Tensor,
        cls: torch.Tensor,
        out_shape: tuple[int, ...],
        last: bool,
    ) -> None:
        _m, T, V = p.shape
        super().__init__(out_shape, T, V, last, tok.shape[1])
        self.p, self.omega, self.topidx, self.k, self.rest = p, omega, topidx, k, rest
        self.tok, self.cls = tok, cls

    def _column(self, r: int, rows: slice) -> torch.Tensor:
        tok, cls = self.tok[rows, r], self.cls[rows, r]
        n = tok.shape[0]
        i = torch.arange(self.m, device=tok.device)[rows]
        tt = tok.clamp_min(0)
        p = self.p[i, tt]  # (n, V)
        c = cls.clamp_min(0)
        pc = p.gather(1, c.unsqueeze(1))
        onehot = torch.zeros_like(p)
        onehot[torch.arange(n), c] = 1.0
        class_col = pc.sqrt() * (onehot - p)
        kept = self.topidx[i, tt]  # (n, kmax)
        keep = torch.arange(kept.shape[1], device=tok.device) < self.k[i, tt].unsqueeze(1)
        prest = p.scatter(1, kept, p.gather(1, kept) * (~keep).to(p.dtype))
        s = self.rest[i, tt].unsqueeze(1)
        rs = s.clamp_min(torch.finfo(p.dtype).tiny).sqrt()
        rest_col = prest / rs - rs * p
        val = torch.where((cls >= 0).unsqueeze(1), class_col, rest_col)
        val = val * self.omega[i, tt].sqrt().unsqueeze(1)
        return self._to_layout(_scatter_tokens(val, tok, self.T))

    def _compact(self) -> list[torch.Tensor]:
        return [self.p, self.omega]


class SampledSequenceFactor(_TokenLayout):
    r"""Sampled columns :math:`\sum_t \sqrt{\omega_t}\,(p_t - e_{\hat y_{ts}})/\sqrt S`, one per
    draw s: :math:`E[b_s b_s^\top] = \frac1S \mathrm{blockdiag}_t(\omega_t\Lambda_t)`, so the S
    columns are unbiased for :math:`\Lambda_i` with S backward passes per batch instead of
    one per token.

    Built in ``dtype`` (the model's float32 for a float32 model, else float64): the engine
    casts every column to the model's dtype before using it as a cotangent, so a float64
    column would only be rounded there, after two more passes over its T V entries a sample.
    """

    def __init__(
        self,
        p: torch.Tensor,
        omega: torch.Tensor,
        labels: torch.Tensor,
        out_shape: tuple[int, ...],
        last: bool,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        _m, T, V = p.shape
        super().__init__(out_shape, T, V, last, labels.shape[2])
        self.p, self.omega, self.labels = p.to(dtype), omega, labels
        self.scale = (omega.sqrt() / self._r0**0.5).unsqueeze(2).to(dtype)  # (m, T, 1)

    def _column(self, r: int, rows: slice) -> torch.Tensor:
        s = self.scale[rows]
        val = self.p[rows] * s  # one pass over (n, T, V); the label entries then get -s
        val.scatter_add_(2, self.labels[rows, :, r : r + 1], -s)
        return self._to_layout(val)

    def _compact(self) -> list[torch.Tensor]:
        return [self.p, self.omega]


class TokenBlockFactor(_TokenLayout):
    """Explicit per-token factors ``blocks`` (m, T, V, Q): column r is token r // Q, entry r % Q."""

    def __init__(self, blocks: torch.Tensor, out_shape: tuple[int, ...], last: bool) -> None:
        _m, T, V, Q = blocks.shape
        super().__init__(out_shape, T, V, last, T * Q)
        self.blocks, self.Q = blocks, Q

    def _column(self, r: int, rows: slice) -> torch.Tensor:
        t, j = divmod(r, self.Q)
        val = self.blocks[rows, t, :, j]
        tok = torch.full((val.shape[0],), t, dtype=torch.long, device=val.device)
        return self._to_layout(_scatter_tokens(val, tok, self.T))

    def _compact(self) -> list[torch.Tensor]:
        return [self.blocks]


Factor = torch.Tensor | LazyFactor


def column(sqrt: Factor, r: int) -> torch.Tensor:
    """Column r of a (m, C, R) factor, (m, C)."""
    return sqrt[:, :, r] if isinstance(sqrt, torch.Tensor) else sqrt.column(r)


def sample_block(sqrt: Factor, rows: slice) -> torch.Tensor:
    """Dense (n, C, R) rows of a factor."""
    return sqrt[rows] if isinstance(sqrt, torch.Tensor) else sqrt.block(rows)


def append_columns(sqrt: Factor, cols: torch.Tensor) -> Factor:
    """The factor with dense columns (m, C, E) appended."""
    if isinstance(sqrt, torch.Tensor):
        return torch.cat([sqrt, cols], dim=2)
    return sqrt.with_columns(cols)


def is_finite(sqrt: Factor) -> torch.Tensor:
    """(m,) per-sample finiteness of a factor."""
    if isinstance(sqrt, torch.Tensor):
        return torch.isfinite(sqrt).flatten(1).all(1)
    return sqrt.isfinite()
