"""Frozen encoders from transformers: vision models, text models and CLIP-like pairs.

- ``hf-vision:NAME`` -- ``AutoModel`` + ``AutoImageProcessor``. The embedding is the model's
  ``pooler_output`` when its pooler was loaded from the checkpoint (DINOv2, CLIP vision, Swin,
  ResNet, ...), else the first token (ViT's CLS after the final norm) or, for conv nets, the
  spatial mean. Tokens are ``last_hidden_state`` as the model returns it (ViT-like: all
  tokens, CLS included; conv nets: the ``(C, H, W)`` map flattened to ``(H*W, C)``).
- ``hf-text:NAME`` -- ``AutoModel`` + ``AutoTokenizer``; mean of the last hidden states over the
  attention mask (the sentence-transformers recipe, Reimers & Gurevych 2019); tokens are the
  last hidden states with that mask.
- ``hf-clip:NAME`` -- a two-tower model with ``get_image_features``/``get_text_features`` (CLIP,
  Radford et al. 2021; SigLIP works too). Each tower is its own encoder over one shared
  model; both expose ``logit_scale`` (the exp'd multiplier), ``model``, ``tokenizer`` and
  ``processor`` for scorers. Tokens are the towers' ``last_hidden_state`` (before projection).

A ``@TAG`` in the spec is passed as the hub ``revision``. Weights load as float32 from
safetensors or, where a repository has only a ``.bin``, through transformers' own guarded loader.
"""
from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nofree.core import SpecError, resolve_device
from nofree.encoders.base import FrozenEncoder, mean_pool, require

__all__ = ["HFVisionEncoder", "HFTextEncoder", "HFClipTower", "load_hf_vision", "load_hf_text",
           "load_hf_clip", "pool_vision_output"]

_TRANSFORMERS_PIP = "'transformers>=5'"


def _transformers(what: str) -> Any:
    return require("transformers", _TRANSFORMERS_PIP, what=what)


def _from_pretrained(factory: Any, name: str, spec: str, **kwargs: Any) -> Any:
    """``factory.from_pretrained(name, **kwargs)`` with hub/folder failures turned into SpecError."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return factory.from_pretrained(name, **kwargs)
    except pickle.UnpicklingError:
        raise pickle_refused(spec, name) from None
    except (OSError, ValueError, KeyError) as err:
        where = "folder" if Path(name).exists() else "hub name (needs internet, or a cached copy)"
        raise SpecError(f"{spec}: could not load {getattr(factory, '__name__', factory)} from "
                        f"{name!r} as a {where}: {' '.join(str(err).split())}") from err  # one line


def pickle_refused(spec: str, name: str) -> SpecError:
    """The error for a pickle checkpoint (the file ``name``, or one in the folder ``name``) that
    holds more than tensors, so ``torch.load(weights_only=True)`` refused it: nofree never
    unpickles objects, since that can run code."""
    folder = Path(name)
    if folder.is_file():  # a checkpoint file given directly
        file, folder = folder, folder.parent
    else:
        found = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")) \
            if folder.is_dir() else []
        file = folder / found[0] if found else folder / "pytorch_model.bin"
    return SpecError(
        f"{spec}: {file} is a pickle checkpoint holding more than tensors; nofree reads only "
        "safetensors or tensor-only PyTorch files and never unpickles objects (that can run code). "
        "If you trust the file, convert it to safetensors once: python -c \"import torch; from "
        f"safetensors.torch import save_file; sd = torch.load('{file}', weights_only=False); "
        "save_file({k: v.clone().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"'{folder / 'model.safetensors'}')\" and move the pickle out of the folder")


def _text_max_length(tokenizer: Any, config: Any, cap: int = 512) -> int:
    """The longest input the model takes: min of the tokenizer's limit, positions and ``cap``."""
    limits = [cap, getattr(tokenizer, "model_max_length", cap) or cap]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    return int(min(limits))


def pool_vision_output(output: Any, use_pooler: bool) -> Tensor:
    """Pooled image features ``(n, D)`` from a transformers vision output (see module docstring)."""
    pooled = getattr(output, "pooler_output", None) if use_pooler else None
    if pooled is None:
        hidden = output.last_hidden_state
        pooled = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden[:, 0]
    return pooled.flatten(1)


def _pixels(processor: Any, images: list, device: torch.device) -> Tensor:
    """``(n, 3, H, W)`` float32 pixel values prepared by a transformers image processor."""
    batch = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return batch["pixel_values"].to(device=device, dtype=torch.float32)


class HFVisionEncoder(FrozenEncoder):
    """A frozen transformers vision model (``hf-vision:``, ``local:``).

    Attributes ``model``, ``processor`` and ``use_pooler`` (see :func:`pool_vision_output`).
    """

    def __init__(self, model: Any, processor: Any, *, spec: str, use_pooler: bool = True,
                 device: str | torch.device | None = None) -> None:
        device = resolve_device(device)
        super().__init__(spec=spec, modality="image", module=model.to(device), device=device)
        self.model, self.processor, self.use_pooler = self.module, processor, use_pooler
        self._probe_dims()

    def _embed(self, items: list) -> Tensor:
        return pool_vision_output(self.model(pixel_values=_pixels(self.processor, items, self.device)),
                                  self.use_pooler)

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        hidden = self.model(pixel_values=_pixels(self.processor, items, self.device)).last_hidden_state
        if hidden.dim() == 4:  # conv net: (n, C, H, W) -> (n, H*W, C)
            hidden = hidden.flatten(2).transpose(1, 2)
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool)


class HFTextEncoder(FrozenEncoder):
    """A frozen transformers text model, mean-pooled over the mask (``hf-text:``, ``local:``,
    ``embedded:minilm-l6``). Inputs longer than ``max_length`` tokens are truncated."""

    def __init__(self, model: Any, tokenizer: Any, *, spec: str, max_length: int | None = None,
                 device: str | torch.device | None = None) -> None:
        device = resolve_device(device)
        super().__init__(spec=spec, modality="text", module=model.to(device), device=device,
                         embed_dim=model.config.hidden_size, token_dim=model.config.hidden_size)
        self.model, self.tokenizer = self.module, tokenizer
        if tokenizer.pad_token is None:  # decoder-style tokenizers: pad with eos, masked anyway
            if tokenizer.eos_token is None:
                raise SpecError(f"{spec}: the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.max_length = int(max_length or _text_max_length(tokenizer, model.config))
        self.max_text_tokens = self.max_length
        accepted = inspect.signature(self.model.forward).parameters
        self._input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                             if n in accepted]

    def _hidden(self, items: list) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        inputs = {k: enc[k].to(self.device) for k in self._input_names if k in enc}
        hidden = self.model(**inputs).last_hidden_state
        return hidden, enc["attention_mask"].to(hidden.device).bool()

    def _embed(self, items: list) -> Tensor:
        return mean_pool(*self._hidden(items))

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        return self._hidden(items)


class HFClipTower(FrozenEncoder):
    """One tower of a transformers CLIP-like model (``hf-clip:``, ``local:`` on a CLIP folder).

    ``model`` is the whole two-tower model (shared with the other tower), ``tokenizer`` and
    ``processor`` its preprocessors, ``logit_scale`` the cosine multiplier (exp'd), ``logit_bias``
    the SigLIP bias or None.
    """

    def __init__(self, model: Any, *, modality: str, tokenizer: Any, processor: Any, spec: str,
                 device: str | torch.device | None = None) -> None:
        device = resolve_device(device)
        super().__init__(spec=spec, modality=modality, module=model.to(device), device=device)
        self.model, self.tokenizer, self.processor = self.module, tokenizer, processor
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = float(bias.detach()) if bias is not None else None
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        self.max_length = _text_max_length(tokenizer, text_config)
        self.max_text_tokens = self.max_length
        # SigLIP was trained on texts padded to a fixed length; CLIP masks padding
        self._padding: Any = "max_length" if "siglip" in str(config.model_type) else True
        self._probe_dims()

    def _text_inputs(self, items: list) -> dict[str, Tensor]:
        enc = self.tokenizer(items, padding=self._padding, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask") if k in enc}

    def _embed(self, items: list) -> Tensor:
        if self.modality == "image":
            out = self.model.get_image_features(pixel_values=_pixels(self.processor, items, self.device))
        else:
            out = self.model.get_text_features(**self._text_inputs(items))
        return out if isinstance(out, Tensor) else out.pooler_output

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        if self.modality == "image":
            hidden = self.model.vision_model(
                pixel_values=_pixels(self.processor, items, self.device)).last_hidden_state
            return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool)
        inputs = self._text_inputs(items)
        hidden = self.model.text_model(**inputs).last_hidden_state
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2], dtype=torch.long))
        return hidden, mask.bool()


# --- loaders ---------------------------------------------------------------------------------

def _refuse_two_tower(model: Any, spec: str) -> None:
    """A CLIP-like checkpoint given to a single-tower backend: say which spec to use instead."""
    if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
        _, name = spec.split(":", 1)
        raise SpecError(f"{spec} is a two-tower image-text model: load it as 'hf-clip:{name}' "
                        "with modality='image' or 'text'")


def load_hf_vision(name: str, *, device: str | torch.device | None = None, spec: str | None = None,
                   revision: str | None = None) -> HFVisionEncoder:
    """A frozen ``AutoModel`` vision encoder from a hub name or a local folder."""
    spec = spec or f"hf-vision:{name}"
    tf = _transformers(spec)
    model, info = _from_pretrained(tf.AutoModel, name, spec, revision=revision, dtype=torch.float32,
                                   output_loading_info=True)
    processor = _from_pretrained(tf.AutoImageProcessor, name, spec, revision=revision)
    _refuse_two_tower(model, spec)
    missing = [str(k) for k in info.get("missing_keys", ())]
    use_pooler = not any(k.split(".")[0] == "pooler" or ".pooler." in k for k in missing)
    return HFVisionEncoder(model, processor, spec=spec, use_pooler=use_pooler, device=device)


def load_hf_text(name: str, *, device: str | torch.device | None = None, spec: str | None = None,
                 revision: str | None = None, max_length: int | None = None) -> HFTextEncoder:
    """A frozen ``AutoModel`` text encoder (mean-pooled) from a hub name or a local folder."""
    spec = spec or f"hf-text:{name}"
    tf = _transformers(spec)
    tokenizer = _from_pretrained(tf.AutoTokenizer, name, spec, revision=revision)
    model = _from_pretrained(tf.AutoModel, name, spec, revision=revision, dtype=torch.float32)
    _refuse_two_tower(model, spec)
    return HFTextEncoder(model, tokenizer, spec=spec, max_length=max_length, device=device)


def load_hf_clip(name: str, *, device: str | torch.device | None = None, spec: str | None = None,
                 revision: str | None = None) -> dict[str, HFClipTower]:
    """Both towers of a CLIP-like model: ``{"image": HFClipTower, "text": HFClipTower}``."""
    spec = spec or f"hf-clip:{name}"
    tf = _transformers(spec)
    model = _from_pretrained(tf.AutoModel, name, spec, revision=revision, dtype=torch.float32)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise SpecError(f"{spec}: {type(model).__name__} is not a two-tower image-text model; "
                        "use hf-vision: or hf-text: for a single tower")
    tokenizer = _from_pretrained(tf.AutoTokenizer, name, spec, revision=revision)
    processor = _from_pretrained(tf.AutoImageProcessor, name, spec, revision=revision)
    return {m: HFClipTower(model, modality=m, tokenizer=tokenizer, processor=processor, spec=spec,
                           device=device) for m in ("image", "text")}
