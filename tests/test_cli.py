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
    for spec in ("embedded:effnet-lite0", "embedded:effnet-lite2", "embedded:minilm-l6",
                 "embedded:smollm2-135m"):
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
    from nofree.cli_anchors import DEFAULT_SHARD_SIZE

    assert DEFAULT_SHARD_SIZE == build.DEFAULT_SHARD_SIZE
    pairs = make_pairs(tmp_path / "data", n=5)
    result = runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder", specs[0],
                                  "--text-encoder", specs[1], "--out", str(tmp_path / "set"),
                                  "--shard-size", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "--shard-size" in runner.invoke(main, ["anchors", "build", "--help"]).output


# --- one vocabulary: --format, defaults in --help, cache info|clear -----------------------------

def test_format_table_jsonl_json_everywhere(runner, tmp_path, specs):
    _, out, _ = build_set(runner, tmp_path, specs, n=4)
    table = runner.invoke(main, ["anchors", "info", str(out), "--format", "table"]).output
    assert table == runner.invoke(main, ["anchors", "info", str(out), "--format", "text"]).output
    assert "anchors      8" in table
    line = runner.invoke(main, ["anchors", "info", str(out), "--format", "jsonl"]).output
    assert len(line.strip().splitlines()) == 1 and json.loads(line)["n_anchors"] == 8
    listed = json.loads(runner.invoke(main, ["models", "--format", "json"]).output)
    assert {"embedded:minilm-l6", "st:..."} <= {row["spec"] for row in listed}
    assert all(isinstance(row["installed"], bool) for row in listed)
    lines = runner.invoke(main, ["models", "--format", "jsonl"]).output.strip().splitlines()
    assert len(lines) == len(listed)
    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))[:2]
    result = runner.invoke(main, ["classify", "--anchors", str(out), "--label", "red", "--label", "blue",
                                  "--format", "json", *images])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["image"] for row in rows] == images and rows[0]["top"][0]["label"] in ("red", "blue")
    bad = runner.invoke(main, ["models", "--format", "yaml"])
    assert bad.exit_code == 2 and "table" in bad.output and "json" in bad.output


def _commands(group, prefix=()):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_help_shows_its_defaults(runner):
    import click

    for path, command in _commands(main):
        text = runner.invoke(main, [*path, "--help"]).output
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.hidden:
                continue
            unset = param.default is None or param.default == () or "UNSET" in repr(param.default)
            if not unset:
                assert f"[default: {param.default}" in " ".join(text.split()), (path, param.name)
    train = " ".join(runner.invoke(main, ["train", "--help"]).output.split())
    import inspect

    from nofree.adapters import train as training

    from nofree.adapters import smallcap

    functions = {"lit": training.train_lit, "clipcap": training.train_clipcap,
                 "flamingo": training.train_flamingo, "smallcap": smallcap.train_smallcap}
    from nofree.adapters.recipes import recipe_epochs

    def default(kind, fn, name):  # epochs=None: the recipe's epochs (raised on small sets)
        value = inspect.signature(fn).parameters[name].default
        return recipe_epochs(kind, None)[0] if value is None and name == "epochs" else value

    for name in ("epochs", "batch_size", "lr"):  # the numbers the help states are the functions' own
        stated = ", ".join(f"{kind} {default(kind, fn, name):g}" for kind, fn in functions.items())
        assert stated in train, (name, stated)
    assert "at least" in train  # the small-set rule is stated


def test_cache_info_and_clear(runner, tmp_path):
    from nofree.cache import EmbeddingCache
    from nofree.testing import TinyImageEncoder, TinyTextEncoder

    cache = EmbeddingCache(tmp_path / "cache")
    cache.encode(TinyTextEncoder(), ["a cat", "a dog", "a cat"])
    cache.encode(TinyImageEncoder(), [__import__("PIL.Image").Image.new("RGB", (8, 8))])
    foreign = tmp_path / "cache" / "embeddings" / "not-nofree"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    info = json.loads(runner.invoke(main, ["cache", "info", "--format", "json"]).output)
    assert info["path"] == str(tmp_path / "cache")
    by_spec = {row["spec"]: row for row in info["specs"]}
    assert by_spec[TinyTextEncoder().spec]["embeddings"] == 2 and len(by_spec) == 2
    table = runner.invoke(main, ["cache", "info"]).output
    assert TinyTextEncoder().spec in table and "MiB" in table
    # stdin is not a terminal here: without --yes nothing is deleted
    refused = runner.invoke(main, ["cache", "clear"])
    assert refused.exit_code == 2 and "--yes" in refused.output
    assert len(json.loads(runner.invoke(main, ["cache", "info", "--format", "json"]).output)["specs"]) == 2
    unknown = runner.invoke(main, ["cache", "clear", "--spec", "embedded:nope", "--yes"])
    assert unknown.exit_code != 0 and TinyTextEncoder().spec in unknown.output
    one = runner.invoke(main, ["cache", "clear", "--spec", TinyTextEncoder().spec, "--yes"])
    assert one.exit_code == 0 and "deleted 1 spec folder" in one.output
    left = json.loads(runner.invoke(main, ["cache", "info", "--format", "json"]).output)["specs"]
    assert [row["spec"] for row in left] == [TinyImageEncoder().spec]
    # --stale: only local: models whose folder is gone (a #view suffix aside)
    kept_dir, gone_dir = tmp_path / "model-kept", tmp_path / "model-gone"
    kept_dir.mkdir()
    for spec in (f"local:{kept_dir}", f"local:{gone_dir}#hflip"):
        encoder = TinyTextEncoder()
        encoder.spec = spec
        cache.encode(encoder, ["a cat"])
    stale = runner.invoke(main, ["cache", "clear", "--stale", "--yes"])
    assert stale.exit_code == 0 and "deleted 1 spec folder" in stale.output, stale.output
    left = {row["spec"] for row in json.loads(runner.invoke(main, ["cache", "info", "--format", "json"]).output)["specs"]}
    assert left == {TinyImageEncoder().spec, f"local:{kept_dir}"}
    both = runner.invoke(main, ["cache", "clear", "--stale", "--spec", f"local:{kept_dir}", "--yes"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    assert runner.invoke(main, ["cache", "clear", "--yes"]).exit_code == 0
    assert not json.loads(runner.invoke(main, ["cache", "info", "--format", "json"]).output)["specs"]
    assert (foreign / "keep.txt").read_text() == "mine"  # not a folder nofree wrote
