"""Anchor sets: format v1 round trip, validation of damaged sets, resumable builds, extend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.build import build_anchor_set, extend_anchor_set
from nofree.core import DataError, SpecError
from nofree.testing import TinyImageEncoder, TinyTextEncoder

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "anchors-v1"


def make_pairs(folder: Path, n: int = 7, *, corrupt: tuple[int, ...] = ()) -> Path:
    """A JSONL pairs file of ``n`` small coloured images with two captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        path = folder / f"img{i}.png"
        if i in corrupt:
            path.write_bytes(b"not an image at all")
        else:
            Image.new("RGB", (12, 10), (30 * i % 256, 90, 255 - 20 * i)).save(path)
        lines.append(json.dumps({"image": path.name, "captions": [f"photo number {i}", f"a red bus {i}"],
                                 "split": "train" if i % 3 else "val"}))
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs


@pytest.fixture()
def encoders():
    return TinyImageEncoder(dim=6), TinyTextEncoder(dim=5)


def build(pairs, out, encoders, **kw):
    image_encoder, text_encoder = encoders
    return build_anchor_set(pairs, image_encoder=image_encoder, text_encoder=text_encoder, out=out,
                            progress=False, **kw)


def test_build_round_trip(tmp_path, encoders):
    pairs = make_pairs(tmp_path / "data")
    built = build(pairs, tmp_path / "set", encoders, batch_size=3)
    assert len(built) == 14 and built.image_dim == 6 and built.text_dim == 5
    # each image appears once per caption, and rows are normalised
    torch.testing.assert_close(built.image[0], built.image[1])
    torch.testing.assert_close(built.image.norm(dim=1), torch.ones(14))
    loaded = AnchorSet.load(tmp_path / "set")
    assert torch.equal(loaded.image, built.image) and torch.equal(loaded.text, built.text)
    assert loaded.captions == built.captions and loaded.images == built.images
    manifest = loaded.manifest()
    assert manifest["format_version"] == 2 and manifest["image_spec"] == encoders[0].spec
    assert manifest["sources"][0]["n_pairs"] == 7 and len(manifest["sources"][0]["pairs_sha256"]) == 64
    assert not (tmp_path / "set.partial").exists()


def test_split_limit_and_corrupt_images_are_skipped_and_listed(tmp_path, encoders):
    pairs = make_pairs(tmp_path / "data", n=9, corrupt=(1, 4))
    built = build(pairs, tmp_path / "set", encoders, split="train")
    train = [i for i in range(9) if i % 3]
    assert len(built) == 2 * (len(train) - 2)
    skipped = AnchorSet.load(tmp_path / "set").meta["skipped_images"]
    assert sorted(Path(p).name for p in skipped) == ["img1.png", "img4.png"]
    limited = build(pairs, tmp_path / "lim", encoders, limit=2)
    assert len(limited) == 2 * 1  # img1 is corrupt


def test_existing_output_is_never_overwritten_silently(tmp_path, encoders):
    pairs = make_pairs(tmp_path / "data")
    build(pairs, tmp_path / "set", encoders)
    before = (tmp_path / "set" / "embeddings.safetensors").read_bytes()
    with pytest.raises(DataError, match="already exists"):
        build(pairs, tmp_path / "set", encoders)
    assert (tmp_path / "set" / "embeddings.safetensors").read_bytes() == before


def test_interrupted_build_resumes_to_the_uninterrupted_result(tmp_path, encoders, monkeypatch):
    import nofree.anchors.build.local as build_module

    pairs = make_pairs(tmp_path / "data", n=10)
    reference = build(pairs, tmp_path / "ref", encoders, shard_size=3, batch_size=2)

    real = build_module.encode_shard
    calls = []

    def flaky(chunk, *args, **kw):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third shard
        return real(chunk, *args, **kw)

    monkeypatch.setattr(build_module, "encode_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(pairs, tmp_path / "set", encoders, shard_size=3, batch_size=2)
    partial = tmp_path / "set.partial"
    assert sorted(p.name for p in partial.glob("shard-*.safetensors")) == \
        ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (tmp_path / "set").exists()
    (partial / "shard-00002.safetensors.tmp-999").write_bytes(b"half-written")  # a killed writer

    calls.clear()
    resumed = build(pairs, tmp_path / "set", encoders, shard_size=3, batch_size=2)
    assert calls == [3, 1], "finished shards must not be encoded again"
    assert torch.equal(resumed.image, reference.image) and torch.equal(resumed.text, reference.text)
    assert resumed.captions == reference.captions


def test_resume_with_other_settings_is_refused(tmp_path, encoders, monkeypatch):
    import nofree.anchors.build.local as build_module

    pairs = make_pairs(tmp_path / "data", n=6)
    real, calls = build_module.encode_shard, []

    def interrupt_second(*args, **kw):  # Ctrl-C during the second shard
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(build_module, "encode_shard", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        build(pairs, tmp_path / "set", encoders, shard_size=2)
    monkeypatch.undo()
    with pytest.raises(DataError, match="other settings.*shard_size.*rm -r .*set.partial"):
        build(pairs, tmp_path / "set", encoders, shard_size=4)


def test_extend_appends_with_the_recorded_encoders(tmp_path, encoders):
    pairs = make_pairs(tmp_path / "a", n=3)
    more = make_pairs(tmp_path / "b", n=2)
    base = build(pairs, tmp_path / "set", encoders)
    merged = extend_anchor_set(tmp_path / "set", more, image_encoder=encoders[0],
                               text_encoder=encoders[1], progress=False)
    assert len(merged) == len(base) + 4
    loaded = AnchorSet.load(tmp_path / "set")
    assert torch.equal(loaded.image[: len(base)], base.image)
    assert len(loaded.meta["sources"]) == 2
    with pytest.raises(SpecError, match="built with"):
        extend_anchor_set(tmp_path / "set", more, image_encoder=TinyImageEncoder(dim=6, seed=1),
                          text_encoder=encoders[1], progress=False)


def test_encoder_mismatch_is_a_clear_error(tmp_path, encoders):
    built = build(make_pairs(tmp_path / "data"), tmp_path / "set", encoders)
    built.check_encoder(encoders[0], "image")
    with pytest.raises(SpecError, match="text_encoder="):
        built.check_encoder(TinyTextEncoder(dim=5, seed=3), "text")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), "not an anchor set"),
    (lambda d: (d / "manifest.json").write_text("{oops"), "not valid JSON"),
    (lambda d: _edit_manifest(d, format_version=99), "version 99"),
    (lambda d: _edit_manifest(d, n_anchors=3), "manifest says"),
    (lambda d: _edit_manifest(d, text_dim=7), "manifest says"),
    (lambda d: _truncate(d / "embeddings.safetensors"), "unreadable or truncated"),
    (lambda d: _drop_last_line(d / "captions.jsonl"), "captions but the manifest"),
    (lambda d: (d / "captions.jsonl").write_text("not json\n"), "line 1"),
    (lambda d: _nan_in_last_value(d / "embeddings.safetensors", "text"), "'text' holds NaN"),
])
def test_damaged_sets_fail_clearly(tmp_path, encoders, damage, message):
    build(make_pairs(tmp_path / "data"), tmp_path / "set", encoders)
    _drop_checksums(tmp_path / "set")  # as a set from before checksums: the structural checks
    damage(tmp_path / "set")
    with pytest.raises(DataError, match=message):
        AnchorSet.load(tmp_path / "set")


def _drop_checksums(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _flip_bit(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _flip_bit(d / "embeddings.safetensors", -5), "embeddings.safetensors does not match the sha256"),
    (lambda d: _flip_bit(d / "captions.jsonl", 20), "captions.jsonl does not match the sha256"),
    (lambda d: _truncate(d / "embeddings.safetensors"), "truncated or replaced"),
    (lambda d: (d / "captions.jsonl").unlink(), "captions.jsonl is missing"),
    (lambda d: _nan_in_last_value(d / "embeddings.safetensors", "text"), "does not match the sha256"),
])
def test_checksums_catch_damaged_data_files(tmp_path, encoders, damage, message):
    build(make_pairs(tmp_path / "data"), tmp_path / "set", encoders)
    files = json.loads((tmp_path / "set" / "manifest.json").read_text())["files"]
    assert set(files) == {"embeddings.safetensors", "captions.jsonl"}
    assert all(len(record["sha256"]) == 64 and record["bytes"] > 0 for record in files.values())
    damage(tmp_path / "set")
    with pytest.raises(DataError, match=message) as err:
        AnchorSet.load(tmp_path / "set")
    assert "\n" not in str(err.value) and "rebuild the set" in str(err.value)


def test_quick_load_checks_sizes_only(tmp_path, encoders):
    from nofree.anchors.anchor_set import quick_check

    build(make_pairs(tmp_path / "data"), tmp_path / "set", encoders)
    _flip_bit(tmp_path / "set" / "embeddings.safetensors", -5)  # same size: only a full read sees it
    assert len(AnchorSet.load(tmp_path / "set", verify=False)) == 14
    manifest, captions = quick_check(tmp_path / "set")
    assert manifest["n_anchors"] == 14 and captions[0] == "photo number 0"
    _truncate(tmp_path / "set" / "embeddings.safetensors")
    with pytest.raises(DataError, match="truncated"):
        quick_check(tmp_path / "set")


def test_saving_a_loaded_set_records_fresh_checksums(tmp_path, encoders):
    build(make_pairs(tmp_path / "data"), tmp_path / "set", encoders)
    loaded = AnchorSet.load(tmp_path / "set")
    assert "files" in loaded.meta  # the big set's records, which must not be written again
    loaded.subset([0, 1]).save(tmp_path / "small")
    assert len(AnchorSet.load(tmp_path / "small")) == 2


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _nan_in_last_value(path: Path, name: str) -> None:
    """Overwrite the last float32 of tensor ``name`` in a safetensors file with NaN."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    end = json.loads(bytes(raw[8:start]))[name]["data_offsets"][1]
    raw[start + end - 4:start + end] = b"\x00\x00\xc0\x7f"  # a quiet NaN, little-endian
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def test_committed_v1_fixture_keeps_loading():
    fixture = AnchorSet.load(FIXTURE_V1)
    assert fixture.meta["format_version"] == 1
    assert len(fixture) == 6 and fixture.image_dim == 4 and fixture.text_dim == 3
    assert fixture.captions[0] == "a dog on a beach"
    torch.testing.assert_close(fixture.image.norm(dim=1), torch.ones(6))


def test_subset_keeps_rows_in_order(tmp_path, encoders):
    built = build(make_pairs(tmp_path / "data"), tmp_path / "set", encoders)
    part = built.subset([3, 0])
    assert torch.equal(part.text, built.text[[3, 0]]) and part.captions == (built.captions[3], built.captions[0])


def test_progress_moves_per_encoded_batch(tmp_path, monkeypatch):
    import tqdm.auto

    updates: list[int] = []

    class Bar:
        def __init__(self, *args, **kwargs):
            assert kwargs.get("unit") == "pair"  # tqdm shows the rate as pair/s

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    pairs = make_pairs(tmp_path / "data", n=7)
    build_anchor_set(pairs, image_encoder=TinyImageEncoder(), text_encoder=TinyTextEncoder(),
                     out=tmp_path / "set", batch_size=2, shard_size=256)
    assert updates == [2, 2, 2, 1]  # one shard, yet the bar moves after every batch
    # a resumed build counts the pairs an earlier run saved at once, then moves per batch
    updates.clear()
    work = Path(str(tmp_path / "again") + ".partial")
    with pytest.raises(KeyboardInterrupt):
        build_anchor_set(pairs, image_encoder=TinyImageEncoder(), out=tmp_path / "again",
                         text_encoder=_interrupting_text_encoder(after=2), batch_size=2, shard_size=3)
    assert work.exists() and updates[:1] == [2]
    updates.clear()
    build_anchor_set(pairs, image_encoder=TinyImageEncoder(), text_encoder=TinyTextEncoder(),
                     out=tmp_path / "again", batch_size=2, shard_size=3)
    assert updates == [2, 1, 2, 1, 1]  # shard 0: 2 saved + 1 encoded; shard 1: 2 + 1; shard 2: 1


def _interrupting_text_encoder(after: int):
    """A TinyTextEncoder that raises KeyboardInterrupt on its ``after``-th encode call."""
    class Interrupting(TinyTextEncoder):
        calls = 0

        def encode(self, batch, **kwargs):
            type(self).calls += 1
            if type(self).calls >= after:
                raise KeyboardInterrupt
            return super().encode(batch, **kwargs)

    return Interrupting()
