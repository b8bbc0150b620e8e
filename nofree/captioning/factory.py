"""The captioner a method name stands for, and captioning a list of image files with it.

:func:`load_captioner` builds any captioner from a method name and a folder (an anchor set or a
trained adapter): the one entry point behind ``nofree caption``; :func:`iter_caption_paths`
captions image files batch by batch, skipping unreadable ones. Errors about the arguments are
:class:`~nofree.core.OptionError` s, which name the parameters of this module's functions (the
CLI rewrites them as its flags).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

from nofree.captioning.drafts import MagicCaptioner
from nofree.captioning.retrieval import RetrievalCaptioner
from nofree.core import DataError, Option, OptionError, option_list
from nofree.data.pool import default_pool_path

#: Spec forms of a CLIP-like scorer, for the messages that suggest one.
_CLIP_LIKE = "open_clip:ARCH@TAG, hf-clip:NAME, local:DIR, lit:DIR"
#: The decoding options of a trained adapter's captioner, and its parameter for each.
_ADAPTER_DECODING = {"max_new_tokens": "max_tokens", "beams": "beams", "no_repeat_ngram": "no_repeat_ngram",
                     "nbest": "nbest"}
#: A SmallCap captioner's further options: more candidates, one kept by consensus with retrieval.
_SMALLCAP_CANDIDATES = {"drafts": "drafts", "consensus": "consensus", "with_retrieved": "with_retrieved"}


def load_captioner(method: str, *, anchor_dir: Any = None, adapter_dir: Any = None, pool: Any = None,
                   lm: str | None = None, device: Any = None, options: dict | None = None,
                   clean_pool: bool = True, scorer: str | None = None, label_weight: float | None = None) -> Any:
    """The captioner ``method`` names (retrieval, magic, clipcap, flamingo, smallcap), built from
    an anchor set (``anchor_dir``) or a trained adapter (``adapter_dir``).

    ``pool``: a caption file, cleaned as :class:`RetrievalCaptioner` says unless ``clean_pool``
    is False. ``scorer``: MAGIC's scorer spec (:mod:`nofree.scoring`): ``asif`` (the default,
    with the anchor set), or a CLIP-like model or trained LiT, which ranks the pool itself
    (no anchor set) and steers with the paper's α, β unless ``options`` say otherwise.
    ``options``: the captioner's keyword arguments (MAGIC's, or a trained adapter's decoding:
    ``max_new_tokens``, ``beams``, ``no_repeat_ngram``, ``nbest``; SmallCap's also ``drafts``,
    ``consensus`` and ``with_retrieved``). ``label_weight``: the label bridge's weight in the ASIF
    similarity over ``anchor_dir`` (:mod:`nofree.anchors.labels`; None: nofree's default).
    """
    options = dict(options or {})
    asif_ranked = method in ("retrieval", "magic") and anchor_dir is not None \
        and (scorer is None or scorer.strip().lower() == "asif")
    if label_weight is not None and not asif_ranked:
        raise OptionError(Option("label_weight", label_weight), " weighs the label bridge of ASIF over ",
                          Option("anchor_dir", placeholder="DIR"), " (", Option("method", "retrieval"), " or ",
                          Option("method", "magic"), "): drop it")
    if scorer is not None:
        from nofree.scoring import ASIF_SCORER, load_scorer, normalize_scorer_spec

        if method != "magic":
            raise OptionError(Option("scorer"), " steers MAGIC only (", Option("method", method),
                              " takes none): drop ", Option("scorer"), ", or use ", Option("method", "magic"))
        scorer = normalize_scorer_spec(scorer)
        if scorer == ASIF_SCORER and anchor_dir is None:
            raise OptionError(Option("scorer", ASIF_SCORER), " scores through an anchor set: add ",
                              Option("anchor_dir", placeholder="DIR"), " (from `nofree anchors build`), or give "
                              "a CLIP-like ",
                              Option("scorer"), f" ({_CLIP_LIKE}), which needs none")
        if scorer != ASIF_SCORER:
            if anchor_dir is not None:
                raise OptionError(Option("scorer", scorer), " ranks the caption pool itself and uses no "
                                  "anchor set: drop ", Option("anchor_dir"), ", or use ",
                                  Option("scorer", ASIF_SCORER), " to score with the anchors")
            from nofree.cache import EmbeddingCache

            options = _magic_options(options, pool)
            space = load_scorer(scorer, device=device, cache=EmbeddingCache())
            return MagicCaptioner.from_scorer(space, lm=lm, device=device, clean_pool=clean_pool, **options)
    if method in ("retrieval", "magic"):
        if anchor_dir is None:
            clip = [" or a CLIP-like ", Option("scorer"), f" ({_CLIP_LIKE})"] if method == "magic" else []
            raise OptionError(Option("method", method), " needs ", Option("anchor_dir", placeholder="DIR"),
                              " (an anchor set from `nofree anchors build`)", *clip)
        from nofree.anchors.pipeline import AsifPipeline
        from nofree.cache import EmbeddingCache

        pipeline = AsifPipeline.load(anchor_dir, device=device, cache=EmbeddingCache(), label_weight=label_weight)
        if method == "retrieval":
            from nofree.data.pairs import load_text_lines

            unused = sorted(k for k in options if k not in {"max_new_tokens"})
            if unused:
                raise OptionError(Option("method", "retrieval"), " takes no ", *option_list(unused))
            return RetrievalCaptioner(pipeline, load_text_lines(pool or default_pool_path()),
                                      clean_pool=clean_pool)
        options = _magic_options(options, pool)
        return MagicCaptioner.from_pipeline(pipeline, lm=lm, device=device, clean_pool=clean_pool, **options)
    if method in ("clipcap", "flamingo", "smallcap"):
        if adapter_dir is None:
            raise OptionError(Option("method", method), " needs ", Option("adapter_dir", placeholder="DIR"),
                              f" (an adapter from `nofree train {method}`)")
        known = {**_ADAPTER_DECODING, **(_SMALLCAP_CANDIDATES if method == "smallcap" else {})}
        unused = sorted(k for k in options if k not in known)
        if unused:
            raise OptionError(Option("method", method), " takes no ", *option_list(unused))
        decode = {known[k]: v for k, v in options.items()}
        if method == "smallcap":
            from nofree.adapters.smallcap import SmallCapCaptioner
            from nofree.cache import EmbeddingCache
            from nofree.data.pairs import load_text_lines

            return SmallCapCaptioner.from_pretrained(
                adapter_dir, pool=load_text_lines(pool) if pool is not None else None, device=device,
                cache=EmbeddingCache(), clean_pool=clean_pool, **decode)
        from nofree.adapters import AdapterCaptioner, load_adapter

        adapter = load_adapter(adapter_dir, device=device)
        if adapter.kind != method:
            raise OptionError(f"{adapter_dir} holds a {adapter.kind} adapter, not {method}: use ",
                              Option("method", adapter.kind))
        return AdapterCaptioner(adapter, **decode)
    raise OptionError(f"unknown captioning method {method!r}: choose retrieval, magic, clipcap, flamingo "
                      "or smallcap")


def _magic_options(options: dict, pool: Any) -> dict:
    """``options`` checked for ``method="magic"`` and with the ``pool`` file's captions added."""
    adapter_only = sorted(k for k in ("beams", "no_repeat_ngram", "nbest") if k in options)
    if adapter_only:
        raise OptionError(Option("method", "magic"), " takes no ", *option_list(adapter_only),
                          " (they set a trained adapter's decoding)")
    if pool is not None:
        from nofree.data.pairs import load_text_lines

        return {**options, "pool": load_text_lines(pool)}
    return options


def caption_paths(captioner: Any, paths: Sequence[str], *, batch_size: int = 8,
                  progress: bool = True, strict: bool = False) -> list[dict]:
    """``[{"image": path, "caption": text}, ...]`` in input order: :func:`iter_caption_paths`
    collected into a list."""
    return list(iter_caption_paths(captioner, paths, batch_size=batch_size, progress=progress,
                                   strict=strict))


def iter_caption_paths(captioner: Any, paths: Sequence[str], *, batch_size: int = 8,
                       progress: bool = True, strict: bool = False) -> Iterator[dict]:
    """``{"image": path, "caption": text}`` for each image in input order, yielded batch by batch
    as each is captioned (with a progress bar), so a caller can hand results out as they finish.

    An unreadable image does not stop the run: its row has ``caption: None`` and an ``error``;
    the skipped images are reported once at the end (``logging``). ``strict=True`` raises the
    first unreadable image's ``DataError`` (naming the file) instead.
    """
    from tqdm.auto import tqdm

    from nofree.data.images import load_image, report_skipped

    skipped: list[str] = []
    try:
        with tqdm(total=len(paths), unit="image", desc="captioning", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = list(paths[start:start + batch_size])
                images, errors = [], {}
                for path in chunk:
                    try:
                        images.append(load_image(path))
                    except DataError as err:
                        if strict:
                            raise
                        errors[path] = str(err)
                        skipped.append(str(path))
                captions = iter(captioner.caption(images) if images else [])
                rows = [{"image": path, "caption": None, "error": errors[path]} if path in errors
                        else {"image": path, "caption": next(captions)} for path in chunk]
                bar.update(len(chunk))
                yield from rows
    finally:
        report_skipped(skipped)
