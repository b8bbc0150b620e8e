"""`nofree demo` end to end on the bundled sample, with tiny config-built models standing in."""
from __future__ import annotations

import json

from nofree import sample_dir
from nofree.data.pairs import load_pairs, load_text_lines
from nofree.demo import run_demo
from nofree.testing import make_tiny_lm_dir
from tests.test_cli import specs  # noqa: F401  (fixture)


def test_demo_runs_on_the_sample(tmp_path, monkeypatch, specs):  # noqa: F811
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    lm = f"local:{make_tiny_lm_dir(tmp_path / 'lm', family='llama')}"
    printed: list[str] = []
    out = run_demo(n_images=3, workdir=tmp_path / "demo", echo=printed.append, image_encoder=specs[0],
                   text_encoder=specs[1], lm=lm, pool_limit=300)
    train = load_pairs(sample_dir() / "pairs.jsonl", split="train")
    assert out["anchors"] == sum(len(p.captions) for p in train)            # one anchor per caption
    val_images = {p.image for p in load_pairs(sample_dir() / "pairs.jsonl", split="val")}
    pool = set(load_text_lines(sample_dir() / "caption_corpus.txt")[:300])
    categories = set(json.loads((sample_dir() / "coco_categories.json").read_text()))
    assert len(out["images"]) == 3
    for row in out["images"]:
        assert row["image"] in val_images                                   # held-out photos only
        assert row["retrieval"] in pool and isinstance(row["magic"], str)
        assert len(row["zero_shot"]) == 3 and {r["label"] for r in row["zero_shot"]} <= categories
    text = "\n".join(printed)
    assert "MAGIC" in text and "text -> image" in text
    again: list[str] = []
    run_demo(n_images=1, workdir=tmp_path / "demo", echo=again.append, magic=False,
             image_encoder=specs[0], text_encoder=specs[1], lm=lm, pool_limit=300)
    assert any("reusing the anchor set" in line for line in again)
