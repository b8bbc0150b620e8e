"""The command line end to end on tiny local models: exit codes, outputs, clear errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nofree.cli import main
from nofree.testing import make_tiny_hf_text, make_tiny_hf_vision
from tests.test_anchors import make_pairs


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (f"local:{make_tiny_hf_vision(root / 'vision')}", f"local:{make_tiny_hf_text(root / 'text')}")


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    return CliRunner()


def build_set(runner, tmp_path, specs, n=8):
    pairs = make_pairs(tmp_path / "data", n=n)
    out = tmp_path / "set"
    result = runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder", specs[0],
                                  "--text-encoder", specs[1], "--out", str(out)])
    assert result.exit_code == 0, result.output
    return pairs, out, result


def test_anchors_build_info_extend(runner, tmp_path, specs):
    pairs, out, result = build_set(runner, tmp_path, specs)
    assert f"wrote {out}: 16 anchors" in result.output
    info = runner.invoke(main, ["anchors", "info", str(out), "--format", "json"])
    manifest = json.loads(info.output)
    assert manifest["n_anchors"] == 16 and manifest["text_spec"] == specs[1]
    text = runner.invoke(main, ["anchors", "info", str(out)]).output
    assert "anchors      16" in text and specs[0] in text
    extended = runner.invoke(main, ["anchors", "extend", str(out), "--pairs", str(pairs), "--limit", "2"])
    assert extended.exit_code == 0 and "now 20 anchors" in extended.output


def test_models_lists_embedded_defaults(runner):
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0
    for spec in ("embedded:effnet-lite0", "embedded:minilm-l6", "embedded:smollm2-135m"):
        assert spec in result.output


@pytest.mark.parametrize("content, message", [
    ("", "holds no pairs"),
    ('{"image": "x.png"}\n', "line 1"),
    ('{"image": "missing.png", "captions": ["a cat"]}\n', "none of the 1 images"),
])
def test_bad_pairs_give_one_clear_line(runner, tmp_path, specs, content, message):
    pairs = tmp_path / "bad.jsonl"
    pairs.write_text(content)
    result = runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder", specs[0],
                                  "--text-encoder", specs[1], "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_spec_is_named(runner, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=2)
    result = runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder",
                                  "embedded:nope", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "embedded:nope" in result.output


def test_info_on_a_non_set_is_clear(runner, tmp_path):
    result = runner.invoke(main, ["anchors", "info", str(tmp_path)])
    assert result.exit_code != 0 and "not an anchor set" in result.output


def test_build_from_a_shard_pattern(runner, tmp_path, specs):
    from nofree.testing import make_webdataset

    make_webdataset(tmp_path / "wds", 6, per_shard=2)
    pattern = str(tmp_path / "wds" / "{00000..00002}.tar")
    result = runner.invoke(main, ["anchors", "build", "--pairs", pattern, "--image-encoder", specs[0],
                                  "--text-encoder", specs[1], "--out", str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert "6 anchors" in result.output
    missing = runner.invoke(main, ["anchors", "build", "--pairs", str(tmp_path / "nope.jsonl"),
                                   "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "shards/{00000..00099}.tar" in missing.output


def test_build_shard_size(runner, tmp_path, specs):
    from nofree.anchors import build
    from nofree.cli import DEFAULT_SHARD_SIZE

    assert DEFAULT_SHARD_SIZE == build.DEFAULT_SHARD_SIZE
    pairs = make_pairs(tmp_path / "data", n=5)
    result = runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder", specs[0],
                                  "--text-encoder", specs[1], "--out", str(tmp_path / "set"),
                                  "--shard-size", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "--shard-size" in runner.invoke(main, ["anchors", "build", "--help"]).output
