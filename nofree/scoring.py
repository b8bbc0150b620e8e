"""MAGIC scorers named by a spec, and the joint space that ranks a caption pool with them.

``load_scorer(spec)`` builds a :class:`ScorerSpace` for a CLIP-like model or a trained LiT:

=========================  ============================================================================
spec                       scorer
=========================  ============================================================================
``open_clip:ARCH@TAG``     an open_clip CLIP (also ``open_clip:ARCH/TAG``, ``open-clip:``,
                           ``open_clip:local-dir:DIR``, ``open_clip:hf-hub:ORG/NAME``)
``hf-clip:NAME``           a transformers CLIP-like model, hub name or folder (also ``hf_clip:``)
``local:DIR``              a CLIP saved in a folder (open_clip or transformers; a bare folder too)
``lit:DIR``                a trained LiT adapter (:mod:`nofree.adapters.lit`): its locked image tower
                           and tuned text side (``lit:hf-hub:ORG/NAME[@REV]``: one on the hub)
=========================  ============================================================================

``asif`` (:data:`ASIF_SCORER`) names the ASIF scorer, which compares images and texts through an
anchor set: it comes from an :class:`~nofree.anchors.pipeline.AsifPipeline`
(``MagicCaptioner.from_pipeline``), not from here.

A :class:`ScorerSpace` is a joint image–text space with the interface
:class:`~nofree.captioning.retrieval.RetrievalCaptioner` ranks a pool with (``encode_images``,
``encode_texts``, ``similarity``, as ``AsifPipeline``), plus the ``scorer`` that steers MAGIC. So
with a CLIP-like scorer the caption pool is ranked by the scorer itself, as in CLIPRe (the
retrieval baseline of Su et al., 2022, "Language Models Can See: Plugging Visual Controls in
Text Generation"): the pool captions are embedded once by the text side (through an
:class:`~nofree.cache.EmbeddingCache` when given) and each image ranks them by cosine with its
image embedding. No anchor set is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from nofree.core import SpecError, l2_normalize, parse_spec

__all__ = ["ASIF_SCORER", "ScorerSpace", "load_scorer", "normalize_scorer_spec"]

#: the scorer spec of the ASIF similarity over an anchor set
ASIF_SCORER = "asif"
#: registry backends that hold a CLIP-like two-tower model
CLIP_BACKENDS = ("open_clip", "hf-clip", "local")
_CLIP_FORMS = ("open_clip:ARCH@TAG, hf-clip:NAME, local:DIR (a saved CLIP) or lit:DIR (a trained LiT "
               "adapter)")
_FORMS = f"{ASIF_SCORER}, {_CLIP_FORMS}"
#: texts embedded per call on the LiT text side (bounds memory when it tunes text layers)
_LIT_CHUNK = 4096


def _holds_adapter(folder: Path) -> bool:
    from nofree.adapters.base import WEIGHTS_FILE

    return (folder / WEIGHTS_FILE).is_file()


def normalize_scorer_spec(spec: str) -> str:
    """The canonical form of a scorer spec (see the module docstring), checked without loading
    anything: :data:`ASIF_SCORER`, ``lit:`` + an absolute folder, or a registry spec of a
    CLIP-like model (``local:`` folders must hold one). A bare folder is ``local:`` (``lit:``
    when it holds an adapter). Raises :class:`SpecError` naming the accepted forms."""
    from nofree.registry import _local_kind, normalize_spec

    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty scorer spec: give {_FORMS}")
    spec = spec.strip()
    if spec.lower() == ASIF_SCORER:
        return ASIF_SCORER
    if ":" not in spec:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise SpecError(f"{spec!r} is not a scorer: give {_FORMS}")
        spec = f"{'lit' if _holds_adapter(folder) else 'local'}:{spec}"
    backend, _, name = spec.partition(":")
    if backend == "local" and _holds_adapter(Path(name).expanduser()):
        backend = "lit"
    if backend == "lit":
        from nofree.hub import is_hub_ref, parse_hub_ref

        if is_hub_ref(name):  # fetched when the scorer loads (nofree.hub)
            parse_hub_ref(name)
            return f"lit:{name}"
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise SpecError(f"{spec}: {folder} is not a folder; lit: takes the folder of a trained "
                            "LiT adapter")
        return f"lit:{folder.resolve()}"
    spec = normalize_spec(spec)
    backend, name, _ = parse_spec(spec)
    if backend not in CLIP_BACKENDS:
        raise SpecError(f"{spec} is not an image–text model; a scorer is {_FORMS}")
    if backend == "local":
        kind = _local_kind(Path(name), spec)
        if kind not in ("clip", "open_clip"):
            what = {"lm": "causal language"}.get(kind, kind)
            raise SpecError(f"{spec} holds a {what} model, not a CLIP-like image–text model; a "
                            f"scorer is {_FORMS}")
    return spec


class ScorerSpace:
    """A CLIP-like joint image–text space and its MAGIC scorer.

    ``scorer`` steers MAGIC: ``score(image_emb (B, Di), texts) -> (B, k)`` logits;
    ``image_encoder`` gives those ``image_emb`` (:meth:`encode_images`); ``embed_texts(texts) ->
    (N, D)`` embeds texts in the joint space and ``project_image`` maps ``image_emb`` there
    (identity for CLIP; LiT's image head). :meth:`similarity` is their cosine ``(B, N)``: what
    ranks a caption pool. ``logit_scale``: the model's learned multiplier of those cosines (CLIP's
    or the LiT's temperature t; ``None`` when unknown), what turns them into softmax
    probabilities. ``cache``: an EmbeddingCache for image paths (``embed_texts`` uses it for the
    texts where it can).
    """

    def __init__(self, spec: str, scorer: Any, image_encoder: Any, *,
                 embed_texts: Callable[[list[str]], Tensor],
                 project_image: Callable[[Tensor], Tensor] | None = None, cache: Any = None,
                 batch_size: int = 32, logit_scale: float | None = None) -> None:
        self.spec, self.scorer, self.image_encoder = spec, scorer, image_encoder
        self._embed_texts, self._project_image = embed_texts, project_image
        self.cache, self.batch_size = cache, batch_size
        self.logit_scale = logit_scale if logit_scale is not None else getattr(scorer, "logit_scale", None)

    def __repr__(self) -> str:
        return f"ScorerSpace({self.spec!r})"

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """``(N, Di)`` image embeddings (what ``scorer.score`` takes) of image paths or PIL images."""
        from nofree.cache import encode_images

        return encode_images(self.image_encoder, images, cache=self.cache, batch_size=self.batch_size)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``(N, D)`` L2-normalised joint-space embeddings of texts."""
        return l2_normalize(self._embed_texts(list(texts)).float().cpu())

    @torch.no_grad()
    def similarity(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosines ``(B, N)`` of image embeddings ``(B, Di)`` and joint-space text embeddings ``(N, D)``."""
        image = image_emb if self._project_image is None else self._project_image(image_emb)
        return l2_normalize(image.float().cpu()) @ l2_normalize(text_emb.float().cpu()).T


def load_scorer(spec: str, *, device: str | torch.device | None = None, cache: Any = None) -> ScorerSpace:
    """The :class:`ScorerSpace` of a CLIP-like model or a trained LiT named by ``spec`` (see the
    module docstring). ``cache``: an :class:`~nofree.cache.EmbeddingCache` for the caption pool's
    and images' embeddings."""
    spec = normalize_scorer_spec(spec)
    if spec == ASIF_SCORER:
        raise SpecError("the asif scorer compares images and texts through an anchor set: build it "
                        f"from one (MagicCaptioner.from_pipeline); load_scorer takes {_CLIP_FORMS}")
    if spec.startswith("lit:"):
        from nofree.hub import resolve_dir

        return _lit_space(spec, resolve_dir(spec[len("lit:"):], what="LiT adapter"), device, cache)
    from nofree.decoding.clip_scorer import ClipScorer
    from nofree.registry import load_encoder

    image_encoder = load_encoder(spec, modality="image", device=device)
    text_encoder = load_encoder(spec, modality="text", device=device)

    def embed_texts(texts: list[str]) -> Tensor:
        return cache.encode(text_encoder, texts) if cache is not None else text_encoder.encode(texts)

    return ScorerSpace(spec, ClipScorer.from_encoder(text_encoder, device=device), image_encoder,
                       embed_texts=embed_texts, cache=cache)


def _lit_space(spec: str, folder: Path, device: Any, cache: Any) -> ScorerSpace:
    """A trained LiT: scores ``t · cos`` in its joint space (:meth:`LiT.scorer`); texts are the
    frozen text encoder's embeddings (cached when it has no tuned layers) through the text head."""
    from nofree.adapters.base import load_adapter, read_config

    kind = read_config(folder)["kind"]
    if kind != "lit":
        raise SpecError(f"{spec}: {folder} holds a {kind} adapter; a scorer needs a LiT adapter")
    lit = load_adapter(folder, device=device).eval()

    @torch.no_grad()
    def embed_texts(texts: list[str]) -> Tensor:
        parts = [torch.zeros(0, lit.embed_dim)]
        for start in range(0, len(texts), _LIT_CHUNK):
            features, mask = lit.text_inputs(texts[start:start + _LIT_CHUNK], cache=cache)
            parts.append(lit.project_text(features, mask).cpu())
        return torch.cat(parts)

    return ScorerSpace(spec, lit.scorer(), lit.image_encoder, embed_texts=embed_texts,
                       project_image=lit.project_image, cache=cache, logit_scale=lit.logit_scale)
