"""Exact top-k cosines of queries among anchors, at any number of anchors.

The search behind ASIF's relative representations (:mod:`nofree.anchors.relative`; Norelli,
Fumero, Maiorca, Moschella, Rodolà, Locatello (2022), "ASIF: Coupled Data Turns Unimodal Models
to Multimodal Without Training" (NeurIPS 2023), §3): for each query, the k largest cosines to the
anchors and their anchor ids. Choices made here:

* **Exact top-k at any N.** Anchors are scanned in chunks with a running per-row threshold, so no
  (Q, N) matrix is ever held. On CPU the scan can use a low-precision matmul (``"int8"`` or
  ``"bf16"``) to find *candidates*, with a rigorous per-row bound e on the error of the
  approximate score. With m the k-th largest approximate score seen so far, an anchor whose
  approximate score y satisfies ``y < m - 2e - (rounding of m)`` has exact cosine below the exact
  k-th largest, so it is dropped; the survivors are re-scored in float32 (faiss's indexed inner
  products, visited in anchor order) and the top k taken. The result is the exact float32 top-k
  (ties at the float32 rounding level excepted), never an approximation: the margin adapts to how
  crowded each row is near its k-th value. Off CPU the scan is float32 throughout (leave TF32
  matmuls off for float32-exact cosines on NVIDIA GPUs).
* Output rows list their anchors by decreasing cosine (ties: increasing anchor id).
* The bookkeeping between matmuls — taking each score tile's candidates, pruning them, the
  final per-row ranking, re-quantising anchor chunks — runs in small C helpers
  (:mod:`nofree.native`, built on first use) when a C compiler is available, and in
  torch otherwise, with bit-identical results either way.

Shapes: Q queries, N anchors, D embedding width, k kept entries per row.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nofree.anchors.int8_matmul import Int8Products
from nofree.core import DataError, resolve_device
from nofree.native import library_for

PRECISIONS = ("auto", "fp32", "bf16", "int8")
DEFAULT_ANCHOR_CHUNK = 8192
DEFAULT_QUERY_CHUNK = 2048
#: anchor rows per scan chunk when none is given, by scan precision: a low-precision chunk is
#: quantised (and, with the int8 kernel, fetched into the cache while the previous chunk is
#: scanned), so smaller chunks that stay in the cache suit it (benchmarks/asif_scale.py; int8
#: against 1,024 and 4,096 rows in benchmarks/RESULTS.md, "ASIF at scale")
ANCHOR_CHUNK_BY_PRECISION = {"fp32": DEFAULT_ANCHOR_CHUNK, "bf16": 4096, "int8": 2048}
#: ``precision="auto"`` on CPU: float32 below AUTO_BF16_MIN_ANCHORS, bfloat16 candidates up to
#: AUTO_INT8_MIN_ANCHORS, int8 candidates above: int8's matmul is faster, but its wider error
#: band lets more candidates through to the float32 re-scoring, so it wins only where the matmul
#: dominates, at many anchors (crossovers from benchmarks/asif_scale.py). With nofree's own int8
#: kernel (AVX-512 VNNI, selection fused in) int8 wins from AUTO_INT8_FUSED_MIN_ANCHORS on
#: (benchmarks/RESULTS.md, "ASIF at scale": 100k and 200k anchors). Other devices always scan in
#: float32.
AUTO_BF16_MIN_ANCHORS = 65536
AUTO_INT8_MIN_ANCHORS = 500_000
AUTO_INT8_FUSED_MIN_ANCHORS = 150_000

# Histogram of approximate scores per query row, used to track the k-th largest score cheaply.
_BIN_W = 2.0 ** -10
_BIN_LO = -1.5
_N_BINS = 3072  # covers [-1.5, 1.5); values outside are clamped into the end bins
_GROUP = 16  # column group for the max-prefilter in _select
_REFRESH = 1.25  # the discard level is recomputed whenever the anchors seen grow by this factor
#: anchor rows per pass of anchor_stats: several passes per chunk, so that one pass's rows
#: (3 MB of float32 at 768-d) stay in the cache between its steps
_STATS_ROWS = 1024


def resolve_precision(precision: str, n_anchors: int, device: Any = None) -> str:
    """The scan precision ``"auto"`` stands for at this size and device."""
    if precision not in PRECISIONS:
        raise DataError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cpu = resolve_device(device).type == "cpu"
    if precision in ("bf16", "int8") and not cpu:
        raise DataError(f"precision={precision!r} is a CPU scan (its error bound assumes CPU kernels); "
                        f"use precision='fp32' or 'auto' on {resolve_device(device)}")
    if precision != "auto":
        return precision
    if not cpu or n_anchors < AUTO_BF16_MIN_ANCHORS:
        return "fp32"
    if n_anchors >= AUTO_INT8_MIN_ANCHORS:
        return "int8"
    fused = n_anchors >= AUTO_INT8_FUSED_MIN_ANCHORS and Int8Products.available(library_for(torch.device("cpu")))
    return "int8" if fused else "bf16"


@dataclass(frozen=True)
class AnchorStats:
    """What the low-precision scan needs to know about the anchors (one pass, no copy kept).

    a_norm: max ||a_j||; res: max ||a_j - â_j|| (â the low-precision anchor); ah_norm: max ||â_j||;
    scale: int8 quantisation step shared by all anchors (1.0 for other precisions).
    """

    precision: str
    a_norm: float
    res: float
    ah_norm: float
    scale: float = 1.0


def anchor_stats(anchors: Tensor, precision: str, *, chunk: int = DEFAULT_ANCHOR_CHUNK) -> AnchorStats:
    """Error-bound statistics of ``anchors (N, D)`` for ``precision`` ("fp32", "bf16", "int8")."""
    if precision not in _CODECS:
        raise DataError(f"precision must be one of {tuple(_CODECS)}, got {precision!r}")
    codec = _CODECS[precision]
    chunk = min(chunk, _STATS_ROWS)  # the passes below then re-read the chunk from cache, not memory
    scale = 1.0
    if precision == "int8":
        top = max(float(anchors[i:i + chunk].abs().amax()) for i in range(0, anchors.shape[0], chunk))
        scale = float(torch.tensor(max(top, 1e-30) / 127.0, dtype=torch.float32))
    a_norm = res = ah_norm = 0.0
    for i in range(0, anchors.shape[0], chunk):
        a = anchors[i:i + chunk].float()
        ah = codec.dequantize(codec.quantize_anchors(a, scale), scale)
        a_norm = max(a_norm, float(a.norm(dim=1).max()))
        res = max(res, float((a - ah).norm(dim=1).max()))
        ah_norm = max(ah_norm, float(ah.norm(dim=1).max()))
    return AnchorStats(precision, a_norm, res, ah_norm, scale)


class _Fp32:
    """The scan values are the float32 cosines themselves: no error, no re-scoring."""

    name, exact, out_rel = "fp32", True, 0.0

    @staticmethod
    def quantize_anchors(a: Tensor, scale: float) -> Tensor:
        return a

    @staticmethod
    def dequantize(a: Tensor, scale: float) -> Tensor:
        return a

    @staticmethod
    def queries(q: Tensor, stats: AnchorStats) -> tuple[Tensor, Tensor, Tensor]:
        ones = torch.ones(q.shape[0], dtype=torch.float64, device=q.device)
        return q, ones, torch.zeros_like(ones)

    @staticmethod
    def scores(q_low: Tensor, a_low: Tensor) -> Tensor:
        return q_low @ a_low.T

    @staticmethod
    def values(s: Tensor, qscale: Tensor) -> Tensor:
        return s.float()

    @staticmethod
    def threshold(tau: Tensor, qscale: Tensor) -> Tensor:
        return tau.float()

    @staticmethod
    def level(tau: Tensor) -> Tensor:
        return tau.float()

    @staticmethod
    def comparable(s: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
        return s, thr


class _Bf16(_Fp32):
    """bfloat16 inputs, float32 accumulation, bfloat16 output (what torch's CPU matmul does).

    Bound: |q·a - y| <= ||q - q̂||·max||a|| + ||q̂||·max||a - â|| + γ_D·||q̂||·max||â||, with y the
    float32 accumulator; the stored score rounds y to bfloat16 (relative error <= 2^-8).
    """

    name, exact, out_rel = "bf16", False, 2.0 ** -8 / (1 - 2.0 ** -8)

    @staticmethod
    def quantize_anchors(a: Tensor, scale: float) -> Tensor:
        return a.to(torch.bfloat16)

    @staticmethod
    def dequantize(a: Tensor, scale: float) -> Tensor:
        return a.float()

    @staticmethod
    def queries(q: Tensor, stats: AnchorStats) -> tuple[Tensor, Tensor, Tensor]:
        qh = q.to(torch.bfloat16)
        qf = qh.float()
        rq = (q - qf).norm(dim=1).double()
        qn = qf.norm(dim=1).double()
        d = q.shape[1]
        gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
        err = rq * stats.a_norm + qn * stats.res + gamma * qn * stats.ah_norm
        return qh, torch.ones_like(err), err * (1 + 1e-6) + 1e-6

    @staticmethod
    def threshold(tau: Tensor, qscale: Tensor) -> Tensor:
        # the largest bfloat16 value <= tau: then s < thr (bf16) implies y < thr <= tau
        t = tau.float().to(torch.bfloat16)
        down = torch.nextafter(t, torch.full_like(t, -math.inf))
        return torch.where(t.double() > tau, down, t)

    @classmethod
    def level(cls, tau: Tensor) -> Tensor:
        return cls.threshold(tau, tau).float()

    @staticmethod
    def comparable(s: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
        # positive bfloat16 values order like their int16 bit patterns, and negative ones (sign
        # bit set) fall below every positive pattern; integer compares/maxima are much faster
        if bool((thr > 0).all()):
            return s.view(torch.int16), thr.view(torch.int16)
        return s, thr

    @staticmethod
    def values(s: Tensor, qscale: Tensor) -> Tensor:
        return (s.view(torch.bfloat16) if s.dtype == torch.int16 else s).float()


class _Int8(_Fp32):
    """int8 inputs, exact int32 dot products (``torch._int_mm``); y = dot · s_q · s_a exactly.

    Queries use one scale per row, anchors one scale for the whole set (so a row threshold is a
    single integer). Bound: |q·a - y| <= ||q - q̂||·max||a|| + ||q̂||·max||a - â||.
    """

    name, exact, out_rel = "int8", False, 2.0 ** -21

    @staticmethod
    def quantize_anchors(a: Tensor, scale: float) -> Tensor:
        # a multiply and in-place rounding: ~2.7x faster than round(a / scale) per chunk (one
        # pass in C when the native helpers are built, same values); the error bound uses these
        # same quantised anchors (anchor_stats calls this function too)
        lib = library_for(a.device)
        if lib is not None and a.dtype == torch.float32 and a.is_contiguous():
            out = torch.empty(a.shape, dtype=torch.int8)
            lib.nofree_quantize_i8(a.data_ptr(), a.numel(), 1.0 / scale, out.data_ptr())
            return out
        return (a * (1.0 / scale)).round_().clamp_(-127, 127).to(torch.int8)

    @staticmethod
    def dequantize(a: Tensor, scale: float) -> Tensor:
        return a.float() * scale

    @staticmethod
    def queries(q: Tensor, stats: AnchorStats) -> tuple[Tensor, Tensor, Tensor]:
        sq = (q.abs().amax(dim=1) / 127.0).clamp_min(1e-30)
        q8 = torch.round(q / sq[:, None]).clamp_(-127, 127).to(torch.int8)
        qh = q8.float() * sq[:, None]
        rq = (q - qh).norm(dim=1).double()
        qn = qh.norm(dim=1).double()
        err = rq * stats.a_norm + qn * stats.res
        return q8, sq.double() * stats.scale, err * (1 + 1e-6) + 1e-6

    @staticmethod
    def scores(q_low: Tensor, a_low: Tensor) -> Tensor:
        return torch._int_mm(q_low, a_low.T)

    @staticmethod
    def values(s: Tensor, qscale: Tensor) -> Tensor:
        return s.float() * qscale.float()

    @staticmethod
    def threshold(tau: Tensor, qscale: Tensor) -> Tensor:
        # s < floor(tau/scale) - 1 implies y = s·scale < tau - scale (float64 is exact enough here)
        t = torch.floor(tau / qscale) - 1
        return t.clamp(-2.0 ** 31, 2.0 ** 31 - 1).nan_to_num(nan=-2.0 ** 31).to(torch.int32)

    @staticmethod
    def level(tau: Tensor) -> Tensor:
        return (tau - tau.abs() * 2.0 ** -20 - 1e-30).float()


_CODECS = {"fp32": _Fp32, "bf16": _Bf16, "int8": _Int8}


def _select(s: Tensor, thr: Tensor, grouped: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Entries ``s[r, c] >= thr[r]`` of ``s (R, C)``: rows, cols, values (dtype of ``s``).

    ``grouped``: first compare each group of 16 columns' maximum with the row threshold and look
    inside passing groups only; about 3x cheaper than a full mask when few entries pass.
    """
    r_, c_ = s.shape
    thr = thr.to(s.dtype)[:, None]
    if grouped and c_ % _GROUP == 0:
        groups = s.view(r_, c_ // _GROUP, _GROUP)
        gr, gc = (groups.amax(dim=2) >= thr).nonzero(as_tuple=True)
        block = groups[gr, gc]  # (n_groups, G)
        sr, sj = (block >= thr[gr]).nonzero(as_tuple=True)
        return gr[sr], gc[sr] * _GROUP + sj, block[sr, sj]
    r, c = (s >= thr).nonzero(as_tuple=True)
    return r, c, s[r, c]


def _bins(v: Tensor) -> Tensor:
    return ((v.float() - _BIN_LO) / _BIN_W).floor_().clamp_(0, _N_BINS - 1).long()


class _Candidates:
    """The candidate ``(row, anchor id, approximate value)`` triples of one query block, in flat
    int32 / int32 / float32 arrays that grow by doubling and are pruned in place.

    One long-lived allocation per field instead of a list of small pieces: many pieces of
    assorted sizes, interleaved with the scan's short-lived tiles, fragment the C heap (measured:
    peak memory 5.4 -> 8-9 GB on one 2,048-query block over a million anchors).
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.size = 0
        self.rows = torch.empty(capacity, dtype=torch.int32, device=device)
        self.cols = torch.empty(capacity, dtype=torch.int32, device=device)
        self.vals = torch.empty(capacity, dtype=torch.float32, device=device)

    @property
    def capacity(self) -> int:
        return self.rows.numel()

    def reserve(self, extra: int) -> None:
        """Room for at least ``extra`` more triples."""
        if self.size + extra <= self.capacity:
            return
        capacity = max(2 * self.capacity, self.size + extra)
        for name in ("rows", "cols", "vals"):
            old = getattr(self, name)
            new = torch.empty(capacity, dtype=old.dtype, device=old.device)
            new[:self.size] = old[:self.size]
            setattr(self, name, new)

    def append(self, rows: Tensor, cols: Tensor, vals: Tensor) -> None:
        n = rows.numel()
        self.reserve(n)
        self.rows[self.size:self.size + n] = rows
        self.cols[self.size:self.size + n] = cols
        self.vals[self.size:self.size + n] = vals
        self.size += n

    def prune(self, level: Tensor) -> None:
        """Keep the triples whose value is ``>= level[row]`` (float32 ``level``; order kept)."""
        lib = library_for(self.rows.device)
        if lib is not None:
            level = level.float().contiguous()
            self.size = lib.nofree_prune(self.rows.data_ptr(), self.cols.data_ptr(), self.vals.data_ptr(),
                                         self.size, level.data_ptr(), torch.get_num_threads())
            return
        keep = (self.vals[:self.size] >= level[self.rows[:self.size].long()]).nonzero().squeeze(1)
        n = keep.numel()
        for name in ("rows", "cols", "vals"):
            t = getattr(self, name)
            t[:n] = t[:self.size][keep]
        self.size = n

    def arrays(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.rows[:self.size], self.cols[:self.size], self.vals[:self.size]


class _Taker:
    """Appends the candidates of one score tile after another to a :class:`_Candidates`: every
    entry ``s[r, c] >= thr[r]`` as ``(r, col0 + c, codec.values(s[r, c]))``, row by row then by
    column, counting each in its row's histogram of values (``hist (R, _N_BINS)`` int32).

    With the native helpers (int32 tiles of an int8 scan, int16 tiles of a bfloat16 one) this is
    one pass in C over the tile, writing straight into the store; otherwise torch's
    :func:`_select` (same triples, same order, same histogram).
    """

    def __init__(self, codec: Any, qscale: Tensor, hist: Tensor, store: _Candidates) -> None:
        self.codec, self.hist, self.store = codec, hist, store
        self.qscale32 = qscale.float().contiguous()
        self.lib = library_for(hist.device)
        self.rate = 1.0  # fraction of the last tile's entries taken (picks the torch strategy)

    def __call__(self, s: Tensor, thr: Tensor, qscale: Tensor, col0: int) -> None:
        before = self.store.size
        s, thr = self.codec.comparable(s, thr)
        kernel = {torch.int32: "nofree_take_i32", torch.int16: "nofree_take_i16"}.get(s.dtype)
        if self.lib is not None and kernel is not None and s.stride(1) == 1:
            self._native(getattr(self.lib, kernel), s, thr.to(s.dtype).contiguous(), col0)
        else:
            r, c, sv = _select(s, thr, grouped=self.rate < 0.004)
            v = self.codec.values(sv, qscale[r])
            flat = r * _N_BINS + _bins(v)
            self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            self.store.append(r, c + col0, v)
        self.rate = (self.store.size - before) / max(1, s.numel())

    def _native(self, fn: Any, s: Tensor, thr: Tensor, col0: int) -> None:
        n_rows, n_cols = s.shape
        store = self.store
        store.reserve(n_rows * n_cols + _GROUP)  # room for the whole tile: the kernel never runs out
        store.size = fn(s.data_ptr(), n_rows, n_cols, s.stride(0), thr.data_ptr(), col0,
                        self.qscale32.data_ptr(), self.hist.data_ptr(), _N_BINS, _BIN_LO, 1.0 / _BIN_W,
                        store.rows.data_ptr(), store.cols.data_ptr(), store.vals.data_ptr(), store.size)


def _kth_bins(hist: Tensor, k: int, lo: int) -> Tensor:
    """Per row of ``hist (R, bins)``, the highest bin ``b >= lo`` where the count from the top
    reaches k, or -1 when bins ``lo..`` hold fewer than k entries -> ``(R,)`` int64."""
    lib = library_for(hist.device) if hist.is_contiguous() else None
    if lib is not None:
        out = torch.empty(hist.shape[0], dtype=torch.int64)
        lib.nofree_kth_bins(hist.data_ptr(), hist.shape[0], hist.shape[1], k, lo, out.data_ptr())
        return out
    window = hist[:, lo:]
    cum = window.flip(1).cumsum(dim=1)
    reached = cum >= k
    b = lo + window.shape[1] - 1 - reached.int().argmax(dim=1)
    return torch.where(reached.any(dim=1), b, torch.full_like(b, -1))


def _tau_from_hist(hist: Tensor, k: int, err: Tensor, out_rel: float, tau_old: Tensor) -> Tensor:
    """New discard levels ``(R,)`` float64 from per-row score histograms ``hist (R, bins)``.

    L = lower edge of the bin where the count from the top reaches k (>= k scores are >= L);
    every anchor whose approximate score is below ``L - out_rel·|L| - 2·err`` is out of the top k.
    """
    finite = torch.isfinite(tau_old)
    lo = int(_bins(tau_old[finite]).min()) if bool(finite.all()) and finite.numel() else 0
    b = _kth_bins(hist, k, lo).to(tau_old.device)
    edge = (_BIN_LO + b.double() * _BIN_W) - 2.0 ** -20  # bins computed in float32: keep a hair below
    edge = torch.where(b > 0, edge, torch.full_like(edge, -math.inf))
    tau = edge - out_rel * edge.abs().nan_to_num(posinf=0.0, neginf=0.0) - 2 * err
    return torch.maximum(tau, tau_old)


def _rescore_pairs(query: Tensor, anchors: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Exact float32 ``query[rows[j]] · anchors[cols[j]]`` for each pair ``j`` -> ``(n,)``.

    Pairs should come sorted by anchor id: each anchor row is then read once while the query
    block stays in cache (about 10x faster than visiting them query by query).
    """
    n = rows.numel()
    if anchors.device.type == "cpu" and anchors.dtype == torch.float32 and n > 0:
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            q = query.float().contiguous().numpy()
            a = anchors.contiguous().numpy()
            ia, iq = cols.long().contiguous().numpy(), rows.long().contiguous().numpy()
            out = torch.empty(n, dtype=torch.float32)
            faiss.pairwise_indexed_inner_product(q.shape[1], n, faiss.swig_ptr(a), faiss.swig_ptr(ia),
                                                 faiss.swig_ptr(q), faiss.swig_ptr(iq),
                                                 faiss.swig_ptr(out.numpy()))
            return out
    out = torch.empty(n, dtype=torch.float32, device=anchors.device)
    step = max(1, (1 << 22) // anchors.shape[1])
    for i in range(0, n, step):
        a = anchors[cols[i:i + step].long()].float()
        out[i:i + step] = (a * query[rows[i:i + step].long()].float()).sum(dim=1)
    return out


def _canonical(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by decreasing value, ties by increasing index."""
    indices, order = indices.sort(dim=1)
    values = values.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def _check(query: Tensor, anchors: Tensor, k: int, anchor_chunk: int, query_chunk: int) -> None:
    if query.ndim != 2 or anchors.ndim != 2:
        raise DataError(f"expected 2-D query (Q, D) and anchors (N, D), got {tuple(query.shape)} "
                        f"and {tuple(anchors.shape)}")
    if query.shape[1] != anchors.shape[1]:
        raise DataError(f"query has {query.shape[1]} dims but the anchors have {anchors.shape[1]}: "
                        "embed both with the same encoder")
    n = anchors.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise DataError(f"k must be an integer in [1, {n}] (the number of anchors), got {k!r}")
    for name, value in (("anchor_chunk", anchor_chunk), ("query_chunk", query_chunk)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def cosine_topk(query: Tensor, anchors: Tensor, k: int, *, precision: str = "auto",
                anchor_chunk: int | None = None, query_chunk: int = DEFAULT_QUERY_CHUNK,
                stats: AnchorStats | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k cosines of every query row among the anchors.

    query ``(Q, D)`` and anchors ``(N, D)``, L2-normalised float32 (the query is moved to the
    anchors' device). Returns cosines ``(Q, k)`` float32 (decreasing; ties by anchor id) and
    indices ``(Q, k)`` int64. Memory is bounded by the chunk sizes: the scan holds one query
    block's state, ``query_chunk × anchor_chunk`` scores plus that block's candidates (a few k
    per row), besides the inputs and outputs.
    ``stats`` (from :func:`anchor_stats`) saves one pass over the anchors on repeated calls.
    """
    precision = resolve_precision(precision, anchors.shape[0] if anchors.ndim == 2 else 0, anchors.device)
    if anchor_chunk is None:
        anchor_chunk = ANCHOR_CHUNK_BY_PRECISION[precision]
    _check(query, anchors, k, anchor_chunk, query_chunk)
    query = query.to(anchors.device).float()
    if not bool(torch.isfinite(query).all()):
        raise DataError("query embeddings contain NaN or inf; check the encoder output")
    n, nq = anchors.shape[0], query.shape[0]
    codec = _CODECS[precision]
    if nq == 0:
        return (torch.zeros(0, k, device=anchors.device),
                torch.zeros(0, k, dtype=torch.int64, device=anchors.device))
    if precision == "fp32" and n <= anchor_chunk:  # small sets: one matmul per query block
        out_v, out_i = [], []
        for q0 in range(0, nq, query_chunk):
            v, i = (query[q0:q0 + query_chunk] @ anchors.float().T).topk(k, dim=1)
            out_v.append(v)
            out_i.append(i)
        return _canonical(torch.cat(out_v), torch.cat(out_i))
    if precision == "fp32":
        stats = AnchorStats("fp32", 1.0, 0.0, 1.0)
    elif stats is None or stats.precision != precision:
        stats = anchor_stats(anchors, precision, chunk=anchor_chunk)
    return _scan(query, anchors, k, codec, stats, anchor_chunk, query_chunk)


def _scan(query: Tensor, anchors: Tensor, k: int, codec: Any, stats: AnchorStats,
          anchor_chunk: int, query_chunk: int) -> tuple[Tensor, Tensor]:
    """The chunked candidate scan, then exact re-scoring of the survivors (see module doc).

    One query block at a time (its state is all that is held): ``tau`` (float64, per row) is the
    current discard level and ``hist`` counts the kept approximate scores by bin; ``tau`` is
    recomputed from ``hist`` whenever the anchors seen have grown by 25%, and the kept candidates
    are pruned to ``tau`` when they have doubled.
    """
    device = anchors.device
    n, nq = anchors.shape[0], query.shape[0]
    q_low, qscale, err = codec.queries(query, stats)
    n_chunks = (n + anchor_chunk - 1) // anchor_chunk
    # a fixed shuffled chunk order: anchor sets sorted by topic would otherwise settle slowly
    order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(0)).tolist()
    out_v = torch.empty(nq, k, dtype=torch.float32, device=device)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=device)
    for a in range(0, nq, query_chunk):
        b = min(a + query_chunk, nq)
        rows, cols, vals = _scan_block(q_low[a:b], qscale[a:b], err[a:b], anchors, k, codec, stats,
                                       anchor_chunk, order)
        if library_for(device) is None:  # anchor order: cache-friendly re-scoring; _top_per_row's ties by id
            cols, o = cols.sort(stable=True)
            rows, vals = rows[o], vals[o]
        if not codec.exact:  # exact float32 scores
            vals = _rescore_pairs(query[a:b], anchors, rows, cols)
        out_v[a:b], out_i[a:b] = _top_per_row(rows, cols, vals, b - a, k)
    return out_v, out_i


def _scan_block(q_low: Tensor, qscale: Tensor, err: Tensor, anchors: Tensor, k: int, codec: Any,
                stats: AnchorStats, anchor_chunk: int, order: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates ``(rows, cols, approx)`` of one query block: every anchor that may be in a top k."""
    device, n, nb = anchors.device, anchors.shape[0], q_low.shape[0]
    hist = torch.zeros(nb, _N_BINS, dtype=torch.int32, device=device)
    tau = torch.full((nb,), -math.inf, dtype=torch.float64, device=device)
    thr = codec.threshold(tau, qscale)
    store = _Candidates(nb * min(n, 4 * k + anchor_chunk), device)  # the first tiles pass the most
    pruned_at = seen = refreshed_at = 0  # store size after the last pruning; anchors seen
    take = _Taker(codec, qscale, hist, store)
    # int8 on a CPU with AVX-512 VNNI: the products in C, the selection fused into them
    fused = Int8Products.create(library_for(device), q_low) if codec is _Int8 else None
    for step, ci in enumerate(order):
        c0 = ci * anchor_chunk
        chunk = anchors[c0:c0 + anchor_chunk]
        cold = chunk.shape[0] >= k and not bool(torch.isfinite(tau).all())
        if fused is None:
            s = codec.scores(q_low, codec.quantize_anchors(chunk.float(), stats.scale))
        else:
            packed = fused.pack(chunk, stats.scale)
            s = fused.scores(packed) if cold else None
        if cold:  # the k-th largest score of this chunk is a valid first level
            kth = codec.values(s.topk(k, dim=1, sorted=False).values.amin(dim=1), qscale).double()
            tau = torch.maximum(tau, kth - codec.out_rel * kth.abs() - 2 * err)
            thr = codec.threshold(tau, qscale)
        room = nb * chunk.shape[0] + _GROUP if s is not None else fused.room(chunk.shape[0])
        if store.size + room > store.capacity and store.size > pruned_at:
            store.prune(codec.level(tau))  # drop what the current level rules out before growing
            pruned_at = store.size
            store.reserve(store.size)      # still over half full: double, or it prunes again soon
        if s is None:  # (the next chunk's anchors are fetched into the cache meanwhile)
            ahead = order[step + 1] * anchor_chunk if step + 1 < len(order) else None
            fused.take(packed, thr, c0, take.qscale32, hist, _N_BINS, _BIN_LO, _BIN_W, store,
                       prefetch=None if ahead is None else anchors[ahead:ahead + anchor_chunk])
        else:
            take(s, thr, qscale, c0)
        del s
        seen += min(anchor_chunk, n - c0)
        if seen >= _REFRESH * refreshed_at or step == len(order) - 1:
            refreshed_at = seen
            tau = _tau_from_hist(hist, k, err, codec.out_rel, tau)
            thr = codec.threshold(tau, qscale)
    store.prune(codec.level(tau))
    return store.arrays()


def _top_per_row(rows: Tensor, cols: Tensor, vals: Tensor, nb: int, k: int) -> tuple[Tensor, Tensor]:
    """The k best ``(value, col)`` of each row from flat candidate triples -> ``(nb, k)`` each.

    One stable sort of an int64 key (row in the high 32 bits, the value's order-preserving bit
    pattern, flipped for decreasing order, in the low ones) instead of a padded (nb, max
    candidates) matrix: one row with a very flat score profile must not cost memory for every
    row. Ties keep the input order (callers pass candidates sorted by anchor id). With the native
    helpers: per-row buckets, each sorted by (value desc, id asc), in C; same result.
    """
    lib = library_for(vals.device)
    if lib is not None:  # per-row buckets and a sort of each (value desc, col asc) in C
        rows, cols = rows.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous()
        vals = vals.float().contiguous()
        out_v = torch.empty(nb, k, dtype=torch.float32)
        out_i = torch.empty(nb, k, dtype=torch.int64)
        status = lib.nofree_top_per_row(rows.data_ptr(), cols.data_ptr(), vals.data_ptr(), rows.numel(),
                                        nb, k, out_v.data_ptr(), out_i.data_ptr(), torch.get_num_threads())
        if status == -2:
            raise MemoryError(f"no memory to rank {rows.numel()} candidates")
        if status != -1:
            raise RuntimeError("internal error: fewer than k candidates kept for a row")
        return out_v, out_i
    rows, cols = rows.long(), cols.long()
    bits = (vals.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # increasing with the value
    key = (rows << 32) | ((0x7FFFFFFF - ordered) & 0xFFFFFFFF)
    key, o = key.sort(stable=True)
    rows, cols, vals = rows[o], cols[o], vals[o]
    counts = torch.bincount(rows, minlength=nb)
    if bool((counts < k).any()):
        raise RuntimeError("internal error: fewer than k candidates kept for a row")
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    keep = pos < k
    return _canonical(vals[keep].view(nb, k), cols[keep].view(nb, k))
