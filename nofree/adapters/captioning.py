"""Captioning adapters: a frozen causal LM conditioned on an image writes its caption.

:class:`CaptioningAdapter` is what ClipCap and the Flamingo-style adapter share on top of
:class:`nofree.adapters.base.Adapter`: caption tokenisation, the teacher-forced loss, batched
greedy and beam-search decoding with the LM's KV cache. :class:`AdapterCaptioner` is the
:class:`nofree.core.Captioner` of a trained captioning adapter (its captions are tidied with
:func:`nofree.core.clean_caption`, like the other captioners').
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from nofree.adapters.base import Adapter
from nofree.adapters.losses import IGNORE_INDEX, next_token_loss
from nofree.core import DataError, LMStep, SpecError, clean_caption, resolve_device


def lm_device(lm: Any, device: str | torch.device | None) -> torch.device:
    """The device of an LM adapter: the LM's, which ``device`` (if given) must name."""
    lm_dev = torch.device(getattr(lm, "device", "cpu"))
    if device is not None and resolve_device(device) != lm_dev:
        raise SpecError(f"device={device!r} but the LM {lm.spec!r} is on {lm_dev}; load the LM "
                        f"on the same device (load_lm(spec, device=...))")
    return lm_dev


def greedy_decode(start: LMStep, step: Callable[[Tensor, Any], LMStep], *, stop_ids: set[int],
                  pad_id: int, max_tokens: int) -> list[list[int]]:
    """Batched greedy decoding from the first step's logits ``(B, V)``; stop tokens are kept."""
    logits, cache = start.logits, start.cache
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(logits.shape[0])]
    for t in range(max_tokens):
        token = logits.argmax(-1).cpu()
        for row in torch.nonzero(~done).flatten().tolist():
            out[row].append(int(token[row]))
            done[row] = int(token[row]) in stop_ids
        if bool(done.all()) or t == max_tokens - 1:
            break
        token = torch.where(done, torch.full_like(token, pad_id), token)
        nxt = step(token[:, None], cache)
        logits, cache = nxt.logits, nxt.cache
    return out


def beam_decode(start: LMStep, step: Callable[[Tensor, Any], LMStep],
                select: Callable[[Any, Tensor], Any], *, beams: int, stop_ids: set[int],
                max_tokens: int) -> list[list[int]]:
    """Batched beam search; the best hypothesis per row by mean token log-probability.

    ``select(cache, index)`` re-indexes the cache (and any per-row media state) to rows
    ``index`` ``(B·beams,)``. A hypothesis ends at a stop token (kept) or after ``max_tokens``.
    """
    logp = start.logits.float().log_softmax(-1)                         # (B, V)
    batch, vocab = logp.shape
    k = min(beams, vocab)
    scores, tokens = logp.topk(k, dim=-1)                               # (B, k)
    scores, seqs = scores.reshape(-1).cpu(), tokens.reshape(-1, 1).cpu()
    rows = torch.arange(batch).repeat_interleave(k)
    cache = select(start.cache, rows.to(start.logits.device))
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]

    def retire(index: int) -> None:
        seq = seqs[index].tolist()
        finished[index // k].append((float(scores[index]) / len(seq), seq))
        scores[index] = float("-inf")

    for t in range(1, max_tokens + 1):
        for index in range(batch * k):
            if scores[index] > float("-inf") and (int(seqs[index, -1]) in stop_ids or t == max_tokens):
                retire(index)
        if t == max_tokens or all(len(f) >= k for f in finished) or bool(torch.isinf(scores).all()):
            break
        nxt = step(seqs[:, -1:].to(start.logits.device), cache)
        cand = scores[:, None] + nxt.logits.float().log_softmax(-1).cpu()  # (B·k, V)
        top, flat = cand.view(batch, k * vocab).topk(k, dim=-1)            # (B, k)
        src = (torch.arange(batch)[:, None] * k + flat // vocab).reshape(-1)
        scores = top.reshape(-1).clone()
        seqs = torch.cat([seqs[src], (flat % vocab).reshape(-1, 1)], dim=1)
        cache = select(nxt.cache, src.to(start.logits.device))
    return [max(f, key=lambda item: item[0])[1] if f else [] for f in finished]


class CaptioningAdapter(Adapter):
    """An adapter that makes a frozen causal LM write captions of images.

    Subclasses implement ``start_step(features) -> LMStep`` (the first, grad-free LM step that
    conditions on the image) and may override ``media(features)`` (a context active during the
    whole decode) and ``select_media(index)`` (re-index per-row media state for beam search).
    """

    backbone_roles = ("image_encoder", "lm")
    bucket_by_length = True

    def __init__(self, image_encoder: Any, lm: Any, *, max_caption_tokens: int,
                 device: str | torch.device | None) -> None:
        super().__init__({"image_encoder": image_encoder, "lm": lm}, lm_device(lm, device))
        if int(max_caption_tokens) < 1:
            raise ValueError(f"max_caption_tokens must be >= 1, got {max_caption_tokens!r}")
        self.max_caption_tokens = int(max_caption_tokens)

    @property
    def lm(self) -> Any:
        return self._backbones["lm"]

    def caption_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption (no special tokens), cut to ``max_caption_tokens``."""
        ids = self.lm.tokenize(list(texts))
        for text, row in zip(texts, ids):
            if not row:
                raise DataError(f"empty caption {text!r}: every training caption needs some text")
        return [row[: self.max_caption_tokens] for row in ids]

    def stop_ids(self, *, stop_at_period: bool = True) -> set[int]:
        """eos, plus the single-token spellings of '.' when ``stop_at_period``."""
        stops = {int(self.lm.eos_id)}
        if stop_at_period:
            for text in (".", " ."):
                ids = self.lm.tokenize([text])[0]
                if len(ids) == 1:
                    stops.add(int(ids[0]))
        return stops

    def caption_logits(self, features: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits ``(B, T, V)`` and aligned labels ``(B, T)`` (``-100`` ignored)."""
        raise NotImplementedError

    def batch_loss(self, batch: Any) -> Tensor:
        """Mean next-token cross-entropy over the caption tokens (and eos) of a batch."""
        logits, labels = self.caption_logits(batch.image_features, batch.texts)
        return next_token_loss(logits, labels)

    @torch.no_grad()
    def evaluate(self, examples: Any, *, batch_size: int = 32) -> dict[str, float]:
        """``{'val_loss': mean cross-entropy per caption token}`` over ``examples``."""
        total, count = 0.0, 0
        by_length = torch.tensor(sorted(range(len(examples)), key=lambda i: len(examples.texts[i])),
                                 dtype=torch.long)  # similar lengths share a batch: less padding
        for batch in examples.batches(batch_size, device=self.device, order=by_length):
            logits, labels = self.caption_logits(batch.image_features, batch.texts)
            total += float(next_token_loss(logits, labels, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
        return {"val_loss": total / max(count, 1)}

    def start_step(self, features: Tensor) -> LMStep:
        """The first LM step conditioned on image ``features`` (called under no_grad)."""
        raise NotImplementedError

    def media(self, features: Tensor) -> Any:
        return nullcontext()

    def select_media(self, index: Tensor) -> None:
        return None

    @torch.no_grad()
    def generate(self, features: Tensor, *, beams: int = 1, max_tokens: int = 30,
                 stop_at_period: bool = True) -> list[list[int]]:
        """Token ids of one caption per feature row ``(B, ...)`` (greedy when ``beams == 1``)."""
        if beams < 1 or max_tokens < 1:
            raise ValueError("beams and max_tokens must be >= 1")
        was_training = self.training
        self.eval()
        features = features.to(self.device, torch.float32)
        stops = self.stop_ids(stop_at_period=stop_at_period)
        lm = self.lm
        try:
            with self.media(features):
                start = self.start_step(features)
                step = lambda ids, cache: lm.step(ids, cache=cache)  # noqa: E731
                if beams == 1:
                    return greedy_decode(start, step, stop_ids=stops, pad_id=lm.pad_id,
                                         max_tokens=max_tokens)

                def select(cache: Any, index: Tensor) -> Any:
                    self.select_media(index)
                    return lm.select_cache(cache, index)

                return beam_decode(start, step, select, beams=beams, stop_ids=stops,
                                   max_tokens=max_tokens)
        finally:
            self.train(was_training)

    def caption_features(self, features: Tensor, **kw: Any) -> list[str]:
        """Captions of precomputed image features (whitespace runs, newlines included, become one
        space); keyword arguments as in :meth:`generate`."""
        eos = int(self.lm.eos_id)
        ids = self.generate(features, **kw)
        texts = self.lm.decode([[t for t in row if t != eos] for row in ids])
        return [" ".join(text.split()) for text in texts]


class AdapterCaptioner:
    """:class:`nofree.core.Captioner` of a trained ClipCap or Flamingo-style adapter.

    ``image_encoder`` defaults to the adapter's own and must carry the spec it was trained with.
    ``caption(images)`` takes PIL images or image paths and returns one string per image, tidied
    by :func:`nofree.core.clean_caption` (first line, no leading bullet or quotes, capitalised).
    """

    def __init__(self, adapter: CaptioningAdapter, image_encoder: Any = None, *, beams: int = 1,
                 max_tokens: int = 30, batch_size: int = 16, stop_at_period: bool = True) -> None:
        if not isinstance(adapter, CaptioningAdapter):
            raise TypeError(f"AdapterCaptioner needs a captioning adapter (ClipCap, Flamingo), "
                            f"got {type(adapter).__name__}")
        if image_encoder is not None and image_encoder.spec != adapter.image_encoder.spec:
            raise SpecError(f"the adapter was trained on {adapter.image_encoder.spec!r} features, "
                            f"but image_encoder is {image_encoder.spec!r}")
        self.adapter = adapter
        self.image_encoder = image_encoder or adapter.image_encoder
        self.options = {"beams": beams, "max_tokens": max_tokens, "stop_at_period": stop_at_period}
        self.batch_size = batch_size

    def caption(self, images: Sequence[Any], **kw: Any) -> list[str]:
        """One caption per image; ``beams``, ``max_tokens``, ``stop_at_period`` override defaults."""
        options = {**self.options, **kw}
        loaded = [_as_image(image) for image in images]
        captions: list[str] = []
        for start in range(0, len(loaded), self.batch_size):
            chunk = loaded[start:start + self.batch_size]
            if self.adapter.feature_kind == "tokens":
                features = self.image_encoder.encode_tokens(chunk)
            else:
                features = self.image_encoder.encode(chunk)
            captions += [clean_caption(text) for text in self.adapter.caption_features(features, **options)]
        return captions


def _as_image(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        from nofree.data.images import load_image

        return load_image(image)
    return image
