"""The anchor scan's precisions: which one ``"auto"`` picks, what the error bound needs to know
about the anchors, and one codec per precision (how queries and anchors are made low-precision,
multiplied, and how far the result may be from the float32 cosine).

The scan (:mod:`nofree.anchors.search.exact`) finds candidates with a low-precision matmul on
CPU and re-scores them in float32; the codecs here carry the rigorous per-row bound that makes
its result exact. The precision named here is the *anchor scan's* (``ASIF(precision=...)``),
not the dtype a language model runs in (:data:`nofree.registry.LM_PRECISIONS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nofree.anchors.search.int8_gemm import Int8Products
from nofree.core import DataError, resolve_device
from nofree.kernels import bindings

#: The anchor scan's precisions (``ASIF(precision=...)``, ``cosine_topk(precision=...)``): the
#: number format its candidate matmul runs in. Not a language model's dtype
#: (:data:`nofree.registry.LM_PRECISIONS`) nor an adapter's training precision.
SCAN_PRECISIONS = ("auto", "fp32", "bf16", "int8")
DEFAULT_ANCHOR_CHUNK = 8192
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

#: anchor rows per pass of anchor_stats: several passes per chunk, so that one pass's rows
#: (3 MB of float32 at 768-d) stay in the cache between its steps
_STATS_ROWS = 1024


def resolve_precision(precision: str, n_anchors: int, device: Any = None) -> str:
    """The scan precision ``"auto"`` stands for at this size and device."""
    if precision not in SCAN_PRECISIONS:
        raise DataError(f"precision must be one of {SCAN_PRECISIONS}, got {precision!r}")
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
    fused = n_anchors >= AUTO_INT8_FUSED_MIN_ANCHORS and Int8Products.available()
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
    if precision not in CODECS:
        raise DataError(f"precision must be one of {tuple(CODECS)}, got {precision!r}")
    codec = CODECS[precision]
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


class Fp32Codec:
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


class Bf16Codec(Fp32Codec):
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


class Int8Codec(Fp32Codec):
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
        if a.dtype == torch.float32 and a.is_contiguous() and bindings.available(a.device):
            return bindings.quantize_int8(a, scale)
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


CODECS = {"fp32": Fp32Codec, "bf16": Bf16Codec, "int8": Int8Codec}
