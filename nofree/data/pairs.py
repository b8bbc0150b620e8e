"""Read (image, captions) pairs from JSONL, CSV, a folder of images with caption sidecars, or
webdataset tar shards.

Four layouts, told apart by the source itself:

* ``*.jsonl``: one JSON object a line, ``{"image": "images/1.jpg", "captions": [...],
  "split": "train", ...}``; a single ``"caption": "..."`` string is accepted too. Other fields
  (``coco_id``, ``categories``, ...) are kept in ``Pair.meta``.
* ``*.csv``: a header naming ``image`` and ``caption`` (and optionally ``split``); rows that
  share an image become one pair with several captions, in file order; further columns of an
  image's first row go to ``Pair.meta``.
* a directory: every image file ``foo.jpg`` (any depth) with a sidecar ``foo.txt`` holding one
  caption per non-empty line.
* a ``.tar`` file, or a directory holding ``.tar`` files: webdataset shards as img2dataset writes
  them (``KEY.jpg`` + ``KEY.txt`` / ``KEY.json`` per sample); see :mod:`nofree.data.webdataset`.
  Image paths are then member references ``SHARD.tar#MEMBER``; samples without a caption or
  image, and truncated shards, are skipped and logged.

Relative image paths are resolved against the folder of the pairs file and stored as absolute
path strings. Captions are stripped and runs of whitespace (line breaks, tabs) become one
space. Whether the image file exists is not checked here: unreadable images are skipped
and reported where images are read (``nofree.data.images``). Any malformed row is a
``DataError`` naming the file, the line and what to fix.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from nofree.core import DataError, Pair

log = logging.getLogger(__name__)

#: File suffixes (lower case) treated as images when reading an image folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_JSONL_RESERVED = ("image", "captions", "caption", "split")


def load_pairs(source: str | os.PathLike, *, split: str | None = None,
               limit: int | None = None) -> list[Pair]:
    """All pairs of ``source`` (a ``.jsonl`` / ``.csv`` file or an image folder), in file order.

    ``split`` keeps only pairs whose ``split`` field equals it (``None`` keeps all); ``limit``
    keeps the first ``limit`` pairs after that filter. Raises ``DataError`` for a missing or
    malformed source, or when no pair is left.
    """
    path = Path(os.path.expanduser(os.fspath(source)))
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit={limit!r}: expected a positive whole number of pairs (or None for all)")
    if not path.exists():
        raise DataError(f"pairs source {path} does not exist: pass a .jsonl or .csv pairs file or a "
                        "folder of images with .txt caption sidecars")
    from nofree.data.webdataset import is_webdataset, scan_webdataset

    if is_webdataset(path):
        pairs = scan_webdataset(path, limit=limit if split is None else None).pairs
    elif path.is_dir():
        pairs = _read_folder(path)
    elif path.suffix.lower() == ".jsonl":
        pairs = _read_jsonl(path)
    elif path.suffix.lower() == ".csv":
        pairs = _read_csv(path)
    else:
        raise DataError(f"{path}: unknown pairs format {path.suffix!r}; use a .jsonl file (one "
                        "{\"image\": ..., \"captions\": [...]} object a line), a .csv file with an "
                        "'image,caption' header, a folder of images with .txt sidecars, or "
                        "webdataset .tar shards")
    if not pairs:
        raise DataError(f"{path} holds no pairs: add at least one image with a caption")
    if split is not None:
        selected = [pair for pair in pairs if pair.split == split]
        if not selected:
            present = sorted({str(pair.split) for pair in pairs})
            raise DataError(f"{path} has no pairs with split={split!r}; the splits present are "
                            f"{', '.join(present)} (None means the rows carry no split)")
        pairs = selected
    return pairs[:limit] if limit is not None else pairs


def load_text_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (e.g. a caption pool), stripped, in order."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise DataError(f"text file {path} does not exist: pass a UTF-8 file with one caption a line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); re-save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- layouts ---

def _resolve(image: str, base: Path) -> str:
    """``image`` as an absolute path string; relative paths are taken from ``base``."""
    image_path = Path(os.path.expanduser(image))
    if not image_path.is_absolute():
        image_path = base / image_path
    return os.path.normpath(os.path.abspath(image_path))


def _clean_captions(raw: object, where: str) -> tuple[str, ...]:
    """Validated, stripped captions; ``where`` ("FILE, line N") prefixes every error."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f"{where}: no captions; give \"captions\": [\"...\"] (a non-empty list of "
                        "strings) or \"caption\": \"...\"")
    captions = []
    for i, caption in enumerate(raw):
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption {i} is {type(caption).__name__} {caption!r}, "
                            "expected a string")
        if not caption.strip():
            raise DataError(f"{where}: caption {i} is empty; remove it or write the caption")
        captions.append(" ".join(caption.split()))
    return tuple(captions)


def _read_jsonl(path: Path) -> list[Pair]:
    base = path.parent
    pairs = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line "
                                "must be one JSON object like {\"image\": \"a.jpg\", \"captions\": "
                                "[\"...\"]}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            image = row.get("image")
            if not isinstance(image, str) or not image.strip():
                raise DataError(f"{where}: missing \"image\" field (a path to the image file, "
                                "relative to the pairs file's folder or absolute)")
            if "captions" in row and "caption" in row:
                raise DataError(f"{where}: has both \"captions\" and \"caption\"; keep one")
            captions = _clean_captions(row.get("captions", row.get("caption")), where)
            split = row.get("split")
            if split is not None and not isinstance(split, str):
                raise DataError(f"{where}: \"split\" must be a string such as \"train\", got {split!r}")
            meta = {key: value for key, value in row.items() if key not in _JSONL_RESERVED}
            pairs.append(Pair(_resolve(image.strip(), base), captions, split, meta))
    return pairs


def _read_csv(path: Path) -> list[Pair]:
    base = path.parent
    rows: dict[str, dict] = {}  # image as written -> {"captions", "split", "meta", "line"}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as err:
            raise DataError(f"{path}, line 1: unreadable CSV header ({err})") from None
        names = [name.strip() for name in header]
        if "image" not in names or "caption" not in names:
            raise DataError(f"{path}, line 1: the header must name the columns 'image' and "
                            f"'caption' (optionally 'split'); found {names}")
        if len(set(names)) != len(names):
            raise DataError(f"{path}, line 1: repeated column names in the header {names}")
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err}); check "
                                "the quoting of that row") from None
            number = reader.line_num
            where = f"{path}, line {number}"
            if not any(value.strip() for value in values):
                continue
            if len(values) != len(names):
                raise DataError(f"{where}: {len(values)} fields but the header has {len(names)}; "
                                "quote captions that contain commas")
            row = dict(zip(names, values))
            image = row["image"].strip()
            if not image:
                raise DataError(f"{where}: empty 'image' field; give the image path")
            caption = _clean_captions(row["caption"], where)[0]
            split = row.get("split", "").strip() or None
            entry = rows.get(image)
            if entry is None:
                meta = {k: v for k, v in row.items() if k not in ("image", "caption", "split")}
                rows[image] = {"captions": [caption], "split": split, "meta": meta, "line": number}
            else:
                if entry["split"] != split:
                    raise DataError(f"{where}: image {image!r} has split {split!r} here but "
                                    f"{entry['split']!r} on line {entry['line']}; one image belongs "
                                    "to one split")
                entry["captions"].append(caption)
    return [Pair(_resolve(image, base), tuple(entry["captions"]), entry["split"], entry["meta"])
            for image, entry in rows.items()]


def _read_folder(folder: Path) -> list[Pair]:
    images = sorted((p for p in folder.rglob("*")
                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(folder).as_posix())
    pairs, uncaptioned = [], []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            uncaptioned.append(image)
            continue
        try:
            text = sidecar.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"{sidecar} is not UTF-8 text ({err}); re-save it as UTF-8") from None
        captions = [line.strip() for line in text.splitlines() if line.strip()]
        if not captions:
            raise DataError(f"{sidecar} is empty: write one caption per line for {image.name}, or "
                            "delete the sidecar")
        relative = image.relative_to(folder).as_posix()
        pairs.append(Pair(_resolve(str(image), folder), tuple(" ".join(c.split()) for c in captions),
                          None, {"source": relative}))
    if uncaptioned:
        log.warning("%s: %d image(s) have no .txt caption sidecar and are left out (e.g. %s)",
                    folder, len(uncaptioned), ", ".join(p.name for p in uncaptioned[:3]))
    if images and not pairs:
        raise DataError(f"{folder}: none of its {len(images)} images has a caption sidecar; write "
                        f"the captions of {images[0].name} into {images[0].with_suffix('.txt').name}, "
                        "one per line")
    return pairs
