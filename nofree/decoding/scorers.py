"""The scorer protocol that steers MAGIC decoding (:mod:`nofree.decoding.magic`), and the ASIF scorer.

A scorer embeds images once (``embed_images(images) -> (B, D)``) and, at every decoding step,
scores each image against its k candidate texts (``score(image_emb (B, D), texts) -> (B, k)``
float32 logits, already multiplied by the scorer's temperature: MAGIC takes a softmax over the
k candidates on top). Any callable ``(image_emb, texts) -> (B, k)`` plugs in through
:class:`CallableScorer`; :func:`check_texts` validates a ``score`` call for every scorer.

- :class:`AsifScorer` -- ASIF (Norelli et al., 2022, "ASIF: Coupled Data Turns Unimodal Models
  to Multimodal Without Training"): the similarity of the image's and the text's relative
  representations over a set of anchor pairs, × a temperature.
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

#: ASIF similarities lie in [0, 1] and the k continuations of one caption differ little. Measured
#: with SmolLM2 + EfficientNet-Lite0/MiniLM anchors (700 coco-mini train pairs, p=8) over 8 val
#: images × 10 steps: the spread across the 45 candidates is bimodal (std median 0.003, q90 0.06).
#: At 100 the candidates that differ in content get a decisive softmax (top mass q75 0.69) while
#: near-identical ones (punctuation, word pieces) stay near uniform (median 0.06); 300 lets the
#: image term pick among near-identical candidates too (median 0.29, q75 0.96), 50 weakens the
#: decisive steps (q75 0.36). Stand-in ASIF per the design notes (k = all 700 anchors).
DEFAULT_ASIF_TEMPERATURE = 100.0


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

def _dense(rel: Any) -> Tensor:
    """A float32 dense torch tensor from any relative-representation container: a torch tensor
    (dense or sparse), an object with ``to_dense()`` or ``toarray()`` (scipy), or an array."""
    if isinstance(rel, Tensor):
        return (rel.to_dense() if rel.layout != torch.strided else rel).float()
    if hasattr(rel, "to_dense"):
        return torch.as_tensor(rel.to_dense()).float()
    if hasattr(rel, "toarray"):
        rel = rel.toarray()
    return torch.as_tensor(rel).float()


def _relative_dot(text_rel: Any, image_rel: Tensor) -> Tensor:
    """``(U, B)`` inner products of text relative representations with dense image ones ``(B, N)``.

    Row-sparse containers (``values``/``indices`` ``(U, k)``, as ASIF keeps its top-k entries)
    gather k anchors per text instead of densifying; torch sparse tensors use a sparse matmul.
    """
    values, indices = getattr(text_rel, "values", None), getattr(text_rel, "indices", None)
    if isinstance(values, Tensor) and isinstance(indices, Tensor):
        picked = image_rel.T[indices.to(image_rel.device)]                 # (U, k, B)
        return (picked * values.to(image_rel.device).float()[..., None]).sum(1)
    if isinstance(text_rel, Tensor) and text_rel.layout != torch.strided:
        return torch.sparse.mm(text_rel.float(), image_rel.T.contiguous())
    return _dense(text_rel) @ image_rel.T


class AsifScorer:
    """ASIF similarity ⟨ρ_img, ρ_txt⟩ between an image and candidate texts, × ``temperature``.

    asif: a fitted :class:`nofree.anchors.asif.ASIF` (``transform(emb, modality=)`` gives the
    relative representations ``(N, n_anchors)``); text_encoder / image_encoder: the encoders its
    anchors were built with (``image_encoder`` is needed only for :meth:`embed_images`).
    ``image_emb`` passed to :meth:`score` are the image encoder's embeddings ``(B, Di)``; their
    relative representations are computed once per distinct image and kept (``cache_images``).
    Repeated candidate strings within a call are embedded once. ``packed=True`` (default)
    encodes the candidates with the text encoder's packed twin (``text_encoder.packed()``, when
    it has one: same embeddings to ~1e-6, faster matrix kernels on CPUs).
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
        self._image_rel: OrderedDict[bytes, Tensor] = OrderedDict()
        self.seconds = {"text_encoder": 0.0, "relative": 0.0}

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """``(B, Di)`` image-encoder embeddings (what :meth:`score` takes)."""
        if self.image_encoder is None:
            raise TypeError("AsifScorer was built without image_encoder=: pass the image encoder "
                            "the anchors were built with, or give magic_search its embeddings")
        return self.image_encoder.encode(list(images)).float()

    def image_relative(self, image_emb: Tensor) -> Tensor:
        """``(B, n_anchors)`` dense relative representations, cached per image."""
        image_emb = image_emb.detach().float().cpu()
        keys = [row.numpy().tobytes() for row in image_emb]
        todo = [i for i, key in enumerate(keys) if key not in self._image_rel]
        if todo:
            rel = _dense(self.asif.transform(image_emb[todo], modality="image"))
            for i, row in zip(todo, rel):
                self._image_rel[keys[i]] = row
            while len(self._image_rel) > self.cache_images:
                self._image_rel.popitem(last=False)
        return torch.stack([self._image_rel[key] for key in keys])

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
        """``(B, k)`` float32: temperature · ⟨ρ_img(b), ρ_txt(text b,i)⟩."""
        k = check_texts(image_emb, texts)
        image_rel = self.image_relative(image_emb)                        # (B, n)
        flat = [t for row in texts for t in row]
        unique = list(dict.fromkeys(flat))
        start = time.perf_counter()
        text_emb = self.text_encoder.encode(unique)                       # (U, Dt)
        mid = time.perf_counter()
        text_rel = self.asif.transform(text_emb, modality="text")         # (U, n), maybe sparse
        sim = _relative_dot(text_rel, image_rel.to(text_emb.device))      # (U, B)
        where = {t: i for i, t in enumerate(unique)}
        index = torch.tensor([where[t] for t in flat]).view(len(texts), k)
        out = sim.cpu()
        self.seconds["text_encoder"] += mid - start
        self.seconds["relative"] += time.perf_counter() - mid
        return self.temperature * out[index, torch.arange(len(texts))[:, None]].float()
