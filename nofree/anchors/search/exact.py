"""Exact top-k cosines of queries among anchors, at any number of anchors.

The search behind ASIF's relative representations (:mod:`nofree.anchors.relative`; Norelli,
Fumero, Maiorca, Moschella, Rodolà, Locatello (2022), "ASIF: Coupled Data Turns Unimodal Models
to Multimodal Without Training" (NeurIPS 2023), §3): for each query, the k largest cosines to the
anchors and their anchor ids. Choices made here:

* **Exact top-k at any N.** Anchors are scanned in chunks with a running per-row threshold, so no
  (Q, N) matrix is ever held. On CPU the scan can use a low-precision matmul (``"int8"`` or
  ``"bf16"``) to find *candidates*, with a rigorous per-row bound e on the error of the
  approximate score (each precision's codec and bound: :mod:`nofree.anchors.search.precision`).
  With m the k-th largest approximate score seen so far, an anchor whose approximate score y
  satisfies ``y < m - 2e - (rounding of m)`` has exact cosine below the exact k-th largest, so it
  is dropped; the survivors are re-scored in float32 (faiss's indexed inner products, visited in
  anchor order) and the top k taken. The result is the exact float32 top-k
  (ties at the float32 rounding level excepted), never an approximation: the margin adapts to how
  crowded each row is near its k-th value. Off CPU the scan is float32 throughout (leave TF32
  matmuls off for float32-exact cosines on NVIDIA GPUs).
* Output rows list their anchors by decreasing cosine (ties: increasing anchor id).
* The bookkeeping between matmuls — taking each score tile's candidates, pruning them, the
  final per-row ranking, re-quantising anchor chunks — runs in small C helpers
  (:mod:`nofree.kernels.bindings`, built on first use) when a C compiler is available, and in
  torch otherwise, with bit-identical results either way; on CPUs with AVX-512 VNNI the int8
  matmul too, with the selection fused in (:mod:`nofree.anchors.search.int8_gemm`).

Shapes: Q queries, N anchors, D embedding width, k kept entries per row.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from nofree.anchors.search.int8_gemm import Int8Products
from nofree.anchors.search.precision import (ANCHOR_CHUNK_BY_PRECISION, CODECS, AnchorStats, Int8Codec,
                                             anchor_stats, resolve_precision)
from nofree.core import DataError
from nofree.kernels import bindings

DEFAULT_QUERY_CHUNK = 2048

# Histogram of approximate scores per query row, used to track the k-th largest score cheaply.
_BIN_W = 2.0 ** -10
_BIN_LO = -1.5
_N_BINS = 3072  # covers [-1.5, 1.5); values outside are clamped into the end bins
_GROUP = 16  # column group for the max-prefilter in _select
_REFRESH = 1.25  # the discard level is recomputed whenever the anchors seen grow by this factor


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
        if bindings.available(self.rows.device):
            self.size = bindings.prune(self.triples(), self.size, level.float().contiguous())
            return
        keep = (self.vals[:self.size] >= level[self.rows[:self.size].long()]).nonzero().squeeze(1)
        n = keep.numel()
        for name in ("rows", "cols", "vals"):
            t = getattr(self, name)
            t[:n] = t[:self.size][keep]
        self.size = n

    def arrays(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.rows[:self.size], self.cols[:self.size], self.vals[:self.size]

    def triples(self) -> bindings.Triples:
        """The whole buffers, for the C kernels to append to (after :meth:`reserve`)."""
        return bindings.Triples(self.rows, self.cols, self.vals)


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
        self.bins = bindings.Histogram(hist, _BIN_LO, _BIN_W)  # as the C kernels count them
        self.native = bindings.available(hist.device)
        self.rate = 1.0  # fraction of the last tile's entries taken (picks the torch strategy)

    def __call__(self, s: Tensor, thr: Tensor, qscale: Tensor, col0: int) -> None:
        before = self.store.size
        s, thr = self.codec.comparable(s, thr)
        if self.native and s.dtype in (torch.int32, torch.int16) and s.stride(1) == 1:
            store = self.store
            store.reserve(s.numel() + bindings.GROUP)  # room for the whole tile: the kernel never runs out
            store.size = bindings.take_tile(s, thr.to(s.dtype).contiguous(), self.qscale32, col0, self.bins,
                                            store.triples(), store.size)
        else:
            r, c, sv = _select(s, thr, grouped=self.rate < 0.004)
            v = self.codec.values(sv, qscale[r])
            flat = r * _N_BINS + _bins(v)
            self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            self.store.append(r, c + col0, v)
        self.rate = (self.store.size - before) / max(1, s.numel())


def _kth_bins(hist: Tensor, k: int, lo: int) -> Tensor:
    """Per row of ``hist (R, bins)``, the highest bin ``b >= lo`` where the count from the top
    reaches k, or -1 when bins ``lo..`` hold fewer than k entries -> ``(R,)`` int64."""
    if hist.is_contiguous() and bindings.available(hist.device):
        return bindings.kth_bins(hist, k, lo)
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
    codec = CODECS[precision]
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
        if not bindings.available(device):  # anchor order: cache-friendly re-scoring; _top_per_row's ties by id
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
    fused = Int8Products.create(q_low) if codec is Int8Codec else None
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
        room = nb * chunk.shape[0] + bindings.GROUP if s is not None else fused.room(chunk.shape[0])
        if store.size + room > store.capacity and store.size > pruned_at:
            store.prune(codec.level(tau))  # drop what the current level rules out before growing
            pruned_at = store.size
            store.reserve(store.size)      # still over half full: double, or it prunes again soon
        if s is None:  # (the next chunk's anchors are fetched into the cache meanwhile)
            ahead = order[step + 1] * anchor_chunk if step + 1 < len(order) else None
            fused.take(packed, thr, c0, take.qscale32, take.bins, store,
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
    if bindings.available(vals.device):  # per-row buckets and a sort of each (value desc, col asc) in C
        try:
            return bindings.top_per_row(rows.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous(),
                                        vals.float().contiguous(), nb, k)
        except ValueError:
            raise RuntimeError("internal error: fewer than k candidates kept for a row") from None
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
