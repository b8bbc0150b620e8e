"""A causal CLIP text tower seen layer by layer, for callers that run its blocks themselves.

CLIP's text tower (Radford et al., 2021) is a pre-norm transformer with causal attention and
absolute positions, pooled at one position (end-of-text for CLIP) and projected. :class:`TextTower`
holds its pieces, read out of an open_clip CLIP/CustomTextCLIP (:func:`open_clip_tower`) or a
transformers CLIPModel (:func:`hf_clip_tower`), so that a caller decides how the tokens attend:
:meth:`TextTower.run` runs every block on flat tokens and asks an ``attend`` function for each
layer's attention output (the MAGIC CLIP scorer, :mod:`nofree.decoding.clip_scorer`, attends
over a prefix tree of candidate texts and held keys/values). Weight matrices are kept in a
chosen dtype, optionally packed for the CPU's matrix kernels (:mod:`nofree.kernels.packing`); the
residual stream stays float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from nofree.kernels.packing import PackedMatrix, gelu_kind, linear, pack

__all__ = ["Block", "TextTower", "Attend", "Pooling", "is_hf_clip", "text_tower", "text_pooling",
           "open_clip_tower", "hf_clip_tower"]

#: ``attend(layer, qkv (N, 3, h, W/h), rows (M,) or None) -> (N, h, W/h)``, or ``(M, h, W/h)``
#: for the tokens ``rows`` only: the attention output of a layer's queries | keys | values.
Attend = Callable[[int, Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Block:
    """One pre-norm transformer block: x += ls1·out(attn(ln1 x)); x += ls2·fc2(act(fc1(ln2 x)))."""

    ln1: nn.Module
    qkv_w: Tensor | PackedMatrix   # (3W, W), rows q | k | v
    qkv_b: Tensor   # (3W,)
    out_w: Tensor | PackedMatrix
    out_b: Tensor
    ls1: Tensor | None
    ln2: nn.Module
    fc1_w: Tensor | PackedMatrix
    fc1_b: Tensor
    act: nn.Module
    fc2_w: Tensor | PackedMatrix
    fc2_b: Tensor
    ls2: Tensor | None

    @property
    def gelu(self) -> str | None:
        """The GELU fc1 applies inside its matrix kernel, when ``act`` is one and fc1 is packed."""
        return gelu_kind(self.act) if isinstance(self.fc1_w, PackedMatrix) else None

    def mlp(self, x: Tensor) -> Tensor:
        """``fc2(act(fc1(x)))`` in float32; a GELU runs inside a packed fc1, whose output then goes
        to fc2 in the weights' dtype (no float32 round trip of the wide hidden layer)."""
        if self.gelu is not None:
            hidden = linear(x.to(self.fc1_w.dtype), self.fc1_w, self.fc1_b, activation=self.gelu)
            return _lin(hidden, self.fc2_w, self.fc2_b)
        return _lin(self.act(_lin(x, self.fc1_w, self.fc1_b)), self.fc2_w, self.fc2_b)


@dataclass(frozen=True)
class TextTower:
    """Token + position embeddings, blocks, final norm and projection of a causal text tower."""

    token_embedding: nn.Module
    positions: Tensor          # (L, W)
    blocks: tuple[Block, ...]
    heads: int
    ln_final: nn.Module
    project: Callable[[Tensor], Tensor]

    def embed(self, ids: Tensor, position: Tensor) -> Tensor:
        """``(N, W)`` float32 inputs of N tokens ``ids (N,)`` at positions ``position (N,)``."""
        return self.token_embedding(ids).float() + \
            self.positions[position.clamp_max(self.positions.shape[0] - 1)]

    def run(self, x: Tensor, attend: Attend, pick: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Run every block on N flat tokens ``x (N, W)``, each layer's attention given by ``attend``.

        ``pick (M,)``: the only tokens whose output is wanted; the last block runs its attention,
        output projection and MLP for those alone (its keys/values still for all N). Returns x
        (``(N, W)``, or ``(M, W)`` at ``pick``) and each layer's ``(N, 3, h, W/h)`` queries | keys
        | values."""
        n, width = x.shape
        last = len(self.blocks) - 1
        new_qkv = []
        for i, blk in enumerate(self.blocks):
            qkv = _lin(blk.ln1(x), blk.qkv_w, blk.qkv_b).view(n, 3, self.heads, width // self.heads)
            new_qkv.append(qkv)
            rows = pick if i == last else None
            o = attend(i, qkv, rows)
            if rows is not None:
                x = x[rows]
            o = _lin(o.reshape(len(x), width), blk.out_w, blk.out_b)
            x = x + (o if blk.ls1 is None else o * blk.ls1)
            m = blk.mlp(blk.ln2(x))
            x = x + (m if blk.ls2 is None else m * blk.ls2)
        return x, new_qkv

    def features(self, pooled: Tensor) -> Tensor:
        """Text features ``(N, D)`` of the pooled positions' last-block outputs ``(N, W)``."""
        return self.project(self.ln_final(pooled))


def _lin(x: Tensor, w: Tensor | PackedMatrix, b: Tensor | None) -> Tensor:
    """``x @ w.T + b`` with the matmul (and bias) in ``w``'s dtype and the result in float32."""
    return linear(x.to(w.dtype), w, b).float()


def _weights(dtype: torch.dtype, packed: bool) -> Callable[[Tensor], Tensor | PackedMatrix]:
    """How a tower keeps a weight matrix: in ``dtype``, packed for the CPU kernels if asked."""
    return (lambda w: pack(w.detach().to(dtype))) if packed else (lambda w: w.detach().to(dtype))


@dataclass(frozen=True)
class Pooling:
    """Where a CLIP text tower pools: the tokeniser's row length, and the rule picking the pooled
    position (``argmax``: the highest id, CLIP's end-of-text; ``eos``: the first ``eos_id``;
    ``last``/``first``: a fixed position)."""

    context_length: int
    pool_type: str
    eos_id: int | None

    def index(self, ids: Tensor) -> Tensor:
        """``(N,)`` the pooled position of each row of token ids ``(N, L)``."""
        if self.pool_type == "argmax":
            return ids.argmax(-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(-1)
        if self.pool_type == "last":
            return torch.full(ids.shape[:1], ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        return torch.zeros(ids.shape[:1], dtype=torch.long, device=ids.device)


def text_pooling(model: Any, tokenizer: Any) -> Pooling:
    """The :class:`Pooling` of an open_clip or transformers CLIP model (``tokenizer``: its own)."""
    if is_hf_clip(model):
        cfg = model.config.text_config
        eos_id = int(cfg.eos_token_id)
        return Pooling(int(cfg.max_position_embeddings), "argmax" if eos_id == 2 else "eos", eos_id)
    text = getattr(model, "text", model)
    return Pooling(int(getattr(tokenizer, "context_length", None) or text.context_length),
                   getattr(model, "text_pool_type", getattr(text, "pool_type", "argmax")),
                   getattr(model, "text_eos_id", getattr(text, "eos_id", None)))


def is_hf_clip(model: Any) -> bool:
    """Whether ``model`` is a transformers CLIPModel (else an open_clip one is expected)."""
    return hasattr(model, "get_text_features") and hasattr(model, "text_model")


def text_tower(model: Any, *, dtype: torch.dtype = torch.float32, packed: bool = True) -> TextTower | None:
    """The causal text tower of an open_clip or transformers CLIP model (None when an open_clip
    tower is not a plain causal one: its own ``encode_text`` must run it)."""
    with torch.no_grad():
        build = hf_clip_tower if is_hf_clip(model) else open_clip_tower
        return build(model, dtype, packed)


def open_clip_tower(model: Any, dtype: torch.dtype, packed: bool) -> TextTower | None:
    """The text tower of an open_clip CLIP/CustomTextCLIP, or None when it is not a plain causal one."""
    text = getattr(model, "text", model)
    weight = _weights(dtype, packed)
    attn_mask = getattr(text, "attn_mask", None)
    blocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    if attn_mask is None or blocks is None or getattr(text, "cls_emb", None) is not None:
        return None
    pool_type = getattr(model, "text_pool_type", getattr(text, "pool_type", None))
    if pool_type not in ("argmax", "eos", "last", "first"):
        return None
    out = []
    for blk in blocks:
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        plain_mlp = isinstance(mlp, nn.Sequential) and [n for n, _ in mlp.named_children()] == \
            ["c_fc", "gelu", "c_proj"]
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(blk, "ln_1_kv") or not plain_mlp:
            return None
        ls = [getattr(getattr(blk, name), "gamma", None) for name in ("ls_1", "ls_2")]
        out.append(Block(blk.ln_1, weight(attn.in_proj_weight), attn.in_proj_bias,
                         weight(attn.out_proj.weight), attn.out_proj.bias, ls[0], blk.ln_2,
                         weight(mlp.c_fc.weight), mlp.c_fc.bias, mlp.gelu,
                         weight(mlp.c_proj.weight), mlp.c_proj.bias, ls[1]))
    proj = text.text_projection
    if proj is None:
        project = lambda x: x  # noqa: E731
    else:
        proj_w, proj_b = (proj.weight, proj.bias) if isinstance(proj, nn.Linear) else (proj.t(), None)
        proj_w = weight(proj_w)
        project = lambda x: _lin(x, proj_w, proj_b)  # noqa: E731
    return TextTower(text.token_embedding, text.positional_embedding.float(), tuple(out),
                     blocks[0].attn.num_heads, text.ln_final, project)


def hf_clip_tower(model: Any, dtype: torch.dtype, packed: bool) -> TextTower:
    """The text tower of a transformers CLIPModel."""
    weight = _weights(dtype, packed)
    text = model.text_model
    out = []
    for layer in text.encoder.layers:
        att = layer.self_attn
        out.append(Block(layer.layer_norm1,
                         weight(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                         torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
                         weight(att.out_proj.weight), att.out_proj.bias, None, layer.layer_norm2,
                         weight(layer.mlp.fc1.weight), layer.mlp.fc1.bias, layer.mlp.activation_fn,
                         weight(layer.mlp.fc2.weight), layer.mlp.fc2.bias, None))
    proj_w = weight(model.text_projection.weight)
    return TextTower(text.embeddings.token_embedding, text.embeddings.position_embedding.weight.float(),
                     tuple(out), text.config.num_attention_heads, text.final_layer_norm,
                     lambda x: _lin(x, proj_w, None))
