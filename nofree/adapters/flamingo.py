"""Flamingo-style adapter: a perceiver resampler and tanh-gated cross-attention into a frozen LM.

Alayrac et al. (2022), "Flamingo: a Visual Language Model for Few-Shot Learning" (§2.1, §2.2,
appendix A.1). Two trainable parts around frozen towers:

- a **perceiver resampler** turns the image token grid ``(B, T, W)`` (``encode_tokens`` of the
  frozen image encoder, projected to the LM width H) into ``n`` latents ``(B, n, H)``: learned
  latent queries attend to ``concat(visual tokens, latents)`` (keys/values), with residual
  attention and feed-forward layers and a final LayerNorm;
- **gated cross-attention blocks** before every ``xattn_every``-th decoder layer of the frozen
  LM (layers 0, n, 2n, ...): ``y += tanh(α)·XAttn(LN(y), latents)``; ``y += tanh(β)·FF(LN(y))``.
  In the paper α = β = 0 at initialisation, so a fresh adapter returns exactly the frozen LM's
  logits. nofree's default keeps that identity differently, for small data: the output
  projections start at 0 and the gates at 0.5, and each change is scaled to the RMS of the hidden
  state it is added to (:class:`GatedCrossAttentionBlock`; ``gate_init=0,
  scale_to_residual=False`` is the paper's block).

Insertion works with any Hugging Face causal LM: :func:`find_decoder_layers` finds the
``ModuleList`` of decoder layers generically (``transformer.h`` in GPT-2, ``model.layers`` in
Llama-family models such as SmolLM2), and each chosen layer gets a forward pre-hook that applies
the gated block to its incoming hidden states and then lets the original layer run with the same
arguments. The frozen layers, their weights and the module tree stay untouched (HF code that
inspects layer types or attributes is unaffected), and the hooks are inert unless this adapter is
conditioning a forward (so the same LM object can serve other captioners meanwhile).

``gate_lr_scale`` multiplies the gates' learning rate (default 1): with the paper's zero gates,
a few hundred steps at the usual rates leave them near 0; with nofree's block a higher rate
closes the attention gates early (benchmarks/RESULTS.md, "Trained fusion").

The cross-attention does not depend on the KV cache, so cached decoding works unchanged. Scope:
one image per sequence, and every text position attends to it (captioning). Flamingo's
interleaved media-position mask (text attends only to the latest preceding image) is not
implemented; neither are its per-frame time embeddings (single images only).
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nofree.adapters.base import find_layers
from nofree.adapters.captioning import DECODING, CaptioningAdapter
from nofree.adapters.losses import caption_batch
from nofree.lm.hf import left_pad


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers of a HF causal LM (``transformer.h`` for GPT-2,
    ``model.layers`` for Llama-family models); see :func:`nofree.adapters.base.find_layers`."""
    return find_layers(model)


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(B, T, heads·dh)`` -> ``(B, heads, T, dh)``."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """``(B, heads, T, dh)`` -> ``(B, T, heads·dh)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """``LN → Linear(dim → mult·dim) → GELU → Linear(→ dim)`` (no biases, as in Flamingo)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents ``(B, n, D)`` attend to ``concat(media (B, T, D), latents)`` -> ``(B, n, D)``."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(*(_heads(t, self.heads) for t in (q, k, v)))
        return self.to_out(_merge(out))


class PerceiverResampler(nn.Module):
    """Image token grid ``(B, T, W)`` -> ``(B, n, H)`` latents (normalised by a final LayerNorm)."""

    def __init__(self, media_dim: int, dim: int, *, num_latents: int, depth: int, heads: int,
                 dim_head: int, ff_mult: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(media_dim, dim)
        self.drop = nn.Dropout(dropout)  # on each residual branch, in training only
        # Small learned latents: at unit scale they dominate the residual stream, so the resampled
        # latents of different photos start nearly identical (RESULTS.md, "Trained fusion"), a few
        # hundred steps never make them depend on the image, and the gates learn to ignore them.
        self.latents = nn.Parameter(0.02 * torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        media = self.proj(tokens)
        x = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for attn, ff in self.layers:
            x = self.drop(attn(media, x)) + x
            x = self.drop(ff(x)) + x
        return self.norm(x)


class GatedCrossAttentionBlock(nn.Module):
    """``y += tanh(α)·s·XAttn(LN(y), latents); y += tanh(β)·s·FF(LN(y))``: a fresh block is the
    identity.

    ``y`` ``(B, T, H)`` hidden states of the LM, ``latents`` ``(B, n, H)``; returns ``(B, T, H)``
    in ``y``'s dtype. ``s`` is 1, or with ``scale_to_residual`` the RMS of each position's
    incoming hidden state (no gradient), so that a gate value means the same relative change at
    every depth and position: a causal LM's residual stream grows with depth (SmolLM2-135M: RMS
    ~0.1 at the embeddings, 5–20 in the upper layers), and at unit scale the image signal swamps
    the first layers and vanishes in the last ones. Each position's own RMS, not one typical
    value per layer: attention-sink positions (~100× the others) then take changes of their own
    size, and every later token reads them; one constant per layer, or a cap at a few times it,
    learnt far less from the image (benchmarks/RESULTS.md, "Trained fusion").

    ``gate_init`` 0 is the paper's initialisation: both gates at 0, the output projections random.
    A positive ``gate_init`` starts both gates at that value and the output projections (the
    attention's ``to_out`` and the feed-forward's last layer) at 0 instead: the block is still the
    identity, but each output direction learns on its own from the first step, rather than
    through one scalar gate that opens only once the randomly projected image features help the
    LM, which a few hundred captions never showed (benchmarks/RESULTS.md, "Trained fusion").

    ``dropout``: the probability of zeroing each output unit of both branches in training (a
    block that adds 0 stays the identity either way).
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: int, gate_init: float = 0.0,
                 scale_to_residual: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= gate_init < 1.0:
            raise ValueError(f"gate_init must be in [0, 1), got {gate_init!r}")
        self.heads, self.scale_to_residual = heads, bool(scale_to_residual)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.full((1,), math.atanh(gate_init)))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), math.atanh(gate_init)))
        self.drop = nn.Dropout(dropout)
        if gate_init > 0:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.ff[-1].weight)

    def forward(self, y: Tensor, latents: Tensor) -> Tensor:
        x = y.to(self.attn_gate.dtype)
        scale = x.detach().pow(2).mean(-1, keepdim=True).sqrt() if self.scale_to_residual else 1.0
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(latents).chunk(2, dim=-1)
        attended = self.to_out(_merge(F.scaled_dot_product_attention(
            *(_heads(t, self.heads) for t in (q, k, v)))))
        x = x + torch.tanh(self.attn_gate) * scale * self.drop(attended)
        x = x + torch.tanh(self.ff_gate) * scale * self.drop(self.ff(x))
        return x.to(y.dtype)


class Flamingo(CaptioningAdapter):
    """Flamingo-style captioner over a frozen image encoder (token grids) and a frozen causal LM.

    Hyperparameters: ``num_latents`` n, ``resampler_depth``, ``heads`` and ``dim_head`` (both
    attentions), ``ff_mult``, ``xattn_every`` (a block before LM layers 0, n, 2n, ...), ``prompt``
    (text after the start token that every caption follows; default none), ``gate_lr_scale``
    (learning-rate multiplier of the tanh gates in training), ``gate_init`` and
    ``scale_to_residual`` (see :class:`GatedCrossAttentionBlock`; ``gate_init=0``,
    ``scale_to_residual=False`` is the paper's block), ``dropout`` (on every residual branch of the
    resampler and the blocks, in training only). The adapter runs on
    the LM's device and attaches inert forward pre-hooks to the LM's decoder layers
    (:meth:`detach` removes them).
    """

    kind = "flamingo"
    feature_kind = "tokens"
    # 3 beams: the best cross-validated decoding of the 6-epoch recipe on coco-mini train (ahead of
    # greedy in every fold with one training seed, +2.0 CIDEr over two seeds; RESULTS.md,
    # "Cross-validation of the trained captioners' recipes")
    decoding = {**DECODING, "beams": 3}
    config_limits = {"num_latents": (1, 4096), "resampler_depth": (1, 64), "heads": (1, 256),
                     "dim_head": (1, 4096), "ff_mult": (1, 64), "xattn_every": (1, 10**6),
                     "max_caption_tokens": (1, 8192)}
    # Settings a saved config may lack (written before they existed), with the value that
    # reproduces how such an adapter was trained.
    absent_config = {"gate_init": 0.0, "scale_to_residual": False, "dropout": 0.0}

    @classmethod
    def planned_parameters(cls, config: dict[str, Any], dims: dict[str, int]) -> int:
        h, t = dims.get("lm_hidden_size", 0), dims.get("image_token_dim", 0)
        layer = 4 * h * config["heads"] * config["dim_head"] + 2 * config["ff_mult"] * h * h  # attn + ff
        blocks = -(-dims.get("lm_num_layers", 0) // config["xattn_every"])
        return t * h + config["num_latents"] * h + (config["resampler_depth"] + blocks) * layer

    def __init__(self, image_encoder: Any, lm: Any, *, num_latents: int = 32,
                 resampler_depth: int = 2, heads: int = 8, dim_head: int = 64, ff_mult: int = 2,
                 xattn_every: int = 5, prompt: str = "", gate_lr_scale: float = 1.0,
                 gate_init: float = 0.5, scale_to_residual: bool = True, dropout: float = 0.0,
                 max_caption_tokens: int = 40, device: str | torch.device | None = None) -> None:
        super().__init__(image_encoder, lm, max_caption_tokens=max_caption_tokens, device=device)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        for name, value in (("num_latents", num_latents), ("resampler_depth", resampler_depth),
                            ("heads", heads), ("dim_head", dim_head), ("ff_mult", ff_mult),
                            ("xattn_every", xattn_every)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        hidden = int(lm.hidden_size)
        self.hparams = {"num_latents": int(num_latents), "resampler_depth": int(resampler_depth),
                        "heads": int(heads), "dim_head": int(dim_head), "ff_mult": int(ff_mult),
                        "xattn_every": int(xattn_every), "prompt": str(prompt),
                        "gate_lr_scale": float(gate_lr_scale), "gate_init": float(gate_init),
                        "scale_to_residual": bool(scale_to_residual), "dropout": float(dropout)}
        self.resampler = PerceiverResampler(int(image_encoder.token_dim), hidden,
                                            num_latents=int(num_latents), depth=int(resampler_depth),
                                            heads=int(heads), dim_head=int(dim_head), ff_mult=int(ff_mult),
                                            dropout=float(dropout))
        layers = find_decoder_layers(lm.model)
        self.xattn_layers = list(range(0, len(layers), int(xattn_every)))
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(hidden, heads=int(heads), dim_head=int(dim_head), ff_mult=int(ff_mult),
                                     gate_init=float(gate_init), scale_to_residual=bool(scale_to_residual),
                                     dropout=float(dropout))
            for _ in self.xattn_layers)
        self.to(self.device)
        tok = lm.tokenizer
        start = tok.bos_token_id if getattr(tok, "bos_token_id", None) is not None else lm.eos_id
        self.start_ids = [int(start)] + (lm.tokenize([prompt])[0] if prompt else [])
        object.__setattr__(self, "_media_latents", None)
        object.__setattr__(self, "_hooks", [])
        me = weakref.ref(self)
        for block_index, layer_index in enumerate(self.xattn_layers):
            self._hooks.append(layers[layer_index].register_forward_pre_hook(
                _make_hook(me, block_index), with_kwargs=True))

    def config(self) -> dict[str, Any]:
        return {**self.hparams, "max_caption_tokens": self.max_caption_tokens}

    def backbone_dims(self) -> dict[str, int]:
        return {"image_token_dim": int(self.image_encoder.token_dim),
                "lm_hidden_size": int(self.lm.hidden_size),
                "lm_num_layers": len(find_decoder_layers(self.lm.model))}

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups: the tanh gates (learning rate × ``gate_lr_scale``, no weight decay) and
        everything else."""
        gates = [p for name, p in self.named_parameters() if name.endswith("_gate")]
        gate_ids = {id(p) for p in gates}
        rest = [p for p in self.trainable_parameters() if id(p) not in gate_ids]
        return [{"params": rest, "lr_scale": 1.0},
                {"params": gates, "lr_scale": self.hparams["gate_lr_scale"], "weight_decay": 0.0}]

    def detach(self) -> None:
        """Remove the hooks from the LM (the adapter can no longer condition it)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # --- conditioning -----------------------------------------------------------------------
    def latents(self, tokens: Tensor) -> Tensor:
        """Resampled latents ``(B, n, H)`` of image token grids ``(B, T, W)``."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.image_encoder.token_dim:
            raise ValueError(f"Flamingo takes image token grids (B, T, {self.image_encoder.token_dim}) "
                             f"from encode_tokens, got {tuple(tokens.shape)}")
        return self.resampler(tokens.to(self.device, torch.float32))

    @contextmanager
    def attending(self, latents: Tensor) -> Iterator[None]:
        """While active, the LM's gated blocks attend to ``latents`` ``(B, n, H)``."""
        if not self._hooks:
            raise RuntimeError("this Flamingo adapter was detached from its LM")
        previous = self._media_latents
        object.__setattr__(self, "_media_latents", latents)
        try:
            yield
        finally:
            object.__setattr__(self, "_media_latents", previous)

    def lm_logits(self, tokens: Tensor, ids: Tensor, attention_mask: Tensor | None = None, *,
                  keep: int = 0) -> Tensor:
        """Logits ``(B, T, V)`` of the LM over ``ids`` ``(B, T)`` conditioned on image tokens (only
        the last ``keep`` positions when ``keep`` > 0). Left padding in ``attention_mask`` is
        honoured: positions count from each row's first real token."""
        position_ids = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        with self.attending(self.latents(tokens)):
            out = self.lm.model(input_ids=ids.to(self.device), attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False, logits_to_keep=keep)
        return out.logits

    def start_rows(self, n: int, prompts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Left-padded start ids ``(n, S)`` and mask ``(n, S)``: the start tokens (and the fixed
        ``prompt``), then each row's own text from ``prompts`` (one per row) when given."""
        rows = [list(self.start_ids) for _ in range(n)]
        if prompts is not None:
            if len(prompts) != n:
                raise ValueError(f"{len(prompts)} prompts for {n} rows")
            rows = [row + extra for row, extra in zip(rows, self.lm.tokenize(list(prompts)))]
        return left_pad(rows, self.lm.pad_id)

    def caption_logits(self, features: Tensor, texts: list[str],
                       prompts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits ``(B, 1+Tc, V)`` from the last start position on, and labels
        ``(B, 1+Tc)`` (-100 ignored); ``prompts`` as in :meth:`start_rows`."""
        start, start_mask = self.start_rows(len(texts), prompts)
        ids, mask, labels = caption_batch(self.caption_ids(texts), eos_id=self.lm.eos_id,
                                          pad_id=self.lm.pad_id, n_start=start.shape[1])
        mask[:, :start.shape[1]] = start_mask
        keep = labels.shape[1] - (start.shape[1] - 1)  # no logits where nothing is predicted
        logits = self.lm_logits(features, torch.cat([start, ids], dim=1), mask, keep=keep)
        return logits, labels[:, -keep:].to(self.device)

    # --- decoding ---------------------------------------------------------------------------------
    @contextmanager
    def media(self, features: Tensor, *, copies: int = 1) -> Iterator[None]:
        with self.attending(self.latents(features).repeat_interleave(copies, dim=0)):
            yield

    def generation_inputs(self, features: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Tensor]:
        ids, mask = self.start_rows(features.shape[0], prompts)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}


def _make_hook(adapter_ref: "weakref.ref[Flamingo]", block_index: int):
    """A forward pre-hook applying gated block ``block_index`` to a decoder layer's input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        adapter = adapter_ref()
        if adapter is None or adapter._media_latents is None:
            return None
        latents = adapter._media_latents
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] != latents.shape[0]:
            raise RuntimeError(f"the LM runs {hidden.shape[0]} rows but {latents.shape[0]} images "
                               "condition it; pass one image per sequence")
        new = adapter.blocks[block_index](hidden, latents)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return hook
