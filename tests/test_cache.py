"""The embedding cache: hits skip the encoder, keys follow content and spec, writes are atomic."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nofree.cache import EmbeddingCache, content_key, default_cache_root, spec_dirname
from nofree.core import DataError


class CountingEncoder:
    """Deterministic stand-in for a frozen encoder that records every input it is given."""

    def __init__(self, spec: str = "fake:text-8", modality: str = "text", dim: int = 8):
        self.spec, self.modality, self.embed_dim, self.token_dim = spec, modality, dim, dim
        self.calls = 0
        self.seen: list = []

    def _seed(self, item) -> int:
        data = item.encode() if isinstance(item, str) else item.tobytes() + repr(item.size).encode()
        return int.from_bytes(hashlib.sha256(self.spec.encode() + data).digest()[:6], "big")

    def _vector(self, item) -> torch.Tensor:
        vec = torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(self._seed(item)))
        return vec / vec.norm()

    def encode(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        self.calls += 1
        self.seen.extend(batch)
        return torch.stack([self._vector(item) for item in batch])

    def encode_tokens(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        """Text: one token per word, zero-padded to the batch's longest; images: 3 tokens."""
        self.calls += 1
        self.seen.extend(batch)
        lengths = [len(item.split()) if isinstance(item, str) else 3 for item in batch]
        out = torch.zeros(len(batch), max(lengths), self.token_dim)
        for row, (item, length) in enumerate(zip(batch, lengths)):
            gen = torch.Generator().manual_seed(self._seed(item))
            out[row, :length] = torch.rand(length, self.token_dim, generator=gen) + 0.1
        return out


def shards(cache: EmbeddingCache, spec: str, kind: str = "embed") -> list[Path]:
    return sorted(cache.spec_dir(spec).glob(f"{kind}-*.safetensors"))


TEXTS = ["a dog on a beach", "a red bus", "a dog on a beach", "two cats on a sofa"]


def test_hits_are_identical_and_skip_the_encoder(tmp_path):
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    first = cache.encode(encoder, TEXTS)
    assert first.shape == (4, 8) and first.dtype == torch.float32
    assert torch.equal(first, CountingEncoder().encode(TEXTS))  # same values, input order
    assert sorted(encoder.seen) == sorted(set(TEXTS))  # the repeated text is encoded once
    assert (cache.hits, cache.misses) == (1, 3)

    again = EmbeddingCache(tmp_path)  # a fresh instance reads what the first one wrote
    encoder.seen.clear()
    calls = encoder.calls
    second = again.encode(encoder, list(reversed(TEXTS)))
    assert encoder.calls == calls and encoder.seen == []
    assert torch.equal(second, first.flip(0))
    assert (again.hits, again.misses) == (4, 0)

    mixed = again.encode(encoder, ["a red bus", "a new caption", "a dog on a beach"])
    assert encoder.seen == ["a new caption"]
    assert torch.equal(mixed, CountingEncoder().encode(["a red bus", "a new caption", "a dog on a beach"]))
    assert again.encode(encoder, []).shape == (0, 8)


def test_other_spec_is_a_miss_and_spec_is_recorded(tmp_path):
    cache = EmbeddingCache(tmp_path)
    a = CountingEncoder(spec="hf-text:org/model-a")
    b = CountingEncoder(spec="hf-text:org/model-a@v2")
    cache.encode(a, TEXTS)
    out_b = cache.encode(b, TEXTS)
    assert b.calls == 1 and sorted(b.seen) == sorted(set(TEXTS))
    assert not torch.equal(out_b, cache.encode(a, TEXTS))
    dir_a, dir_b = cache.spec_dir(a.spec), cache.spec_dir(b.spec)
    assert dir_a != dir_b and dir_a.parent == dir_b.parent
    assert "/" not in spec_dirname("local:/weird/path@x") and spec_dirname("x:y") != spec_dirname("x:z")
    assert json.loads((dir_b / "spec.json").read_text())["spec"] == "hf-text:org/model-a@v2"


def test_image_keys_follow_file_bytes(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        paths.append(pictures / f"{i}.png")
        Image.new("RGB", (6, 5), color).save(paths[-1])
    encoder = CountingEncoder(spec="fake:image-8", modality="image")
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.encode(encoder, [str(p) for p in paths])
    assert len(encoder.seen) == 3 and all(isinstance(im, Image.Image) for im in encoder.seen)

    renamed = pictures / "renamed.png"
    shutil.copy(paths[1], renamed)  # same bytes under another name: a hit
    encoder.seen.clear()
    assert torch.equal(cache.encode(encoder, [renamed]), first[1:2])
    assert encoder.seen == []

    Image.new("RGB", (6, 5), (9, 9, 9)).save(paths[1])  # new bytes under the old name: a miss
    changed = cache.encode(encoder, [str(p) for p in paths])
    assert len(encoder.seen) == 1
    assert torch.equal(changed[[0, 2]], first[[0, 2]]) and not torch.equal(changed[1], first[1])

    in_memory = Image.new("RGB", (6, 5), (1, 2, 3))  # PIL images are keyed by their pixels
    once = cache.encode(encoder, [in_memory])
    twice = cache.encode(encoder, [in_memory.copy()])
    assert torch.equal(once, twice) and len(encoder.seen) == 2
    assert content_key(in_memory, "image") != content_key(Image.new("RGB", (5, 6), (1, 2, 3)), "image")
    with pytest.raises(DataError, match="missing.png"):
        cache.encode(encoder, [pictures / "missing.png"])


def test_shards_hold_many_items(tmp_path):
    texts = [f"caption number {i}" for i in range(25)]
    cache = EmbeddingCache(tmp_path, shard_size=10)
    encoder = CountingEncoder()
    out = cache.encode(encoder, texts, batch_size=4)
    files = shards(cache, encoder.spec)
    assert 2 <= len(files) <= 4  # not one file per item, not everything rewritten
    assert encoder.calls == 7  # ceil(25 / 4) encoder batches
    assert torch.equal(EmbeddingCache(tmp_path).encode(encoder, texts), out)
    assert encoder.calls == 7


def test_interrupted_writes_are_never_read_back(tmp_path, caplog):
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    cache.encode(encoder, ["kept text"])
    (shard,) = shards(cache, encoder.spec)
    folder = shard.parent
    # a run killed while writing leaves a temporary file holding wrong values for a new text
    from safetensors.torch import save_file
    leftover = folder / f".{shard.name}.tmp-12345"
    save_file({"values": torch.zeros(1, 8)}, str(leftover),
              metadata={"format": "1", "spec": encoder.spec, "kind": "embed",
                        "keys": json.dumps([content_key("new text", "text")]), "sha256": "0"})
    # a shard cut short (e.g. disk full) under a final name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 7])

    fresh = EmbeddingCache(tmp_path)
    encoder.seen.clear()
    with caplog.at_level(logging.WARNING):
        out = fresh.encode(encoder, ["kept text", "new text"])
    assert encoder.seen == ["kept text", "new text"]  # neither file was trusted
    assert torch.equal(out, CountingEncoder().encode(["kept text", "new text"]))
    assert "corrupt" in caplog.text
    assert (folder / (shard.name + ".corrupt")).exists() and not shard.exists()
    encoder.seen.clear()
    assert torch.equal(EmbeddingCache(tmp_path).encode(encoder, ["kept text", "new text"]), out)
    assert encoder.seen == []


def test_flipped_bytes_fail_the_checksum(tmp_path, caplog):
    encoder = CountingEncoder()
    EmbeddingCache(tmp_path).encode(encoder, TEXTS)
    (shard,) = shards(EmbeddingCache(tmp_path), encoder.spec)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: the header still parses
    shard.write_bytes(bytes(data))
    encoder.seen.clear()
    with caplog.at_level(logging.WARNING):
        out = EmbeddingCache(tmp_path).encode(encoder, TEXTS)
    assert "checksum" in caplog.text and sorted(encoder.seen) == sorted(set(TEXTS))
    assert torch.equal(out, CountingEncoder().encode(TEXTS))


def test_work_done_before_an_error_is_kept(tmp_path):
    good = []
    for i in range(4):
        good.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(good[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    encoder = CountingEncoder(spec="fake:image", modality="image")
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(DataError, match="broken.png"):
        cache.encode(encoder, [*good[:2], broken, *good[2:]], batch_size=2)
    encoder.seen.clear()
    EmbeddingCache(tmp_path / "cache").encode(encoder, good)
    assert len(encoder.seen) == 2  # the first batch was saved before the bad image stopped the run


def test_token_grids(tmp_path):
    texts = ["a dog", "a dog on the beach today", "a dog"]
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    grids = cache.encode(encoder, texts, kind="tokens")
    assert grids.shape == (3, 6, 8)
    assert torch.equal(grids, CountingEncoder().encode_tokens(texts))
    alone = EmbeddingCache(tmp_path).encode(encoder, ["a dog"], kind="tokens")
    assert alone.shape == (1, 2, 8)  # stored without the padding of the batch it came from
    assert torch.equal(alone[0], grids[0, :2])
    assert len(shards(cache, encoder.spec, "tokens")) == 1 and not shards(cache, encoder.spec, "embed")
    with pytest.raises(ValueError, match="kind"):
        cache.encode(encoder, texts, kind="pooled")


def test_default_root_and_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "env-root"))
    assert default_cache_root() == tmp_path / "env-root"
    cache = EmbeddingCache()
    expected = cache.encode(CountingEncoder(), TEXTS)
    assert (tmp_path / "env-root" / "embeddings").is_dir()
    script = (
        "import sys, torch\n"
        "from nofree.cache import EmbeddingCache\n"
        "class Refuses:\n"
        "    spec, modality, embed_dim = 'fake:text-8', 'text', 8\n"
        "    def encode(self, batch, *, batch_size=32):\n"
        "        raise SystemExit('the encoder was called')\n"
        f"texts = {TEXTS!r}\n"
        "out = EmbeddingCache().encode(Refuses(), texts)\n"
        "torch.save(out, sys.argv[1])\n")
    result_file = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-c", script, str(result_file)], capture_output=True,
                          text=True, env={**os.environ, "NOFREE_CACHE": str(tmp_path / "env-root")})
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(result_file, weights_only=True), expected)


def test_batches_wait_in_memory_until_a_flush(tmp_path):
    texts = [f"caption number {i}" for i in range(6)]
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    first = cache.encode(encoder, texts[:3], flush=False)
    assert not shards(cache, encoder.spec)  # waiting in memory...
    encoder.seen.clear()
    assert torch.equal(cache.encode(encoder, texts[:3], flush=False), first)
    assert encoder.seen == []  # ...and served from there
    cache.encode(encoder, texts[3:], flush=False)
    cache.flush()
    assert len(shards(cache, encoder.spec)) == 1  # one file for both calls
    encoder.seen.clear()
    EmbeddingCache(tmp_path).encode(encoder, texts)
    assert encoder.seen == []


def test_waiting_items_are_written_by_age(tmp_path):
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path, flush_seconds=0)
    cache.encode(encoder, ["a", "b", "c"], batch_size=1, flush=False)
    assert len(shards(cache, encoder.spec)) == 3  # each batch was old enough to be written
    with pytest.raises(ValueError, match="flush_seconds"):
        EmbeddingCache(tmp_path, flush_seconds=-1)


class InterruptedEncoder(CountingEncoder):
    """Raises KeyboardInterrupt (as Ctrl-C would) when it reaches ``stop_at``."""

    def __init__(self, stop_at: str):
        super().__init__()
        self.stop_at = stop_at

    def encode(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        if self.stop_at in batch:
            raise KeyboardInterrupt
        return super().encode(batch, batch_size=batch_size)


def test_finished_batches_survive_an_interrupt(tmp_path):
    texts = [f"caption number {i}" for i in range(7)]
    cache = EmbeddingCache(tmp_path)
    cache.encode(CountingEncoder(), ["waiting from an earlier call"], flush=False)
    with pytest.raises(KeyboardInterrupt):
        cache.encode(InterruptedEncoder(stop_at=texts[4]), texts, batch_size=2, flush=False)
    encoder = CountingEncoder()
    EmbeddingCache(tmp_path).encode(encoder, ["waiting from an earlier call", *texts])
    assert encoder.seen == texts[4:]  # the first two batches (and the earlier call) were kept
