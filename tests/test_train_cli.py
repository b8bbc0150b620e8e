"""`nofree train` and `nofree caption --adapter` end to end on tiny config-built backbones."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nofree.cli import main
from nofree.testing import make_tiny_hf_text, make_tiny_hf_vision, make_tiny_lm_dir
from tests.test_anchors import make_pairs


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {"image": f"local:{make_tiny_hf_vision(root / 'vision')}",
            "text": f"local:{make_tiny_hf_text(root / 'text')}",
            "lm": f"local:{make_tiny_lm_dir(root / 'lm')}"}


@pytest.mark.parametrize("method", ["clipcap", "flamingo"])
def test_train_then_caption(tmp_path, backbones, method, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    pairs = make_pairs(tmp_path / "data", n=6)
    out = tmp_path / method
    args = ["train", method, "--pairs", str(pairs), "--image-encoder", backbones["image"], "--lm",
            backbones["lm"], "--out", str(out), "--epochs", "2", "--batch-size", "4"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and (out / "adapter.safetensors").exists()
    assert f"wrote {out}" in result.stdout

    again = runner.invoke(main, args)  # an existing checkpoint is never overwritten silently
    assert again.exit_code != 0 and "Traceback" not in again.output

    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))[:2]
    result = runner.invoke(main, ["caption", "--method", method, "--adapter", str(out), "--max-tokens", "4",
                                  "--format", "jsonl", *images])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == images and all(isinstance(r["caption"], str) for r in rows)
    beams = runner.invoke(main, ["caption", "--method", method, "--adapter", str(out), "--max-tokens", "4",
                                 "--beams", "3", "--no-repeat-ngram", "2", "--format", "jsonl", *images])
    assert beams.exit_code == 0, beams.output
    assert len(beams.stdout.splitlines()) == 2
    # --nbest: the consensus choice among the search's n best, exactly as the library makes it
    nbest = runner.invoke(main, ["caption", "--method", method, "--adapter", str(out), "--max-tokens", "4",
                                 "--beams", "3", "--nbest", "3", "--format", "jsonl", *images])
    assert nbest.exit_code == 0, nbest.output
    from nofree.adapters import AdapterCaptioner, load_adapter

    library = AdapterCaptioner(load_adapter(out), max_tokens=4, beams=3, nbest=3).caption(images)
    assert [json.loads(line)["caption"] for line in nbest.stdout.splitlines()] == library
    too_many = runner.invoke(main, ["caption", "--method", method, "--adapter", str(out), "--beams", "2",
                                    "--nbest", "3", images[0]])
    assert too_many.exit_code == 2 and "--nbest 3 cannot exceed the beam width, --beams 2" in too_many.output

    other = "flamingo" if method == "clipcap" else "clipcap"
    wrong = runner.invoke(main, ["caption", "--method", other, "--adapter", str(out), images[0]])
    assert wrong.exit_code != 0 and f"--method {method}" in wrong.output


def test_train_clipcap_with_the_transformer_mapper(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    pairs = make_pairs(tmp_path / "data", n=6)
    args = ["train", "clipcap", "--pairs", str(pairs), "--image-encoder", backbones["image"], "--lm",
            backbones["lm"], "--out", str(tmp_path / "cc"), "--epochs", "1", "--mapper", "transformer"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cc" / "config.json").read_text())["config"]["mapper"] == "transformer"
    wrong = CliRunner().invoke(main, ["train", "flamingo", *args[2:-2], "--mapper", "transformer"])
    assert wrong.exit_code == 2 and "ClipCap's option" in wrong.output


def test_train_lit(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    pairs = make_pairs(tmp_path / "data", n=6)
    result = CliRunner().invoke(main, ["train", "lit", "--pairs", str(pairs), "--image-encoder",
                                       backbones["image"], "--text-encoder", backbones["text"], "--out",
                                       str(tmp_path / "lit"), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lit" / "adapter.safetensors").exists()
