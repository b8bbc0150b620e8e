"""Webdataset tar shards (img2dataset layout) read into pairs; bad samples skipped and reported."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.build import build_anchor_set
from nofree.core import DataError
from nofree.data.images import load_image
from nofree.data.pairs import load_pairs
from nofree.data.webdataset import scan_webdataset, split_key
from nofree.testing import TinyImageEncoder, TinyTextEncoder, make_webdataset, synthetic_sample


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    synthetic_sample(i, 16)[0].save(buffer, format="JPEG")
    return buffer.getvalue()


def test_shards_read_in_order_with_member_references(tmp_path):
    shards = make_webdataset(tmp_path / "wds", 11, per_shard=4)
    pairs = load_pairs(tmp_path / "wds")
    assert len(shards) == 3 and len(pairs) == 11
    assert [p.captions[0] for p in pairs] == [synthetic_sample(i)[1] for i in range(11)]
    assert pairs[5].image == f"{shards[1]}#{pairs[5].meta['key']}.jpg" and pairs[5].meta["shard"] == "00001.tar"
    # the member reference decodes to the stored JPEG
    with tarfile.open(shards[1]) as tar:
        stored = Image.open(io.BytesIO(tar.extractfile(f"{pairs[5].meta['key']}.jpg").read())).convert("RGB")
    assert list(load_image(pairs[5].image).getdata()) == list(stored.getdata())
    assert len(load_pairs(shards[2])) == 3 and len(load_pairs(tmp_path / "wds", limit=6)) == 6


def test_caption_from_json_and_webdataset_keys(tmp_path):
    make_webdataset(tmp_path / "wds", 3, caption_in="json")
    assert [p.captions[0] for p in load_pairs(tmp_path / "wds")] == [synthetic_sample(i)[1] for i in range(3)]
    assert split_key("a/b/000012.seg.png") == ("a/b/000012", "seg.png")


def test_bad_samples_and_truncated_shard_are_skipped_and_reported(tmp_path, caplog):
    folder = tmp_path / "wds"
    folder.mkdir()
    write_tar(folder / "00000.tar", [
        ("s0.jpg", jpeg(0)), ("s0.txt", b"a red circle"),
        ("s1.jpg", jpeg(1)),                                               # no caption
        ("s2.jpg", b"<html>not an image</html>"), ("s2.txt", b"broken"),   # non-image bytes
        ("s3.json", json.dumps({"status": "failed_to_download"}).encode()),  # no image member
        ("notes.md", b"# a stray file"),                                   # no image member
        ("s4.png", jpeg(4)), ("s4.json", json.dumps({"caption": "a  green\nsquare"}).encode()),
    ])
    # four samples, then the file is cut inside the third image's data
    cut = write_tar(folder / "00001.tar", [(f"t{i}.{ext}", jpeg(i) if ext == "jpg" else f"caption {i}".encode())
                                           for i in range(4) for ext in ("jpg", "txt")])
    with tarfile.open(cut) as tar:
        end = tar.getmember("t2.jpg").offset_data + 100
    cut.write_bytes(cut.read_bytes()[:end])
    write_tar(folder / "00002.tar", [("u0.jpg", jpeg(9)), ("u0.txt", b"the last one")])

    scan = scan_webdataset(folder)
    assert "skipped" in caplog.text
    reasons = {ref.rsplit("/", 1)[-1]: why for ref, why in scan.skipped}
    assert "no caption" in reasons["00000.tar#s1.jpg"]
    assert "no image" in reasons["00000.tar#s3"] and "no image" in reasons["00000.tar#notes"]
    assert "truncated" in reasons["00001.tar"]
    kept = [p.captions[0] for p in scan.pairs]
    assert kept[:3] == ["a red circle", "broken", "a green square"] and kept[-1] == "the last one"
    assert [c for c in kept if c.startswith("caption")] == ["caption 0", "caption 1"]  # before the cut
    assert "cut" in reasons["00001.tar#t2"]

    built = build_anchor_set(folder, image_encoder=TinyImageEncoder(dim=6), text_encoder=TinyTextEncoder(dim=5),
                             out=tmp_path / "set", progress=False)
    assert len(built) == len(kept) - 1  # s2 is read but does not decode
    skipped = AnchorSet.load(tmp_path / "set").meta["skipped_images"]
    assert any(s.endswith("00000.tar#s2.jpg") for s in skipped)
    assert len(skipped) == len(scan.skipped) + 1
    assert "the last one" in built.captions


def test_missing_member_and_unreadable_compressed_shards_are_clear_errors(tmp_path, caplog):
    shard = make_webdataset(tmp_path / "wds", 2)[0]
    with pytest.raises(DataError, match="no member"):
        load_image(f"{shard}#absent.jpg")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="holds no pairs"):
        load_pairs(tmp_path / "gz" / "a.tar.gz")
    assert "not a readable tar shard" in caplog.text


def test_webdataset_build_equals_jsonl_build_of_the_same_images(tmp_path):
    shards = make_webdataset(tmp_path / "wds", 6, per_shard=4)
    rows = []
    for pair in load_pairs(tmp_path / "wds"):
        path = tmp_path / f"{pair.meta['key']}.png"
        load_image(pair.image).save(path)  # lossless copy of the decoded JPEG
        rows.append(json.dumps({"image": path.name, "captions": list(pair.captions)}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    enc = TinyImageEncoder(dim=6), TinyTextEncoder(dim=5)
    a = build_anchor_set(shards[0].parent, image_encoder=enc[0], text_encoder=enc[1], out=tmp_path / "a",
                         progress=False, shard_size=4)
    b = build_anchor_set(tmp_path / "pairs.jsonl", image_encoder=enc[0], text_encoder=enc[1],
                         out=tmp_path / "b", progress=False, shard_size=4)
    torch.testing.assert_close(a.image, b.image)
    assert torch.equal(a.text, b.text) and a.captions == b.captions


# --- shards as users name them ------------------------------------------------------------------

def _gzip_shards(shards: list[Path]) -> list[Path]:
    """``X.tar`` -> ``X.tar.gz`` (the plain shard removed)."""
    import gzip

    out = []
    for shard in shards:
        target = shard.with_name(shard.name + ".gz")
        target.write_bytes(gzip.compress(shard.read_bytes()))
        shard.unlink()
        out.append(target)
    return out


def test_brace_patterns_and_lists_of_shards(tmp_path):
    shards = make_webdataset(tmp_path / "wds", 10, per_shard=4)  # 00000..00002
    expected = [synthetic_sample(i)[1] for i in range(10)]
    pattern = str(tmp_path / "wds" / "{00000..00002}.tar")
    assert [p.captions[0] for p in load_pairs(pattern)] == expected
    assert [p.captions[0] for p in load_pairs([str(s) for s in shards])] == expected
    # webdataset's '::' joins patterns; the order written is kept
    joined = f"{shards[2]}::{tmp_path / 'wds' / '{00000..00001}.tar'}"
    assert [p.captions[0] for p in load_pairs(joined)] == expected[8:] + expected[:8]
    assert len(load_pairs(pattern, limit=5)) == 5
    with pytest.raises(DataError, match=r"00003.tar.*does not exist.*range"):
        load_pairs(str(tmp_path / "wds" / "{00000..00003}.tar"))


def test_compressed_shards_read_by_member_reference(tmp_path):
    plain = load_pairs(make_webdataset(tmp_path / "plain", 9, per_shard=4)[0].parent)
    shards = _gzip_shards(make_webdataset(tmp_path / "wds", 9, per_shard=4))
    for source in (tmp_path / "wds", str(tmp_path / "wds" / "{00000..00002}.tar.gz"), shards):
        pairs = load_pairs(source)
        assert [p.captions for p in pairs] == [p.captions for p in plain]
    assert pairs[5].image == f"{shards[1]}#{pairs[5].meta['key']}.jpg"
    # forward, backward and across shards: each reference gives its own image
    for i in (5, 6, 0, 8, 5):
        assert list(load_image(pairs[i].image).getdata()) == list(load_image(plain[i].image).getdata())


def test_truncated_compressed_shard_keeps_the_samples_before_the_cut(tmp_path):
    [shard] = _gzip_shards(make_webdataset(tmp_path / "wds", 6, per_shard=6))
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) * 2 // 3])
    scan = scan_webdataset(shard)
    assert 0 < len(scan.pairs) < 6 and scan.skipped
    assert [p.captions[0] for p in scan.pairs] == [synthetic_sample(i)[1] for i in range(len(scan.pairs))]


def test_build_from_a_pattern_resumes_from_member_references(tmp_path):
    make_webdataset(tmp_path / "wds", 12, per_shard=5)
    pattern = str(tmp_path / "wds" / "{00000..00002}.tar")
    built = build_anchor_set(pattern, image_encoder=TinyImageEncoder(), text_encoder=TinyTextEncoder(),
                             out=tmp_path / "a", shard_size=4, progress=False)
    again = build_anchor_set([str(p) for p in sorted((tmp_path / "wds").glob("*.tar"))],
                             image_encoder=TinyImageEncoder(), text_encoder=TinyTextEncoder(),
                             out=tmp_path / "b", shard_size=4, progress=False)
    assert len(built) == 12 and torch.equal(built.image, again.image)
    assert AnchorSet.load(tmp_path / "a").meta["sources"][0]["pairs"] == pattern
