"""ClipCap: an image embedding mapped to a prefix of a frozen causal LM.

Mokady, Hertz & Bermano (2021), "ClipCap: CLIP Prefix for Image Captioning". A frozen image
encoder gives a pooled embedding ``(B, d)``; a trainable *mapper* turns it into ``L`` prefix
vectors ``(B, L, H)`` in the LM's input-embedding space; the frozen LM, fed the prefix and then
the caption tokens, is trained (through the mapper only) to predict the caption.

Mappers (the paper's two):

- ``mlp``: ``Linear(d → L·H/2) → Tanh → Linear(→ L·H)``, reshaped to ``(L, H)``;
- ``transformer``: ``Linear(d → L_c·H)`` gives ``L_c`` vectors, ``L`` learned constants are
  appended, 8 pre-LN transformer layers mix them, and the last ``L`` outputs are the prefix.

Departures from the reference implementation, on purpose:

- the image embedding is L2-normalised before the mapper in *both* training and inference
  (the reference normalises in one but not the other);
- captions are right-padded with the LM's real pad id, an attention mask hides the padding,
  and padded positions carry the ignored label ``-100`` (the reference pads with token 0 and
  ignores label 0, which silently drops every real token with id 0);
- every caption ends with the LM's eos token, so decoding knows where to stop.

Any Hugging Face causal LM works (GPT-2, Llama-family such as SmolLM2): the prefix is passed as
``inputs_embeds``. Decoding (transformers' ``generate`` from the prefix) lives in
:class:`nofree.adapters.captioning.CaptioningAdapter`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from nofree.adapters.captioning import DECODING, CaptioningAdapter
from nofree.adapters.losses import caption_batch
from nofree.core import l2_normalize

MAPPERS = ("mlp", "transformer")


class MLPMapper(nn.Module):
    """``(B, d)`` image embedding -> ``(B, L, H)`` prefix through one tanh hidden layer."""

    def __init__(self, embed_dim: int, hidden_size: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length, self.hidden_size = prefix_length, hidden_size
        middle = max(1, prefix_length * hidden_size // 2)
        self.net = nn.Sequential(nn.Linear(embed_dim, middle), nn.Tanh(),
                                 nn.Linear(middle, prefix_length * hidden_size))

    def forward(self, image_emb: Tensor) -> Tensor:
        return self.net(image_emb).view(-1, self.prefix_length, self.hidden_size)


class TransformerMapper(nn.Module):
    """``(B, d)`` -> ``(B, L, H)``: ``L_c`` projected vectors + ``L`` learned constants through a
    pre-LN transformer; the outputs at the constants' positions are the prefix."""

    def __init__(self, embed_dim: int, hidden_size: int, prefix_length: int, clip_length: int,
                 num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.clip_length, self.hidden_size = clip_length, hidden_size
        self.linear = nn.Linear(embed_dim, clip_length * hidden_size)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden_size))
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, dim_feedforward=2 * hidden_size,
                                           dropout=0.0, activation="relu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, image_emb: Tensor) -> Tensor:
        projected = self.linear(image_emb).view(-1, self.clip_length, self.hidden_size)
        const = self.prefix_const.unsqueeze(0).expand(projected.shape[0], -1, -1)
        return self.transformer(torch.cat([projected, const], dim=1))[:, self.clip_length:]


class ClipCap(CaptioningAdapter):
    """ClipCap over a frozen image encoder and a frozen causal LM.

    ``image_encoder``: a nofree image encoder (pooled embeddings, ``embed_dim`` d);
    ``lm``: a :class:`nofree.lm.hf.HFLanguageModel` (width H). Hyperparameters: ``prefix_length``
    L, ``mapper`` ('mlp' | 'transformer'), and for the transformer ``clip_length`` L_c,
    ``num_layers``, ``num_heads``; captions are cut to ``max_caption_tokens`` in training.
    The adapter runs on the LM's device.
    """

    kind = "clipcap"
    feature_kind = "embed"
    # beam search gained over greedy with the 6-epoch recipe in 5-fold cross-validation on
    # coco-mini train (RESULTS.md, "Trained fusion: how the recipes were chosen")
    decoding = {**DECODING, "beams": 3}
    config_limits = {"prefix_length": (1, 1024), "clip_length": (1, 1024), "num_layers": (1, 64),
                     "num_heads": (1, 256), "max_caption_tokens": (1, 8192)}

    @classmethod
    def planned_parameters(cls, config: dict[str, Any], dims: dict[str, int]) -> int:
        d, h, length = dims.get("image_embed_dim", 0), dims.get("lm_hidden_size", 0), config["prefix_length"]
        if config["mapper"] == "mlp":  # d -> L·H/2 -> L·H: quadratic in the prefix length
            middle = max(1, length * h // 2)
            return d * middle + middle * length * h
        return d * config["clip_length"] * h + length * h + config["num_layers"] * 8 * h * h

    def __init__(self, image_encoder: Any, lm: Any, *, prefix_length: int = 10, mapper: str = "mlp",
                 clip_length: int = 10, num_layers: int = 8, num_heads: int = 8,
                 max_caption_tokens: int = 40, device: str | torch.device | None = None) -> None:
        super().__init__(image_encoder, lm, max_caption_tokens=max_caption_tokens, device=device)
        if mapper not in MAPPERS:
            raise ValueError(f"mapper must be one of {MAPPERS}, got {mapper!r}")
        if prefix_length < 1 or clip_length < 1 or num_layers < 1:
            raise ValueError("prefix_length, clip_length and num_layers must be >= 1")
        embed_dim, hidden = int(image_encoder.embed_dim), int(lm.hidden_size)
        if mapper == "transformer" and hidden % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the LM width {hidden}")
        self.prefix_length, self.mapper_kind = int(prefix_length), mapper
        self.clip_length, self.num_layers, self.num_heads = int(clip_length), int(num_layers), int(num_heads)
        if mapper == "mlp":
            self.mapper = MLPMapper(embed_dim, hidden, self.prefix_length)
        else:
            self.mapper = TransformerMapper(embed_dim, hidden, self.prefix_length, self.clip_length,
                                            self.num_layers, self.num_heads)
        self.to(self.device)

    def config(self) -> dict[str, Any]:
        return {"prefix_length": self.prefix_length, "mapper": self.mapper_kind,
                "clip_length": self.clip_length, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "max_caption_tokens": self.max_caption_tokens}

    def backbone_dims(self) -> dict[str, int]:
        return {"image_embed_dim": int(self.image_encoder.embed_dim),
                "lm_hidden_size": int(self.lm.hidden_size)}

    def prefix(self, image_emb: Tensor) -> Tensor:
        """Prefix embeddings ``(B, L, H)`` of image embeddings ``(B, d)`` (L2-normalised first)."""
        if image_emb.dim() != 2 or image_emb.shape[1] != self.image_encoder.embed_dim:
            raise ValueError(f"ClipCap takes pooled image embeddings (B, {self.image_encoder.embed_dim}), "
                             f"got {tuple(image_emb.shape)}")
        return self.mapper(l2_normalize(image_emb.to(self.device)))

    def caption_logits(self, features: Tensor, texts: list[str],
                       prompts: Any = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits ``(B, 1+Tc, V)`` from the last prefix position on, and aligned
        labels ``(B, 1+Tc)`` (-100 ignored)."""
        if prompts is not None:
            raise ValueError("ClipCap conditions on the image prefix only; it takes no prompts")
        ids, mask, labels = caption_batch(self.caption_ids(texts), eos_id=self.lm.eos_id,
                                          pad_id=self.lm.pad_id, n_start=self.prefix_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = torch.cat([self.prefix(features), self.lm.embed(ids)], dim=1)
        keep = labels.shape[1] - (self.prefix_length - 1)  # no logits where nothing is predicted
        out = self.lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                            logits_to_keep=keep)
        return out.logits, labels[:, -keep:].to(self.device)

    def generation_inputs(self, features: Tensor, prompts: Any = None) -> dict[str, Tensor]:
        if prompts is not None:
            raise ValueError("ClipCap conditions on the image prefix only; it takes no prompts")
        prefix = self.prefix(features)
        return {"inputs_embeds": prefix,
                "attention_mask": torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)}
