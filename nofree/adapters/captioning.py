"""Captioning adapters: a frozen causal LM conditioned on an image writes its caption.

:class:`CaptioningAdapter` is what ClipCap and the Flamingo-style adapter share on top of
:class:`nofree.adapters.base.Adapter`: caption tokenisation, the teacher-forced loss, batched
decoding through transformers' ``generate`` (greedy or beam search, with repetition controls).
:class:`AdapterCaptioner` is the :class:`nofree.core.Captioner` of a trained captioning adapter
(its captions are tidied with :func:`nofree.core.clean_caption`, like the other captioners').
"""
from __future__ import annotations

import functools
import re

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.adapters.base import Adapter
from nofree.adapters.losses import IGNORE_INDEX, next_token_loss
from nofree.core import DataError, Option, OptionError, SpecError, clean_caption, resolve_device
from nofree.decoding.stopping import end_caption


def lm_device(lm: Any, device: str | torch.device | None) -> torch.device:
    """The device of an LM adapter: the LM's, which ``device`` (if given) must name."""
    lm_dev = torch.device(getattr(lm, "device", "cpu"))
    if device is not None and resolve_device(device) != lm_dev:
        raise SpecError(f"device={device!r} but the LM {lm.spec!r} is on {lm_dev}; load the LM "
                        f"on the same device (load_lm(spec, device=...))")
    return lm_dev


_ALNUM = re.compile(r"[^\W_]")  # a letter or digit


def word_ids(tokenizer: Any, size: int) -> Tensor:
    """``(size,)`` long: for each token id, an id of its text lower-cased without surrounding spaces,
    so that ``"A"`` and ``" a"`` (or ``" Plate"`` and ``" plate"``) count as the same word; -1 for
    a token without a letter or digit (``"-"``, ``","``), which is not a word, so that
    "black-and-white" repeats "black and white" as :mod:`nofree.eval.degeneration` counts words;
    ids beyond the tokenizer's vocabulary keep their own."""
    texts = tokenizer.batch_decode([[i] for i in range(min(size, len(tokenizer)))])
    first: dict[str, int] = {}
    canon = torch.arange(size)
    for i, text in enumerate(texts):
        canon[i] = first.setdefault(text.strip().lower(), i) if _ALNUM.search(text) else -1
    return canon


class NoRepeatWordNGram:
    """A transformers logits processor: no word ``n``-gram twice in the generated tokens.

    transformers' ``no_repeat_ngram_size`` compares raw token ids over the whole sequence, prompt
    included, so it lets "A plate of food with a plate of fries" through ("A" and " a" are other
    ids) and would forbid a SmallCap caption from reusing a phrase of its retrieved examples. Here
    tokens compare through :func:`word_ids`, tokens that are not words are skipped, and only
    positions from ``start`` (the prompt's length) on count.
    """

    def __init__(self, n: int, start: int, canon: Tensor) -> None:
        self.n, self.start, self.canon = int(n), int(start), canon

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        words = self.canon[input_ids[:, self.start:].cpu()]                # (B, T)
        if words.shape[1] < self.n - 1:
            return scores
        canon = self.canon.to(scores.device)
        for row, tokens in enumerate(words.tolist()):
            seq = [word for word in tokens if word >= 0]
            prefix = seq[len(seq) - (self.n - 1):] if self.n > 1 else []
            banned = {seq[i + self.n - 1] for i in range(len(seq) - self.n + 1)
                      if seq[i:i + self.n - 1] == prefix}
            if banned:
                hit = torch.isin(canon[:scores.shape[1]], torch.tensor(sorted(banned), device=scores.device))
                scores[row, :len(hit)] = scores[row, :len(hit)].masked_fill(hit, float("-inf"))
        return scores


#: How AdapterCaptioner decodes unless told otherwise; an adapter class may set its own
#: ``decoding`` (see benchmarks/RESULTS.md, "Trained fusion").
DECODING = {"beams": 1, "no_repeat_ngram": 3}


class CaptioningAdapter(Adapter):
    """An adapter that makes a frozen causal LM write captions of images.

    Subclasses implement ``caption_logits(features, texts, prompts)`` and
    ``generation_inputs(features, prompts)`` (the ids or embeddings the LM starts from; ``prompts``
    is an optional text per row, for adapters that read one) and may override
    ``media(features, copies=...)`` (a context active during the whole decode, e.g. the image
    latents cross-attention reads).
    """

    #: The captioner's default decoding (:class:`AdapterCaptioner`), chosen per method by
    #: cross-validation on ``train``.
    decoding: dict[str, int] = DECODING
    #: What ``nofree train`` says when the val loss barely rises with the image features shuffled
    #: across captions (``{gap}``: that rise; ``{gap_text}``: the same with its interval over the
    #: photos; ``{photo_gap_text}``: see :func:`nofree.adapters.train.validation_warnings`).
    weak_image_warning = ("barely uses the image: its validation loss rises only {gap_text} when each "
                          "caption is paired with another photo; train longer or with a higher learning "
                          "rate, or check the image features")

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
        """The ids transformers' search ends a row at: eos, plus the single-token spellings of '.'
        when ``stop_at_period``."""
        stops = {int(self.lm.eos_id)}
        if stop_at_period:
            for text in (".", " ."):
                ids = self.lm.tokenize([text])[0]
                if len(ids) == 1:
                    stops.add(int(ids[0]))
        return stops

    def caption_logits(self, features: Tensor, texts: list[str],
                       prompts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits ``(B, T, V)`` and aligned labels ``(B, T)`` (``-100`` ignored)."""
        raise NotImplementedError

    def batch_loss(self, batch: Any) -> Tensor:
        """Mean next-token cross-entropy over the caption tokens (and eos) of a batch."""
        logits, labels = self.caption_logits(batch.image_features, batch.texts, batch.prompts)
        return next_token_loss(logits, labels)

    @torch.no_grad()
    def evaluate(self, examples: Any, *, batch_size: int = 32, captions: bool = True) -> dict[str, float]:
        """Validation metrics over ``examples`` (:class:`nofree.adapters.train.Examples`):

        - ``val_loss``: mean cross-entropy per caption token;
        - ``val_loss_shuffled`` and ``image_gap``: the same loss with every caption paired with
          another photo's features, and its excess over ``val_loss`` (an adapter that ignores the
          image has a gap of ~0; needs at least two photos); ``image_gap_low`` and
          ``image_gap_high``: the gap's 95% bootstrap interval over the photos (each photo's
          captions drawn together, :func:`nofree.eval.significance.clustered_interval`);
        - where each photo carries a prompt (SmallCap-style: its retrieved captions),
          ``photo_gap``: the rise when the prompt moves with the features, so that everything a
          caption is conditioned on comes from another photo (``image_gap`` keeps each photo's
          prompt: it measures what the image features add to it);
        - with ``captions``: ``val_distinct``, ``val_repeat_3gram`` and ``val_stutter`` of one
          greedy caption per photo, decoded as :class:`AdapterCaptioner` does by default (see
          :mod:`nofree.eval.degeneration`: 1/n distinct means one caption for all).
        """
        losses, tokens = self._caption_losses(examples, batch_size)
        total = max(float(tokens.sum()), 1.0)
        metrics = {"val_loss": float(losses.sum()) / total}
        if len(examples.image_features) > 1:
            from nofree.eval.significance import clustered_interval

            shuffled, _ = self._caption_losses(examples.with_images_shuffled(), batch_size)
            metrics["val_loss_shuffled"] = float(shuffled.sum()) / total
            metrics["image_gap"] = metrics["val_loss_shuffled"] - metrics["val_loss"]
            if len(set(examples.image_index.tolist())) > 1:
                metrics["image_gap_low"], metrics["image_gap_high"] = clustered_interval(
                    (shuffled - losses).tolist(), examples.image_index.tolist(), weights=tokens.tolist())
            if examples.image_prompts is not None:
                moved, _ = self._caption_losses(examples.with_images_shuffled(prompts=True), batch_size)
                metrics["photo_gap"] = float(moved.sum()) / total - metrics["val_loss"]
        if captions and len(examples.image_features):
            from nofree.eval.degeneration import degeneration

            texts = []
            for start in range(0, len(examples.image_features), batch_size):
                prompts = examples.image_prompts[start:start + batch_size] if examples.image_prompts else None
                texts += self.caption_features(examples.image_features[start:start + batch_size],
                                               prompts=prompts, **DECODING)
            found = degeneration(texts)
            metrics.update(val_distinct=found["distinct"], val_repeat_3gram=found["repeat_3gram"],
                           val_stutter=found["stutter"])
        return metrics

    def _caption_losses(self, examples: Any, batch_size: int) -> tuple[Tensor, Tensor]:
        """Each example's summed next-token loss ``(N,)`` and its number of scored tokens ``(N,)``,
        in the order of ``examples``."""
        losses, tokens = torch.zeros(len(examples)), torch.zeros(len(examples))
        by_length = torch.tensor(sorted(range(len(examples)), key=lambda i: len(examples.texts[i])),
                                 dtype=torch.long)  # similar lengths share a batch: less padding
        for rows in by_length.split(batch_size):
            batch = examples.batch(rows, self.device)
            logits, labels = self.caption_logits(batch.image_features, batch.texts, batch.prompts)
            per_token = next_token_loss(logits, labels, reduction="none").reshape(labels.shape)
            losses[rows] = per_token.sum(dim=1).cpu()
            tokens[rows] = (labels != IGNORE_INDEX).sum(dim=1).float().cpu()
        return losses, tokens

    def generation_inputs(self, features: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """What the frozen LM's ``generate`` starts from for image ``features``: ``input_ids``
        or ``inputs_embeds`` ``(B, S, ...)`` and ``attention_mask`` ``(B, S)`` (under no_grad)."""
        raise NotImplementedError

    def word_ids(self) -> Tensor:
        """The LM tokenizer's :func:`word_ids` (computed once)."""
        if getattr(self, "_word_ids", None) is None:
            object.__setattr__(self, "_word_ids", word_ids(self.lm.tokenizer, self.lm.vocab_size))
        return self._word_ids

    def media(self, features: Tensor, *, copies: int = 1) -> Any:
        """A context active during the whole decode (each image's row repeated ``copies`` times,
        as beam search runs ``copies`` rows per image)."""
        return nullcontext()

    @torch.no_grad()
    def generate(self, features: Tensor, *, prompts: Sequence[str] | None = None, beams: int = 1,
                 max_tokens: int = 30, stop_at_period: bool = True, no_repeat_ngram: int = 0,
                 repetition_penalty: float = 1.0, returns: int = 1) -> list[list[int]]:
        """Token ids of ``returns`` captions per feature row ``(B, ...)``, row-major (image 0's
        captions first, best first; ``returns`` <= ``beams``: the beam search's n best); ``prompts``:
        one text per row for adapters that read one (see :meth:`generation_inputs`).

        A caption ends by the rule every decoder follows (:mod:`nofree.decoding.stopping`): at eos
        (not part of the caption), at a period after a word (kept; when ``stop_at_period``) or
        after ``max_tokens``. The search is transformers' ``generate`` on the frozen LM (greedy
        when ``beams == 1``, else beam search ranked by mean token log-probability); it ends a
        row at one of :meth:`stop_ids`, never as one of its first two tokens (a caption is never
        empty), and the rule then reads the caption off the row. Repetition controls:
        ``no_repeat_ngram`` > 0 forbids any word n-gram from occurring twice in a caption
        (:class:`NoRepeatWordNGram`), ``repetition_penalty`` > 1 divides the scores of tokens
        already in the sequence, prompt included (CTRL's rule, transformers' processor).
        """
        if beams < 1 or max_tokens < 1 or no_repeat_ngram < 0 or not repetition_penalty > 0:
            raise ValueError("beams and max_tokens must be >= 1, no_repeat_ngram >= 0 and "
                             "repetition_penalty > 0")
        if not 1 <= returns <= beams:
            raise ValueError(f"returns must be between 1 and beams ({beams}), got {returns}")
        was_training = self.training
        self.eval()
        features = features.to(self.device, torch.float32)
        stops = sorted(self.stop_ids(stop_at_period=stop_at_period))
        lm = self.lm
        try:
            with self.media(features, copies=beams):
                inputs = self.generation_inputs(features, prompts)
                beam_options = {"num_beams": beams, "length_penalty": 1.0, "early_stopping": True,
                                "num_return_sequences": returns} if beams > 1 else {}
                processors = []
                if no_repeat_ngram:
                    from transformers import LogitsProcessorList

                    start = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
                    processors = LogitsProcessorList(
                        [NoRepeatWordNGram(no_repeat_ngram, start, self.word_ids())])
                out = lm.model.generate(  # at least two tokens: a caption is never empty
                    **inputs, **beam_options, max_new_tokens=max_tokens, min_new_tokens=min(2, max_tokens),
                    do_sample=False, logits_processor=processors, repetition_penalty=repetition_penalty,
                    eos_token_id=stops, pad_token_id=lm.pad_id, use_cache=True)
        finally:
            self.train(was_training)
        if "input_ids" in inputs:  # decoder-only generate returns the prompt too (the same for each return)
            out = out[:, inputs["input_ids"].shape[1]:]
        captions, ends = [], set(stops)
        for row in out.tolist():  # the search's row ends at its first stop id; padding follows
            end = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
            caption, _ = end_caption(lm, row[:end], stop_at_period=stop_at_period, max_tokens=max_tokens)
            captions.append(caption)
        return captions

    def caption_features(self, features: Tensor, **kw: Any) -> list[str]:
        """Captions of precomputed image features (whitespace runs, newlines included, become one
        space); keyword arguments as in :meth:`generate`."""
        texts = self.lm.decode(self.generate(features, **kw))
        return [" ".join(text.split()) for text in texts]


class AdapterCaptioner:
    """:class:`nofree.core.Captioner` of a trained ClipCap or Flamingo-style adapter.

    ``image_encoder`` defaults to the adapter's own and must carry the spec it was trained with.
    ``beams``, ``no_repeat_ngram`` and ``nbest`` default to the adapter class's ``decoding`` (a
    default ``nbest`` is cut to a narrower ``beams``). ``nbest`` > 1 keeps the beam search's
    ``nbest`` best captions and returns the one agreeing most with the others under CIDEr-D
    (minimum-Bayes-risk selection, :meth:`nofree.eval.cider_d.CiderD.agreement`; n-gram
    weights from the bundled caption pool); 1 returns the search's best.
    ``caption(images)`` takes PIL images or image paths and returns one string per image, tidied
    by :func:`nofree.core.clean_caption` (first line, no leading bullet or quotes, capitalised).
    """

    def __init__(self, adapter: CaptioningAdapter, image_encoder: Any = None, *,
                 beams: int | None = None, no_repeat_ngram: int | None = None, nbest: int | None = None,
                 max_tokens: int = 30, batch_size: int = 16, stop_at_period: bool = True) -> None:
        if not isinstance(adapter, CaptioningAdapter):
            raise TypeError(f"AdapterCaptioner needs a captioning adapter (ClipCap, Flamingo), "
                            f"got {type(adapter).__name__}")
        if image_encoder is not None and image_encoder.spec != adapter.image_encoder.spec:
            raise SpecError(f"the adapter was trained on {adapter.image_encoder.spec!r} features, "
                            f"but image_encoder is {image_encoder.spec!r}")
        self.adapter = adapter
        self.image_encoder = image_encoder or adapter.image_encoder
        beams = adapter.decoding["beams"] if beams is None else beams
        no_repeat_ngram = adapter.decoding["no_repeat_ngram"] if no_repeat_ngram is None else no_repeat_ngram
        if nbest is None:  # a default n-best follows a narrower beam given by the caller
            nbest = min(int(adapter.decoding.get("nbest", 1)), beams)
        if nbest < 1:
            raise ValueError(f"nbest must be >= 1, got {nbest}")
        if nbest > beams:
            raise OptionError(Option("nbest", nbest), " cannot exceed the beam width, ",
                              Option("beams", beams), ": lower the first or raise the second")
        self.options = {"beams": beams, "no_repeat_ngram": no_repeat_ngram, "max_tokens": max_tokens,
                        "stop_at_period": stop_at_period}
        self.nbest = int(nbest)
        self.batch_size = batch_size

    def caption(self, images: Sequence[Any], **kw: Any) -> list[str]:
        """One caption per image; keywords of :meth:`CaptioningAdapter.generate` override the
        captioner's."""
        options = {**self.options, **kw}
        loaded = [_as_image(image) for image in images]
        captions: list[str] = []
        for start in range(0, len(loaded), self.batch_size):
            chunk = loaded[start:start + self.batch_size]
            if self.adapter.feature_kind == "tokens":
                features = self.image_encoder.encode_tokens(chunk)
            else:
                features = self.image_encoder.encode(chunk)
            captions += self.caption_chunk(chunk, features, options)
        return captions

    def caption_chunk(self, images: Sequence[Any], features: Tensor, options: dict[str, Any]) -> list[str]:
        """Tidied captions of one chunk of loaded ``images`` and their ``features``, decoded with
        ``options`` (keywords of :meth:`CaptioningAdapter.generate`): the search's best, or with
        ``nbest`` > 1 the consensus choice among its n best."""
        returns = min(self.nbest, options["beams"])
        return self.most_agreeing(self.nbest_captions(features, self.prompts(images), options, returns))

    def nbest_captions(self, features: Tensor, prompts: Sequence[str] | None, options: dict[str, Any],
                       returns: int) -> list[list[str]]:
        """Each image's ``returns`` best captions of the beam search (tidied), best first."""
        texts = [clean_caption(text) for text in
                 self.adapter.caption_features(features, prompts=prompts, returns=returns, **options)]
        return [texts[at:at + returns] for at in range(0, len(texts), returns)]

    @staticmethod
    def most_agreeing(rows: Sequence[Sequence[str]]) -> list[str]:
        """Per image, the candidate agreeing most with the others (CIDEr-D; the only one if alone)."""
        return [row[0] if len(row) == 1 else row[pool_cider().choose(row)] for row in rows]

    def prompts(self, images: Sequence[Any]) -> list[str] | None:
        """The text each image's caption follows, for adapters that read one (none here)."""
        return None


@functools.lru_cache(maxsize=1)
def pool_cider() -> Any:
    """:class:`~nofree.eval.cider_d.CiderD` with n-gram weights from the bundled caption
    pool (built once per process): a fixed collection, so an image's choice never depends on the
    other images of its batch."""
    from nofree.data.pairs import load_text_lines
    from nofree.data.pool import default_pool_path
    from nofree.eval.cider_d import CiderD

    return CiderD(load_text_lines(default_pool_path()))


def _as_image(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        from nofree.data.images import load_image

        return load_image(image)
    return image
