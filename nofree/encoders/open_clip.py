"""Frozen CLIP towers from open_clip (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"; Cherti et al. 2023, "Reproducible scaling laws for
contrastive language-image learning").

Spec grammar, ``open_clip:MODEL@PRETRAINED``:

- ``open_clip:ViT-B-32@laion2b_s34b_b79k`` -- a built-in architecture and a pretrained tag
  (``open_clip.list_pretrained()``), or a checkpoint file path after the ``@``;
- ``open_clip:ViT-B-32@random`` -- the architecture with random weights drawn from seed 0, so
  the spec rebuilds the same model (tests, smoke runs); a built-in name without a tag is
  refused so random weights are never loaded by accident;
- ``open_clip:local-dir:/path`` -- a folder with ``open_clip_config.json`` and weights (what
  ``local:/path`` resolves to for such a folder); ``open_clip:hf-hub:org/repo`` -- a hub repo.

Each tower is its own encoder (pick one with ``modality=``); both share one model and expose
``model``, ``tokenizer``, ``preprocess`` and ``logit_scale`` (the exp'd cosine multiplier).
Tokens: image -- the patch grid of the last block after the final norm (class token dropped),
``(n, h*w, W)``; text -- the last block's states after the final norm, trimmed to the longest
text in the chunk with padding masked out.
"""
from __future__ import annotations

import logging
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from nofree.core import SpecError, resolve_device
from nofree.encoders.base import FrozenEncoder, require

__all__ = ["OpenClipTower", "load_open_clip", "RANDOM_TAG"]

#: the tag that asks for randomly initialised weights
RANDOM_TAG = "random"


class OpenClipTower(FrozenEncoder):
    """One tower (``modality`` 'image' or 'text') of an open_clip model."""

    def __init__(self, model: Any, *, modality: str, preprocess: Any, tokenizer: Any, spec: str,
                 device: str | torch.device | None = None) -> None:
        device = resolve_device(device)
        super().__init__(spec=spec, modality=modality, module=model.to(device), device=device)
        self.model, self.preprocess, self.tokenizer = self.module, preprocess, tokenizer
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = float(bias.detach()) if bias is not None else None
        inner = getattr(tokenizer, "tokenizer", None)  # HF-backed open_clip tokenizers
        pad = getattr(inner, "pad_token_id", None) if inner is not None else None
        self.pad_id = int(pad) if pad is not None else 0  # SimpleTokenizer pads with 0
        self.max_text_tokens = int(getattr(tokenizer, "context_length", 77) or 77)
        self._probe_dims()

    def _images(self, items: list) -> Tensor:
        """``(n, 3, S, S)`` float32 after the model's own eval transform."""
        return torch.stack([self.preprocess(im.convert("RGB")) for im in items]).to(self.device)

    def _ids(self, items: list) -> Tensor:
        """``(n, context_length)`` long token ids."""
        return self.tokenizer(items).to(self.device)

    def _intermediates(self, **kwargs: Any) -> dict:
        """open_clip's ``forward_intermediates`` (last block, final norm applied)."""
        try:
            return self.model.forward_intermediates(normalize_intermediates=True,
                                                    intermediates_only=True, **kwargs)
        except (AttributeError, NotImplementedError, AssertionError) as err:
            raise NotImplementedError(f"{self.spec}: this open_clip {self.modality} tower does not "
                                      f"expose token states ({err})") from err

    def _embed(self, items: list) -> Tensor:
        if self.modality == "image":
            return self.model.encode_image(self._images(items))
        return self.model.encode_text(self._ids(items))

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        if self.modality == "image":
            out = self._intermediates(image=self._images(items), image_indices=1,
                                      image_output_fmt="NCHW")
            grid = out["image_intermediates"][-1]  # (n, W, h, w)
            tokens = grid.flatten(2).transpose(1, 2)
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)
        ids = self._ids(items)
        states = self._intermediates(text=ids, text_indices=1)["text_intermediates"][-1]  # (n, L, W)
        mask = ids != self.pad_id
        length = max(int(mask.sum(1).max()), 1)
        return states[:, :length], mask[:, :length]


class _RaisedAnyway(logging.Filter):
    """Drops the error records open_clip's files (under ``package``) log on the root logger: each
    comes right before an exception, which :func:`load_open_clip` turns into a SpecError with the
    same message, so the user reads it once."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.package = package

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.pathname.startswith(self.package))


@contextmanager
def _quiet_open_clip_errors(open_clip: Any) -> Iterator[None]:
    root, quiet = logging.getLogger(), _RaisedAnyway(str(Path(open_clip.__file__).parent))
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_open_clip(name: str, tag: str | None, *, device: str | torch.device | None = None,
                   spec: str | None = None) -> dict[str, OpenClipTower]:
    """Both towers of an open_clip model: ``{"image": OpenClipTower, "text": OpenClipTower}``.

    ``name``/``tag`` follow the grammar in the module docstring.
    """
    spec = spec or (f"open_clip:{name}@{tag}" if tag else f"open_clip:{name}")
    open_clip = require("open_clip", "open_clip_torch", what=spec)
    has_schema = name.startswith(("local-dir:", "hf-hub:"))
    if has_schema and tag:
        raise SpecError(f"{spec}: '{name.split(':')[0]}:' models carry their own weights; drop '@{tag}'")
    if not has_schema:
        known = open_clip.list_models()
        if name not in known:
            raise SpecError(f"{spec}: unknown open_clip architecture {name!r}; known ones include "
                            f"{', '.join(known[:12])}, ... (open_clip.list_models())")
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(name)
            example = tags[0] if tags else "TAG"
            raise SpecError(f"{spec}: name the weights, e.g. open_clip:{name}@{example} "
                            f"(tags: {', '.join(tags) or 'none'}), or open_clip:{name}@{RANDOM_TAG} "
                            "for random weights")
        if tag != RANDOM_TAG and not open_clip.get_pretrained_cfg(name, tag) and not Path(tag).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise SpecError(f"{spec}: {tag!r} is neither a pretrained tag of {name} nor a checkpoint "
                            f"file; tags: {', '.join(tags) or 'none'} (or {RANDOM_TAG} for random weights)")
    pretrained = None if tag == RANDOM_TAG else tag
    try:
        # "@random" weights are the same on every load
        with torch.random.fork_rng(devices=[]), _quiet_open_clip_errors(open_clip):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=str(resolve_device(device)))
        tokenizer = open_clip.get_tokenizer(name)
    except pickle.UnpicklingError:
        from nofree.encoders.hf import pickle_refused

        raise pickle_refused(spec, tag if tag and tag != RANDOM_TAG else name.removeprefix("local-dir:")) \
            from None
    except (RuntimeError, OSError, ValueError) as err:
        raise SpecError(f"{spec}: open_clip could not build the model ({err}). Pretrained tags "
                        "download from the hub: they need internet or a cached copy") from err
    return {m: OpenClipTower(model, modality=m, preprocess=preprocess, tokenizer=tokenizer,
                             spec=spec, device=device) for m in ("image", "text")}
