"""SmallCap-style captioner: retrieved captions in the frozen LM's prompt, gated cross-attention to
the image.

Ramos, Martins, Elliott & Kementchedjhieva (2023), "SmallCap: Lightweight Image Captioning
Prompted with Retrieval Augmentation" (CVPR): a frozen GPT-2 decoder reads the prompt "Similar
images show {c1} ... {ck}. This image shows" filled with the k captions that a CLIP retrieval finds
for the image in a datastore, and only cross-attention from the decoder to frozen CLIP features is
trained (1.8–7M parameters; COCO CIDEr ~120 with the full training set). Here:

- the image path is the Flamingo-style one of :mod:`nofree.adapters.flamingo` (perceiver
  resampler + tanh-gated cross-attention, zero gates at initialisation), so a fresh adapter *is*
  the frozen LM reading the prompt;
- retrieval is nofree's caption retrieval (:class:`nofree.captioning.retrieval.RetrievalCaptioner`: ASIF
  similarity through an anchor set, CIDEr-D consensus re-ranking) over a caption pool, exactly as
  ``nofree caption --method retrieval`` ranks them; the pool can be swapped at inference without
  retraining (training-free domain transfer);
- a photo's own captions are never among its examples, and training photos get their examples
  from anchors that do not contain them (:func:`leave_out_prompts`): with its own anchor in the
  set a training photo would retrieve better examples than any new photo can, and the adapter
  would learn to trust them more than it should.

The adapter folder holds, beside ``config.json`` and ``adapter.safetensors``, the anchor set it
retrieves with (``anchors/``) and, when training used a pool other than the bundled one, that pool
(``pool.txt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.adapters.captioning import DECODING, AdapterCaptioner
from nofree.adapters.flamingo import Flamingo
from nofree.adapters.recipes import RECIPES, recipe_epochs
from nofree.core import DataError, Option, OptionError, SpecError, clean_caption
from nofree.data.pool import duplicate_key, example_windows

ANCHORS_DIR = "anchors"
POOL_FILE = "pool.txt"
#: SmallCap's prompt, with a colon after each part (the frozen LM is an instruction-tuned one).
TEMPLATE = "Similar images show: {examples} This image shows:"


class SmallCap(Flamingo):
    """A Flamingo-style adapter whose LM prompt holds ``examples`` retrieved pool captions.

    ``template`` must contain ``{examples}`` (the captions, each ending with a period). Other
    hyperparameters as in :class:`~nofree.adapters.flamingo.Flamingo`. The retrieval assets
    (``anchors``: an :class:`~nofree.anchors.anchor_set.AnchorSet` whose image side was built with
    this adapter's image encoder; ``pool``: captions, or None for the bundled pool) are attached
    with :meth:`attach_retrieval` and saved with the adapter.
    """

    kind = "smallcap"
    # chosen by 5-fold cross-validation on coco-mini train (RESULTS.md, "Cross-validation of the
    # trained captioners' recipes"): 3 beams beat greedy decoding in every fold, and 2 drafts × the
    # 3 best of each beam search + the retrieved caption, kept by CIDEr-D consensus, had the best
    # cross-validated CIDEr of the decodings tried
    decoding = {**DECODING, "beams": 3, "drafts": 2, "nbest": 3, "with_retrieved": True}
    config_limits = {**Flamingo.config_limits, "examples": (1, 64)}
    # the shuffle keeps each caption's retrieved examples: the gap is what the cross-attention adds
    # to them, and a small one means the captions follow the examples
    weak_image_warning = ("barely uses the image features beyond its retrieved captions: its validation "
                          "loss rises only {gap_text} when each caption is paired with another photo's "
                          "features{photo_gap_text}, so its captions follow the retrieved examples; compare "
                          "it with --method retrieval")

    def __init__(self, image_encoder: Any, lm: Any, *, examples: int = 4, template: str = TEMPLATE,
                 num_latents: int = 32, resampler_depth: int = 2, heads: int = 8, dim_head: int = 64,
                 ff_mult: int = 2, xattn_every: int = 5, prompt: str = "", gate_lr_scale: float = 1.0,
                 gate_init: float = 0.5, scale_to_residual: bool = True, dropout: float = 0.0,
                 max_caption_tokens: int = 40, device: str | torch.device | None = None) -> None:
        if int(examples) < 1:
            raise ValueError(f"examples must be >= 1, got {examples!r}")
        if "{examples}" not in template:
            raise ValueError(f"template must contain '{{examples}}', got {template!r}")
        super().__init__(image_encoder, lm, num_latents=num_latents, resampler_depth=resampler_depth,
                         heads=heads, dim_head=dim_head, ff_mult=ff_mult, xattn_every=xattn_every,
                         prompt=prompt, gate_lr_scale=gate_lr_scale, gate_init=gate_init,
                         scale_to_residual=scale_to_residual, dropout=dropout,
                         max_caption_tokens=max_caption_tokens, device=device)
        self.hparams.update(examples=int(examples), template=str(template))
        object.__setattr__(self, "anchors", None)
        object.__setattr__(self, "pool", None)

    def attach_retrieval(self, anchors: Any, pool: Sequence[str] | None = None) -> None:
        """Record the anchor set (image side from this adapter's image encoder) and the caption
        pool (``None``: the bundled one) that ``save_pretrained`` stores with the weights."""
        if anchors.image_spec != self.image_encoder.spec:
            raise SpecError(f"the anchor set's images were encoded with {anchors.image_spec!r}, but this "
                            f"adapter's image encoder is {self.image_encoder.spec!r}; build the anchors "
                            "with the same image encoder")
        object.__setattr__(self, "anchors", anchors)
        object.__setattr__(self, "pool", None if pool is None else list(pool))

    def prompt_text(self, examples: Sequence[str]) -> str:
        """The prompt for one photo's retrieved captions."""
        joined = " ".join(text[:1].upper() + text[1:] + "." for text in map(duplicate_key, examples))
        return self.hparams["template"].format(examples=joined)

    def caption_ids(self, texts: Sequence[str]) -> list[list[int]]:
        # captions continue the prompt after its colon: a leading space, as the LM would write it
        return super().caption_ids([" " + text.strip() for text in texts])

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Weights and config (see :class:`~nofree.adapters.base.Adapter`), then the attached anchor
        set and custom pool when not already there (they do not change during training)."""
        directory = super().save_pretrained(directory, overwrite=overwrite)
        if self.anchors is None:  # prompts come from the caller: nothing to retrieve with
            return directory
        if not (directory / ANCHORS_DIR / "manifest.json").is_file():
            self.anchors.save(directory / ANCHORS_DIR, overwrite=True)
        if self.pool is not None and not (directory / POOL_FILE).is_file():
            from nofree.adapters.base import atomic_write_bytes

            atomic_write_bytes(directory / POOL_FILE, ("\n".join(self.pool) + "\n").encode("utf-8"))
        return directory


def retrieval_for(anchors: Any, image_encoder: Any, text_encoder: Any, pool: Sequence[str], *,
                  cache: Any = None, clean_pool: bool = True) -> Any:
    """The :class:`~nofree.captioning.retrieval.RetrievalCaptioner` that ranks ``pool`` for ``anchors``
    (its non-captions and repeats dropped unless ``clean_pool`` is False)."""
    from nofree.anchors.pipeline import AsifPipeline
    from nofree.captioning.retrieval import RetrievalCaptioner

    pipeline = AsifPipeline.from_anchors(anchors, image_encoder, text_encoder, cache=cache)
    return RetrievalCaptioner(pipeline, pool, clean_pool=clean_pool)


def example_captions(retrieval: Any, image_emb: Tensor, m: int,
                     exclude: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Each image's ``m`` best pool captions as :meth:`RetrievalCaptioner.ranked` orders them,
    leaving out any equal (case, spacing and final period aside) to that image's ``exclude``
    captions (its own references)."""
    if len(retrieval.pool) < m:
        raise OptionError(f"the caption pool holds {len(retrieval.pool)} captions but {m} examples per "
                          "photo were asked for; give ", Option("pool"), " a larger file")
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    ranked = retrieval.ranked(image_emb, m + extra)
    out = []
    for row, candidates in enumerate(ranked):
        own = {duplicate_key(c) for c in exclude[row]} if exclude else set()
        out.append([c for c in candidates if duplicate_key(c) not in own][:m])
    return out


def leave_out_prompts(adapter: SmallCap, retrieval_of: Any, image_paths: Sequence[str], image_emb: Tensor,
                      own: Sequence[Sequence[str]], *, folds: int = 5) -> list[str]:
    """Prompts for training photos whose retrieval never sees them: the photos are split into
    ``folds`` groups and each group's examples come from ``retrieval_of(anchor_rows)``, a
    :class:`RetrievalCaptioner` over the anchors at ``anchor_rows`` (those of the other groups).
    ``image_emb`` ``(M, Di)`` are the photos' embeddings by the anchors' image encoder, ``own``
    their reference captions (never used as examples)."""
    import os

    anchors = adapter.anchors
    n = len(image_paths)
    group = {os.path.realpath(path): i % folds for i, path in enumerate(image_paths)}
    anchor_groups = [group.get(os.path.realpath(path)) for path in anchors.images]
    prompts: list[str | None] = [None] * n
    for fold in range(min(folds, n)):
        rows = [i for i, g in enumerate(anchor_groups) if g != fold]
        if not rows:
            raise OptionError("too few anchors to leave each training fold out; give ", Option("anchors"),
                              " a set built from more photos")
        members = [i for i in range(n) if i % folds == fold]
        retrieval = retrieval_of(rows)
        found = example_captions(retrieval, image_emb[members], adapter.hparams["examples"],
                                 [own[i] for i in members])
        for i, captions in zip(members, found):
            prompts[i] = adapter.prompt_text(captions)
    return prompts  # type: ignore[return-value]


#: SmallCapCaptioner's candidate options where neither the caller nor the adapter's ``decoding`` sets them.
CANDIDATES = {"drafts": 1, "with_retrieved": False, "consensus": 20}


class SmallCapCaptioner(AdapterCaptioner):
    """:class:`nofree.core.Captioner` of a SmallCap adapter: retrieves each image's examples
    (``retrieval``: a :class:`RetrievalCaptioner` whose image encoder is the adapter's), builds its
    prompt and decodes as :class:`AdapterCaptioner` does.

    Several candidates, one kept: ``drafts`` > 1 writes one caption per window of retrieved
    examples (the windows MAGIC's drafts read, :func:`nofree.data.pool.example_windows`:
    the ``examples`` best pool captions, fewer, more, shifted); ``nbest`` > 1 keeps each beam
    search's ``nbest`` best captions (at most the beam width); with ``with_retrieved`` the
    retrieved caption joins them. Of the candidates, the one agreeing most (CIDEr-D) with the
    image's ``consensus`` best pool captions is kept, the selection nofree's MAGIC defaults use
    (:mod:`nofree.captioning.consensus`). ``drafts=1, nbest=1`` without it is SmallCap's own
    decoding. Options left out take the adapter class's ``decoding`` (:attr:`SmallCap.decoding`),
    then :data:`CANDIDATES`; ``nbest`` is :class:`AdapterCaptioner`'s (a default one is cut to a
    narrower ``beams``).
    """

    def __init__(self, adapter: SmallCap, retrieval: Any, *, drafts: int | None = None, nbest: int | None = None,
                 with_retrieved: bool | None = None, consensus: int | None = None, **kw: Any) -> None:
        super().__init__(adapter, nbest=nbest, **kw)  # sets and checks self.nbest
        given = {"drafts": drafts, "with_retrieved": with_retrieved, "consensus": consensus}
        chosen = {**CANDIDATES, **{k: v for k, v in adapter.decoding.items() if k in CANDIDATES},
                  **{k: v for k, v in given.items() if v is not None}}
        drafts, with_retrieved, consensus = (chosen[k] for k in given)
        if retrieval.pipeline.image_encoder.spec != adapter.image_encoder.spec:
            raise SpecError(f"the retrieval's image encoder {retrieval.pipeline.image_encoder.spec!r} "
                            f"is not the adapter's {adapter.image_encoder.spec!r}")
        if drafts < 1 or consensus < 1:
            raise ValueError(f"drafts and consensus must be >= 1, got {drafts} and {consensus}")
        self.retrieval = retrieval
        self.drafts, self.with_retrieved = int(drafts), bool(with_retrieved)
        self.consensus = int(consensus)

    def caption_chunk(self, images: Sequence[Any], features: Tensor, options: dict[str, Any]) -> list[str]:
        """One caption per image of the chunk: SmallCap's own, or the consensus choice among the
        candidates; see the class docstring."""
        if self.drafts == 1 and self.nbest == 1 and not self.with_retrieved:
            return super().caption_chunk(images, features, options)
        image_emb = self.retrieval.pipeline.encode_images(images)
        return self.choose(self.candidates(image_emb, features, options), image_emb)

    def candidates(self, image_emb: Tensor, features: Tensor, options: dict[str, Any]) -> list[list[str]]:
        """Each image's candidate captions: per example window, the beam search's ``nbest`` best
        (tidied), then the retrieved caption when ``with_retrieved``. ``image_emb`` ``(B, Di)``:
        the images by the retrieval's image encoder; ``features``: the adapter's; ``options``:
        keywords of :meth:`~nofree.adapters.captioning.CaptioningAdapter.generate`."""
        windows = example_windows(self.adapter.hparams["examples"], self.drafts)
        ranked = example_captions(self.retrieval, image_emb, max(first + count for first, count in windows))
        returns = min(self.nbest, options["beams"])
        candidates: list[list[str]] = [[] for _ in range(len(image_emb))]
        for first, count in windows:
            prompts = [self.adapter.prompt_text(found[first:first + count]) for found in ranked]
            drafts = self.adapter.caption_features(features, prompts=prompts, returns=returns, **options)
            for i, text in enumerate(drafts):
                candidates[i // returns].append(clean_caption(text))
        if self.with_retrieved:
            for row, found in zip(candidates, ranked):
                row.append(found[0].strip())
        return candidates

    def choose(self, candidates: Sequence[Sequence[str]], image_emb: Tensor) -> list[str]:
        """Per image, the candidate with the highest CIDEr-D against its ``consensus`` best pool
        captions by similarity (:meth:`RetrievalCaptioner.top`)."""
        references = self.retrieval.top(image_emb, self.consensus)
        return [row[self.retrieval.cider.choose(row, refs)] for row, refs in zip(candidates, references)]

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, pool: Sequence[str] | None = None,
                        device: Any = None, cache: Any = None, **kw: Any) -> "SmallCapCaptioner":
        """The adapter saved in ``directory`` with its anchor set, retrieving from ``pool`` (default:
        the pool it was trained with); keywords as in :class:`AdapterCaptioner`."""
        from nofree.adapters.base import load_adapter
        from nofree.hub import resolve_dir

        directory = resolve_dir(directory, what="adapter")  # a folder, or hf-hub:ORG/NAME[@REVISION]
        return cls.for_adapter(load_adapter(directory, device=device), directory, pool=pool, cache=cache,
                               **kw)

    @classmethod
    def for_adapter(cls, adapter: Any, directory: str | Path, *, pool: Sequence[str] | None = None,
                    cache: Any = None, clean_pool: bool = True, **kw: Any) -> "SmallCapCaptioner":
        """Like :meth:`from_pretrained` for an adapter already loaded from ``directory``."""
        from nofree.anchors.anchor_set import AnchorSet
        from nofree.data.pairs import load_text_lines
        from nofree.data.pool import default_pool_path
        from nofree.registry import load_encoder

        from nofree.hub import resolve_dir

        directory = resolve_dir(directory, what="adapter")
        if not isinstance(adapter, SmallCap):
            raise OptionError(f"{directory} holds a {adapter.kind} adapter, not smallcap: use ",
                              Option("method", adapter.kind))
        if not (directory / ANCHORS_DIR).is_dir():
            raise DataError(f"{directory} lacks its anchor set ({ANCHORS_DIR}/); copy the whole adapter "
                            "folder, or retrain it")
        anchors = AnchorSet.load(directory / ANCHORS_DIR)
        text_encoder = load_encoder(anchors.text_spec, modality="text", device=adapter.device)
        if pool is None:
            saved = directory / POOL_FILE
            pool = load_text_lines(saved if saved.is_file() else default_pool_path())
        adapter.attach_retrieval(anchors, pool)
        retrieval = retrieval_for(anchors, adapter.image_encoder, text_encoder, pool, cache=cache,
                                  clean_pool=clean_pool)
        return cls(adapter, retrieval, **kw)

    def prompts(self, images: Sequence[Any]) -> list[str]:
        """Each image's prompt: its retrieved pool captions."""
        image_emb = self.retrieval.pipeline.encode_images(images)
        found = example_captions(self.retrieval, image_emb, self.adapter.hparams["examples"])
        return [self.adapter.prompt_text(captions) for captions in found]


def _with_anchor_rows(retrieval: Any, rows: Sequence[int]) -> Any:
    """``retrieval`` over the anchors at ``rows`` only: same pool and pool embeddings (nothing is
    re-encoded), ASIF refitted and the pool's relative representations recomputed."""
    import copy

    from nofree.anchors.pipeline import AsifPipeline

    full = retrieval.pipeline
    other = copy.copy(retrieval)
    other.pipeline = AsifPipeline.from_anchors(full.anchors.subset(list(rows)), full.image_encoder,
                                               full.text_encoder, cache=full.cache, **full.label_settings)
    other.pool_rel = other.pipeline.asif.transform(retrieval.pool_emb, modality="text")
    return other


def train_smallcap(pairs_path: str | Path, *, out: str | Path, image_encoder: str | None = None,
                   text_encoder: str | None = None, lm: str | None = None, anchors: str | Path | None = None,
                   pool: str | Path | None = None, clean_pool: bool = True, examples: int = 4,
                   epochs: int | None = None,
                   batch_size: int = RECIPES["smallcap"]["batch_size"], lr: float = RECIPES["smallcap"]["lr"],
                   num_latents: int = 32, xattn_every: int = 5, gate_lr_scale: float = 1.0,
                   precision: str = "bf16", augment: str = str(RECIPES["smallcap"]["augment"]),
                   resume: bool = False, overwrite: bool = False, device: Any = None,
                   seed: int = 0, train_split: str = "train", val_split: str | None = "val",
                   cache_dir: str | Path | None = None, progress: bool = True, **train_kw: Any) -> Any:
    """Train a SmallCap adapter on ``pairs_path`` (see the module docstring); returns the
    :class:`~nofree.adapters.train.TrainResult`.

    ``anchors``: an anchor set folder to retrieve with (default: built from ``train_split``);
    ``pool``: a caption file (default: the bundled pool), its non-captions and repeats dropped
    unless ``clean_pool`` is False (:class:`~nofree.captioning.retrieval.RetrievalCaptioner`).
    Other keywords as in :func:`nofree.adapters.train.train_flamingo`.
    """
    import tempfile

    from nofree.adapters.base import _load_backbone
    from nofree.adapters.checkpoint import check_out_dir
    from nofree.adapters.train import _check_positive, load_splits, prepare_examples, train_adapter
    from nofree.anchors.anchor_set import AnchorSet
    from nofree.cache import EmbeddingCache
    from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER
    from nofree.data.pairs import load_text_lines
    from nofree.data.pool import default_pool_path
    from nofree.registry import load_encoder

    check_out_dir(out, resume=resume, overwrite=overwrite,
                  inputs=[p for p in (pairs_path, anchors, pool) if p is not None])
    epochs, train_kw["min_steps"] = recipe_epochs("smallcap", epochs)
    _check_positive(epochs=epochs, batch_size=batch_size, lr=lr)
    train_pairs, val_pairs = load_splits(pairs_path, train_split, val_split)
    cache = EmbeddingCache(cache_dir)
    image = _load_backbone("image_encoder", image_encoder or DEFAULT_IMAGE_ENCODER, device)
    if anchors is not None:
        anchor_set = AnchorSet.load(anchors)
        if image_encoder is not None and anchor_set.image_spec != image.spec:
            raise OptionError(f"{anchors} was built with image encoder {anchor_set.image_spec!r}, not "
                              f"{image.spec!r}; pass ", Option("image_encoder", anchor_set.image_spec),
                              " or other anchors")
        image = image if anchor_set.image_spec == image.spec else \
            _load_backbone("image_encoder", anchor_set.image_spec, device)
        text = load_encoder(anchor_set.text_spec, modality="text", device=device)
    else:
        from nofree.anchors.build import build_anchor_set

        text = load_encoder(text_encoder or DEFAULT_TEXT_ENCODER, modality="text", device=device)
        with tempfile.TemporaryDirectory(prefix="nofree-smallcap-") as scratch:
            anchor_set = build_anchor_set(pairs_path, split=train_split, out=Path(scratch) / "anchors",
                                          image_encoder=image, text_encoder=text, device=device,
                                          progress=progress)
    pool_lines = load_text_lines(pool) if pool is not None else None
    torch.manual_seed(seed)
    adapter = SmallCap(image, _load_backbone("lm", lm or DEFAULT_LM, device), examples=examples,
                       num_latents=num_latents, xattn_every=xattn_every, gate_lr_scale=gate_lr_scale,
                       device=device)
    adapter.attach_retrieval(anchor_set, pool_lines)
    retrieval = retrieval_for(anchor_set, image, text, pool_lines or load_text_lines(default_pool_path()),
                              cache=cache, clean_pool=clean_pool)

    def prompted(pairs: Any, *, leave_out: bool) -> Any:
        found = prepare_examples(adapter, pairs, cache=cache, progress=progress,
                                 augment=augment if leave_out else "none")
        if not found.image_paths:
            return found
        own_of = {str(p.image): list(p.captions) for p in pairs}
        own = [own_of[path] for path in found.image_paths]
        image_emb = cache.encode(image, found.image_paths, kind="embed")
        if leave_out:
            found.image_prompts = leave_out_prompts(adapter, lambda rows: _with_anchor_rows(retrieval, rows),
                                                    found.image_paths, image_emb, own)
        else:
            found.image_prompts = [adapter.prompt_text(c) for c in
                                   example_captions(retrieval, image_emb, examples, own)]
        return found

    train = prompted(train_pairs, leave_out=True)
    val = prompted(val_pairs, leave_out=False) if val_pairs else None
    return train_adapter(adapter, train, val_pairs=val, epochs=epochs, batch_size=batch_size, lr=lr,
                         out_dir=out, resume=resume, overwrite=overwrite, seed=seed, progress=progress,
                         precision=precision, augment=augment, cache=cache, **train_kw)
