"""The int8 anchor scan's products in C, with the candidate selection fused in (AVX-512 VNNI).

The native kernel in ``nofree/native/scan.c`` keeps an 8 × 48 tile of int32 dot products in
registers through the whole embedding width, and computes the int8 scan's query × anchor
products faster than ``torch._int_mm`` (oneDNN; ``benchmarks/RESULTS.md``, "ASIF at scale").
Its second entry point compares each finished tile with the rows' discard thresholds and
appends only the passing entries, so the (queries × chunk) score tile is never written and read
back; meanwhile it fetches the next anchor chunk into the cache, so that quantising and packing
it reads the cache, not memory. Both give exactly the int32 products of ``torch._int_mm``
(integer arithmetic), so the scan's candidates, and hence its results, are the same either way.

Used by :func:`nofree.anchors.topk._scan_block` when the native helpers are built for a CPU with
AVX-512 VNNI; elsewhere the scan keeps ``torch._int_mm`` and the tile-wise selection.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_GROUP = 16  # the C kernels' full-vector stores run up to this many slots past their count


class Int8Products:
    """Products of one query block's int8 rows ``q8 (R, D)`` with anchor chunks, in C.

    The queries are packed once; each anchor chunk is quantised and packed into a reused buffer
    (:meth:`pack`), then multiplied into a score tile (:meth:`scores`) or straight into the
    candidate store (:meth:`take`). Threads: ``torch.get_num_threads()``.
    """

    def __init__(self, lib: Any, q8: Tensor) -> None:
        self.lib = lib
        self.rows_per_tile, self.cols_per_tile = divmod(int(lib.nofree_i8_layout()), 1000)
        self.n_rows, self.dim = q8.shape
        self.d4 = (self.dim + 3) // 4
        mr = self.rows_per_tile
        groups = (self.n_rows + mr - 1) // mr
        padded = torch.zeros(groups * mr, self.d4 * 4, dtype=torch.int8)
        padded[:self.n_rows, :self.dim] = q8
        self.packed_rows = groups * mr
        self.queries = padded.view(groups, mr, self.d4, 4).permute(0, 2, 1, 3).contiguous()
        self.corr = (128 * q8.sum(dim=1, dtype=torch.int32)).contiguous()
        self.threads = max(1, torch.get_num_threads())
        self._anchors = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def available(lib: Any) -> bool:
        """Whether the native helpers ``lib`` (or None) were built with the VNNI kernels."""
        return lib is not None and int(lib.nofree_i8_layout()) != 0

    @staticmethod
    def create(lib: Any, q8: Tensor) -> "Int8Products | None":
        """For ``q8`` on the CPU when ``lib`` has the VNNI kernels; else None."""
        if q8.device.type != "cpu" or not Int8Products.available(lib):
            return None
        return Int8Products(lib, q8)

    def pack(self, anchors: Tensor, scale: float) -> tuple[Tensor, int]:
        """Quantise ``anchors (C, D)`` (step ``scale``, as the int8 codec does) and pack them:
        ``(buffer, C)``; the buffer is reused by the next call."""
        a = anchors.float().contiguous()
        n = a.shape[0]
        w = self.cols_per_tile
        size = (n + w - 1) // w * w * self.d4 * 4
        if self._anchors.numel() < size:
            self._anchors = torch.empty(size, dtype=torch.uint8)
        self.lib.nofree_i8_pack_anchors(a.data_ptr(), n, self.dim, 1.0 / scale, self._anchors.data_ptr(),
                                        self.threads)
        return self._anchors, n

    def scores(self, packed: tuple[Tensor, int]) -> Tensor:
        """The int32 products ``(R, C)``: what ``torch._int_mm(q8, a8.T)`` gives."""
        buf, n = packed
        out = torch.empty(self.n_rows, n, dtype=torch.int32)
        self.lib.nofree_i8_scores(self.queries.data_ptr(), self.corr.data_ptr(), self.n_rows, self.d4,
                                  buf.data_ptr(), n, out.data_ptr(), n, self.threads)
        return out

    def room(self, n_cols: int) -> int:
        """Store slots :meth:`take` may need for a chunk of ``n_cols`` anchors."""
        return self.packed_rows * n_cols + self.threads * _GROUP

    def take(self, packed: tuple[Tensor, int], thr: Tensor, col0: int, qscale: Tensor, hist: Tensor,
             n_bins: int, bin_lo: float, bin_w: float, store: Any, prefetch: Tensor | None = None) -> None:
        """Append every product ``>= thr[r]`` (int32 ``(R,)``) to ``store`` as ``(r, col0 + c,
        product · qscale[r])`` (float32 ``qscale``), counting it in ``hist (R, n_bins)``.
        ``prefetch``: a contiguous tensor the next call will read (the next anchor chunk), brought
        into the cache while this one computes."""
        buf, n = packed
        store.reserve(self.room(n))
        thr = thr.to(torch.int32).contiguous()
        next_ptr, next_bytes = None, 0
        if prefetch is not None and prefetch.is_contiguous() and prefetch.device.type == "cpu":
            next_ptr, next_bytes = prefetch.data_ptr(), prefetch.numel() * prefetch.element_size()
        store.size = self.lib.nofree_i8_take(
            self.queries.data_ptr(), self.corr.data_ptr(), self.n_rows, self.d4, buf.data_ptr(), n,
            thr.data_ptr(), col0, qscale.data_ptr(), hist.data_ptr(), n_bins, bin_lo, 1.0 / bin_w,
            store.rows.data_ptr(), store.cols.data_ptr(), store.vals.data_ptr(), store.size, next_ptr,
            next_bytes, self.threads)
