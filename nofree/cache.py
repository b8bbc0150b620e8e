"""An on-disk embedding cache keyed by (encoder spec, content hash).

Re-running an experiment never encodes the same image or text with the same encoder twice:
``EmbeddingCache.encode(encoder, items)`` looks every item up, sends only the misses through the
encoder and returns the full ``(N, D)`` tensor in input order.

Keys. An item's key is the sha256 of its content: the bytes of an image *file* (so editing the
file is a miss, renaming it is a hit), the raw pixels + size + mode of an in-memory
``PIL.Image``, or the UTF-8 bytes of a text. Keys live under the encoder's spec string, so a
different spec never shares entries.

Layout under ``root`` (default ``$NOFREE_CACHE`` or ``~/.cache/nofree``)::

    embeddings/<sanitised spec>-<sha256(spec)[:12]>/
        spec.json                        {"format": 1, "spec": "<the full spec>"}
        embed-<random>.safetensors       pooled embeddings: "values" (n, D)
        tokens-<random>.safetensors      token grids: "values" (sum of lengths, W), "lengths" (n,)

Each shard's safetensors metadata holds its item keys (JSON) and a sha256 of its tensor bytes;
the index is rebuilt from the shard headers, so there is no separate index file to go stale.
Shards are written to a hidden temporary name, flushed to disk and renamed into place
(:func:`nofree.artifacts.atomic_path`): a shard under its final name is always complete. Encoded items are written
when ``shard_size`` of them are waiting, when the oldest has waited ``flush_seconds``, at the end
of an ``encode`` call, and whenever an error or an interrupt (Ctrl-C, or SIGTERM raised as an
exception by the CLI) stops one, so an interrupted run loses only what a hard kill catches in
the last ``flush_seconds``. ``encode(..., flush=False)`` keeps the waiting items in memory (and
serves them to later lookups) across calls, so a caller encoding batch by batch writes a few
shard files rather than one per batch; it calls ``flush()`` when done. A shard that fails to
parse or whose checksum does not match is set aside (renamed ``*.corrupt``) with a warning and
its items are encoded again. Loading reads safetensors and JSON only; nothing is unpickled or executed.

Token grids (``kind="tokens"``): text grids are stored without their trailing all-zero
(padding) rows, so a text's grid does not depend on the batch it was encoded in; a returned
batch is zero-padded to its longest item, as ``Encoder.encode_tokens`` does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.artifacts import atomic_path, atomic_write_json, remove_temp_leftovers, rename_aside
from nofree.core import DataError, Encoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("embed", "tokens")
DEFAULT_SHARD_SIZE = 4096  # items per shard file
DEFAULT_FLUSH_SECONDS = 30.0  # longest time an encoded item waits in memory before it is written
_STALE_TEMP_S = 24 * 3600  # temporary files older than this are leftovers of a killed run


def default_cache_root() -> Path:
    """``$NOFREE_CACHE`` if set, else ``~/.cache/nofree``."""
    return Path(os.path.expanduser(os.environ.get("NOFREE_CACHE") or "~/.cache/nofree"))


def spec_dirname(spec: str) -> str:
    """A filesystem-safe folder name for ``spec``: readable prefix + 12 hex of its sha256."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._")[:60] or "encoder"
    return f"{readable}-{hashlib.sha256(spec.encode('utf-8')).hexdigest()[:12]}"


def content_key(item: Any, modality: str) -> str:
    """sha256 hex of an item's content (see the module docstring for what is hashed).

    Text encoders take ``str``; image encoders take a path (``str`` / ``os.PathLike``) or a
    ``PIL.Image.Image``. Raises ``DataError`` for an unreadable file or an unsupported item.
    """
    digest = hashlib.sha256()
    if modality == "text":
        if not isinstance(item, str):
            raise DataError(f"text encoder input must be str, got {type(item).__name__} {item!r:.60}")
        digest.update(b"text\0" + item.encode("utf-8"))
    elif isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as handle:
                digest.update(b"file\0")
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as err:
            raise DataError(f"image {os.fspath(item)} cannot be read ({err.strerror}); fix the path "
                            "or drop the image (nofree.data.load_images skips unreadable ones)") from None
    elif hasattr(item, "tobytes") and hasattr(item, "mode") and hasattr(item, "size"):
        digest.update(f"pixels\0{item.mode}\0{item.size[0]}x{item.size[1]}\0".encode())
        digest.update(item.tobytes())
    else:
        raise DataError(f"image encoder input must be a path or a PIL image, got {type(item).__name__}")
    return digest.hexdigest()


def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(memoryview(tensors[name].contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


def _trim_padding(grid: Tensor) -> Tensor:
    """``(T, W)`` without its trailing all-zero rows (at least one row is kept)."""
    nonzero = grid.abs().sum(dim=1) != 0
    length = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 1
    return grid[:length]


#: Encoding this many items or more shows a progress bar unless the caller says otherwise.
PROGRESS_FROM = 1000


class _Shard:
    """Header facts of one shard file: its keys and (tokens) the row offset of each item."""

    def __init__(self, path: Path, keys: list[str], lengths: list[int] | None, digest: str):
        self.path, self.keys, self.lengths, self.digest = path, keys, lengths, digest
        self.offsets = None
        if lengths is not None:
            self.offsets = [0]
            for length in lengths:
                self.offsets.append(self.offsets[-1] + length)


class _Store:
    """The shards of one (spec, kind) in one folder; rebuilt from shard headers."""

    def __init__(self, folder: Path, spec: str, kind: str):
        self.folder, self.spec, self.kind = folder, spec, kind
        self.index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, item position)
        self.shards: dict[str, _Shard] = {}
        self.seen: set[str] = set()  # file names already looked at (good or set aside)
        self.pending: dict[str, Tensor] = {}  # encoded, not yet written: key -> (D,) or (T, W)
        self.pending_since = 0.0  # time.monotonic() when the oldest pending item was added
        self.writable = True  # False once the folder refused a write: the cache then only reads
        # by age, not by process id: processes on other machines may share a cache folder
        remove_temp_leftovers(folder, f"{kind}-*.safetensors", older_than=_STALE_TEMP_S)

    def disable_writes(self, err: OSError) -> None:
        """Go on without saving (a read-only or full cache folder costs time, never the run)."""
        if self.writable:
            log.warning("embedding cache %s cannot be written (%s); going on without saving "
                        "embeddings: set NOFREE_CACHE to a writable folder to keep them",
                        self.folder, err.strerror or err)
        self.writable = False
        self.pending = {}

    def refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        for path in sorted(self.folder.glob(f"{self.kind}-*.safetensors")):
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            shard = self._read_header(path)
            if shard is None:
                continue
            self.shards[path.name] = shard
            for position, key in enumerate(shard.keys):
                self.index.setdefault(key, (path.name, position))

    def _read_header(self, path: Path) -> _Shard | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                names = set(handle.keys())
            if int(meta.get("format", -1)) != FORMAT_VERSION or meta.get("spec") != self.spec:
                raise ValueError(f"format {meta.get('format')!r} / spec {meta.get('spec')!r} do not "
                                 f"match this cache (format {FORMAT_VERSION}, {self.spec!r})")
            keys = json.loads(meta["keys"])
            lengths = json.loads(meta["lengths"]) if self.kind == "tokens" else None
            expected = {"values", "lengths"} if self.kind == "tokens" else {"values"}
            if names != expected or not isinstance(keys, list):
                raise ValueError(f"unexpected contents {sorted(names)}")
            return _Shard(path, keys, lengths, meta["sha256"])
        except Exception as err:  # any parse failure means the file is not a usable shard
            self.set_aside(path, f"unreadable header: {err}")
            return None

    def set_aside(self, path: Path, reason: str) -> None:
        log.warning("embedding cache shard %s is corrupt (%s); ignoring it and encoding its items "
                    "again", path, reason)
        self.shards.pop(path.name, None)
        self.index = {}
        for name, shard in self.shards.items():  # another shard may hold the same keys
            for position, key in enumerate(shard.keys):
                self.index.setdefault(key, (name, position))
        rename_aside(path, ".corrupt")  # if the folder refuses, this process still skips it (``seen``)

    def load(self, name: str) -> dict[str, Tensor] | None:
        """The verified tensors of shard ``name``, or ``None`` (and set aside) if corrupt."""
        from safetensors.torch import load_file

        shard = self.shards[name]
        try:
            tensors = load_file(str(shard.path))
            if _tensor_digest(tensors) != shard.digest:
                raise ValueError("checksum mismatch")
            rows = sum(shard.lengths) if shard.lengths is not None else len(shard.keys)
            if tensors["values"].shape[0] != rows:
                raise ValueError("row count does not match its keys")
        except Exception as err:
            self.set_aside(shard.path, str(err))
            return None
        return tensors

    def add(self, key: str, grid: Tensor) -> None:
        """Hold one encoded item until the next ``flush``."""
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending[key] = grid

    def due(self, shard_size: int, flush_seconds: float) -> bool:
        """Whether the pending items fill a shard or the oldest has waited long enough."""
        return bool(self.pending) and (len(self.pending) >= shard_size
                                       or time.monotonic() - self.pending_since >= flush_seconds)

    def flush(self) -> None:
        """Write the pending items as one shard (dropped, with one warning, when the folder
        cannot be written)."""
        if self.pending and not self.writable:
            self.pending = {}
        if self.pending:
            keys, grids = list(self.pending), list(self.pending.values())
            try:
                self.write(keys, grids)
            except OSError as err:
                self.disable_writes(err)
                return
            self.pending = {}

    def write(self, keys: list[str], grids: list[Tensor]) -> None:
        """Write one shard holding ``grids[i]`` (``(D,)`` or ``(T_i, W)``) under ``keys[i]``."""
        from safetensors.torch import save

        if self.kind == "tokens":
            lengths = [int(grid.shape[0]) for grid in grids]
            tensors = {"values": torch.cat(grids).contiguous(),
                       "lengths": torch.tensor(lengths, dtype=torch.int64)}
        else:
            lengths = None
            tensors = {"values": torch.stack(grids).contiguous()}
        meta = {"format": str(FORMAT_VERSION), "spec": self.spec, "kind": self.kind,
                "keys": json.dumps(keys), "sha256": _tensor_digest(tensors)}
        if lengths is not None:
            meta["lengths"] = json.dumps(lengths)
        name = f"{self.kind}-{uuid.uuid4().hex[:16]}.safetensors"
        final = self.folder / name
        with atomic_path(final) as temp:  # hidden ".NAME.tmp-*": leftovers removed by _Store()
            with open(temp, "wb") as handle:
                handle.write(save(tensors, metadata=meta))
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the final name points at it
        self.seen.add(name)
        self.shards[name] = _Shard(final, keys, lengths, meta["sha256"])
        for position, key in enumerate(keys):
            self.index.setdefault(key, (name, position))


class EmbeddingCache:
    """Disk cache of encoder outputs; ``encode`` is a drop-in for ``encoder.encode``.

    ``hits`` / ``misses`` count items served from disk / sent to the encoder since creation.
    ``shard_size`` and ``flush_seconds`` bound how many items, and for how long, encoded work
    waits in memory before it is written (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_open_shards: int = 8, flush_seconds: float = DEFAULT_FLUSH_SECONDS):
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size}: expected a positive number of items")
        if not flush_seconds >= 0:
            raise ValueError(f"flush_seconds={flush_seconds}: expected a number of seconds >= 0")
        self.flush_seconds = float(flush_seconds)
        self.root = Path(os.path.expanduser(os.fspath(root))) if root is not None else default_cache_root()
        self.shard_size = shard_size
        self.max_open_shards = max_open_shards
        self.hits = 0
        self.misses = 0
        self._stores: dict[tuple[str, str], _Store] = {}
        self._loaded: OrderedDict[tuple[str, str, str], dict[str, Tensor]] = OrderedDict()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r}, hits={self.hits}, misses={self.misses})"

    def spec_dir(self, spec: str) -> Path:
        """The folder holding every entry of encoder ``spec``."""
        return self.root / "embeddings" / spec_dirname(spec)

    def encode(self, encoder: Encoder, items: Sequence[Any], *, kind: str = "embed",
               batch_size: int = 32, progress: bool | None = None, flush: bool = True) -> Tensor:
        """``encoder.encode(items)`` (``kind="embed"``: ``(N, D)``) or ``encoder.encode_tokens(items)``
        (``kind="tokens"``: ``(N, T, W)``, zero-padded), computing only what is not cached.

        Items: ``str`` for text encoders; image paths or ``PIL.Image``s for image encoders
        (paths are read with ``nofree.data.load_image``; an unreadable one is a ``DataError``,
        raised after everything encoded so far is saved). Returns float CPU tensors in input
        order; repeated items are encoded once. ``flush=False`` leaves the newly encoded items
        waiting in memory (written by size, by age, on an error, or by :meth:`flush`).
        ``progress``: a progress bar on stderr (``None``: when at least
        :data:`PROGRESS_FROM` items need encoding, e.g. a caption pool seen for the first time).
        """
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
        items = list(items)
        store = self._store(encoder, kind)
        keys = [content_key(item, encoder.modality) for item in items]
        found = self._lookup(store, keys)
        todo: dict[str, Any] = {}
        for key, item in zip(keys, items):
            if key not in found and key not in todo:
                todo[key] = item
        if todo:
            found.update(self._encode_missing(store, encoder, todo, kind, batch_size, progress))
        if flush:
            store.flush()
        self.misses += len(todo)
        self.hits += len(items) - len(todo)
        return self._assemble([found[key] for key in keys], encoder, kind)

    def flush(self) -> None:
        """Write every item still waiting in memory (see ``encode(..., flush=False)``)."""
        for store in self._stores.values():
            store.flush()

    def clear(self, spec: str | None = None) -> None:
        """Delete the entries of ``spec`` (or of every spec when ``None``)."""
        import shutil

        target = self.spec_dir(spec) if spec is not None else self.root / "embeddings"
        shutil.rmtree(target, ignore_errors=True)
        self._stores.clear()
        self._loaded.clear()

    # --- internals ---

    def _store(self, encoder: Encoder, kind: str) -> _Store:
        spec = getattr(encoder, "spec", None)
        if not isinstance(spec, str) or not spec:
            raise DataError(f"{type(encoder).__name__} has no spec string; the cache keys entries by "
                            "encoder spec (e.g. 'embedded:minilm-l6')")
        if getattr(encoder, "modality", None) not in ("image", "text"):
            raise DataError(f"encoder {spec!r} has modality {getattr(encoder, 'modality', None)!r}; "
                            "expected 'image' or 'text'")
        store = self._stores.get((spec, kind))
        if store is None:
            folder = self.spec_dir(spec)
            problem: OSError | None = None  # a cache that cannot be written is read (if it can)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                problem = err
            record = folder / "spec.json"
            try:
                recorded = json.loads(record.read_text(encoding="utf-8")).get("spec")
            except (OSError, ValueError, AttributeError):  # absent or damaged: write it again
                recorded = None
            if recorded is not None and recorded != spec:
                raise DataError(f"cache folder {folder} belongs to spec {recorded!r}, not "
                                f"{spec!r}; delete it or use another cache root")
            if recorded is None and problem is None:
                try:
                    atomic_write_json(record, {"format": FORMAT_VERSION, "spec": spec}, indent=1)
                except OSError as err:
                    problem = err
            store = self._stores[(spec, kind)] = _Store(folder, spec, kind)
            if problem is not None:
                store.disable_writes(problem)
        store.refresh()
        return store

    def _shard_tensors(self, store: _Store, name: str) -> dict[str, Tensor] | None:
        cache_key = (store.spec, store.kind, name)
        if cache_key in self._loaded:
            self._loaded.move_to_end(cache_key)
            return self._loaded[cache_key]
        tensors = store.load(name)
        if tensors is not None:
            self._loaded[cache_key] = tensors
            while len(self._loaded) > self.max_open_shards:
                self._loaded.popitem(last=False)
        return tensors

    def _lookup(self, store: _Store, keys: list[str]) -> dict[str, Tensor]:
        """Cached entries among ``keys``: key -> ``(D,)`` or ``(T, W)``."""
        found: dict[str, Tensor] = {key: store.pending[key] for key in set(keys) if key in store.pending}
        by_shard: dict[str, set[str]] = {}
        for key in set(keys):
            if key in found:
                continue
            if key in store.index:
                by_shard.setdefault(store.index[key][0], set()).add(key)
        for name, wanted in by_shard.items():
            shard = store.shards.get(name)
            tensors = self._shard_tensors(store, name) if shard is not None else None
            if tensors is None:
                continue
            values = tensors["values"]
            for key in wanted:
                position = store.index[key][1]
                if shard.offsets is None:
                    found[key] = values[position]
                else:
                    found[key] = values[shard.offsets[position]:shard.offsets[position + 1]]
        return found

    def _encode_missing(self, store: _Store, encoder: Encoder, todo: dict[str, Any], kind: str,
                        batch_size: int, progress: bool | None) -> dict[str, Tensor]:
        from tqdm.auto import tqdm

        method = encoder.encode if kind == "embed" else encoder.encode_tokens
        keys, items = list(todo), list(todo.values())
        done: dict[str, Tensor] = {}
        show = len(items) >= PROGRESS_FROM if progress is None else progress
        bar = tqdm(total=len(items), unit="item", desc=f"encoding ({encoder.spec})", disable=not show)
        try:
            for start in range(0, len(items), batch_size):
                chunk = _as_inputs(items[start:start + batch_size], encoder.modality)
                out = method(chunk, batch_size=batch_size)
                if out.shape[0] != len(chunk) or out.dim() != (2 if kind == "embed" else 3):
                    raise ValueError(f"encoder {encoder.spec!r} returned shape {tuple(out.shape)} for "
                                     f"{len(chunk)} inputs (kind={kind!r})")
                out = out.detach().to("cpu", torch.float32)
                for key, row in zip(keys[start:start + batch_size], out):
                    if kind == "tokens" and encoder.modality == "text":
                        row = _trim_padding(row)
                    done[key] = row.clone()
                    store.add(key, done[key])
                if store.due(self.shard_size, self.flush_seconds):
                    store.flush()
                bar.update(len(chunk))
        except BaseException:  # keep finished work even when an error or Ctrl-C stops the loop
            try:
                store.flush()
            except Exception as err:  # e.g. a full disk: report it, raise what stopped the loop
                log.warning("could not save %d encoded item(s) to the cache: %s", len(store.pending), err)
            raise
        finally:
            bar.close()
        return done

    @staticmethod
    def _assemble(entries: list[Tensor], encoder: Encoder, kind: str) -> Tensor:
        if kind == "embed":
            if not entries:
                return torch.zeros(0, int(getattr(encoder, "embed_dim", 0)))
            widths = {entry.shape[-1] for entry in entries}
            if len(widths) > 1:
                raise DataError(f"cached entries of {encoder.spec!r} have different widths {sorted(widths)}; "
                                "the spec no longer identifies one model: clear its cache folder")
            return torch.stack(entries).float()
        if not entries:
            return torch.zeros(0, 0, int(getattr(encoder, "token_dim", 0)))
        length = max(entry.shape[0] for entry in entries)
        out = torch.zeros(len(entries), length, entries[0].shape[1])
        for row, entry in enumerate(entries):
            out[row, :entry.shape[0]] = entry
        return out


def encode_images(encoder: Encoder, images: Sequence[Any], *, cache: "EmbeddingCache | None" = None,
                  batch_size: int = 32) -> Tensor:
    """``encoder.encode`` of image paths or PIL images ``(N, D)``: through ``cache`` when every
    item is a path (the cache reads the files it has to encode), else the paths are read here."""
    if cache is not None and all(isinstance(x, (str, Path)) for x in images):
        return cache.encode(encoder, [str(x) for x in images], batch_size=batch_size)
    from nofree.data.images import load_image

    loaded = [load_image(x) if isinstance(x, (str, Path)) else x for x in images]
    return encoder.encode(loaded, batch_size=batch_size)


def _as_inputs(items: list[Any], modality: str) -> list[Any]:
    """Encoder-ready inputs: image paths become RGB PIL images; everything else is unchanged."""
    if modality != "image":
        return items
    from nofree.data.images import load_image

    return [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in items]
