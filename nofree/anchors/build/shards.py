"""The shard format of anchor-set builds: pairs encoded into shards, written atomically, resumed.

A build (:mod:`nofree.anchors.build.local`, locally; :mod:`nofree.anchors.build.ray`, on Ray actors)
splits its pairs into shards of ``shard_size`` pairs and writes each one, once encoded, as
``shard-NNNNN.safetensors`` in its work folder (``OUT.partial``): tensors ``image`` ``(n, Di)``
and ``text`` ``(n, Dt)`` (one row per readable image and caption), and JSON metadata lists
``captions``, ``images`` (each row's image path) and ``skipped`` (unreadable images). A shard is
written to a temporary name and renamed into place, so a shard on disk is always complete.
Within a shard the pairs are encoded in pieces of ``batch_size`` pairs; an unfinished shard's
pieces are saved as ``part-NNNNN.safetensors`` (the same layout, plus ``pairs_done`` and
``pairs_sha256``). ``plan.json`` records what is being built (:func:`start_work_dir`): shard and
piece boundaries, hence encoder batches, depend only on the pairs and those settings, so both
engines write the same shards and either can finish a build the other started.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nofree.anchors.anchor_set import AnchorSet
from nofree.artifacts import atomic_path, atomic_write_json, writing
from nofree.core import DataError, Encoder, Option, OptionError, Pair

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256  # pairs (images) per shard
DEFAULT_CHECKPOINT_S = 30.0  # seconds of encoding between saves of an unfinished shard


def pairs_digest(pairs: Sequence[Pair]) -> str:
    """sha256 over the pairs' image paths and captions: identifies a build's input."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.image, list(pair.captions)], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def resolve_encoder(encoder: str | Encoder | Callable[[], Encoder], modality: str,
                    device: Any) -> Encoder:
    """An encoder from a spec string, an encoder, or a zero-argument factory returning one."""
    if not isinstance(encoder, (str, Encoder)) and callable(encoder):
        encoder = encoder()
    if isinstance(encoder, str):
        from nofree.registry import load_encoder

        encoder = load_encoder(encoder, modality=modality, device=device)
    if getattr(encoder, "modality", modality) != modality:
        raise OptionError(Option(f"{modality}_encoder"), f" {encoder.spec!r} is a {encoder.modality} encoder")
    return encoder


def _encode_piece(pairs: Sequence[Pair], image_encoder: Encoder, text_encoder: Encoder,
                  batch_size: int, strict: bool = False,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Encode a few pairs: one anchor per (readable image, caption); returns tensors + lists.
    An unreadable image is skipped (``strict``: its ``DataError`` is raised)."""
    from nofree.data.images import load_image

    images, kept, skipped = [], [], []
    for pair in pairs:
        try:
            images.append(load_image(pair.image))
            kept.append(pair)
        except DataError as err:
            if strict:
                raise
            skipped.append(pair.image)
            log.debug("skipping %s", err)  # reported together at the end of the build
    captions = [caption for pair in kept for caption in pair.captions]
    owners = [pair.image for pair in kept for _ in pair.captions]
    repeats = torch.tensor([len(pair.captions) for pair in kept], dtype=torch.long)
    image_emb = image_encoder.encode(images, batch_size=batch_size) if images else \
        torch.zeros(0, image_encoder.embed_dim)
    text_emb = text_encoder.encode(captions, batch_size=batch_size) if captions else \
        torch.zeros(0, text_encoder.embed_dim)
    tensors = {"image": image_emb.float().repeat_interleave(repeats, dim=0).contiguous(),
               "text": text_emb.float().contiguous()}
    return tensors, {"captions": captions, "images": owners, "skipped": skipped}


def _join(pieces: list[tuple[dict[str, torch.Tensor], dict[str, list]]], dims: tuple[int, int],
          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Pieces in order as one shard's tensors and (JSON string) metadata."""
    tensors = {name: torch.cat([t[name] for t, _ in pieces]) if pieces else torch.zeros(0, dim)
               for name, dim in zip(("image", "text"), dims)}
    metadata = {key: json.dumps([v for _, lists in pieces for v in lists[key]], ensure_ascii=False)
                for key in ("captions", "images", "skipped")}
    return tensors, metadata


def encode_shard(pairs: Sequence[Pair], image_encoder: Encoder, text_encoder: Encoder,
                 batch_size: int, *, checkpoint: Path | None = None,
                 checkpoint_s: float = DEFAULT_CHECKPOINT_S, strict: bool = False,
                 on_pairs: Callable[[int], Any] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode one shard: one anchor per (readable image, caption); returns tensors + metadata.
    ``on_pairs(n)`` is called as each piece of ``n`` pairs is done (and once for the pairs a
    checkpoint already held), e.g. to move a progress bar.

    The shard is encoded in pieces of ``batch_size`` pairs (one image batch each), so its result
    does not depend on where an earlier attempt stopped. With ``checkpoint`` (a file path), the
    pieces finished so far are saved there every ``checkpoint_s`` seconds and on Ctrl-C, and a
    call finding that file continues after them.
    """
    dims = (image_encoder.embed_dim, text_encoder.embed_dim)
    digest = pairs_digest(pairs)
    pieces, done = [], 0
    saved = _read_checkpoint(checkpoint, digest, len(pairs)) if checkpoint is not None else None
    if saved is not None:
        tensors, meta = saved
        done = int(meta["pairs_done"])
        pieces.append((tensors, {key: meta[key] for key in ("captions", "images", "skipped")}))
        if on_pairs is not None:
            on_pairs(done)
    saved_done, last_save = done, time.monotonic()

    def save() -> None:
        tensors, metadata = _join(pieces, dims)
        write_shard(checkpoint, tensors, {**metadata, "pairs_done": json.dumps(done),
                                           "pairs_sha256": json.dumps(digest)})

    try:
        while done < len(pairs):
            chunk = pairs[done:done + batch_size]
            pieces.append(_encode_piece(chunk, image_encoder, text_encoder, batch_size, strict))
            done += len(chunk)
            if on_pairs is not None:
                on_pairs(len(chunk))
            if checkpoint is not None and done < len(pairs) and \
                    time.monotonic() - last_save >= checkpoint_s:
                save()
                saved_done, last_save = done, time.monotonic()
    except (KeyboardInterrupt, DataError):  # Ctrl-C, or ``strict`` stopping at an unreadable image
        if checkpoint is not None and saved_done < done < len(pairs):
            save()
        raise
    return _join(pieces, dims)


def _read_checkpoint(path: Path, digest: str, n_pairs: int,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The saved pieces of an unfinished shard, or ``None`` (absent, unreadable or not this shard's)."""
    if not path.exists():
        return None
    part = read_shard(path)
    if part is not None:
        meta = part[1]
        done = meta.get("pairs_done")
        if meta.get("pairs_sha256") == digest and isinstance(done, int) and 0 < done < n_pairs:
            return part
        log.warning("%s belongs to other pairs or settings; encoding that shard from its start", path)
    return None


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard (or an unfinished shard's pieces) atomically: temporary name, then rename."""
    from safetensors.torch import save_file

    with writing(path), atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A finished shard's tensors and metadata, or ``None`` if it is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {key: json.loads(value) for key, value in f.metadata().items()}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError):
        log.warning("shard %s is unreadable; encoding it again", path)
        return None
    return tensors, meta


def shard_path(work_dir: Path, index: int) -> Path:
    """Where finished shard ``index`` is written."""
    return work_dir / f"shard-{index:05d}.safetensors"


def checkpoint_path(work_dir: Path, index: int) -> Path:
    """Where the finished pieces of unfinished shard ``index`` are saved."""
    return work_dir / f"part-{index:05d}.safetensors"


def start_work_dir(work_dir: Path, pairs: Sequence[Pair], image_spec: str, text_spec: str,
                   shard_size: int, batch_size: int) -> int:
    """Write ``plan.json`` into ``work_dir`` (or check the one there); returns the shard count.

    A plan that differs from the current arguments is an error rather than silently mixing two
    builds. The plan does not name the engine: local and Ray shards are interchangeable.
    """
    plan = {"pairs_sha256": pairs_digest(pairs), "n_pairs": len(pairs), "image_spec": image_spec,
            "text_spec": text_spec, "shard_size": shard_size, "batch_size": batch_size}
    plan_file = work_dir / "plan.json"
    discard = f"`rm -r {shlex.quote(str(work_dir))}` (it holds only that build's encoded shards)"
    if plan_file.exists():
        try:
            previous = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{plan_file} is unreadable (an unfinished build's plan); discard that "
                            f"build with {discard} and run the command again") from None
        if not isinstance(previous, dict) or previous != plan:
            changed = sorted(k for k in plan
                             if not isinstance(previous, dict) or previous.get(k) != plan[k])
            raise DataError(f"{work_dir} holds an unfinished build with other settings "
                            f"({', '.join(changed)} differ): run that earlier command again to finish "
                            f"it, or discard it with {discard}")
    else:
        with writing(work_dir):
            work_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(plan_file, plan, indent=2)
    return (len(pairs) + shard_size - 1) // shard_size


def assemble_shards(parts: Sequence[tuple[dict[str, torch.Tensor], dict[str, Any]]], image_spec: str,
                    text_spec: str, dims: tuple[int, int] = (0, 0)) -> tuple[AnchorSet, list[str]]:
    """One in-memory AnchorSet from shard parts in shard order, and the skipped image paths."""
    skipped = [path for _, meta in parts for path in meta["skipped"]]
    image = torch.cat([t["image"] for t, _ in parts]) if parts else torch.zeros(0, dims[0])
    text = torch.cat([t["text"] for t, _ in parts]) if parts else torch.zeros(0, dims[1])
    captions = tuple(c for _, meta in parts for c in meta["captions"])
    images = tuple(p for _, meta in parts for p in meta["images"])
    return AnchorSet(image, text, captions, image_spec, text_spec, images), skipped
