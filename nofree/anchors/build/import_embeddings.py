"""Import embeddings computed elsewhere (clip-retrieval, parquet) as an anchor set.

Users who already embedded millions of pairs should not encode them again. Two layouts:

* **clip-retrieval** (``clip-retrieval inference`` output)::

      DIR/img_emb/img_emb_0.npy        (n0, Di) float16/float32, one row per sample
      DIR/text_emb/text_emb_0.npy      (n0, Dt)
      DIR/metadata/metadata_0.parquet  n0 rows: "caption", "image_path" (or "url"), ...
      ... img_emb_1.npy, text_emb_1.npy, metadata_1.parquet, ...

  parts are matched by their number and read in numeric order;
* **parquet with embedding columns**: ``DIR/*.parquet`` (or one file) with list columns
  ``image_embedding`` (or ``img_emb``) and ``text_embedding`` (or ``text_emb``), a ``caption``
  column and optionally ``image_path`` / ``url``.

Row i of a part becomes anchor i: (image embedding, text embedding, caption). Rows with no
caption or a non-finite embedding are skipped and listed in the manifest; rows are
L2-normalised. The encoders that made the embeddings cannot be read from these files, so the
caller names them (``image_spec``, ``text_spec``): queries must later be encoded with exactly
those models. ``.npy`` files are read with ``allow_pickle=False``; nothing is executed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nofree.anchors.anchor_set import AnchorSet
from nofree.core import DataError, MissingDependencyError, OptionError, l2_normalize

log = logging.getLogger(__name__)

_IMAGE_COLUMNS = ("image_embedding", "img_emb", "image_emb")
_TEXT_COLUMNS = ("text_embedding", "text_emb")
_CAPTION_COLUMNS = ("caption", "text", "captions")
_PATH_COLUMNS = ("image_path", "url", "key")


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading parquet needs pyarrow: pip install pyarrow "
                                     "(or pip install 'nofree[ray]')") from None
    return pq


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{prefix}_(\d+){re.escape(suffix)}$")
    return {int(m.group(1)): p for p in folder.glob(f"{prefix}_*{suffix}")
            if (m := pattern.match(p.name))}


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npy array ({err}); re-export the embeddings") from None
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D (rows, dim) array, got shape {array.shape}")
    return array


def _column(table: Any, names: tuple[str, ...], where: Path, what: str, required: bool = True):
    for name in names:
        if name in table.column_names:
            return table.column(name)
    if required:
        raise DataError(f"{where}: no {what} column (looked for {', '.join(names)}); columns are "
                        f"{table.column_names}")
    return None


def _texts(column: Any) -> list[str | None]:
    values = column.to_pylist() if column is not None else []
    return [v[0] if isinstance(v, list) and v else v if isinstance(v, str) else None for v in values]


def _list_column(column: Any, where: Path) -> np.ndarray:
    """A list<float> parquet column -> ``(n, D)`` float32 (every row the same length)."""
    import pyarrow as pa

    chunk = column.combine_chunks()
    if not pa.types.is_list(chunk.type) and not pa.types.is_fixed_size_list(chunk.type) \
            and not pa.types.is_large_list(chunk.type):
        raise DataError(f"{where}: embedding column {column!r:.40} is not a list of floats")
    n = len(chunk)
    flat = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if n and flat.size % n:
        raise DataError(f"{where}: embedding rows have different lengths; every row must have one width")
    return flat.reshape(n, flat.size // n if n else 0)


def _parts(folder: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, list, list]]:
    """``(part name, image (n, Di), text (n, Dt), captions, image paths)`` for each part."""
    pq = None
    if (folder / "img_emb").is_dir():
        images = _numbered(folder / "img_emb", "img_emb", ".npy")
        texts = _numbered(folder / "text_emb", "text_emb", ".npy")
        metas = _numbered(folder / "metadata", "metadata", ".parquet")
        if not images:
            raise DataError(f"{folder / 'img_emb'} holds no img_emb_N.npy files")
        for number in sorted(images):
            if number not in texts or number not in metas:
                raise DataError(f"{images[number]} has no matching text_emb/text_emb_{number}.npy and "
                                f"metadata/metadata_{number}.parquet in {folder}: run clip-retrieval "
                                "inference with --enable_text True --enable_metadata True")
            pq = pq or _parquet()
            table = pq.read_table(metas[number])
            captions = _texts(_column(table, _CAPTION_COLUMNS, metas[number], "caption"))
            paths = _texts(_column(table, _PATH_COLUMNS, metas[number], "image path", required=False))
            yield f"part {number}", _load_npy(images[number]), _load_npy(texts[number]), captions, paths
        return
    files = [folder] if folder.is_file() else sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: expected clip-retrieval output (img_emb/, text_emb/, metadata/) or "
                        "parquet files with image_embedding / text_embedding / caption columns")
    pq = _parquet()
    for file in files:
        table = pq.read_table(file)
        image = _list_column(_column(table, _IMAGE_COLUMNS, file, "image embedding"), file)
        text = _list_column(_column(table, _TEXT_COLUMNS, file, "text embedding"), file)
        captions = _texts(_column(table, _CAPTION_COLUMNS, file, "caption"))
        paths = _texts(_column(table, _PATH_COLUMNS, file, "image path", required=False))
        yield file.name, image, text, captions, paths


def read_embeddings(source: str | Path) -> tuple[AnchorSet, list[str]]:
    """All rows of ``source`` as an in-memory AnchorSet (specs blank) and the skipped row refs."""
    folder = Path(source)
    if not folder.exists():
        raise DataError(f"embeddings source {folder} does not exist")
    image_parts, text_parts, captions, paths, skipped = [], [], [], [], []
    for name, image, text, part_captions, part_paths in _parts(folder):
        n = image.shape[0]
        if text.shape[0] != n or len(part_captions) != n:
            raise DataError(f"{folder} {name}: {n} image rows, {text.shape[0]} text rows and "
                            f"{len(part_captions)} metadata rows; the three must line up row by row")
        image = np.asarray(image, dtype=np.float32)
        text = np.asarray(text, dtype=np.float32)
        ok = np.isfinite(image).all(1) & np.isfinite(text).all(1) & np.array([bool(c and c.strip())
                                                                               for c in part_captions], bool)
        for row in np.flatnonzero(~ok).tolist():
            skipped.append(f"{folder} {name} row {row}")
        keep = np.flatnonzero(ok)
        image_parts.append(torch.from_numpy(image[keep]))
        text_parts.append(torch.from_numpy(text[keep]))
        captions += [" ".join(part_captions[i].split()) for i in keep.tolist()]
        paths += [part_paths[i] if i < len(part_paths) and part_paths[i] else "" for i in keep.tolist()]
    if len({t.shape[1] for t in image_parts}) > 1 or len({t.shape[1] for t in text_parts}) > 1:
        raise DataError(f"{folder}: parts have different embedding widths; import one model's embeddings")
    image = l2_normalize(torch.cat(image_parts)) if image_parts else torch.zeros(0, 0)
    text = l2_normalize(torch.cat(text_parts)) if text_parts else torch.zeros(0, 0)
    anchors = AnchorSet(image, text, tuple(captions), "", "", tuple(paths) if all(paths) else ())
    return anchors, skipped


def import_embeddings(source: str | Path, *, image_spec: str, text_spec: str, out: str | Path,
                      overwrite: bool = False, index: str | None = None) -> AnchorSet:
    """Save the embeddings at ``source`` as an anchor set at ``out``, recording the encoder specs.

    ``index``: optionally add a faiss index (see :func:`nofree.anchors.search.index.add_index`).
    ``overwrite`` replaces an existing anchor set at ``out``, never anything else (see
    :func:`nofree.artifacts.check_replaceable`).
    """
    from nofree.artifacts import ANCHOR_SET, OUT, OVERWRITE, check_replaceable, exclusive

    out = Path(out)
    if out.exists() and not overwrite:
        raise OptionError(f"{out} already exists; pass ", OVERWRITE, " to replace it, or choose another ", OUT)
    if overwrite:
        check_replaceable(out, kind=ANCHOR_SET, inputs=[source])
    with exclusive(out):
        return _import(source, image_spec=image_spec, text_spec=text_spec, out=out,
                       overwrite=overwrite, index=index)


def _import(source: str | Path, *, image_spec: str, text_spec: str, out: Path, overwrite: bool,
            index: str | None) -> AnchorSet:
    from nofree.registry import normalize_spec

    read, skipped = read_embeddings(source)
    if len(read) == 0:
        raise DataError(f"{source} holds no usable rows (every row lacked a caption or had NaN "
                        "embeddings)")
    digest = hashlib.sha256(json.dumps(read.captions, ensure_ascii=False).encode())
    digest.update(read.image.numpy().tobytes())
    digest.update(read.text.numpy().tobytes())
    meta = {"sources": [{"pairs": os.path.abspath(source), "split": None, "limit": None, "n_pairs": len(read),
                         "pairs_sha256": digest.hexdigest(), "imported": "embeddings"}],
            "skipped_images": skipped}
    anchors = AnchorSet(read.image, read.text, read.captions, normalize_spec(image_spec, "image"),
                        normalize_spec(text_spec, "text"), read.images, meta)
    anchors.save(out, overwrite=overwrite)
    if skipped:
        log.warning("skipped %d row(s) without a caption or with non-finite embeddings (listed in "
                    "%s/manifest.json)", len(skipped), out)
    if index:
        from nofree.anchors.search.index import add_index

        meta["index"] = add_index(out, index, anchors=anchors)
    return anchors
