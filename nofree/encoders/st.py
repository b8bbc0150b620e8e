"""Frozen text encoders through sentence-transformers (Reimers & Gurevych 2019, "Sentence-BERT").

``st:NAME_OR_DIR[@revision]`` loads a sentence-transformers model (a hub name such as
``sentence-transformers/all-MiniLM-L6-v2`` or a folder it saved) and runs its own module
pipeline, as listed in the model's ``modules.json``: the transformer, then *its* pooling (mean,
CLS, max, last token, ...), any dense layers and its normalisation. ``hf-text:`` instead always
mean-pools the transformer's last hidden states, which differs for CLS- or last-token-pooled
models and drops any dense projection. A model whose card sets a default prompt (e.g. E5's
``"query: "``) gets that prompt in front of every text, as ``SentenceTransformer.encode`` does.

The embedding is the pipeline's ``sentence_embedding`` (L2-normalised by the encoder shell, as
every nofree embedding); tokens are the transformer's ``token_embeddings`` with its attention
mask. Remote code is never run (``trust_remote_code=False``): a model that needs custom modules
is refused with the loader's own message.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nofree.core import SpecError, resolve_device
from nofree.encoders.base import FrozenEncoder, require

__all__ = ["STTextEncoder", "load_st_text", "ST_PIP"]

ST_PIP = "'sentence-transformers>=3'"


class STTextEncoder(FrozenEncoder):
    """A frozen ``SentenceTransformer`` (``st:``); attributes ``model`` (the module pipeline) and
    ``prompt`` (text put before every input, '' for none)."""

    def __init__(self, model: Any, *, spec: str, device: str | torch.device | None = None) -> None:
        device = resolve_device(device)
        super().__init__(spec=spec, modality="text", module=model.to(device), device=device)
        self.model = self.module
        prompts = getattr(model, "prompts", None) or {}
        self.prompt = str(prompts.get(getattr(model, "default_prompt_name", None) or "", ""))
        self.max_text_tokens = int(getattr(model, "max_seq_length", None) or 512)
        self._probe_dims()

    def _forward(self, items: list) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The tokenised features (on the device) and the pipeline's output dict."""
        texts = [self.prompt + text for text in items] if self.prompt else items
        # `preprocess` in sentence-transformers 5+, `tokenize` before
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v
                    for k, v in prepare(texts).items()}
        return features, self.model(dict(features))

    def _embed(self, items: list) -> Tensor:
        return self._forward(items)[1]["sentence_embedding"]

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        features, out = self._forward(items)
        tokens = out.get("token_embeddings")
        if tokens is None or tokens.dim() != 3:
            raise NotImplementedError(f"{self.spec}: this model has no per-token states")
        mask = features.get("attention_mask", torch.ones(tokens.shape[:2], dtype=torch.long))
        return tokens, mask.to(tokens.device).bool()


def load_st_text(name: str, *, device: str | torch.device | None = None, spec: str | None = None,
                 revision: str | None = None) -> STTextEncoder:
    """A frozen sentence-transformers encoder from a hub name or a saved folder."""
    spec = spec or f"st:{name}"
    st = require("sentence_transformers", ST_PIP, what=spec)
    device = resolve_device(device)
    try:
        model = st.SentenceTransformer(name, device=str(device), revision=revision,
                                       trust_remote_code=False)
    except pickle.UnpicklingError:
        from nofree.encoders.hf import pickle_refused

        raise pickle_refused(spec, name) from None
    except (OSError, ValueError, KeyError) as err:
        where = "folder" if Path(name).exists() else "hub name (needs internet, or a cached copy)"
        raise SpecError(f"{spec}: sentence-transformers could not load {name!r} as a {where}: "
                        f"{err}") from err
    if any(type(module).__name__ == "CLIPModel" for module in model):
        raise SpecError(f"{spec} is a two-tower image-text model: load it as 'hf-clip:{name}' "
                        "with modality='image' or 'text'")
    return STTextEncoder(model, spec=spec, device=device)
