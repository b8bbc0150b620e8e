"""Anchor sets: paired (image, caption) embeddings from two frozen encoders, on disk.

An anchor is one (image, caption) pair embedded by the image encoder and the text encoder; ASIF
(Norelli et al., 2022) compares any new image or text with these anchors. On-disk format v2 is a
directory::

    manifest.json           format name and version, nofree version, both encoder specs,
                            counts, dims, source pairs (path + sha256), skipped images,
                            "image_root" (below), and "files": size and sha256 of the two data
                            files below
    embeddings.safetensors  "image" (N, Di) float32 and "text" (N, Dt) float32, L2-normalised
    captions.jsonl          one {"caption": ..., "image": ...} per anchor, in anchor order
    index-image.faiss       optional search index of each side, described by the manifest's
    index-text.faiss        "index" entry (see :mod:`nofree.anchors.search.index`); readers that do
                            not use it ignore it. ``save`` writes a set without an index.

No file of a v2 set holds an absolute path, so a set can be moved, copied or shared (``nofree
push``; ``hf-hub:ORG/NAME`` loads one, see :mod:`nofree.hub`). An anchor's ``"image"`` is its
image file relative to the manifest's ``"image_root"``, itself relative to the set's folder (the
folder holding every image, e.g. ``"../photos"``; ``"photos"`` when the images live inside the
set), in ``/``-separated form; a reference that is not a local file (a URL or key of imported
embeddings) is kept as written under ``"image_ref"`` instead. The manifest's provenance paths (each
source's ``"pairs"``, ``"skipped_images"``) are relative to the set's folder and begin with
``./`` or ``../``; other strings there are labels, kept as written. Loading resolves them all
against the folder the set is read from: in memory ``AnchorSet.images`` and the provenance are
absolute paths, so a set moved together with its photos still finds them. Format v1 (absolute
paths, no ``"image_root"``) still loads, its paths as written; saving writes v2.

Loading reads only JSON and safetensors (never executes code), checks the data files against
the manifest's sizes and sha256 (sets written before checksums were recorded have none and load
without that check) and every shape and count against the manifest, so a truncated, damaged or
hand-edited set is a clear error, not a wrong answer. Hashing reads about 1.7 GB/s, faster than
the finiteness scan loading already does, so ``load`` verifies in full by default.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nofree.artifacts import (ANCHOR_SET, OVERWRITE, apply_umask, check_replaceable, file_record,
                              replace_dir, temp_dir_beside, verify_files, writing)
from nofree.core import DataError, OptionError, SpecError
from nofree.hub import resolve_dir

FORMAT_NAME = "nofree-anchor-set"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # every format version this nofree reads (tests/fixtures holds one of each)
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
CAPTIONS = "captions.jsonl"
DATA_FILES = (EMBEDDINGS, CAPTIONS)  # the files the manifest's "files" entry checksums
REBUILD = "rebuild the set (`nofree anchors build ... --overwrite`) or restore it from a copy"


@dataclass(frozen=True, eq=False)
class AnchorSet:
    """N paired anchors: ``image`` (N, Di) and ``text`` (N, Dt) float32, row i = pair i.

    ``captions[i]`` is anchor i's caption and ``images[i]`` the image path it came from;
    ``meta`` holds the rest of the manifest (sources, skipped images, build settings).
    """

    image: Tensor
    text: Tensor
    captions: tuple[str, ...]
    image_spec: str
    text_spec: str
    images: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.image.shape[0]
        if self.image.ndim != 2 or self.text.ndim != 2:
            raise DataError(f"anchor embeddings must be 2-D, got image {tuple(self.image.shape)} "
                            f"and text {tuple(self.text.shape)}")
        if self.text.shape[0] != n or len(self.captions) != n:
            raise DataError(f"anchor counts disagree: {n} image rows, {self.text.shape[0]} text rows, "
                            f"{len(self.captions)} captions")
        if self.images and len(self.images) != n:
            raise DataError(f"anchor counts disagree: {n} anchors but {len(self.images)} image paths")

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    def __repr__(self) -> str:
        return (f"AnchorSet(n={len(self)}, image={self.image_spec!r} ({self.image_dim}-d), "
                f"text={self.text_spec!r} ({self.text_dim}-d))")

    def check_encoder(self, encoder: Any, modality: str) -> None:
        """Raise :class:`SpecError` unless ``encoder`` is the one that built this side."""
        expected = self.image_spec if modality == "image" else self.text_spec
        spec = getattr(encoder, "spec", None)
        if spec != expected:
            raise SpecError(
                f"this anchor set's {modality} side was built with {expected!r}, but the {modality} "
                f"encoder given is {spec!r}: embeddings from different encoders are not comparable. "
                f"Use {modality}_encoder={expected!r} or rebuild the anchors with {spec}")

    def subset(self, index: Tensor | list[int]) -> "AnchorSet":
        """The anchors at ``index`` (in that order), e.g. for quality-vs-size curves."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = index.tolist()
        return AnchorSet(self.image[index], self.text[index], tuple(self.captions[i] for i in pick),
                         self.image_spec, self.text_spec,
                         tuple(self.images[i] for i in pick) if self.images else (), dict(self.meta))

    # --- disk ---------------------------------------------------------------------------
    def manifest(self) -> dict:
        from nofree import __version__

        return {**self.meta, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "nofree_version": __version__, "image_spec": self.image_spec,
                "text_spec": self.text_spec, "n_anchors": len(self), "image_dim": self.image_dim,
                "text_dim": self.text_dim}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write format v2 to directory ``path`` atomically (a crash leaves the old set intact);
        image and provenance paths are written relative to ``path`` (see the module docstring).

        The new set is written completely into a hidden folder beside ``path`` and swapped in;
        an old set there is removed only after the swap. ``overwrite`` replaces only an anchor
        set or an empty folder, never the current directory, home or ``/``
        (:func:`nofree.artifacts.check_replaceable`); callers that know what they read also
        pass it as ``inputs`` there first.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise OptionError(f"{path} already exists; pass ", OVERWRITE, " or choose another folder")
        if path.exists():
            check_replaceable(path, kind=ANCHOR_SET)
        tmp = None
        try:
            with writing(path):
                tmp = temp_dir_beside(path)
                save_file({"image": self.image.float().contiguous(),
                           "text": self.text.float().contiguous()}, str(tmp / EMBEDDINGS))
                image_root, refs = portable_images(self.images, path)
                with open(tmp / CAPTIONS, "w", encoding="utf-8") as f:
                    for i, caption in enumerate(self.captions):
                        f.write(json.dumps({"caption": caption, **(refs[i] if refs else {})},
                                           ensure_ascii=False) + "\n")
                manifest = portable_manifest(self.manifest(), path)
                manifest.pop("image_root", None)
                if image_root is not None:
                    manifest["image_root"] = image_root
                manifest.pop("index", None)  # the index files describe another directory's set
                manifest["files"] = {name: file_record(tmp / name) for name in DATA_FILES}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
                apply_umask(tmp)
                replace_dir(tmp, path)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> "AnchorSet":
        """Read a saved set, checking its files' checksums, format, shapes and counts.

        ``path``: the set's folder, or ``hf-hub:ORG/NAME[@REVISION]`` (:func:`nofree.hub.resolve_dir`).

        ``verify=False`` checks the data files' sizes instead of their sha256 (a bit flip then
        goes unnoticed unless it makes a value NaN/inf). The embeddings stay memory-mapped from
        the file (safetensors maps it; pages are read as they are touched); the checks scan
        them in bounded chunks.
        """
        path = resolve_dir(path, what="anchor set")
        manifest = read_manifest(path)
        if "files" in manifest:
            verify_files(path, manifest["files"], full=verify, where=path / MANIFEST, fix=REBUILD)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path / EMBEDDINGS))
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"{path / EMBEDDINGS} is unreadable or truncated ({err}); rebuild the "
                            "anchor set with `nofree anchors build`") from err
        missing = {"image", "text"} - set(tensors)
        if missing:
            raise DataError(f"{path / EMBEDDINGS} lacks tensor(s) {sorted(missing)}; rebuild the set")
        image, text = tensors["image"], tensors["text"]
        n = manifest["n_anchors"]
        expected = {"image": (n, manifest["image_dim"]), "text": (n, manifest["text_dim"])}
        for name, tensor in (("image", image), ("text", text)):
            if tuple(tensor.shape) != expected[name] or tensor.dtype != torch.float32:
                raise DataError(f"{path / EMBEDDINGS}: tensor {name!r} is {tuple(tensor.shape)} "
                                f"{tensor.dtype}, but the manifest says {expected[name]} float32; "
                                "the set was edited or truncated: rebuild it")
            step = max(1, (1 << 24) // max(1, tensor.shape[1]))  # bounded temporaries
            if not all(bool(torch.isfinite(tensor[i:i + step]).all()) for i in range(0, n, step)):
                raise DataError(f"{path / EMBEDDINGS}: tensor {name!r} holds NaN/inf values; rebuild it")
        captions, images = read_captions(path / CAPTIONS, root=image_base(path, manifest))
        if len(captions) != n:
            raise DataError(f"{path / CAPTIONS} has {len(captions)} captions but the manifest says {n} "
                            "anchors; the set was edited or truncated: rebuild it")
        meta = {key: value for key, value in resolved_manifest(manifest, path).items()
                if key not in {"image_spec", "text_spec", "n_anchors", "image_dim", "text_dim"}}
        return cls(image, text, tuple(captions), manifest["image_spec"], manifest["text_spec"],
                   tuple(images) if all(images) else (), meta)


def read_manifest(path: Path) -> dict:
    """The manifest of the anchor set at ``path``, validated (format, version, fields)."""
    file = path / MANIFEST
    if not file.is_file():
        hint = " (it is a file; give the anchor set's directory)" if path.is_file() else ""
        raise DataError(f"{path} is not an anchor set: {MANIFEST} not found{hint}. Build one with "
                        "`nofree anchors build --pairs PAIRS --out DIR`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file} is not valid JSON ({err}); rebuild the anchor set") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{file} is not a nofree anchor-set manifest (format != {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise DataError(f"{file}: anchor-set format version {version!r} is not supported by this "
                        f"nofree (reads versions {', '.join(map(str, READ_VERSIONS))}); upgrade nofree "
                        "or rebuild the set")
    root = manifest.get("image_root")
    if root is not None and (version < 2 or not isinstance(root, str) or os.path.isabs(root)):
        raise DataError(f"{file}: field 'image_root' must be a relative path (format v2); rebuild the set")
    for key, kind in (("image_spec", str), ("text_spec", str), ("n_anchors", int),
                      ("image_dim", int), ("text_dim", int)):
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"{file}: field {key!r} is missing or not a {kind.__name__}; rebuild the set")
    if manifest.get("index") is not None:
        from nofree.anchors.search.index import check_index_entry

        check_index_entry(manifest["index"], file)
    return manifest


def read_captions(file: Path, root: str | None = None) -> tuple[list[str], list[str | None]]:
    """Captions and image paths of a ``captions.jsonl`` (DataError with the line on a bad row);
    ``root``: the absolute folder a row's ``"image"`` is relative to (format v2), ``None`` to take
    it as written (v1)."""
    captions: list[str] = []
    images: list[str | None] = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{file} is missing or unreadable ({err}); rebuild the anchor set") from err
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            caption = row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{file}, line {number}: expected {{\"caption\": ...}} ({err})") from err
        if not isinstance(caption, str):
            raise DataError(f"{file}, line {number}: caption must be a string")
        captions.append(caption)
        image = row.get("image")
        if not isinstance(image, str):
            images.append(row.get("image_ref") if isinstance(row.get("image_ref"), str) else None)
        elif root is None or os.path.isabs(image):
            images.append(image)
        else:
            images.append(_under(root, image))
    return captions, images


def quick_check(path: str | Path, n_captions: int = 3) -> tuple[dict, list[str]]:
    """The manifest of the set at ``path`` and its first ``n_captions`` captions, after checking
    the manifest and its data files' sizes only (no data is read; :meth:`AnchorSet.load` checks
    everything)."""
    path = resolve_dir(path, what="anchor set")
    manifest = read_manifest(path)
    if "files" in manifest:
        verify_files(path, manifest["files"], full=False, where=path / MANIFEST, fix=REBUILD)
    captions = []
    try:
        with open(path / CAPTIONS, encoding="utf-8") as f:
            for line in f:
                if len(captions) == n_captions:
                    break
                captions.append(json.loads(line)["caption"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path / CAPTIONS} is missing or unreadable ({err}); {REBUILD}") from err
    return manifest, captions


# --- relative paths (format v2) --------------------------------------------------------------
def _posix(relative: str) -> str:
    return relative.replace(os.sep, "/") if os.sep != "/" else relative


def _native(relative: str) -> str:
    return relative.replace("/", os.sep) if os.sep != "/" else relative


def _file_part(ref: str) -> str:
    """The file an image reference reads: itself, or the shard of ``SHARD.tar#MEMBER``."""
    from nofree.data.images import REF_SEPS

    for sep in REF_SEPS:
        at = ref.find(sep)
        if at >= 0:
            return ref[:at + len(sep) - 1]
    return ref


def _under(base: str, relative: str) -> str:
    """``relative`` (``/``-separated) joined to the absolute folder ``base``, normalised."""
    if relative.startswith("../") or "/../" in relative or relative in ("..", ".") or "/./" in relative             or relative.startswith("./"):
        return os.path.normpath(os.path.join(base, _native(relative)))
    return base + os.sep + _native(relative) if base != os.sep else os.sep + _native(relative)


def portable_images(images: tuple[str, ...], folder: str | Path) -> tuple[str | None, list[dict]]:
    """``(image_root, rows)`` writing ``images`` for a set saved at ``folder``: the folder holding
    every absolute image path, relative to ``folder`` (``None`` when there is none), and per anchor
    ``{"image": path relative to that root}`` or ``{"image_ref": reference as written}`` for a
    reference that is not an absolute path (or has no relative form, e.g. on another drive)."""
    if not images:
        return None, []
    folder = os.path.abspath(folder)
    local = [os.path.normpath(image) if os.path.isabs(image) else None for image in images]
    parents = {os.path.dirname(_file_part(image)) for image in local if image is not None}
    root = None
    if parents:
        try:
            root = os.path.commonpath(sorted(parents))
            image_root = _posix(os.path.relpath(root, folder))
        except ValueError:  # paths on different drives (Windows): no common folder
            root = None
    rows = []
    prefix = root.rstrip(os.sep) + os.sep if root is not None else None
    for image, original in zip(local, images):
        if image is None or prefix is None or not image.startswith(prefix):
            rows.append({"image_ref": original} if original is not None else {})
        else:
            rows.append({"image": _posix(image[len(prefix):])})
    return (image_root if root is not None else None), rows


def image_base(folder: str | Path, manifest: dict) -> str | None:
    """The absolute folder a v2 set's image paths are relative to (``None``: v1, or no local images)."""
    root = manifest.get("image_root")
    if root is None:
        return None
    return os.path.normpath(os.path.join(os.path.abspath(folder), _native(root)))


def _relative_ref(value: Any, folder: str) -> Any:
    """A provenance string relative to ``folder`` (``./`` or ``../`` first) when it is an absolute
    path (each part of a ``::``-joined shard list); anything else as it is."""
    if not isinstance(value, str):
        return value
    parts = value.split("::")
    out = []
    for part in parts:
        if os.path.isabs(part):
            try:
                relative = _posix(os.path.relpath(os.path.normpath(part), folder))
            except ValueError:  # another drive (Windows): keep it as written
                relative = part
            else:
                relative = relative if relative.startswith("..") else "./" + relative
            out.append(relative)
        else:
            out.append(part)
    return "::".join(out)


def _absolute_ref(value: Any, folder: str) -> Any:
    """The inverse of :func:`_relative_ref` for a set read from ``folder``."""
    if not isinstance(value, str):
        return value
    return "::".join(_under(folder, part) if part.startswith(("./", "../")) else part
                     for part in value.split("::"))


def _map_provenance(manifest: dict, convert: Any) -> dict:
    out = dict(manifest)
    if isinstance(out.get("sources"), list):
        out["sources"] = [{**source, "pairs": convert(source.get("pairs"))}
                          if isinstance(source, dict) and "pairs" in source else source
                          for source in out["sources"]]
    if isinstance(out.get("skipped_images"), list):
        out["skipped_images"] = [convert(item) for item in out["skipped_images"]]
    return out


def portable_manifest(manifest: dict, folder: str | Path) -> dict:
    """``manifest`` with its provenance paths made relative to ``folder``, where it is saved."""
    folder = os.path.abspath(folder)
    return _map_provenance(manifest, lambda value: _relative_ref(value, folder))


def resolved_manifest(manifest: dict, folder: str | Path) -> dict:
    """``manifest`` (as read from ``folder``) with its relative provenance paths made absolute."""
    if manifest.get("format_version") == 1:
        return dict(manifest)
    folder = os.path.abspath(folder)
    return _map_provenance(manifest, lambda value: _absolute_ref(value, folder))
