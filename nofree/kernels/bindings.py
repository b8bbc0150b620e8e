"""Typed entry points to nofree's C kernels: the one module that hands tensors to C code.

Each function takes tensors, checks what the C code assumes of them — on the CPU, the dtype, the
shape, contiguous (or the row stride it reads), and room in the buffers it writes — and raises a
``ValueError`` naming the argument when something does not hold, instead of letting the C code
read or write out of bounds. Index *values* (candidate rows, attention key numbers) are not
scanned: the callers build them, and checking them would cost a pass over the data per call.

The kernels are optional (:mod:`nofree.kernels.build` compiles them on first use): callers ask
:func:`available` first and otherwise run the torch twin beside them; a binding called without
the library raises ``RuntimeError``. The C prototypes are declared here, next to their only
callers; they must match ``select.c``, ``int8_gemm.c`` and ``attention.c``.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from nofree.kernels import build

#: Slots past their count that the selection kernels' full-vector stores may write
#: (``GROUP`` in ``candidates.h``): output buffers need this much room beyond the entries.
GROUP = 16

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_PI64 = ctypes.POINTER(ctypes.c_int64)
_TAKE = (_I64, [_P, _I64, _I64, _I64, _P, _I32, _P, _P, _I64, _F32, _F32, _P, _P, _P, _I64])
#: name: (return type, argument types) of every function the library exports
_SIGNATURES = {
    "nofree_take_i32": _TAKE,
    "nofree_take_i16": _TAKE,
    "nofree_kth_bins": (None, [_P, _I64, _I64, _I64, _I64, _P]),
    "nofree_quantize_i8": (None, [_P, _I64, _F32, _P]),
    "nofree_prune": (_I64, [_P, _P, _P, _I64, _P, _I64]),
    "nofree_top_per_row": (_I64, [_P, _P, _P, _I64, _I64, _I64, _P, _P, _I64]),
    "nofree_i8_tile": (None, [_PI64, _PI64]),
    "nofree_i8_pack_anchors": (None, [_P, _I64, _I64, _F32, _P, _I64]),
    "nofree_i8_scores": (None, [_P, _P, _I64, _I64, _P, _I64, _P, _I64, _I64]),
    "nofree_i8_take": (_I64, [_P, _P, _I64, _I64, _P, _I64, _P, _I32, _P, _P, _I64, _F32, _F32, _P, _P, _P,
                              _I64, _P, _I64, _I64]),
    "nofree_list_attention": (_I64, [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _F32, _P, _I64]),
}
_INT32_MAX = 2 ** 31 - 1


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the kernels can take tensors on ``device``: on the CPU, with the library built."""
    return torch.device(device).type == "cpu" and build.library() is not None


@functools.lru_cache(maxsize=None)
def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _lib() -> ctypes.CDLL:
    lib = build.library()
    if lib is None:
        raise RuntimeError("nofree's native kernels are unavailable here; ask "
                           "nofree.kernels.bindings.available() before calling them")
    return _declared(lib)


def _threads(threads: int | None) -> int:
    return max(1, torch.get_num_threads() if threads is None else int(threads))


def _check(fn: str, name: str, t: Any, dtypes: tuple[torch.dtype, ...], shape: tuple[int | None, ...],
           *, contiguous: bool = True) -> None:
    """Raise a ValueError (TypeError for a non-tensor) unless ``t`` is a CPU tensor of one of
    ``dtypes`` with ``shape`` (None: any size along that axis), contiguous when asked."""
    # plain comparisons, messages built only on failure: these run on every kernel call
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise ValueError(f"{fn}: {name} must be on the CPU, got a tensor on {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{fn}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    got = t.shape
    fits = len(got) == len(shape)
    for want, size in zip(shape, got):
        fits = fits and (want is None or want == size)
    if not fits:
        wanted = ", ".join("*" if want is None else str(want) for want in shape)
        raise ValueError(f"{fn}: {name} must have shape ({wanted}), got {tuple(got)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous (call .contiguous() first)")


class Histogram(NamedTuple):
    """Per-row counts of candidate values by bin: ``counts (R, n_bins)`` int32, bin b counting
    the values in ``[lo + b·width, lo + (b + 1)·width)``, the end bins also those beyond."""

    counts: Tensor
    lo: float
    width: float


class Triples(NamedTuple):
    """Flat candidate buffers, ``(capacity,)`` each: query row (int32), anchor id (int32) and
    approximate value (float32); the kernels append after the first ``count`` entries."""

    rows: Tensor
    cols: Tensor
    vals: Tensor


def _check_triples(fn: str, out: Triples, count: int, extra: int) -> None:
    """Check the buffers and that they hold ``count`` entries plus room for ``extra`` more."""
    _check(fn, "out.rows", out.rows, (torch.int32,), (None,))
    capacity = out.rows.shape[0]
    _check(fn, "out.cols", out.cols, (torch.int32,), (capacity,))
    _check(fn, "out.vals", out.vals, (torch.float32,), (capacity,))
    if not 0 <= count <= capacity or count + extra > capacity:
        raise ValueError(f"{fn}: the candidate buffers hold {capacity} entries, too few for {count} "
                         f"held plus {extra} this call may append; reserve room first")


def _check_histogram(fn: str, hist: Histogram, n_rows: int) -> None:
    _check(fn, "hist.counts", hist.counts, (torch.int32,), (n_rows, None))
    if hist.counts.shape[1] < 1 or not hist.width > 0:
        raise ValueError(f"{fn}: the histogram needs at least one bin of positive width, got "
                         f"{hist.counts.shape[1]} of width {hist.width}")


# --- the anchor scan's selection (select.c) -----------------------------------------------------
def take_tile(scores: Tensor, thresholds: Tensor, qscale: Tensor, col0: int, hist: Histogram, out: Triples,
              count: int) -> int:
    """Append every entry ``scores[r, c] >= thresholds[r]`` of an ``(R, C)`` score tile to ``out``
    after its first ``count`` entries, as ``(r, col0 + c, value)`` row by row, and count each
    value in ``hist``; returns the new count. value: ``scores · qscale[r]`` for int32 tiles (an
    int8 scan), the bfloat16 whose bit pattern the entry is for int16 tiles (qscale unused).

    scores: int32 or int16, rows of unit stride (any row stride); thresholds ``(R,)`` of the
    same dtype; qscale ``(R,)`` float32; ``out`` needs room for ``R·C + GROUP`` more entries.
    """
    fn = "take_tile"
    _check(fn, "scores", scores, (torch.int32, torch.int16), (None, None), contiguous=False)
    n_rows, n_cols = scores.shape
    if (n_cols > 1 and scores.stride(1) != 1) or (n_rows > 1 and scores.stride(0) < n_cols):
        raise ValueError(f"{fn}: scores must have rows of unit stride, got strides {scores.stride()}")
    _check(fn, "thresholds", thresholds, (scores.dtype,), (n_rows,))
    _check(fn, "qscale", qscale, (torch.float32,), (n_rows,))
    _check_histogram(fn, hist, n_rows)
    _check_triples(fn, out, count, n_rows * n_cols + GROUP)
    if not 0 <= col0 <= _INT32_MAX - n_cols:
        raise ValueError(f"{fn}: anchor ids col0 + c must fit in int32, got col0 = {col0}")
    lib = _lib()
    kernel = lib.nofree_take_i32 if scores.dtype == torch.int32 else lib.nofree_take_i16
    return kernel(scores.data_ptr(), n_rows, n_cols, scores.stride(0), thresholds.data_ptr(), col0,
                  qscale.data_ptr(), hist.counts.data_ptr(), hist.counts.shape[1], hist.lo, 1.0 / hist.width,
                  out.rows.data_ptr(), out.cols.data_ptr(), out.vals.data_ptr(), count)


def kth_bins(counts: Tensor, k: int, lo: int) -> Tensor:
    """Per row of ``counts (R, n_bins)`` int32, the highest bin ``b >= lo`` where the count from
    the top reaches ``k``, or -1 when bins ``lo..`` hold fewer than k -> ``(R,)`` int64."""
    _check("kth_bins", "counts", counts, (torch.int32,), (None, None))
    if not 0 <= lo < max(1, counts.shape[1]):
        raise ValueError(f"kth_bins: lo must be a bin index in [0, {counts.shape[1]}), got {lo}")
    out = torch.empty(counts.shape[0], dtype=torch.int64)
    _lib().nofree_kth_bins(counts.data_ptr(), counts.shape[0], counts.shape[1], k, lo, out.data_ptr())
    return out


def quantize_int8(values: Tensor, scale: float) -> Tensor:
    """``clamp(round_half_even(values / scale), -127, 127)`` as int8, in one pass (the division a
    multiplication by ``1 / scale``); values: contiguous float32 of any shape."""
    _check("quantize_int8", "values", values, (torch.float32,), (None,) * values.dim())
    out = torch.empty(values.shape, dtype=torch.int8)
    _lib().nofree_quantize_i8(values.data_ptr(), values.numel(), 1.0 / scale, out.data_ptr())
    return out


def prune(out: Triples, count: int, level: Tensor, *, threads: int | None = None) -> int:
    """Keep the first ``count`` entries of ``out`` whose value is ``>= level[row]`` (float32
    ``level (R,)``), moved to the front in order; returns how many were kept."""
    _check("prune", "level", level, (torch.float32,), (None,))
    _check_triples("prune", out, count, 0)
    return _lib().nofree_prune(out.rows.data_ptr(), out.cols.data_ptr(), out.vals.data_ptr(), count,
                               level.data_ptr(), _threads(threads))


def top_per_row(rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int, k: int, *,
                threads: int | None = None) -> tuple[Tensor, Tensor]:
    """The k best ``(value, col)`` of each of ``n_rows`` rows from flat entries (``rows`` in
    ``[0, n_rows)``): values ``(n_rows, k)`` float32 by decreasing value, ties by increasing col,
    and their cols ``(n_rows, k)`` int64. rows, cols int32 and vals float32 (no NaN), ``(n,)``.
    A row with fewer than k entries is a ValueError; no memory to sort, a MemoryError."""
    fn = "top_per_row"
    _check(fn, "rows", rows, (torch.int32,), (None,))
    _check(fn, "cols", cols, (torch.int32,), rows.shape)
    _check(fn, "vals", vals, (torch.float32,), rows.shape)
    if k < 1 or n_rows < 0:
        raise ValueError(f"{fn}: k must be positive and n_rows not negative, got k = {k}, n_rows = {n_rows}")
    out_v = torch.empty(n_rows, k, dtype=torch.float32)
    out_i = torch.empty(n_rows, k, dtype=torch.int64)
    status = _lib().nofree_top_per_row(rows.data_ptr(), cols.data_ptr(), vals.data_ptr(), rows.numel(), n_rows,
                                       k, out_v.data_ptr(), out_i.data_ptr(), _threads(threads))
    if status == -2:
        raise MemoryError(f"no memory to rank {rows.numel()} candidates")
    if status != -1:
        raise ValueError(f"{fn}: row {status} has fewer than k = {k} entries")
    return out_v, out_i


# --- the int8 scan's matmul, selection fused in (int8_gemm.c, AVX-512 VNNI) ---------------------
def int8_tile() -> tuple[int, int] | None:
    """The int8 kernel's register tile, ``(query rows, anchors)``, or None when the library is
    unavailable or was built without AVX-512 VNNI (the scan then uses ``torch._int_mm``)."""
    if not available():
        return None
    rows, cols = ctypes.c_int64(0), ctypes.c_int64(0)
    _lib().nofree_i8_tile(ctypes.byref(rows), ctypes.byref(cols))
    return (rows.value, cols.value) if rows.value > 0 else None


@dataclass(frozen=True)
class Int8Queries:
    """int8 query rows in the kernel's packed layout: ``data`` int8 ``(groups, d4, MR, 4)`` (4
    consecutive dimensions per 32-bit word, MR rows per group, zero-padded), ``corr`` int32
    ``(R,)`` = 128 · row sum (the kernel multiplies them by anchors stored as u8 = int8 + 128)."""

    data: Tensor
    corr: Tensor
    n_rows: int
    dim: int
    tile: tuple[int, int]

    @property
    def d4(self) -> int:
        return self.data.shape[1]

    @property
    def padded_rows(self) -> int:
        return self.data.shape[0] * self.tile[0]


def _tile(fn: str) -> tuple[int, int]:
    tile = int8_tile()
    if tile is None:
        raise RuntimeError(f"{fn}: nofree's int8 kernel is unavailable here (no AVX-512 VNNI build); "
                           "ask nofree.kernels.bindings.int8_tile() first")
    return tile


def int8_pack_queries(q8: Tensor) -> Int8Queries:
    """``q8 (R, D)`` int8 query rows packed for :func:`int8_scores` / :func:`int8_take`."""
    tile = _tile("int8_pack_queries")
    _check("int8_pack_queries", "q8", q8, (torch.int8,), (None, None), contiguous=False)
    mr = tile[0]
    n_rows, dim = q8.shape
    d4, groups = (dim + 3) // 4, (n_rows + mr - 1) // mr
    padded = torch.zeros(groups * mr, d4 * 4, dtype=torch.int8)
    padded[:n_rows, :dim] = q8
    data = padded.view(groups, mr, d4, 4).permute(0, 2, 1, 3).contiguous()
    corr = (128 * q8.sum(dim=1, dtype=torch.int32)).contiguous()
    return Int8Queries(data, corr, n_rows, dim, tile)


def int8_anchor_bytes(n_anchors: int, dim: int) -> int:
    """Bytes of ``n_anchors`` anchors of width ``dim`` in the packed layout (whole tiles)."""
    return _anchor_bytes(n_anchors, dim, _tile("int8_anchor_bytes")[1])


def _anchor_bytes(n_anchors: int, dim: int, tile_anchors: int) -> int:
    w = tile_anchors
    return (n_anchors + w - 1) // w * w * ((dim + 3) // 4) * 4


def int8_pack_anchors(anchors: Tensor, scale: float, out: Tensor, *, threads: int | None = None) -> None:
    """Quantise ``anchors (C, D)`` float32 (step ``scale``, as :func:`quantize_int8`) into ``out``
    (uint8, at least :func:`int8_anchor_bytes` long) in the packed anchor layout."""
    fn = "int8_pack_anchors"
    _check(fn, "anchors", anchors, (torch.float32,), (None, None))
    _check(fn, "out", out, (torch.uint8,), (None,))
    n, dim = anchors.shape
    needed = int8_anchor_bytes(n, dim)
    if out.numel() < needed:
        raise ValueError(f"{fn}: out holds {out.numel()} bytes, {needed} needed")
    _lib().nofree_i8_pack_anchors(anchors.data_ptr(), n, dim, 1.0 / scale, out.data_ptr(), _threads(threads))


def _check_packed_anchors(fn: str, queries: Int8Queries, anchors: Tensor, n_anchors: int) -> None:
    if not isinstance(queries, Int8Queries):
        raise TypeError(f"{fn}: queries must come from int8_pack_queries, got {type(queries).__name__}")
    _check(fn, "anchors", anchors, (torch.uint8,), (None,))
    if anchors.numel() < _anchor_bytes(n_anchors, queries.dim, queries.tile[1]):
        raise ValueError(f"{fn}: the packed anchors hold {anchors.numel()} bytes, fewer than {n_anchors} "
                         f"anchors of width {queries.dim} take")


def int8_scores(queries: Int8Queries, anchors: Tensor, n_anchors: int, *, threads: int | None = None) -> Tensor:
    """The int32 products ``(R, C)`` of packed queries with ``n_anchors`` packed anchors: what
    ``torch._int_mm(q8, a8.T)`` gives."""
    _check_packed_anchors("int8_scores", queries, anchors, n_anchors)
    out = torch.empty(queries.n_rows, n_anchors, dtype=torch.int32)
    _lib().nofree_i8_scores(queries.data.data_ptr(), queries.corr.data_ptr(), queries.n_rows, queries.d4,
                            anchors.data_ptr(), n_anchors, out.data_ptr(), n_anchors, _threads(threads))
    return out


def int8_room(queries: Int8Queries, n_anchors: int, threads: int | None = None) -> int:
    """Candidate slots :func:`int8_take` may use for ``n_anchors`` anchors on ``threads`` threads."""
    return queries.padded_rows * n_anchors + _threads(threads) * GROUP


def int8_take(queries: Int8Queries, anchors: Tensor, n_anchors: int, thresholds: Tensor, qscale: Tensor,
              col0: int, hist: Histogram, out: Triples, count: int, *, prefetch: Tensor | None = None,
              threads: int | None = None) -> int:
    """:func:`take_tile` of the tile :func:`int8_scores` would return, without making it: the
    same entries (in another order: register tile by tile) and the same histogram counts.

    thresholds ``(R,)`` int32, qscale ``(R,)`` float32; ``out`` needs :func:`int8_room` more
    slots. ``prefetch``: memory the next call will read (the next anchor chunk), brought into the
    cache meanwhile when it is a contiguous CPU tensor."""
    fn = "int8_take"
    _check_packed_anchors(fn, queries, anchors, n_anchors)
    n_rows = queries.n_rows
    _check(fn, "thresholds", thresholds, (torch.int32,), (n_rows,))
    _check(fn, "qscale", qscale, (torch.float32,), (n_rows,))
    _check_histogram(fn, hist, n_rows)
    n_threads = _threads(threads)
    _check_triples(fn, out, count, int8_room(queries, n_anchors, n_threads))
    if not 0 <= col0 <= _INT32_MAX - n_anchors:
        raise ValueError(f"{fn}: anchor ids col0 + c must fit in int32, got col0 = {col0}")
    next_ptr, next_bytes = None, 0
    if isinstance(prefetch, Tensor) and prefetch.is_contiguous() and prefetch.device.type == "cpu":
        next_ptr, next_bytes = prefetch.data_ptr(), prefetch.numel() * prefetch.element_size()
    return _lib().nofree_i8_take(
        queries.data.data_ptr(), queries.corr.data_ptr(), n_rows, queries.d4, anchors.data_ptr(), n_anchors,
        thresholds.data_ptr(), col0, qscale.data_ptr(), hist.counts.data_ptr(), hist.counts.shape[1], hist.lo,
        1.0 / hist.width, out.rows.data_ptr(), out.cols.data_ptr(), out.vals.data_ptr(), count, next_ptr,
        next_bytes, n_threads)


# --- attention over listed keys (attention.c) ---------------------------------------------------
def list_attention(qkv: Tensor, past: tuple[Tensor, Tensor] | None, offsets: Tensor, cols: Tensor,
                   rows: Tensor | None, n_seq: int, *, threads: int | None = None) -> Tensor:
    """Softmax attention ``(M, H, D)`` float32 (scale 1/√D) of the queries of tokens ``rows``
    (``(M,)`` int64; None: all N) over their listed keys.

    qkv: ``(N, 3, H, D)`` float32, each token's query | key | value; past: held keys and values,
    each ``(n_seq, H, P, D)`` float32, or None (P = 0); token n sees the keys
    ``cols[offsets[n]:offsets[n + 1]]`` (``offsets (N + 1,)`` int64, ``cols`` int32), key c < n_seq·P
    being held position c % P of sequence c // P and key n_seq·P + m token m of qkv. All contiguous.
    A MemoryError when a thread's scratch cannot be allocated.
    """
    fn = "list_attention"
    _check(fn, "qkv", qkv, (torch.float32,), (None, 3, None, None))
    n, _, heads, dim = qkv.shape
    held = 0
    if past is not None:
        _check(fn, "past keys", past[0], (torch.float32,), (n_seq, heads, None, dim))
        held = past[0].shape[2]
        _check(fn, "past values", past[1], (torch.float32,), (n_seq, heads, held, dim))
    _check(fn, "offsets", offsets, (torch.int64,), (n + 1,))
    _check(fn, "cols", cols, (torch.int32,), (None,))
    if rows is not None:
        _check(fn, "rows", rows, (torch.int64,), (None,))
    keys, values = past if past is not None else (qkv, qkv)
    out = qkv.new_empty(len(rows) if rows is not None else n, heads, dim)
    status = _lib().nofree_list_attention(
        qkv.data_ptr(), keys.data_ptr(), values.data_ptr(), n_seq, held, heads, dim, offsets.data_ptr(),
        cols.data_ptr(), rows.data_ptr() if rows is not None else None, len(out), dim ** -0.5, out.data_ptr(),
        _threads(threads))
    if status != 0:
        raise MemoryError("no memory for the attention kernel's per-thread scratch")
    return out
