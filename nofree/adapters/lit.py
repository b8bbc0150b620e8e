"""LiT: a locked image tower and a tuned text side, trained contrastively.

Zhai et al. (2022), "LiT: Zero-Shot Transfer with Locked-image text Tuning". The image tower is
frozen *including its output*: image embeddings are computed once and cached, and the joint
space is the image encoder's own embedding space. The text side learns to map into it: here a
trainable projection head over the frozen text encoder's pooled embedding,
``z_txt = norm(head(text_emb))``, initialised (semi-)orthogonal so it starts norm-preserving.
Training uses the symmetric contrastive loss with a learned temperature ``t = exp(log_t)``
(initialised to 10, clamped at 100), or optionally the pairwise sigmoid loss of SigLIP (Zhai et
al., 2023, "Sigmoid Loss for Language Image Pre-Training"; learned bias initialised to -10).

``embed_dim`` other than the image width adds a trainable linear head on the image side too (the
tower stays locked; only the head on top of it trains). ``text_layers = n > 0`` also tunes the top
n layers of a transformers text encoder (``hf-text:``, ``local:``, ``embedded:minilm-l6``): they
are copied into the adapter (the encoder itself stays frozen), the token states entering them are
computed once per caption, and the copies plus the encoder's mean pooling run in training. The
construction checks on a probe sentence that the copies reproduce the frozen encoder's embedding;
architectures whose layers need more than the hidden states and a padding mask are refused. With
``text_layers = 0`` (default) the text embeddings are cached once and training takes seconds.

A trained LiT is an image–text scorer: ``encode_image`` / ``encode_text`` give ``(N, D)``
L2-normalised embeddings in the joint space, ``similarity`` their cosines ``(N_img, N_txt)``,
``logit_scale`` the learned temperature. Zero-shot classification, retrieval and MAGIC's scorer
use these.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from nofree.adapters.base import Adapter, find_layers
from nofree.adapters.losses import contrastive_loss, sigmoid_loss
from nofree.core import SpecError, bound_text, l2_normalize

LOSSES = ("contrastive", "sigmoid")


def orthogonal_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A ``Linear(in_dim → out_dim)`` with (semi-)orthogonal weight and zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def text_states(text_encoder: Any, texts: Sequence[str], layer: int, *,
                batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Token states entering layer ``layer`` of a transformers text encoder, and the padding mask.

    Returns ``states`` ``(N, T, W)`` float32 (CPU, zero at padding) and ``mask`` ``(N, T)`` bool.
    """
    model, tokenizer = text_encoder.model, text_encoder.tokenizer
    accepted = inspect.signature(model.forward).parameters
    parts = []
    max_length = getattr(text_encoder, "max_length", 512)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = [bound_text(text, max_length) for text in texts[start:start + batch_size]]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            inputs = {k: v.to(text_encoder.device) for k, v in enc.items() if k in accepted}
            hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]
            mask = enc["attention_mask"].bool()
            parts.append((hidden.float().cpu() * mask.unsqueeze(-1), mask))
    width = max(p[0].shape[1] for p in parts)
    states = torch.zeros(len(texts), width, parts[0][0].shape[2])
    masks = torch.zeros(len(texts), width, dtype=torch.bool)
    row = 0
    for hidden, mask in parts:
        states[row:row + len(hidden), :hidden.shape[1]] = hidden
        masks[row:row + len(hidden), :hidden.shape[1]] = mask
        row += len(hidden)
    return states.clone(), masks


class TextTop(nn.Module):
    """Trainable copies of the top ``n`` layers of a frozen transformers text encoder, then its
    mean pooling: states ``(B, T, W)`` + mask ``(B, T)`` -> pooled ``(B, W)``."""

    def __init__(self, text_encoder: Any, n: int) -> None:
        super().__init__()
        model = getattr(text_encoder, "model", None)
        if not isinstance(model, nn.Module) or getattr(text_encoder, "tokenizer", None) is None:
            raise SpecError(f"text_layers > 0 needs a transformers text encoder (hf-text:, local:, "
                            f"embedded:minilm-l6); {text_encoder.spec!r} is not one: use text_layers=0")
        layers = find_layers(model)
        if not 0 < n <= len(layers):
            raise ValueError(f"text_layers must be in 1..{len(layers)} for {text_encoder.spec!r}, got {n}")
        self.start = len(layers) - n
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in layers[self.start:])
        for module in self.layers.modules():
            module.__dict__.pop("train", None)  # undo the frozen original's eval-forever train()
        self.layers.requires_grad_(True)
        object.__setattr__(self, "_config", model.config)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self._config, inputs_embeds=states,
                                              attention_mask=mask.long())
        hidden = states
        for layer in self.layers:
            out = layer(hidden, attention_mask=attention)
            hidden = out[0] if isinstance(out, tuple) else out
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def recall_at_1(similarity: Tensor, image_index: Tensor) -> tuple[float, float]:
    """Text→image and image→text R@1 of ``similarity`` ``(M images, N texts)``.

    ``image_index`` ``(N,)`` gives each text's image row. Image→text counts an image as right
    when its best text is any of its own.
    """
    image_index = image_index.to(similarity.device)
    t2i = (similarity.argmax(0) == image_index).float().mean().item()
    i2t = (image_index[similarity.argmax(1)] == torch.arange(similarity.shape[0],
                                                              device=similarity.device)).float().mean().item()
    return t2i, i2t


class LiT(Adapter):
    """Locked image tower + projection head on a frozen text encoder.

    ``image_encoder`` / ``text_encoder``: nofree encoders (widths Di, Dt). Hyperparameters:
    ``embed_dim`` D (default Di: the image space itself), ``hidden_dim`` (None: a linear head;
    else a two-layer GELU MLP), ``text_layers`` (top text-encoder layers to tune, default 0),
    ``loss`` ('contrastive' | 'sigmoid'), ``init_temperature``, ``init_bias`` (sigmoid loss only),
    ``max_temperature``. ``device`` (default CPU) is where the trainable parts run.
    """

    kind = "lit"
    backbone_roles = ("image_encoder", "text_encoder")
    feature_kind = "embed"
    uses_text_features = True
    config_limits = {"embed_dim": (1, 65536), "hidden_dim": (1, 65536), "text_layers": (0, 1024)}

    @classmethod
    def planned_parameters(cls, config: dict[str, Any], dims: dict[str, int]) -> int:
        image, text = dims.get("image_embed_dim", 0), dims.get("text_embed_dim", 0)
        embed, hidden = config["embed_dim"] or image, config["hidden_dim"]
        heads = text * embed if hidden is None else text * hidden + hidden * embed
        return heads + (0 if embed == image else image * embed)

    def __init__(self, image_encoder: Any, text_encoder: Any, *, embed_dim: int | None = None,
                 hidden_dim: int | None = None, text_layers: int = 0, loss: str = "contrastive",
                 init_temperature: float = 10.0, init_bias: float = -10.0,
                 max_temperature: float = 100.0, device: str | torch.device | None = None) -> None:
        super().__init__({"image_encoder": image_encoder, "text_encoder": text_encoder}, device)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not init_temperature > 0 or not max_temperature >= init_temperature:
            raise ValueError("need 0 < init_temperature <= max_temperature")
        image_dim, text_dim = int(image_encoder.embed_dim), int(text_encoder.embed_dim)
        self.embed_dim = int(embed_dim) if embed_dim is not None else image_dim
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self.loss_kind, self.text_layers = loss, int(text_layers)
        self.init_temperature, self.init_bias = float(init_temperature), float(init_bias)
        self.max_temperature = float(max_temperature)
        self.image_head = (nn.Identity() if self.embed_dim == image_dim
                           else orthogonal_linear(image_dim, self.embed_dim))
        if self.hidden_dim is None:
            self.text_head = orthogonal_linear(text_dim, self.embed_dim)
        else:
            self.text_head = nn.Sequential(orthogonal_linear(text_dim, self.hidden_dim), nn.GELU(),
                                           orthogonal_linear(self.hidden_dim, self.embed_dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.init_temperature)))
        if loss == "sigmoid":
            self.logit_bias = nn.Parameter(torch.tensor(self.init_bias))
        self.text_top = TextTop(text_encoder, self.text_layers) if self.text_layers else None
        self.to(self.device)
        if self.text_top is not None:
            self._check_text_top()

    def _check_text_top(self) -> None:
        probe = ["a photo of a dog on the beach", "two cats"]
        states, mask = text_states(self.text_encoder, probe, self.text_top.start)
        was_training = self.text_top.training
        self.text_top.eval()
        with torch.no_grad():
            pooled = l2_normalize(self.text_top(states.to(self.device), mask.to(self.device)).cpu())
        self.text_top.train(was_training)
        if not torch.allclose(pooled, self.text_encoder.encode(probe), atol=1e-4):
            raise SpecError(f"the top layers of {self.text_encoder.spec!r} cannot be run on their own "
                            "here (its layers need more than hidden states and a mask); use text_layers=0")

    @property
    def text_encoder(self) -> Any:
        return self._backbones["text_encoder"]

    def config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "hidden_dim": self.hidden_dim,
                "text_layers": self.text_layers, "loss": self.loss_kind,
                "init_temperature": self.init_temperature, "init_bias": self.init_bias,
                "max_temperature": self.max_temperature}

    def backbone_dims(self) -> dict[str, int]:
        return {"image_embed_dim": int(self.image_encoder.embed_dim),
                "text_embed_dim": int(self.text_encoder.embed_dim)}

    # --- the joint space ----------------------------------------------------------------------
    def temperature(self) -> Tensor:
        """The learned multiplier t of cosines (a scalar tensor, clamped at ``max_temperature``)."""
        return self.log_temperature.exp().clamp(max=self.max_temperature)

    @property
    def logit_scale(self) -> float:
        return float(self.temperature().detach())

    def project_image(self, image_emb: Tensor) -> Tensor:
        """Frozen image embeddings ``(N, Di)`` -> joint space ``(N, D)``, L2-normalised."""
        return l2_normalize(self.image_head(l2_normalize(image_emb.to(self.device))))

    def project_text(self, text_emb: Tensor, mask: Tensor | None = None) -> Tensor:
        """Frozen text features -> joint space ``(N, D)``, L2-normalised.

        ``text_emb``: pooled embeddings ``(N, Dt)``, or with ``text_layers`` the token states
        ``(N, T, Wt)`` entering the tuned layers together with ``mask`` ``(N, T)`` (see
        :meth:`text_inputs`).
        """
        text_emb = text_emb.to(self.device)
        if self.text_top is not None:
            if mask is None or text_emb.dim() != 3:
                raise ValueError("with text_layers > 0, project_text takes token states (N, T, W) "
                                 "and their mask; get them from text_inputs()")
            text_emb = self.text_top(text_emb, mask.to(self.device))
        return l2_normalize(self.text_head(l2_normalize(text_emb)))

    def text_inputs(self, texts: Sequence[str], *, cache: Any = None) -> tuple[Tensor, Tensor | None]:
        """Frozen text features of ``texts`` for :meth:`project_text`, computed once: pooled
        embeddings ``(N, Dt)`` (through ``cache``, an EmbeddingCache, when given) and ``None``, or
        with ``text_layers`` the token states ``(N, T, Wt)`` and mask ``(N, T)``."""
        if self.text_top is not None:
            return text_states(self.text_encoder, texts, self.text_top.start)
        if cache is not None:
            return cache.encode(self.text_encoder, list(texts), kind="embed"), None
        return self.text_encoder.encode(list(texts)), None

    @torch.no_grad()
    def encode_image(self, images: Sequence[Any], *, batch_size: int = 32) -> Tensor:
        """Joint-space embeddings ``(N, D)`` of PIL images (CPU float32)."""
        return self.project_image(self.image_encoder.encode(images, batch_size=batch_size)).cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 32) -> Tensor:
        """Joint-space embeddings ``(N, D)`` of texts (CPU float32)."""
        was_training = self.training
        self.eval()
        features, mask = self.text_inputs(texts)
        out = torch.cat([self.project_text(features[i:i + batch_size],
                                           None if mask is None else mask[i:i + batch_size]).cpu()
                         for i in range(0, len(texts), batch_size)]) if len(texts) else \
            torch.zeros(0, self.embed_dim)
        self.train(was_training)
        return out

    @staticmethod
    def similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosines ``(N_img, N_txt)`` of joint-space embeddings (``encode_image``/``encode_text``)."""
        return l2_normalize(image_emb) @ l2_normalize(text_emb.to(image_emb.device)).t()

    def scorer(self, *, temperature: float | None = None) -> Any:
        """This joint space as a MAGIC scorer: ``score(image_emb, texts)`` = t · cos, where
        ``image_emb`` are the frozen image encoder's embeddings ``(B, Di)`` and t the learned
        temperature (or ``temperature``)."""
        from nofree.decoding.scorers import CallableScorer

        scale = self.logit_scale if temperature is None else float(temperature)

        def score(image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
            with torch.no_grad():
                image = self.project_image(image_emb)                               # (B, D)
                text = self.encode_text([t for row in texts for t in row]).to(image.device)
                text = text.view(len(texts), len(texts[0]), -1)                    # (B, k, D)
                return scale * torch.einsum("bd,bkd->bk", image, text).cpu()

        return CallableScorer(score, embed_images=lambda images: self.image_encoder.encode(list(images)))

    # --- training -------------------------------------------------------------------------------
    def batch_loss(self, batch: Any) -> Tensor:
        image = self.project_image(batch.image_features)
        text = self.project_text(batch.text_features, batch.text_mask)
        ids = batch.image_ids.to(self.device)
        if self.loss_kind == "sigmoid":
            return sigmoid_loss(image, text, self.temperature(), self.logit_bias, image_ids=ids)
        return contrastive_loss(image, text, self.temperature(), image_ids=ids)

    @torch.no_grad()
    def evaluate(self, examples: Any, *, batch_size: int = 256) -> dict[str, float]:
        """Retrieval R@1 among the examples' images and texts: ``val_r1`` is the mean of both ways."""
        image = self.project_image(examples.image_features)
        mask = examples.text_mask
        text = torch.cat([self.project_text(examples.text_features[i:i + batch_size],
                                            None if mask is None else mask[i:i + batch_size])
                          for i in range(0, len(examples), batch_size)])
        t2i, i2t = recall_at_1(image @ text.t(), examples.image_index)
        return {"val_r1": 0.5 * (t2i + i2t), "val_r1_t2i": t2i, "val_r1_i2t": i2t}
