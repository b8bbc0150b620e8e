"""MAGIC on a plain transformers causal LM: one call, or ``model.generate(custom_generate=...)``.

:func:`nofree.decoding.magic.magic_search` runs on any :class:`nofree.core.LanguageModel`; these
two wrap a transformers model and its tokenizer as one (:class:`nofree.lm.hf.HFLanguageModel`,
frozen in place, on its own device) for callers who hold such a model rather than a nofree spec.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from nofree.decoding.magic import magic_search
from nofree.decoding.scorers import as_scorer
from nofree.lm.hf import HFLanguageModel

__all__ = ["magic_custom_generate", "magic_generate"]


def magic_custom_generate(tokenizer: Any, scorer: Any, image_emb: Tensor | None,
                          **magic_kw: Any) -> Callable[..., Tensor]:
    """A callable for ``model.generate(input_ids, custom_generate=...)`` that runs MAGIC.

    ``magic_kw`` are :func:`magic_search` options (k, alpha, beta, stop_at_period). The callable
    returns ``(B, T + n)`` long: the (left-padded) input ids followed by each row's generated
    ids, right-padded with the pad id. transformers' logits processors and stopping criteria
    are not applied (MAGIC scores candidates itself); ``max_new_tokens`` comes from the
    generation config.
    """

    def generate(model: Any, input_ids: Tensor, logits_processor: Any = None,
                 stopping_criteria: Any = None, generation_config: Any = None,
                 **model_kwargs: Any) -> Tensor:
        attention_mask = model_kwargs.get("attention_mask")
        lm = HFLanguageModel(model, tokenizer, spec=f"hf-lm:{model.config.name_or_path}",
                             device=model.device)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
        new = getattr(generation_config, "max_new_tokens", None) or max(
            1, int(generation_config.max_length) - input_ids.shape[1])
        result = magic_search(lm, scorer, image_emb, prompt_ids=prompts, max_new_tokens=new,
                              trace=False, **magic_kw)
        width = max(len(ids) for ids in result.ids)
        tail = torch.full((len(prompts), width), lm.pad_id, dtype=torch.long)
        for row, ids in enumerate(result.ids):
            tail[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return torch.cat([input_ids.cpu(), tail], 1).to(input_ids.device)

    return generate


def magic_generate(model: Any, tokenizer: Any, images: Sequence[Any], scorer: Any, *,
                   prompt: str = "A picture of", **magic_kw: Any) -> list[str]:
    """Caption ``images`` with a transformers causal LM and a scorer: one text per image.

    ``magic_kw`` are :func:`magic_search` options. The model is frozen in place (as every LM in
    nofree) and stays on its device.
    """
    lm = HFLanguageModel(model, tokenizer, spec=f"hf-lm:{model.config.name_or_path}",
                         device=model.device)
    scorer = as_scorer(scorer)
    image_emb = scorer.embed_images(list(images))
    prompts = lm.tokenize([prompt] * len(images))
    return magic_search(lm, scorer, image_emb, prompt_ids=prompts, trace=False, **magic_kw).texts
