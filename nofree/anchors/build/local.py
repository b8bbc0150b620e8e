"""Build and extend anchor sets from pairs files, resumably.

``build_anchor_set`` encodes pairs shard by shard into ``OUT.partial/``; each shard is one
safetensors file written to a temporary name and renamed into place, so a shard on disk is
always complete. Within a shard the pairs are encoded in pieces of ``batch_size`` pairs, and the
pieces finished so far are saved (``part-NNNNN.safetensors``) every ``checkpoint_s`` seconds and
on Ctrl-C, so an interruption loses at most that long of work however small the build.
Interrupted (Ctrl-C, kill, crash) and run again with the same arguments, the build skips the
finished shards and pieces and ends with exactly the set an uninterrupted build gives (shard and
piece boundaries, hence encoder batches, depend only on the pairs and the settings recorded in
``plan.json``). Images that cannot be read are skipped, counted, and listed in the manifest.

One build writes a destination at a time (a lock file beside ``OUT``; a second build there stops
with a message). A build that fails before encoding anything, or whose images could all not be
read, removes its ``OUT.partial``; ``overwrite`` replaces only an existing anchor set that is
not the build's input (:func:`nofree.artifacts.check_replaceable`).

Two engines share the shard format, the plan and the assembly (:mod:`nofree.anchors.build.shards`):
``engine="local"`` encodes the shards one after the other in this process
(:func:`encode_pairs_resumably`); ``engine="ray"`` hands them to a pool of encoder actors on Ray
(:mod:`nofree.anchors.build.ray`). For the same pairs and settings both give the same shards, so
either can finish a build the other started.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.build.ray import encode_pairs_ray
from nofree.anchors.build.shards import (DEFAULT_CHECKPOINT_S, DEFAULT_SHARD_SIZE, assemble_shards,
                                         checkpoint_path, encode_shard, pairs_digest, read_shard,
                                         resolve_encoder, shard_path, start_work_dir, write_shard)
from nofree.artifacts import ANCHOR_SET, OUT, OVERWRITE, check_replaceable, exclusive
from nofree.core import DataError, Encoder, Option, OptionError, Pair

log = logging.getLogger(__name__)


def encode_pairs_resumably(pairs: Sequence[Pair], image_encoder: Encoder, text_encoder: Encoder,
                           work_dir: Path, *, batch_size: int = 32,
                           shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
                           checkpoint_s: float = DEFAULT_CHECKPOINT_S, strict: bool = False,
                           ) -> tuple[AnchorSet, list[str]]:
    """Encode ``pairs`` into an in-memory AnchorSet through resumable shards in ``work_dir``.

    Returns the anchors and the image paths that were skipped. ``work_dir`` holds ``plan.json``
    (what is being built, see :func:`start_work_dir`), ``shard-NNNNN.safetensors`` and, for the
    shard being encoded, ``part-NNNNN.safetensors`` (its pieces so far, saved every
    ``checkpoint_s`` seconds and on Ctrl-C). ``strict``: the first unreadable image raises its
    ``DataError`` (the pairs encoded before it are kept) instead of being skipped.
    """
    from tqdm.auto import tqdm

    n_shards = start_work_dir(work_dir, pairs, image_encoder.spec, text_encoder.spec, shard_size,
                              batch_size)
    parts: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    bar = tqdm(total=len(pairs), unit="pair", desc="encoding anchors", disable=not progress)
    saved = [0]  # pairs encoded so far: all on disk once an interrupt has saved the finished pieces

    def advance(n: int) -> None:
        saved[0] += n
        bar.update(n)

    try:
        for index in range(n_shards):
            chunk = pairs[index * shard_size:(index + 1) * shard_size]
            path = shard_path(work_dir, index)
            part = read_shard(path) if path.exists() else None
            if part is None:
                tensors, metadata = encode_shard(chunk, image_encoder, text_encoder, batch_size,
                                                  checkpoint=checkpoint_path(work_dir, index),
                                                  checkpoint_s=checkpoint_s, strict=strict,
                                                  on_pairs=advance)  # moves per encoded batch
                write_shard(path, tensors, metadata)
                checkpoint_path(work_dir, index).unlink(missing_ok=True)
                part = tensors, {key: json.loads(value) for key, value in metadata.items()}
            else:
                advance(len(chunk))  # a shard finished by an earlier run
            parts.append(part)
    except KeyboardInterrupt:
        bar.close()
        if not _holds_encoded_work(work_dir):
            log.warning("interrupted before any pair was saved; nothing to resume")
            raise
        log.warning("interrupted after %d of %d pairs; finished shards (and the pieces of the shard "
                    "being encoded) are kept in %s: run the same command again to resume",
                    saved[0], len(pairs), work_dir)
        raise
    finally:
        bar.close()  # so an error message starts on a line of its own
    return assemble_shards(parts, image_encoder.spec, text_encoder.spec,
                           (image_encoder.embed_dim, text_encoder.embed_dim))


def _load_pairs(pairs: str | Path | Sequence[Pair], split: str | None,
                limit: int | None) -> tuple[list[Pair], list[str]]:
    """The pairs to encode, and the samples a webdataset source had to skip (missing caption or
    image, truncated shard: logged by the reader)."""
    from nofree.data.webdataset import is_shard_pattern

    if isinstance(pairs, (str, Path)) or is_shard_pattern(pairs):  # a source, or a list of shards
        from nofree.data.pairs import load_pairs
        from nofree.data.webdataset import is_webdataset, scan_webdataset

        if split is None and is_webdataset(pairs):
            scan = scan_webdataset(pairs, limit=limit)
            return scan.pairs, [ref for ref, _ in scan.skipped]
        return list(load_pairs(pairs, split=split, limit=limit)), []
    selected = [p for p in pairs if split is None or p.split == split]
    return (selected[:limit] if limit is not None else selected), []


def _source_record(pairs: str | Path | Sequence[Pair], loaded: Sequence[Pair], split, limit) -> dict:
    from nofree.data.webdataset import is_shard_pattern

    # absolute here, relative to the set's folder on disk (AnchorSet.save): "<...>" is a label
    name = "::".join(os.path.abspath(os.path.expanduser(part)) for part in str(pairs).split("::")) \
        if isinstance(pairs, (str, Path)) else "::".join(os.path.abspath(os.fspath(p)) for p in pairs) \
        if is_shard_pattern(pairs) else "<in-memory pairs>"
    return {"pairs": name, "split": split, "limit": limit, "n_pairs": len(loaded),
            "pairs_sha256": pairs_digest(loaded)}


def build_anchor_set(pairs: str | Path | Sequence[Pair], *, image_encoder: str | Encoder | Callable[[], Encoder],
                     text_encoder: str | Encoder | Callable[[], Encoder], out: str | Path, split: str | None = None,
                     limit: int | None = None, batch_size: int = 32, device: Any = None,
                     shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                     progress: bool = True, engine: str = "local", workers: int | None = None,
                     ray_address: str | None = None, index: str | None = None,
                     checkpoint_s: float = DEFAULT_CHECKPOINT_S, dedupe: bool = False,
                     strict: bool = False) -> AnchorSet:
    """Encode pairs (JSONL / CSV / image folder / webdataset shards) into an anchor set at ``out``.

    Repeated pairs (an image listed twice, a caption its image already has) are reported in one
    warning, and skipped when ``dedupe`` (:func:`nofree.data.pairs.dedupe_pairs`).

    Resumable: an interrupted build keeps its shards (and the finished pieces of the shard it
    was encoding, saved every ``checkpoint_s`` seconds and on Ctrl-C) in ``OUT.partial`` and
    the same call continues it. ``overwrite`` replaces an existing anchor set at ``out``, never
    anything else (see :func:`nofree.artifacts.check_replaceable`). ``split`` keeps only pairs of that split (e.g. ``"train"``); ``limit`` the
    first n pairs. ``engine="ray"`` encodes the shards on a pool of ``workers`` Ray actors (a
    local Ray started for the call, or the cluster at ``ray_address``); the encoders must then be
    spec strings or zero-argument factories, which each actor calls to build its own encoder
    (``device`` is then chosen per actor: its GPU if Ray gave it one, else CPU). ``index``, a
    faiss ``index_factory`` string such as ``"IVF4096,PQ32"``, adds a search index to the set
    (:func:`nofree.anchors.search.index.add_index`). Unreadable images are skipped, listed in the
    manifest and reported once at the end; ``strict`` (local engine) stops at the first one with
    its ``DataError`` instead. Returns the saved set.
    """
    if engine not in ("local", "ray"):
        raise DataError(f"engine must be 'local' or 'ray', got {engine!r}")
    if strict and engine == "ray":
        raise OptionError(Option("strict", True), " works with ", Option("engine", "local"),
                          " only; drop one of them")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OptionError(f"{out} already exists; use `nofree anchors extend` to add pairs, pass ",
                          OVERWRITE, " to replace it, or choose another ", OUT)
    loaded, unread = _load_pairs(pairs, split, limit)
    if not loaded:
        raise DataError(f"no pairs to build from in {pairs}" + (f" with split={split!r}" if split else ""))
    from nofree.data.pairs import dedupe_pairs

    loaded = dedupe_pairs(loaded, pairs if isinstance(pairs, (str, Path)) else "pairs", dedupe=dedupe)
    work_dir = Path(os.path.abspath(out) + ".partial")
    with exclusive(out):
        if out.exists():
            if not overwrite:  # another build finished there while this one was starting
                raise OptionError(f"{out} already exists; pass ", OVERWRITE, " to replace it, or "
                                  "choose another ", OUT)
            check_replaceable(out, kind=ANCHOR_SET, inputs=_inputs(pairs, loaded))
        try:
            if engine == "ray":
                anchors, skipped = encode_pairs_ray(loaded, image_encoder, text_encoder, work_dir,
                                                    batch_size=batch_size, shard_size=shard_size,
                                                    workers=workers, ray_address=ray_address,
                                                    progress=progress)
            else:
                image_encoder = resolve_encoder(image_encoder, "image", device)
                text_encoder = resolve_encoder(text_encoder, "text", device)
                anchors, skipped = encode_pairs_resumably(loaded, image_encoder, text_encoder, work_dir,
                                                          batch_size=batch_size, shard_size=shard_size,
                                                          progress=progress, checkpoint_s=checkpoint_s,
                                                          strict=strict)
            skipped = unread + skipped
            _require_some(anchors, work_dir, loaded, pairs, skipped)
        except BaseException:
            if not _holds_encoded_work(work_dir):
                _discard_work_dir(work_dir)
            raise
        meta = {"sources": [_source_record(pairs, loaded, split, limit)], "skipped_images": skipped}
        anchors = AnchorSet(anchors.image, anchors.text, anchors.captions, anchors.image_spec,
                            anchors.text_spec, anchors.images, meta)
        anchors.save(out, overwrite=overwrite)
        shutil.rmtree(work_dir, ignore_errors=True)
        if skipped:
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            log.warning("skipped %d unreadable image(s) or sample(s): %s%s, all listed in "
                        "%s/manifest.json; strict=True (--strict) stops at the first one instead",
                        len(skipped), ", ".join(skipped[:5]), more, out)
        if index:
            from nofree.anchors.search.index import add_index

            meta["index"] = add_index(out, index, anchors=anchors)
    return anchors


def _inputs(pairs: str | Path | Sequence[Pair], loaded: Sequence[Pair]) -> list[str]:
    """What a build reads, for the ``overwrite`` check: the pairs source and its images' folders."""
    folders = sorted({os.path.dirname(pair.image) for pair in loaded})
    return ([str(pairs)] if isinstance(pairs, (str, Path)) else []) + folders


def _holds_encoded_work(work_dir: Path) -> bool:
    """Whether ``work_dir`` holds a finished shard or saved pieces (worth keeping to resume)."""
    return any(work_dir.glob("shard-*.safetensors")) or any(work_dir.glob("part-*.safetensors"))


def _require_some(encoded: Any, work_dir: Path, loaded: Sequence[Pair], pairs: Any, skipped: list) -> None:
    """Stop when no image could be read: drop ``work_dir`` (its shards only record failures, which
    the next run must retry) and say so in one line."""
    if len(encoded) == 0:
        _discard_work_dir(work_dir)
        raise DataError(f"none of the {len(loaded)} images in {pairs} could be read "
                        f"(e.g. {skipped[:3]}); check the image paths")


def _discard_work_dir(work_dir: Path) -> None:
    """Remove an unfinished build's folder (only if it is one: it holds nofree's plan.json)."""
    if (work_dir / "plan.json").is_file():
        shutil.rmtree(work_dir, ignore_errors=True)


def extend_anchor_set(path: str | Path, pairs: str | Path | Sequence[Pair], *,
                      split: str | None = None, limit: int | None = None, batch_size: int = 32,
                      device: Any = None, image_encoder: Encoder | None = None,
                      text_encoder: Encoder | None = None, progress: bool = True,
                      dedupe: bool = False) -> AnchorSet:
    """Append the anchors of ``pairs`` to the set at ``path``, encoded with its recorded encoders.

    The set's folder is rewritten as a whole (new set complete, then swapped in), so pairs or
    images kept inside it are refused rather than deleted. Repeated pairs, among ``pairs`` or of
    anchors the set already has, are reported, and skipped when ``dedupe``. An interrupted
    extension keeps its work in ``PATH.extend-partial`` and the same call resumes it; one that
    encoded nothing (unreadable images, a failing encoder) leaves no such folder.
    """
    path = Path(path)
    with exclusive(path, option="anchor set"):
        return _extend(path, pairs, split=split, limit=limit, batch_size=batch_size, device=device,
                       image_encoder=image_encoder, text_encoder=text_encoder, progress=progress,
                       dedupe=dedupe)


def _extend(path: Path, pairs: str | Path | Sequence[Pair], *, split: str | None, limit: int | None,
            batch_size: int, device: Any, image_encoder: Encoder | None, text_encoder: Encoder | None,
            progress: bool, dedupe: bool) -> AnchorSet:
    from nofree.data.pairs import dedupe_pairs

    base = AnchorSet.load(path)
    loaded, unread = _load_pairs(pairs, split, limit)
    if not loaded:
        raise DataError(f"no pairs to add from {pairs}" + (f" with split={split!r}" if split else ""))
    # before any encoding: the swap at the end deletes whatever else the set's folder holds
    folder = Path(os.path.realpath(path))
    for item in _inputs(pairs, loaded):
        real = Path(os.path.realpath(item))
        if real == folder or folder in real.parents:
            raise DataError(f"{item} lies inside the anchor set {path}, which extend rewrites as a "
                            f"whole (deleting anything else in it); move the pairs and their images "
                            f"out of {path} and run the command again")
    check_replaceable(path, kind=ANCHOR_SET, option="anchor set", flag=None)
    loaded = dedupe_pairs(loaded, pairs if isinstance(pairs, (str, Path)) else "pairs", dedupe=dedupe,
                          existing=set(zip(base.images, base.captions)))
    if not loaded:
        raise OptionError(f"every pair in {pairs} is already in {path} (", Option("dedupe", True),
                          "); nothing to add")
    image_encoder = resolve_encoder(image_encoder or base.image_spec, "image", device)
    text_encoder = resolve_encoder(text_encoder or base.text_spec, "text", device)
    base.check_encoder(image_encoder, "image")
    base.check_encoder(text_encoder, "text")
    work_dir = Path(os.path.abspath(path) + ".extend-partial")
    try:
        extra, skipped = encode_pairs_resumably(loaded, image_encoder, text_encoder, work_dir,
                                                batch_size=batch_size, progress=progress)
        _require_some(extra, work_dir, loaded, pairs, unread + skipped)
    except BaseException:
        if not _holds_encoded_work(work_dir):
            _discard_work_dir(work_dir)
        raise
    meta = dict(base.meta)
    meta["sources"] = [*meta.get("sources", []), _source_record(pairs, loaded, split, limit)]
    meta["skipped_images"] = [*meta.get("skipped_images", []), *unread, *skipped]
    if meta.pop("index", None):
        log.warning("%s: its search index covers the old anchors only and was dropped; add it again "
                    "with `nofree anchors index %s --factory ...`", path, path)
    merged = AnchorSet(torch.cat([base.image, extra.image]), torch.cat([base.text, extra.text]),
                       base.captions + extra.captions, base.image_spec, base.text_spec,
                       (base.images + extra.images) if base.images else (), meta)
    merged.save(path, overwrite=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    if skipped:
        log.warning("skipped %d unreadable image(s): %s%s (all listed in %s/manifest.json)",
                    len(skipped), ", ".join(skipped[:5]),
                    f" and {len(skipped) - 5} more" if len(skipped) > 5 else "", path)
    return merged
