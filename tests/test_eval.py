"""`nofree eval`: every method on one split, one report; failures isolated; no leakage; resume."""
from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from nofree.cli import main
from nofree.core import DataError
from nofree.eval import report as report_module
from nofree.eval.report import METHODS, EvalConfig, available_methods, run_eval
from nofree.testing import make_tiny_hf_text, make_tiny_hf_vision, make_tiny_lm_dir
from tests.test_anchors import make_pairs

CATEGORIES = (["bus"], ["dog", "bus"], ["cat"], [], ["dog"])


def _with_categories(pairs):
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["categories"] = CATEGORIES[i % len(CATEGORIES)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny backbones, a 12-image pairs file (8 train / 4 val), anchors from train, three adapters."""
    import os

    root = tmp_path_factory.mktemp("eval")
    old_cache = os.environ.get("NOFREE_CACHE")
    os.environ["NOFREE_CACHE"] = str(root / "cache")
    image, text = f"local:{make_tiny_hf_vision(root / 'vision')}", f"local:{make_tiny_hf_text(root / 'text')}"
    lm = f"local:{make_tiny_lm_dir(root / 'lm')}"
    pairs = _with_categories(make_pairs(root / "data", n=12))
    pool = root / "pool.txt"
    pool.write_text("a red bus\na dog on grass\nphoto number 3\na cat\n")
    runner = CliRunner()
    anchors = root / "anchors"
    result = runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--split", "train",
                                  "--image-encoder", image, "--text-encoder", text, "--out", str(anchors)])
    assert result.exit_code == 0, result.output
    adapters = {}
    for kind in ("lit", "clipcap", "flamingo", "smallcap"):
        backbone = {"lit": ["--text-encoder", text],
                    "smallcap": ["--lm", lm, "--text-encoder", text, "--pool", str(pool)]}.get(kind, ["--lm", lm])
        result = runner.invoke(main, ["train", kind, "--pairs", str(pairs), "--image-encoder", image,
                                      *backbone, "--out", str(root / kind), "--epochs", "1"])
        assert result.exit_code == 0, result.output
        adapters[kind] = root / kind
    yield {"root": root, "pairs": pairs, "anchors": anchors, "adapters": adapters, "lm": lm, "pool": pool}
    if old_cache is None:
        os.environ.pop("NOFREE_CACHE", None)
    else:
        os.environ["NOFREE_CACHE"] = old_cache


def _config(setup, **kw):
    return EvalConfig(pairs=setup["pairs"], anchors=setup["anchors"], adapters=setup["adapters"],
                      lm=setup["lm"], pool=setup["pool"], magic={"max_new_tokens": 4, "k": 5},
                      max_tokens=4, meteor=False, **kw)


def test_every_method_in_one_report(setup, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "eval", "--pairs", str(setup["pairs"]), "--anchors", str(setup["anchors"]), "--lm", setup["lm"],
        "--pool", str(setup["pool"]), "--no-meteor", "--samples", "2", "--report", str(out),
        *(arg for kind, d in setup["adapters"].items() for arg in (f"--{kind}", str(d)))])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    assert results["split"] == "val" and results["n_images"] == 4 and results["n_references"] == 8
    for name, entry in results["methods"].items():
        assert entry["status"] == "ok", (name, entry.get("traceback"))
        assert entry["wall_s"] >= 0 and entry["params"]
        metrics = entry["metrics"]
        if entry["task"] == "captioning":
            assert len(entry["captions"]) == 4 and all(isinstance(c, str) for c in entry["captions"])
            assert metrics["n"] == 4 and 0 <= metrics["BLEU-1"] <= 1 and metrics["CIDEr"] >= 0
            assert metrics["n_captions"] == 4 and 0.25 <= metrics["distinct"] <= 1
            assert metrics["worst_repeat"] >= 0 and 0 <= metrics["repeat_3gram"] <= 1
            assert 0 <= metrics["stutter"] <= 1
            per_image = entry["per_image"]["CIDEr"]
            assert len(per_image) == 4 and sum(per_image) / 4 == pytest.approx(metrics["CIDEr"])
            low, high = metrics["CIDEr interval"]
            assert min(per_image) <= low <= metrics["CIDEr"] <= high <= max(per_image)
        else:
            curve = metrics["curve"]["t2i"]
            assert len(curve) == 10 and curve == sorted(curve) and curve[3] == 1.0  # 4 images: R@4 = 1
            assert metrics["n_images"] == 4 and metrics["n_texts"] == 8
            for way in ("t2i", "i2t"):  # the interval over the images holds the R@1 it comes from
                low, high = metrics[f"{way} R@1 interval"]
                assert 0 <= low <= metrics[f"{way} R@1"] <= high <= 1
            # val images 0, 3, 6, 9 -> categories bus, (none), cat, bus: 3 images score zero-shot
            assert metrics["n_zero_shot"] == 3 and metrics["n_classes"] == 3
            assert 0 <= metrics["zero-shot top-1"] <= metrics["zero-shot top-5"] == 1.0
    # the retrieval captioner can only answer with captions of the pool
    assert set(results["methods"]["retrieval"]["captions"]) <= set(setup["pool"].read_text().splitlines())
    markdown = (out / "results.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in markdown
    assert "| t2i R@1 95% CI | i2t R@1 95% CI |" in markdown
    assert "| CIDEr 95% CI | distinct % | 3-gram loops % | worst loop | stutters % |" in markdown
    # every other captioning method is compared with caption retrieval on the same images
    assert results["baseline"] == "retrieval" and "## CIDEr against retrieval" in markdown
    comparison = markdown.split("## CIDEr against retrieval")[1].split("##")[0]
    captioning = [m for m in METHODS if METHODS[m].task == "captioning" and m != "retrieval"]
    assert all(f"| {name} |" in comparison for name in captioning) and "| retrieval |" not in comparison
    for png in results["plots"].values():
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert set(results["plots"].values()) == {"captioning.png", "samples.png", "scoring.png", "recall_at_k.png",
                                              "comparison.png"}
    compared = results["comparison"]["methods"]
    assert results["comparison"]["baseline"] == "retrieval" and set(compared) == set(captioning)
    for name, c in compared.items():
        delta = results["methods"][name]["metrics"]["CIDEr"] - results["methods"]["retrieval"]["metrics"]["CIDEr"]
        assert c["delta"] == pytest.approx(delta) and c["interval"][0] <= c["delta"] <= c["interval"][1]
    assert "| magic |" in result.stdout  # the table goes to stdout
    # the trained captioners' dependence on the photo, measured on the same references
    gaps = markdown.split("## How much the trained captioners read the photo")[1].split("##")[0]
    for name in ("clipcap", "flamingo", "smallcap"):
        metrics = results["methods"][name]["metrics"]
        low, high = metrics["image gap interval"]
        assert metrics["caption loss"] > 0 and low <= metrics["image gap"] <= high and f"| {name} |" in gaps
        assert ("photo gap" in metrics) == (name == "smallcap")
    assert "image gap" not in results["methods"]["magic"]["metrics"] and "| magic |" not in gaps


def test_a_failing_method_is_reported_and_the_rest_run(setup, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("out of cheese")

    monkeypatch.setitem(report_module.RUNNERS, "retrieval", broken)
    result = CliRunner().invoke(main, ["eval", "--pairs", str(setup["pairs"]), "--anchors", str(setup["anchors"]),
                                       "--method", "retrieval", "--method", "asif", "--pool", str(setup["pool"]),
                                       "--no-meteor", "--report", str(tmp_path / "r")])
    assert result.exit_code == 1
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["methods"]["retrieval"]["status"] == "failed"
    assert "out of cheese" in results["methods"]["retrieval"]["error"]
    assert results["methods"]["asif"]["status"] == "ok"
    assert "out of cheese" in (tmp_path / "r" / "results.md").read_text()


def test_resume_keeps_finished_methods_and_refuses_silent_overwrite(setup, tmp_path, monkeypatch):
    out = tmp_path / "r"
    first = run_eval(_config(setup), ["asif", "retrieval"], out_dir=out, progress=False)
    with pytest.raises(DataError, match="resume=True"):
        run_eval(_config(setup), ["asif"], out_dir=out, progress=False)
    calls = []
    original = report_module.RUNNERS["asif"]
    monkeypatch.setitem(report_module.RUNNERS, "asif", lambda ctx: calls.append(1) or original(ctx))
    again = run_eval(_config(setup), ["asif", "retrieval"], out_dir=out, resume=True, progress=False)
    assert calls == [] and again["methods"]["asif"] == first["methods"]["asif"]
    run_eval(_config(setup), ["asif"], out_dir=out, overwrite=True, progress=False)
    assert calls == [1]
    # a finished method that compared through another ASIF (here: a label bridge) runs again
    record = json.loads((out / "results.json").read_text())
    assert record["methods"]["asif"]["inputs"]["asif"]["label_weight"] == 0.0   # tiny encoder: no head
    record["methods"]["asif"]["inputs"]["asif"]["label_weight"] = 2.0
    (out / "results.json").write_text(json.dumps(record))
    run_eval(_config(setup), ["asif"], out_dir=out, resume=True, progress=False)
    assert calls == [1, 1]
    # so does one recorded before rows recorded their inputs
    record = json.loads((out / "results.json").read_text())
    del record["methods"]["asif"]["inputs"]
    (out / "results.json").write_text(json.dumps(record))
    run_eval(_config(setup), ["asif"], out_dir=out, resume=True, progress=False)
    assert calls == [1, 1, 1]


def _count_runs(monkeypatch, *names):
    calls = []
    for name in names:
        original = report_module.RUNNERS[name]
        monkeypatch.setitem(report_module.RUNNERS, name,
                            lambda ctx, name=name, original=original: calls.append(name) or original(ctx))
    return calls


def test_resume_reruns_rows_whose_inputs_changed(setup, tmp_path, monkeypatch):
    """--resume keeps a row only for the same MAGIC options, caption pool, adapter and anchors:
    changing any of them in place (same path, other content) reruns exactly the rows using it."""
    import hashlib
    import shutil

    pool, clipcap, anchors = tmp_path / "pool.txt", tmp_path / "clipcap", tmp_path / "anchors"
    shutil.copy(setup["pool"], pool)
    shutil.copytree(setup["adapters"]["clipcap"], clipcap)
    shutil.copytree(setup["anchors"], anchors)
    config = dataclasses.replace(_config(setup), pool=pool, anchors=anchors,
                                 adapters={**setup["adapters"], "clipcap": clipcap})
    out, methods = tmp_path / "r", ["asif", "retrieval", "magic", "clipcap"]
    run_eval(config, methods, out_dir=out, progress=False)
    calls = _count_runs(monkeypatch, *methods)
    run_eval(config, methods, out_dir=out, resume=True, progress=False)
    assert calls == []
    run_eval(dataclasses.replace(config, magic={**config.magic, "drafts": 2}), methods, out_dir=out,
             resume=True, progress=False)
    assert calls == ["magic"]
    with pool.open("a") as f:
        f.write("a bus in the rain\n")
    run_eval(config, methods, out_dir=out, resume=True, progress=False)   # drafts back to the default
    assert calls == ["magic", "retrieval", "magic"]
    from nofree.adapters.base import load_tensors
    from safetensors.torch import save_file

    weights = load_tensors(clipcap / "adapter.safetensors")
    save_file({k: v + 1e-3 for k, v in weights.items()}, str(clipcap / "adapter.safetensors"))
    header = json.loads((clipcap / "config.json").read_text())
    header["weights_sha256"] = hashlib.sha256((clipcap / "adapter.safetensors").read_bytes()).hexdigest()
    (clipcap / "config.json").write_text(json.dumps(header))
    (clipcap / "loss_curve.png").write_bytes(b"another plot")      # plots do not count
    run_eval(config, methods, out_dir=out, resume=True, progress=False)
    assert calls[3:] == ["clipcap"]
    # a resumed run of some methods keeps the others' finished rows
    assert list(run_eval(config, ["clipcap"], out_dir=out, resume=True, progress=False)["methods"]) == methods
    run_eval(dataclasses.replace(config, anchors=setup["anchors"]), methods, out_dir=out, resume=True,
             progress=False)
    assert calls[4:] == []  # the same anchors in another folder
    from nofree.anchors.anchor_set import AnchorSet

    built = AnchorSet.load(anchors)
    dataclasses.replace(built, image=built.image.flip(0)).save(anchors, overwrite=True)
    run_eval(config, methods, out_dir=out, resume=True, progress=False)
    assert calls[4:] == ["asif", "retrieval", "magic"]


def test_resume_reruns_a_trained_captioner_asked_to_decode_otherwise(setup, tmp_path, monkeypatch):
    out = tmp_path / "r"
    run_eval(_config(setup), ["clipcap"], out_dir=out, progress=False)
    calls = []
    original = report_module.RUNNERS["clipcap"]
    monkeypatch.setitem(report_module.RUNNERS, "clipcap", lambda ctx: calls.append(1) or original(ctx))
    run_eval(_config(setup), ["clipcap"], out_dir=out, resume=True, progress=False)
    assert calls == []  # the same decoding: kept
    record = run_eval(_config(setup, decoding={"beams": 2, "nbest": 2}), ["clipcap"], out_dir=out, resume=True,
                      progress=False)
    assert calls == [1] and (record["methods"]["clipcap"]["params"]["beams"],
                             record["methods"]["clipcap"]["params"]["nbest"]) == (2, 2)
    run_eval(_config(setup, decoding={"beams": 2, "nbest": 2}), ["clipcap"], out_dir=out, resume=True, progress=False)
    assert calls == [1]
    longer = dataclasses.replace(_config(setup, decoding={"beams": 2, "nbest": 2}), max_tokens=5)
    run_eval(longer, ["clipcap"], out_dir=out, resume=True, progress=False)
    assert calls == [1, 1]  # another token limit: decoded again


def test_anchors_from_the_evaluation_split_are_refused(setup, tmp_path):
    leaky = tmp_path / "leaky"
    result = CliRunner().invoke(main, ["anchors", "build", "--pairs", str(setup["pairs"]), "--split", "val",
                                       "--image-encoder", "local:" + str(setup["root"] / "vision"),
                                       "--text-encoder", "local:" + str(setup["root"] / "text"),
                                       "--out", str(leaky)])
    assert result.exit_code == 0, result.output
    results = run_eval(EvalConfig(pairs=setup["pairs"], anchors=leaky, meteor=False), ["asif"],
                       out_dir=tmp_path / "r", progress=False)
    assert results["methods"]["asif"]["status"] == "failed"
    assert "leak" in results["methods"]["asif"]["error"]


def test_the_baseline_must_be_a_captioning_method_that_runs(setup, tmp_path):
    result = CliRunner().invoke(main, ["eval", "--pairs", str(setup["pairs"]), "--anchors", str(setup["anchors"]),
                                       "--method", "retrieval", "--baseline", "clipcap", "--pool", str(setup["pool"]),
                                       "--no-meteor", "--report", str(tmp_path / "r")])
    assert result.exit_code != 0 and not (tmp_path / "r").exists()
    assert "--baseline clipcap is not among the captioning methods run (retrieval): add --method clipcap" \
        in result.output
    with pytest.raises(DataError, match="baseline='asif'"):
        run_eval(_config(setup, baseline="asif"), ["asif", "retrieval"], out_dir=tmp_path / "r", progress=False)
    # no baseline among the methods run: the report has no comparison, and says nothing about one
    results = run_eval(_config(setup), ["magic"], out_dir=tmp_path / "m", progress=False)
    assert results["baseline"] is None and results["comparison"] is None
    assert "CIDEr against" not in (tmp_path / "m" / "results.md").read_text()
    assert "comparison.png" not in results["plots"].values()


def test_method_inputs_are_checked_before_anything_runs(setup, tmp_path):
    assert available_methods(EvalConfig(pairs=setup["pairs"])) == ["asif", "retrieval", "magic"]
    with pytest.raises(DataError, match="clipcap=DIR"):
        run_eval(EvalConfig(pairs=setup["pairs"]), ["clipcap"], out_dir=tmp_path / "r")
    with pytest.raises(DataError, match="unknown method"):
        run_eval(EvalConfig(pairs=setup["pairs"]), ["nope"], out_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(DataError, match="split='test'"):
        run_eval(EvalConfig(pairs=setup["pairs"], split="test"), ["asif"], out_dir=tmp_path / "r")


def test_candidate_options_reach_the_magic_row(setup, tmp_path):
    def run(out, *extra):
        result = CliRunner().invoke(main, [
            "eval", "--pairs", str(setup["pairs"]), "--anchors", str(setup["anchors"]), "--lm", setup["lm"],
            "--pool", str(setup["pool"]), "--no-meteor", "--samples", "0", "--method", "retrieval",
            "--method", "magic", "--drafts", "1", *extra, "--report", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "results.json").read_text())["methods"]

    alone = run("alone", "--no-retrieved")
    offered = run("offered", "--with-retrieved", "--consensus", "3")
    params = offered["magic"]["params"]
    assert (params["drafts"], params["with_retrieved"], params["consensus"]) == (1, True, 3)
    # the row says which settings are not nofree's defaults, in results.json and results.md
    label = offered["magic"]["label"]
    assert "drafts 1" in label and "with_retrieved True" in label and "consensus 3" in label
    assert label in (tmp_path / "offered" / "results.md").read_text()
    # one draft and retrieval's caption: the kept caption is one of the two, for every photo
    retrieved = offered["retrieval"]["captions"]
    assert all(kept in (draft, found) for kept, draft, found
               in zip(offered["magic"]["captions"], alone["magic"]["captions"], retrieved))


def test_a_default_magic_row_keeps_its_fixed_label():
    from nofree.eval.report import method_label

    assert method_label(EvalConfig(pairs="p.jsonl"), "magic") == METHODS["magic"].label
    assert method_label(EvalConfig(pairs="p.jsonl", candidates={"consensus": 50}), "magic") == \
        "MAGIC, consensus 50"
    assert method_label(EvalConfig(pairs="p.jsonl", lm="embedded:gemma3-270m"), "magic") == \
        "MAGIC, lm embedded:gemma3-270m"
    assert method_label(EvalConfig(pairs="p.jsonl", candidates={"consensus": 50}), "retrieval") == \
        METHODS["retrieval"].label
