"""The int8 anchor scan's products in C, with the candidate selection fused in (AVX-512 VNNI).

The kernel (``nofree/kernels/int8_gemm.c``, called through :mod:`nofree.kernels.bindings`) keeps
an 8 × 48 tile of int32 dot products in registers through the whole embedding width, and computes
the int8 scan's query × anchor products faster than ``torch._int_mm`` (oneDNN;
``benchmarks/RESULTS.md``, "ASIF at scale"). Its second entry point compares each finished tile
with the rows' discard thresholds and appends only the passing entries, so the (queries × chunk)
score tile is never written and read back; meanwhile it fetches the next anchor chunk into the
cache, so that quantising and packing it reads the cache, not memory. Both give exactly the int32
products of ``torch._int_mm`` (integer arithmetic), so the scan's candidates, and hence its
results, are the same either way.

Used by :func:`nofree.anchors.search.exact._scan_block` when the kernels are built for a CPU with
AVX-512 VNNI; elsewhere the scan keeps ``torch._int_mm`` and the tile-wise selection.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nofree.kernels import bindings


class Int8Products:
    """Products of one query block's int8 rows ``q8 (R, D)`` with anchor chunks, in C.

    The queries are packed once; each anchor chunk is quantised and packed into a reused buffer
    (:meth:`pack`), then multiplied into a score tile (:meth:`scores`) or straight into the
    candidate store (:meth:`take`). Threads: ``torch.get_num_threads()``.
    """

    def __init__(self, q8: Tensor) -> None:
        self.queries = bindings.int8_pack_queries(q8)
        self.n_rows, self.dim = q8.shape
        self.threads = max(1, torch.get_num_threads())
        self._anchors = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def available() -> bool:
        """Whether the kernels were built here with the VNNI int8 kernel."""
        return bindings.int8_tile() is not None

    @staticmethod
    def create(q8: Tensor) -> "Int8Products | None":
        """For ``q8`` on the CPU when the VNNI int8 kernel is built; else None."""
        if q8.device.type != "cpu" or not Int8Products.available():
            return None
        return Int8Products(q8)

    def pack(self, anchors: Tensor, scale: float) -> tuple[Tensor, int]:
        """Quantise ``anchors (C, D)`` (step ``scale``, as the int8 codec does) and pack them:
        ``(buffer, C)``; the buffer is reused by the next call."""
        a = anchors.float().contiguous()
        size = bindings.int8_anchor_bytes(a.shape[0], self.dim)
        if self._anchors.numel() < size:
            self._anchors = torch.empty(size, dtype=torch.uint8)
        bindings.int8_pack_anchors(a, scale, self._anchors, threads=self.threads)
        return self._anchors, a.shape[0]

    def scores(self, packed: tuple[Tensor, int]) -> Tensor:
        """The int32 products ``(R, C)``: what ``torch._int_mm(q8, a8.T)`` gives."""
        buf, n = packed
        return bindings.int8_scores(self.queries, buf, n, threads=self.threads)

    def room(self, n_cols: int) -> int:
        """Store slots :meth:`take` may need for a chunk of ``n_cols`` anchors."""
        return bindings.int8_room(self.queries, n_cols, self.threads)

    def take(self, packed: tuple[Tensor, int], thr: Tensor, col0: int, qscale: Tensor, hist: bindings.Histogram,
             store: Any, prefetch: Tensor | None = None) -> None:
        """Append every product ``>= thr[r]`` (int32 ``(R,)``) to ``store`` (the scan's candidate
        store) as ``(r, col0 + c, product · qscale[r])`` (float32 ``qscale``), counting it in
        ``hist``. ``prefetch``: a contiguous tensor the next call will read (the next anchor
        chunk), brought into the cache while this one computes."""
        buf, n = packed
        store.reserve(self.room(n))
        store.size = bindings.int8_take(self.queries, buf, n, thr.to(torch.int32).contiguous(), qscale, col0, hist,
                                        store.triples(), store.size, prefetch=prefetch, threads=self.threads)
