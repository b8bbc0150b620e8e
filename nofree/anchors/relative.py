"""ASIF relative representations: sparse top-k cosines to the anchors, powered, normalised.

Norelli, Fumero, Maiorca, Moschella, Rodolà, Locatello (2022), "ASIF: Coupled Data Turns
Unimodal Models to Multimodal Without Training" (NeurIPS 2023), §3. For a query x and the anchors
a_1..a_N of the same modality (all L2-normalised)::

    r(x) = [<x, a_i>]_i                      cosine to every anchor
    keep the k largest entries of r(x), zero the rest
    raise each kept value v to the power p:  sign(v) * |v|**p
    L2-normalise the kept values             -> rho(x), at most k non-zeros

and the image–text similarity is <rho_img(x), rho_txt(y)>, anchor i being the same pair on both
sides. Choices made here:

* **Signed power.** ``sign(v)·|v|^p`` is defined for every real p > 0, keeps the order of the
  cosines, and equals the paper's ``v**p`` whenever the kept cosines are >= 0 (the usual case for
  k << N). Raising a negative cosine to an even p would turn an anti-correlated anchor into a
  correlated one; we never do that. The power is taken in float32 on values first divided by the
  row's largest magnitude (a positive rescaling the final normalisation undoes), so p = 8 does not
  underflow.
* **Exact top-k at any N.** The k largest cosines come from :func:`nofree.anchors.search.exact.cosine_topk`
  (a chunked scan, optionally with low-precision candidates on CPU, always returning the exact
  float32 top-k; see that module).
* Output rows list their anchors by decreasing cosine (ties: increasing anchor id).

Shapes: Q queries, N anchors, D embedding width, k kept entries per row.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nofree.anchors.search.exact import (  # noqa: F401  (the top-k names are re-exported from here)
    DEFAULT_QUERY_CHUNK, cosine_topk)
from nofree.anchors.search.precision import (  # noqa: F401
    AUTO_BF16_MIN_ANCHORS, AUTO_INT8_FUSED_MIN_ANCHORS, AUTO_INT8_MIN_ANCHORS, DEFAULT_ANCHOR_CHUNK,
    SCAN_PRECISIONS, AnchorStats, anchor_stats, resolve_precision)
from nofree.core import DataError, l2_normalize

_DENSE_FLOATS = 1 << 24  # largest dense block sparse_similarity builds


@dataclass(frozen=True, eq=False)
class SparseRelative:
    """Relative representations rho of Q queries over N anchors, k entries per row.

    values:  ``(Q, k)`` float32, each row L2-normalised (all-zero rows stay zero)
    indices: ``(Q, k)`` int64 anchor ids in ``[0, n_anchors)``, by decreasing cosine
    cosines: ``(Q, k)`` float32 the raw cosines behind ``values``
    """

    values: Tensor
    indices: Tensor
    cosines: Tensor
    n_anchors: int

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.n_anchors)

    def to(self, device: Any) -> "SparseRelative":
        return SparseRelative(self.values.to(device), self.indices.to(device),
                              self.cosines.to(device), self.n_anchors)

    def to_dense(self) -> Tensor:
        """``(Q, N)`` float32 dense matrix (mind the memory at large N)."""
        dense = torch.zeros(self.shape, dtype=torch.float32, device=self.values.device)
        return dense.scatter_(1, self.indices, self.values)

    def to_scipy(self):
        """``scipy.sparse.csr_matrix`` of shape ``(Q, N)``, float32."""
        return to_scipy_csr(self.values, self.indices, self.n_anchors)

    def to_torch_csr(self) -> Tensor:
        """``torch.sparse_csr`` tensor of shape ``(Q, N)``, float32."""
        return to_torch_csr(self.values, self.indices, self.n_anchors)

    def __repr__(self) -> str:
        return f"SparseRelative(n={len(self)}, k={self.k}, n_anchors={self.n_anchors})"


def _sorted_rows(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Rows sorted by increasing index (what CSR wants)."""
    indices, order = indices.sort(dim=1)
    return values.gather(1, order), indices


def to_scipy_csr(values: Tensor, indices: Tensor, n_anchors: int):
    """``(Q, k)`` values/indices -> ``scipy.sparse.csr_matrix (Q, n_anchors)`` float32."""
    import numpy as np
    import scipy.sparse

    values, indices = _sorted_rows(values.detach().float().cpu(), indices.detach().cpu())
    q, k = values.shape
    indptr = np.arange(0, q * k + 1, k, dtype=np.int64)
    return scipy.sparse.csr_matrix((values.reshape(-1).numpy(), indices.reshape(-1).numpy(), indptr),
                                   shape=(q, n_anchors))


def to_torch_csr(values: Tensor, indices: Tensor, n_anchors: int) -> Tensor:
    """``(Q, k)`` values/indices -> ``torch.sparse_csr`` ``(Q, n_anchors)`` float32, same device."""
    values, indices = _sorted_rows(values.float(), indices)
    q, k = values.shape
    crow = torch.arange(0, q * k + 1, k, dtype=torch.int64, device=values.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, indices.reshape(-1), values.reshape(-1), size=(q, n_anchors),
                                       check_invariants=False)


# --- the anchors as ASIF compares with them -------------------------------------------------------

def prepare_anchors(anchors: Tensor, modality: str, *, center: bool, chunk: int = DEFAULT_ANCHOR_CHUNK,
                    ) -> tuple[Tensor, Tensor | None]:
    """Anchors ``(N, D)`` as float32 unit rows (no copy when they already are), and, when
    ``center``, minus their mean ``(D,)`` (summed in float64, ``chunk`` rows at a time) and
    re-normalised; returns ``(prepared (N, D), mean or None)``. Raises ``DataError`` on NaN/inf."""
    a = anchors.to(dtype=torch.float32)
    off = 0.0
    for i in range(0, a.shape[0], chunk):
        block = a[i:i + chunk]
        if not bool(torch.isfinite(block).all()):
            raise DataError(f"{modality} anchors contain NaN or inf (rows {i}.."
                            f"{i + block.shape[0] - 1}); rebuild the anchor set")
        off = max(off, float((block.norm(dim=1) - 1).abs().max()))
    if off > 1e-3:
        a = l2_normalize(a)
    mean = None
    if center:
        mean = sum(a[i:i + chunk].double().sum(0) for i in range(0, a.shape[0], chunk)) / a.shape[0]
        mean = mean.float()
        a = l2_normalize(a - mean)
    return a.contiguous(), mean


# --- the power and normalisation -----------------------------------------------------------------

def power_normalize(cosines: Tensor, p: float) -> Tensor:
    """``(Q, k)`` kept cosines -> ``(Q, k)`` float32 ``sign(v)|v|^p``, each row L2-normalised."""
    v = cosines.float()
    v = v / v.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    if p != 1:
        v = v.sign() * v.abs().pow(p)
    return l2_normalize(v, dim=1)


def relative_topk(query: Tensor, anchors: Tensor, k: int, p: float, **scan: Any) -> SparseRelative:
    """rho(query) over ``anchors``: exact top-k cosines, signed power p, L2 per row.

    query ``(Q, D)`` and anchors ``(N, D)`` L2-normalised float32; ``scan`` goes to
    :func:`cosine_topk` (precision, anchor_chunk, query_chunk, stats).
    """
    if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise DataError(f"p must be a positive finite number, got {p!r}")
    cosines, indices = cosine_topk(query, anchors, k, **scan)
    return SparseRelative(power_normalize(cosines, p), indices, cosines, int(anchors.shape[0]))


# --- similarity of two sets of relative representations ------------------------------------------

def sparse_similarity(a_vals: Tensor, a_idx: Tensor, b_vals: Tensor, b_idx: Tensor, n_anchors: int,
                      *, method: str = "auto", row_chunk: int = 4096) -> Tensor:
    """``(Qa, Qb)`` float32 dot products of two sets of sparse rows over the same anchor ids.

    a_vals/a_idx ``(Qa, ka)``, b_vals/b_idx ``(Qb, kb)``. ``method``: ``"sparse"`` (scipy CSR
    product, CPU; work = sum over anchors of (#a rows using it)·(#b rows using it)), ``"dense"``
    (rows densified over the anchors both sides use, chunked matmul; any device) or ``"auto"``
    (the cheaper by that work estimate; dense off CPU). Memory: the output plus one chunk.
    """
    if method not in ("auto", "sparse", "dense"):
        raise DataError(f"method must be 'auto', 'sparse' or 'dense', got {method!r}")
    device = a_vals.device
    qa, qb = a_vals.shape[0], b_vals.shape[0]
    if qa == 0 or qb == 0:
        return torch.zeros(qa, qb, device=device)
    b_vals, b_idx = b_vals.to(device).float(), b_idx.to(device)
    used_a = torch.bincount(a_idx.reshape(-1), minlength=n_anchors)
    used_b = torch.bincount(b_idx.reshape(-1), minlength=n_anchors)
    both = (used_a > 0) & (used_b > 0)
    n_both = int(both.sum())
    if n_both == 0:
        return torch.zeros(qa, qb, device=device)
    if method == "auto":
        sparse_work = float((used_a.double() * used_b.double()).sum())
        dense_work = float(qa) * qb * n_both
        method = "sparse" if device.type == "cpu" and 64 * sparse_work < dense_work else "dense"
    if method == "sparse":
        import numpy as np

        b_csr = to_scipy_csr(b_vals, b_idx, n_anchors).T.tocsr()
        out = np.empty((qa, qb), dtype=np.float32)
        for i in range(0, qa, row_chunk):
            a_csr = to_scipy_csr(a_vals[i:i + row_chunk], a_idx[i:i + row_chunk], n_anchors)
            out[i:i + row_chunk] = (a_csr @ b_csr).toarray()
        return torch.from_numpy(out).to(device)
    # dense over the anchors both sides use (the others contribute nothing), in column and row
    # chunks so no dense piece exceeds _DENSE_FLOATS
    remap = torch.full((n_anchors,), -1, dtype=torch.int64, device=device)
    remap[both] = torch.arange(n_both, device=device)
    a_cols, b_cols = remap[a_idx.to(device)], remap[b_idx]
    a_vals = a_vals.to(device).float()

    def densify(vals: Tensor, cols: Tensor, u0: int, width: int) -> Tensor:
        local = cols - u0
        local = torch.where((local >= 0) & (local < width), local, width)  # misses -> extra column
        dense = torch.zeros(vals.shape[0], width + 1, device=device)
        return dense.scatter_add_(1, local, vals)[:, :width]

    out = torch.zeros(qa, qb, device=device)
    width = max(1, min(n_both, _DENSE_FLOATS // qb))
    rows = max(1, min(row_chunk, _DENSE_FLOATS // width))
    for u0 in range(0, n_both, width):
        w = min(width, n_both - u0)
        b_part = densify(b_vals, b_cols, u0, w).T.contiguous()  # (w, Qb)
        for i in range(0, qa, rows):
            out[i:i + rows] += densify(a_vals[i:i + rows], a_cols[i:i + rows], u0, w) @ b_part
    return out
