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


def test_missing_member_and_compressed_shards_are_clear_errors(tmp_path):
    shard = make_webdataset(tmp_path / "wds", 2)[0]
    with pytest.raises(DataError, match="no member"):
        load_image(f"{shard}#absent.jpg")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="compressed"):
        load_pairs(tmp_path / "gz" / "a.tar.gz")


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
