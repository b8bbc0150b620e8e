"""Pairs files (JSONL / CSV / image folder), caption pools and image loading."""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image

import nofree
from nofree.core import DataError, Pair
from nofree.data import load_image, load_images, load_pairs, load_text_lines

SAMPLE = nofree.sample_dir()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def make_image(path: Path, color=(200, 30, 30), size=(8, 6)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


# --- JSONL ---

def test_jsonl_fields_paths_and_meta(tmp_path):
    absolute = str(tmp_path / "elsewhere" / "z.jpg")
    source = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "images/a.jpg", "captions": ["a dog ", "a  brown\tdog"], "split": "train",
         "coco_id": 7, "categories": ["dog"]},
        "",  # blank lines are allowed
        {"image": absolute, "caption": "one caption", "split": "val"},
    ])
    pairs = load_pairs(source)
    assert len(pairs) == 2 and all(isinstance(p, Pair) for p in pairs)
    first, second = pairs
    assert first.image == str(tmp_path / "images" / "a.jpg")  # relative to the file's folder
    assert first.captions == ("a dog", "a brown dog")  # stripped, whitespace collapsed, order kept
    assert first.split == "train" and first.meta == {"coco_id": 7, "categories": ["dog"]}
    assert second.image == absolute and second.captions == ("one caption",)
    assert second.split == "val" and second.meta == {}
    # the same file read from another working directory gives the same absolute paths
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path.parent)
        again = load_pairs(os.path.relpath(source))
    finally:
        os.chdir(cwd)
    assert [p.image for p in again] == [p.image for p in pairs]


@pytest.mark.parametrize("bad, fragment", [
    ('{"image": "a.jpg", "captions": ["x"]', "invalid JSON"),
    ('{"captions": ["x"]}', "missing \"image\""),
    ('{"image": "a.jpg"}', "no captions"),
    ('{"image": "a.jpg", "captions": []}', "no captions"),
    ('{"image": "a.jpg", "captions": ["ok", "   "]}', "caption 1 is empty"),
    ('{"image": "a.jpg", "caption": ""}', "caption 0 is empty"),
    ('{"image": "a.jpg", "captions": ["ok", 3]}', "caption 1 is int"),
    ('["a.jpg", "x"]', "expected a JSON object"),
    ('{"image": "a.jpg", "captions": ["x"], "split": 1}', "\"split\" must be a string"),
])
def test_jsonl_bad_row_names_file_and_line(tmp_path, bad, fragment):
    source = write_jsonl(tmp_path / "p.jsonl", [{"image": "ok.jpg", "captions": ["fine"]}, "", bad])
    with pytest.raises(DataError) as info:
        load_pairs(source)
    message = str(info.value)
    assert str(source) in message and "line 3" in message and fragment in message


def test_empty_file_split_filter_and_limit(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs(empty)
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"image": f"{i}.jpg", "captions": [f"c{i}"], "split": "train" if i < 3 else "val"}
        for i in range(5)])
    assert [Path(p.image).name for p in load_pairs(source, split="val")] == ["3.jpg", "4.jpg"]
    assert [Path(p.image).name for p in load_pairs(source, split="train", limit=2)] == ["0.jpg", "1.jpg"]
    with pytest.raises(DataError, match="no pairs with split='test'.*train, val"):
        load_pairs(source, split="test")
    with pytest.raises(DataError, match="limit"):
        load_pairs(source, limit=0)
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown pairs format"):
        load_pairs(write_jsonl(tmp_path / "p.txt", ["x"]))


def test_missing_image_file_is_not_a_load_error(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"image": "not-there.jpg", "captions": ["x"]}])
    (pair,) = load_pairs(source)
    assert not Path(pair.image).exists()


# --- CSV ---

def test_csv_merges_rows_of_one_image_in_order(tmp_path):
    source = tmp_path / "pairs.csv"
    source.write_text(
        "image,caption,split,source\n"
        "b.jpg,\"a cat, sleeping\",train,web\n"
        "a.jpg,first of a,val,x\n"
        "b.jpg,second of b,train,web\n"
        "\n"
        "a.jpg,second of a,val,x\n")
    pairs = load_pairs(source)
    assert [Path(p.image).name for p in pairs] == ["b.jpg", "a.jpg"]  # order of first appearance
    assert pairs[0].captions == ("a cat, sleeping", "second of b")
    assert pairs[1].captions == ("first of a", "second of a")
    assert [p.split for p in pairs] == ["train", "val"]
    assert pairs[0].meta == {"source": "web"}
    assert pairs[0].image == str(tmp_path / "b.jpg")
    assert [Path(p.image).name for p in load_pairs(source, split="val")] == ["a.jpg"]


def test_csv_without_split_column(tmp_path):
    source = tmp_path / "p.csv"
    source.write_text("caption,image\nhello there,x.png\n")  # column order is free
    (pair,) = load_pairs(source)
    assert pair.captions == ("hello there",) and pair.split is None
    assert pair.image == str(tmp_path / "x.png")


@pytest.mark.parametrize("body, line, fragment", [
    ("image,caption\na.jpg,ok\na.jpg,\n", 3, "caption 0 is empty"),
    ("image,caption\na.jpg,ok\n,orphan caption\n", 3, "empty 'image'"),
    ("image,caption\na.jpg,ok,extra\n", 2, "3 fields"),
    ("image,caption,split\na.jpg,x,train\nb.jpg,y,val\na.jpg,z,val\n", 4, "one split"),
    ("img,text\na.jpg,x\n", 1, "must name the columns"),
])
def test_csv_bad_rows(tmp_path, body, line, fragment):
    source = tmp_path / "p.csv"
    source.write_text(body)
    with pytest.raises(DataError) as info:
        load_pairs(source)
    message = str(info.value)
    assert str(source) in message and f"line {line}" in message and fragment in message


# --- image folder with sidecars ---

def test_folder_with_sidecars(tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    make_image(folder / "b.jpg")
    (folder / "b.txt").write_text("a red square\n\n  a small red block  \n")
    make_image(folder / "sub" / "a.PNG")
    (folder / "sub" / "a.txt").write_text("nested image\n")
    make_image(folder / "lonely.jpg")  # no sidecar: left out with a warning
    (folder / "notes.txt").write_text("not a caption of any image\n")
    with caplog.at_level(logging.WARNING):
        pairs = load_pairs(folder)
    assert [Path(p.image).name for p in pairs] == ["b.jpg", "a.PNG"]  # sorted by relative path
    assert pairs[0].captions == ("a red square", "a small red block")
    assert pairs[1].captions == ("nested image",)
    assert all(p.split is None and Path(p.image).is_absolute() for p in pairs)
    assert "lonely.jpg" in caplog.text and "1 image(s)" in caplog.text


def test_folder_errors(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    make_image(folder / "a.jpg")
    with pytest.raises(DataError, match="a.txt"):  # images but no sidecars at all
        load_pairs(folder)
    (folder / "a.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"a\.txt is empty"):
        load_pairs(folder)


def test_load_text_lines(tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("  first caption \n\n\tsecond\n   \nthird")
    assert load_text_lines(pool) == ["first caption", "second", "third"]
    with pytest.raises(DataError, match="does not exist"):
        load_text_lines(tmp_path / "missing.txt")


# --- the bundled sample ---

def test_bundled_sample_pairs():
    pairs = load_pairs(SAMPLE / "pairs.jsonl")
    assert len(pairs) == 180
    assert sum(p.split == "train" for p in pairs) == 140
    assert sum(p.split == "val" for p in pairs) == 40
    assert all(Path(p.image).is_file() for p in pairs)
    assert all(len(p.captions) == 5 for p in pairs)
    assert len({p.image for p in pairs}) == 180
    assert all("coco_id" in p.meta for p in pairs)
    assert len(load_pairs(SAMPLE / "pairs.jsonl", split="val")) == 40
    pool = load_text_lines(SAMPLE / "caption_corpus.txt")
    val_captions = {c for p in pairs if p.split == "val" for c in p.captions}
    assert len(pool) > 20000 and not val_captions & set(pool)


# --- images ---

def test_corrupt_truncated_and_missing_images_are_skipped(tmp_path, caplog):
    real = sorted((SAMPLE / "images").glob("*.jpg"))[:3]
    data = real[0].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with Image.open(truncated) as lazy:  # the header alone looks fine: only decoding shows it
        assert lazy.size[0] > 0
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 this is not really a jpeg" * 10)
    missing = tmp_path / "missing.jpg"
    paths = [real[0], truncated, real[1], garbage, missing, real[2]]

    with caplog.at_level(logging.WARNING):
        loaded = load_images(paths)
    assert loaded.indices == [0, 2, 5]
    assert [p for p, _ in loaded.skipped] == [str(truncated), str(garbage), str(missing)]
    assert all(img.mode == "RGB" for img in loaded.images)
    assert loaded.images[0].size == Image.open(real[0]).size
    assert "skipped 3 of 6" in caplog.text and "truncated.jpg" in caplog.text

    for bad, fragment in [(truncated, "truncated"), (garbage, "not a readable image"),
                          (missing, "does not exist"), (tmp_path, "folder")]:
        with pytest.raises(DataError) as info:
            load_image(bad)
        assert str(bad) in str(info.value) and fragment in str(info.value)


def test_modes_are_converted_to_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    Image.new("L", (4, 4), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 4), (0, 0, 255, 10)).save(tmp_path / "rgba.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL palette-transparency warning
        images = [load_image(tmp_path / n) for n in ("p.png", "gray.png", "rgba.png")]
    assert all(im.mode == "RGB" for im in images)
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    assert images[1].getpixel((0, 0)) == (128, 128, 128)
    assert images[2].getpixel((0, 0)) == (0, 0, 255)


def test_decompression_bomb_guard(tmp_path, monkeypatch, caplog):
    path = make_image(tmp_path / "big.png", size=(30, 30))  # 900 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # warns above 600, refuses above 1200
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is logged, not raised as a Python warning
        assert load_image(path).size == (30, 30)
    assert "very large" in caplog.text and "big.png" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    with pytest.raises(DataError, match="too large"):
        load_image(path)
    assert load_images([path]).skipped[0][0] == str(path)
