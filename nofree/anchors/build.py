"""Build and extend anchor sets from pairs files, resumably.

``build_anchor_set`` encodes pairs shard by shard into ``OUT.partial/``; each shard is one
safetensors file written to a temporary name and renamed into place, so a shard on disk is
always complete. Interrupted (Ctrl-C, kill, crash) and run again with the same arguments, the
build skips the finished shards and ends with exactly the set an uninterrupted build gives (shard
boundaries and encoder batches depend only on the pairs and the settings recorded in
``plan.json``). Images that cannot be read are skipped, counted, and listed in the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from nofree.anchors.anchor_set import AnchorSet
from nofree.core import DataError, Encoder, Pair

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256  # pairs (images) per shard


def pairs_digest(pairs: Sequence[Pair]) -> str:
    """sha256 over the pairs' image paths and captions: identifies a build's input."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.image, list(pair.captions)], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _resolve_encoder(encoder: str | Encoder, modality: str, device: Any) -> Encoder:
    if isinstance(encoder, str):
        from nofree.registry import load_encoder

        encoder = load_encoder(encoder, modality=modality, device=device)
    if getattr(encoder, "modality", modality) != modality:
        raise DataError(f"--{modality}-encoder {encoder.spec!r} is a {encoder.modality} encoder")
    return encoder


def _encode_shard(pairs: Sequence[Pair], image_encoder: Encoder, text_encoder: Encoder,
                  batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode one shard: one anchor per (readable image, caption); returns tensors + metadata."""
    from nofree.data.images import load_image

    images, kept, skipped = [], [], []
    for pair in pairs:
        try:
            images.append(load_image(pair.image))
            kept.append(pair)
        except DataError as err:
            skipped.append(pair.image)
            log.warning("skipping %s", err)
    captions = [caption for pair in kept for caption in pair.captions]
    owners = [pair.image for pair in kept for _ in pair.captions]
    repeats = torch.tensor([len(pair.captions) for pair in kept], dtype=torch.long)
    image_emb = image_encoder.encode(images, batch_size=batch_size) if images else \
        torch.zeros(0, image_encoder.embed_dim)
    text_emb = text_encoder.encode(captions, batch_size=batch_size) if captions else \
        torch.zeros(0, text_encoder.embed_dim)
    tensors = {"image": image_emb.repeat_interleave(repeats, dim=0).contiguous(),
               "text": text_emb.float().contiguous()}
    metadata = {"captions": json.dumps(captions, ensure_ascii=False),
                "images": json.dumps(owners, ensure_ascii=False),
                "skipped": json.dumps(skipped, ensure_ascii=False)}
    return tensors, metadata


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
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


def encode_pairs_resumably(pairs: Sequence[Pair], image_encoder: Encoder, text_encoder: Encoder,
                           work_dir: Path, *, batch_size: int = 32,
                           shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
                           ) -> tuple[AnchorSet, list[str]]:
    """Encode ``pairs`` into an in-memory AnchorSet through resumable shards in ``work_dir``.

    Returns the anchors and the image paths that were skipped. ``work_dir`` holds ``plan.json``
    (what is being built) and ``shard-NNNNN.safetensors``; a plan that differs from the current
    arguments is an error rather than silently mixing two builds.
    """
    from tqdm.auto import tqdm

    plan = {"pairs_sha256": pairs_digest(pairs), "n_pairs": len(pairs),
            "image_spec": image_encoder.spec, "text_spec": text_encoder.spec,
            "shard_size": shard_size, "batch_size": batch_size}
    work_dir.mkdir(parents=True, exist_ok=True)
    plan_file = work_dir / "plan.json"
    if plan_file.exists():
        previous = json.loads(plan_file.read_text())
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise DataError(f"{work_dir} holds an unfinished build with other settings ({', '.join(changed)} "
                            "differ). Run the same command as before to resume it, or delete that "
                            "folder to start over")
    else:
        tmp = plan_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=2))
        os.replace(tmp, plan_file)

    n_shards = (len(pairs) + shard_size - 1) // shard_size
    parts: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    bar = tqdm(total=len(pairs), unit="pair", desc="encoding anchors", disable=not progress)
    try:
        for index in range(n_shards):
            chunk = pairs[index * shard_size:(index + 1) * shard_size]
            path = work_dir / f"shard-{index:05d}.safetensors"
            part = _read_shard(path) if path.exists() else None
            if part is None:
                tensors, metadata = _encode_shard(chunk, image_encoder, text_encoder, batch_size)
                _write_shard(path, tensors, metadata)
                part = tensors, {key: json.loads(value) for key, value in metadata.items()}
            parts.append(part)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        bar.close()
        done = len(parts) * shard_size
        log.warning("interrupted after %d of %d pairs; finished shards are kept in %s: run the same "
                    "command again to resume", min(done, len(pairs)), len(pairs), work_dir)
        raise
    bar.close()

    skipped = [path for _, meta in parts for path in meta["skipped"]]
    image = torch.cat([t["image"] for t, _ in parts]) if parts else torch.zeros(0, image_encoder.embed_dim)
    text = torch.cat([t["text"] for t, _ in parts]) if parts else torch.zeros(0, text_encoder.embed_dim)
    captions = tuple(c for _, meta in parts for c in meta["captions"])
    images = tuple(p for _, meta in parts for p in meta["images"])
    anchors = AnchorSet(image, text, captions, image_encoder.spec, text_encoder.spec, images)
    return anchors, skipped


def _load_pairs(pairs: str | Path | Sequence[Pair], split: str | None, limit: int | None) -> list[Pair]:
    if isinstance(pairs, (str, Path)):
        from nofree.data.pairs import load_pairs

        return list(load_pairs(pairs, split=split, limit=limit))
    selected = [p for p in pairs if split is None or p.split == split]
    return selected[:limit] if limit is not None else selected


def _source_record(pairs: str | Path | Sequence[Pair], loaded: Sequence[Pair], split, limit) -> dict:
    name = str(pairs) if isinstance(pairs, (str, Path)) else "<in-memory pairs>"
    return {"pairs": name, "split": split, "limit": limit, "n_pairs": len(loaded),
            "pairs_sha256": pairs_digest(loaded)}


def build_anchor_set(pairs: str | Path | Sequence[Pair], *, image_encoder: str | Encoder,
                     text_encoder: str | Encoder, out: str | Path, split: str | None = None,
                     limit: int | None = None, batch_size: int = 32, device: Any = None,
                     shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                     progress: bool = True) -> AnchorSet:
    """Encode a pairs file (JSONL / CSV / image folder) into an anchor set saved at ``out``.

    Resumable: an interrupted build keeps its shards in ``OUT.partial`` and the same call
    continues it. ``split`` keeps only pairs of that split (e.g. ``"train"``); ``limit`` the
    first n pairs. Returns the saved set.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; use `nofree anchors extend` to add pairs, pass "
                        "--overwrite to replace it, or choose another --out")
    loaded = _load_pairs(pairs, split, limit)
    if not loaded:
        raise DataError(f"no pairs to build from in {pairs}" + (f" with split={split!r}" if split else ""))
    image_encoder = _resolve_encoder(image_encoder, "image", device)
    text_encoder = _resolve_encoder(text_encoder, "text", device)
    work_dir = out.with_name(out.name + ".partial")
    anchors, skipped = encode_pairs_resumably(loaded, image_encoder, text_encoder, work_dir,
                                              batch_size=batch_size, shard_size=shard_size,
                                              progress=progress)
    if len(anchors) == 0:
        raise DataError(f"none of the {len(loaded)} images in {pairs} could be read "
                        f"(e.g. {skipped[:3]}); check the image paths")
    meta = {"sources": [_source_record(pairs, loaded, split, limit)], "skipped_images": skipped}
    anchors = AnchorSet(anchors.image, anchors.text, anchors.captions, anchors.image_spec,
                        anchors.text_spec, anchors.images, meta)
    anchors.save(out, overwrite=overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
    if skipped:
        log.warning("skipped %d unreadable image(s) (listed in %s/manifest.json)", len(skipped), out)
    return anchors


def extend_anchor_set(path: str | Path, pairs: str | Path | Sequence[Pair], *,
                      split: str | None = None, limit: int | None = None, batch_size: int = 32,
                      device: Any = None, image_encoder: Encoder | None = None,
                      text_encoder: Encoder | None = None, progress: bool = True) -> AnchorSet:
    """Append the anchors of ``pairs`` to the set at ``path``, encoded with its recorded encoders."""
    path = Path(path)
    base = AnchorSet.load(path)
    image_encoder = _resolve_encoder(image_encoder or base.image_spec, "image", device)
    text_encoder = _resolve_encoder(text_encoder or base.text_spec, "text", device)
    base.check_encoder(image_encoder, "image")
    base.check_encoder(text_encoder, "text")
    loaded = _load_pairs(pairs, split, limit)
    if not loaded:
        raise DataError(f"no pairs to add from {pairs}" + (f" with split={split!r}" if split else ""))
    work_dir = path.with_name(path.name + ".extend-partial")
    extra, skipped = encode_pairs_resumably(loaded, image_encoder, text_encoder, work_dir,
                                            batch_size=batch_size, progress=progress)
    meta = dict(base.meta)
    meta["sources"] = [*meta.get("sources", []), _source_record(pairs, loaded, split, limit)]
    meta["skipped_images"] = [*meta.get("skipped_images", []), *skipped]
    merged = AnchorSet(torch.cat([base.image, extra.image]), torch.cat([base.text, extra.text]),
                       base.captions + extra.captions, base.image_spec, base.text_spec,
                       (base.images + extra.images) if base.images else (), meta)
    merged.save(path, overwrite=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    return merged
