"""The scorer protocol that steers MAGIC decoding (:mod:`nofree.decoding.magic`), and the ASIF scorer.

A scorer embeds images once (``embed_images(images) -> (B, D)``) and, at every decoding step,
scores each image against its k candidate texts (``score(image_emb (B, D), texts) -> (B, k)``
float32 logits, already multiplied by the scorer's temperature: MAGIC takes a softmax over the
k candidates on top). Any callable ``(image_emb, texts) -> (B, k)`` plugs in through
:class:`CallableScorer`; :func:`check_texts` validates a ``score`` call for every scorer.

- :class:`AsifScorer` -- ASIF (Norelli et al., 2022, "ASIF: Coupled Data Turns Unimodal Models
  to Multimodal Without Training"): the similarity of the image's and the text's relative
  representations over a set of anchor pairs (the fitted ASIF's own, CSLS included), × a
  temperature.
- the CLIP scorer, cosine × a CLIP model's logit scale with its candidates run as a prefix
  tree, is :class:`nofree.decoding.clip_scorer.ClipScorer` (also ``nofree.decoding.ClipScorer``).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from nofree.core import DataError

__all__ = ["Scorer", "CallableScorer", "AsifScorer", "as_scorer", "check_texts",
           "DEFAULT_ASIF_TEMPERATURE"]

#: The softmax temperature of MAGIC's image term on the ASIF similarity. The pipeline's similarity
#: is CSLS-corrected, 2·s − r(image) − r(text), with twice the spread of the plain similarity s
#: between one step's candidates; 50 on it is 100 on s, the scale at which candidates that differ
#: in content get a decisive softmax while near-identical ones (punctuation, word pieces) stay
#: near uniform. benchmarks/RESULTS.md ("MAGIC's ASIF image term") has the measurements.
DEFAULT_ASIF_TEMPERATURE = 50.0


@runtime_checkable
class Scorer(Protocol):
    """Scores images against candidate texts for MAGIC."""

    def embed_images(self, images: Sequence[Any]) -> Tensor: ...      # (B, D) float32

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor: ...  # (B, k)


def check_texts(image_emb: Tensor, texts: Sequence[Sequence[str]]) -> int:
    """Validate a ``score(image_emb, texts)`` call (B lists of k >= 1 strings, ``image_emb (B, D)``);
    return k."""
    if isinstance(texts, str) or not texts or isinstance(texts[0], str):
        raise DataError("texts must be one list of candidate strings per image, e.g. [['a dog', 'a cat']]")
    if image_emb.ndim != 2 or image_emb.shape[0] != len(texts):
        raise DataError(f"image_emb must be (B, D) with B = {len(texts)} text lists, "
                        f"got {tuple(image_emb.shape)}")
    k = len(texts[0])
    if k == 0 or any(len(row) != k for row in texts):
        raise DataError(f"every image needs the same number (>= 1) of candidate texts, got "
                        f"{[len(row) for row in texts]}")
    return k


class CallableScorer:
    """Wrap a function ``fn(image_emb (B, D), texts) -> (B, k)`` (and optionally an image embedder)."""

    def __init__(self, fn: Callable[[Tensor, Sequence[Sequence[str]]], Any],
                 embed_images: Callable[[Sequence[Any]], Tensor] | None = None) -> None:
        self.fn, self._embed_images = fn, embed_images

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        if self._embed_images is None:
            raise TypeError("this CallableScorer has no image embedder: pass embed_images= when "
                            "wrapping the function, or give magic_search the image_emb directly")
        return torch.as_tensor(self._embed_images(images)).float()

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
        k = check_texts(image_emb, texts)
        out = torch.as_tensor(self.fn(image_emb, texts)).float()
        if out.shape != (len(texts), k):
            raise DataError(f"scorer function returned shape {tuple(out.shape)}, expected (B, k) = "
                            f"{(len(texts), k)}")
        return out


def as_scorer(obj: Any) -> Any:
    """``obj`` if it is a :class:`Scorer`, a :class:`CallableScorer` around a plain callable."""
    if isinstance(obj, Scorer):
        return obj
    if callable(obj):
        return CallableScorer(obj)
    raise TypeError(f"a scorer must have score()/embed_images() or be a callable "
                    f"(image_emb, texts) -> (B, k), got {type(obj).__name__}")


# --- ASIF --------------------------------------------------------------------------------------

class AsifScorer:
    """ASIF similarity between an image and candidate texts, × ``temperature``.

    asif: a fitted :class:`nofree.anchors.asif.ASIF`; the similarity is its own
    :meth:`~nofree.anchors.asif.ASIF.similarity`, the one caption retrieval ranks with, CSLS
    included when the ASIF has ``csls`` > 0 (then ``2·s − r(image) − r(text)``: r(image) is the
    same for all of one image's candidates and cancels in MAGIC's softmax, r(text) lowers texts
    that are close to every image). text_encoder / image_encoder: the encoders its anchors were
    built with (``image_encoder`` is needed only for :meth:`embed_images`). ``image_emb`` passed
    to :meth:`score` are the image encoder's embeddings ``(B, Di)``; their relative
    representations are computed once per distinct image and kept (``cache_images``). Repeated
    candidate strings within a call are embedded once. ``packed=True`` (default) encodes the
    candidates with the text encoder's packed twin (``text_encoder.packed()``, when it has one:
    same embeddings to ~1e-6, faster matrix kernels on CPUs).
    """

    def __init__(self, asif: Any, text_encoder: Any, image_encoder: Any = None, *,
                 temperature: float = DEFAULT_ASIF_TEMPERATURE, cache_images: int = 1024,
                 packed: bool = True) -> None:
        if not temperature > 0:
            raise DataError(f"temperature must be > 0, got {temperature}")
        if packed and hasattr(text_encoder, "packed"):
            text_encoder = text_encoder.packed()
        self.asif, self.text_encoder, self.image_encoder = asif, text_encoder, image_encoder
        self.temperature, self.cache_images = float(temperature), cache_images
        self._image_rel: OrderedDict[bytes, tuple[Tensor, ...]] = OrderedDict()
        self.seconds = {"text_encoder": 0.0, "relative": 0.0}

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """``(B, Di)`` image-encoder embeddings (what :meth:`score` takes)."""
        if self.image_encoder is None:
            raise TypeError("AsifScorer was built without image_encoder=: pass the image encoder "
                            "the anchors were built with, or give magic_search its embeddings")
        return self.image_encoder.encode(list(images)).float()

    def image_relative(self, image_emb: Tensor) -> Any:
        """The images' representations for ``asif.similarity`` (B rows: a ``SparseRelative``, or a
        :class:`~nofree.anchors.labels.Bridged` under a label bridge), cached per image."""
        from nofree.anchors.labels import Bridged
        from nofree.anchors.relative import SparseRelative

        image_emb = image_emb.detach().float().cpu()
        keys = [row.numpy().tobytes() for row in image_emb]
        todo = [i for i, key in enumerate(keys) if key not in self._image_rel]
        if todo:
            rep = self.asif.transform(image_emb[todo], modality="image")
            rho, side = (rep.rel, rep.side) if isinstance(rep, Bridged) else (rep, None)
            for row, i in enumerate(todo):
                self._image_rel[keys[i]] = (rho.values[row], rho.indices[row], rho.cosines[row]) \
                    + (() if side is None else (side[row],))
            while len(self._image_rel) > self.cache_images:
                self._image_rel.popitem(last=False)
        parts = [torch.stack(part) for part in zip(*(self._image_rel[key] for key in keys))]
        rho = SparseRelative(*parts[:3], self.asif.n_anchors_)
        return rho if len(parts) == 3 else Bridged(rho, parts[3])

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
        """``(B, k)`` float32: temperature · ASIF similarity (image b, text b,i)."""
        k = check_texts(image_emb, texts)
        image_rel = self.image_relative(image_emb)                        # B rows
        flat = [t for row in texts for t in row]
        unique = list(dict.fromkeys(flat))
        start = time.perf_counter()
        text_emb = self.text_encoder.encode(unique)                       # (U, Dt)
        mid = time.perf_counter()
        sim = self.asif.similarity(image_rel, text_emb).cpu()             # (B, U)
        where = {t: i for i, t in enumerate(unique)}
        index = torch.tensor([where[t] for t in flat]).view(len(texts), k)
        self.seconds["text_encoder"] += mid - start
        self.seconds["relative"] += time.perf_counter() - mid
        return self.temperature * sim.gather(1, index).float()
