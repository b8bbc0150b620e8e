"""Attention of each query over an explicit set of visible keys (the CLIP scorer's prefix tree).

:func:`nofree.decoding.clip_scorer.encode_shared_prefix` runs MAGIC's candidate texts as a prefix tree
packed into one sequence per image: a token sees its image's held keys/values (the continuation
so far) and its own ancestors in the tree, ~10-30 keys of the hundred-odd positions. A dense
masked attention scores every pair and runs at a small fraction of the CPU's speed at these sizes
(head width 64); nofree's C kernel (``nofree/kernels/attention.c``) visits only the visible keys.
Tokens are kept flat, without the padding a per-image batch needs, so the matmuls around the
attention skip the padding too. The torch twin scatters them into padded sequences and calls
``scaled_dot_product_attention`` with the boolean mask; it runs when the kernel is unavailable
(no C compiler, ``NOFREE_NATIVE=0``), on GPUs and for other dtypes. Both give the same values up
to float rounding (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nofree.kernels import bindings

__all__ = ["Visibility", "list_attention"]


@dataclass(frozen=True)
class Visibility:
    """Which keys each of N flat tokens sees, in two forms.

    mask: ``(B, Q, P + Q)`` bool over B padded sequences of Q slots after P held positions (the
    twin's; padding slots see padding only, so that no softmax row is empty); img, slot: ``(N,)``
    the sequence and slot of each token (tokens ordered by sequence, then slot); offsets ``(N + 1,)``
    int64 and cols ``(nnz,)`` int32: the visible keys of token n are cols[offsets[n]:offsets[n+1]],
    numbered as ``nofree/kernels/attention.c`` reads them (held position p of sequence b is b·P + p,
    token m is B·P + m).
    """

    mask: Tensor
    img: Tensor
    slot: Tensor
    offsets: Tensor
    cols: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor, img: Tensor, slot: Tensor) -> "Visibility":
        """From the padded ``mask (B, Q, P + Q)`` and the tokens' ``img``/``slot`` ``(N,)``."""
        n_seq, width, keys = mask.shape
        held = keys - width
        first = torch.cumsum(torch.bincount(img, minlength=n_seq), 0)
        first = torch.cat([first.new_zeros(1), first[:-1]])          # (B,) flat index of slot 0
        token, col = mask[img, slot].nonzero(as_tuple=True)           # row-major: sorted by token
        col = torch.where(col < held, img[token] * held + col, n_seq * held + first[img[token]] + col - held)
        offsets = torch.zeros(len(img) + 1, dtype=torch.long, device=mask.device)
        offsets[1:] = torch.cumsum(torch.bincount(token, minlength=len(img)), 0)
        return cls(mask, img, slot, offsets, col.to(torch.int32))


def _native(qkv: Tensor, past: tuple[Tensor, Tensor] | None) -> bool:
    """Whether nofree's C kernel can take these tensors (float32 on the CPU, kernels built)."""
    if qkv.dtype != torch.float32 or (past is not None and past[0].dtype != torch.float32):
        return False
    return bindings.available(qkv.device)


def list_attention(qkv: Tensor, past: tuple[Tensor, Tensor] | None, seen: Visibility,
                   rows: Tensor | None = None) -> Tensor:
    """Softmax attention ``(M, H, D)`` of the queries of tokens ``rows`` (``(M,)``; None: all N).

    qkv: ``(N, 3, H, D)`` each token's query | key | value; past: held keys and values, each
    ``(B, H, P, D)``, or None (P = 0); seen: who sees whom. Scale 1/√D.
    """
    if _native(qkv, past):
        held = (past[0].contiguous(), past[1].contiguous()) if past is not None else None
        picked = rows.to(torch.long).contiguous() if rows is not None else None
        try:
            return bindings.list_attention(qkv.contiguous(), held, seen.offsets, seen.cols, picked,
                                           seen.mask.shape[0])
        except MemoryError:  # no scratch memory for the kernel's threads: the torch twin below
            pass
    heads, dim = qkv.shape[2:]
    n_seq, width = seen.mask.shape[:2]
    padded = qkv.new_zeros(n_seq, width, 3, heads, dim)
    padded[seen.img, seen.slot] = qkv
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)                        # (B, H, Q, D)
    if past is not None:
        k, v = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(v.dtype), v], 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen.mask[:, None])
    out = out.transpose(1, 2)[seen.img, seen.slot]                           # (N, H, D)
    return out if rows is None else out[rows]
