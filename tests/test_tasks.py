"""ASIF tasks: the pipeline, zero-shot classification, retrieval captioning, and their CLI."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nofree.anchors.asif import ASIF
from nofree.anchors.pipeline import AsifPipeline, top_k_rows
from nofree.captioners import RetrievalCaptioner, caption_paths, consensus_rerank
from nofree.cli import main
from nofree.core import DataError, SpecError
from nofree.testing import TinyImageEncoder, TinyTextEncoder
from tests.test_anchors import build, make_pairs
from tests.test_cli import build_set, runner, specs  # noqa: F401  (fixtures)


@pytest.fixture()
def pipeline(tmp_path):
    encoders = TinyImageEncoder(dim=6), TinyTextEncoder(dim=5)
    anchors = build(make_pairs(tmp_path / "data", n=9), tmp_path / "set", encoders)
    return AsifPipeline.from_anchors(anchors, *encoders, k=6, p=2.0)


def test_consensus_picks_the_candidate_nearest_the_others():
    emb = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0], [0.9, 0.1, 0], [0.8, 0.2, 0],
                                                       [0, 0, 1.0]]]), dim=-1)
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.9]])
    assert consensus_rerank(scores, emb, weight=1.0).item() == 1  # the middle of the cluster
    assert consensus_rerank(scores, emb, weight=0.0).item() == 3  # plain argmax of the score
    assert consensus_rerank(scores[:, :1], emb[:, :1]).item() == 0


def test_classify_prefers_the_nearest_prompt(pipeline):
    image_emb = pipeline.encode_images([_img(0), _img(5)])
    labels = ["photo number 0", "red bus 5", "cat"]
    scores = pipeline.classify(image_emb, labels, templates=("{}",))
    direct = pipeline.similarity(image_emb, pipeline.encode_texts(labels))
    torch.testing.assert_close(scores, direct)
    averaged = pipeline.classify(image_emb, labels, templates=("{}", "a {}"), average_templates=True)
    two = pipeline.similarity(image_emb, pipeline.encode_texts([t for l in labels for t in (l, f"a {l}")]))
    torch.testing.assert_close(averaged, two.view(2, 3, 2).mean(-1))
    with pytest.raises(DataError, match="no '\\{\\}'"):
        pipeline.classify(image_emb, labels, templates=("a photo",))
    with pytest.raises(DataError, match="no class labels"):
        pipeline.classify(image_emb, [])


def _img(i):
    from PIL import Image

    return Image.new("RGB", (12, 10), (30 * i % 256, 90, 255 - 20 * i))


def test_top_k_rows_orders_by_score():
    rows = top_k_rows(torch.tensor([[0.1, 0.9, 0.5]]), ["a", "b", "c"], 2)
    assert [r["label"] for r in rows[0]] == ["b", "c"]


def test_pipeline_refuses_foreign_encoders(pipeline):
    with pytest.raises(SpecError, match="built with"):
        AsifPipeline.from_anchors(pipeline.anchors, TinyImageEncoder(dim=6, seed=9), pipeline.text_encoder)


def test_retrieval_captioner_returns_pool_captions(pipeline, tmp_path):
    pool = ["photo number 3", "a red bus 7", "nothing like it", "photo number 8"]
    captioner = RetrievalCaptioner(pipeline, pool, rerank=0)
    image_emb = pipeline.encode_images([_img(3), _img(8)])
    expected = [pool[j] for j in pipeline.similarity(image_emb, pipeline.encode_texts(pool)).argmax(1)]
    assert captioner.caption([_img(3), _img(8)]) == expected
    reranked = RetrievalCaptioner(pipeline, pool, rerank=3).caption([_img(3)])
    assert reranked[0] in pool
    with pytest.raises(DataError, match="pool is empty"):
        RetrievalCaptioner(pipeline, [])


def test_caption_paths_reports_unreadable_images_and_goes_on(pipeline, tmp_path):
    good = tmp_path / "good.png"
    _img(2).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    captioner = RetrievalCaptioner(pipeline, ["photo number 2", "a red bus 1"], rerank=0)
    rows = caption_paths(captioner, [str(good), str(bad), str(good)], batch_size=2, progress=False)
    assert [r["image"] for r in rows] == [str(good), str(bad), str(good)]
    assert rows[0]["caption"] == rows[2]["caption"] is not None
    assert rows[1]["caption"] is None and "bad.jpg" in rows[1]["error"]


def test_cli_classify_retrieve_caption(runner, tmp_path, specs):  # noqa: F811
    pairs, out, _ = build_set(runner, tmp_path, specs)
    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))[:3]
    result = runner.invoke(main, ["classify", "--anchors", str(out), "--k", "4", "--label", "bus",
                                  "--label", "photo", "--label", "cat", "--top", "2", "--format", "jsonl",
                                  *images])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == images and all(len(r["top"]) == 2 for r in rows)
    assert all(r["top"][0]["score"] >= r["top"][1]["score"] for r in rows)
    indexed = runner.invoke(main, ["classify", "--anchors", str(out), "--k", "4", "--label", "bus", "--label",
                                   "photo", "--label", "cat", "--top", "2", "--format", "jsonl",
                                   "--search", "index", *images])  # no index in the set: exact search
    assert indexed.exit_code == 0 and [json.loads(line) for line in indexed.stdout.splitlines()] == rows

    result = runner.invoke(main, ["retrieve", "--anchors", str(out), "--query", "a red bus", "--top", "3",
                                  "--format", "jsonl", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["results"]
    assert len(hits) == 3 and all(h["image"].endswith(".png") for h in hits)

    result = runner.invoke(main, ["retrieve", "--anchors", str(out), "--image-query", images[0],
                                  "--format", "jsonl", str(pairs)])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["results"]) == 5

    pool = tmp_path / "pool.txt"
    pool.write_text("a red bus\nphoto of a thing\n")
    result = runner.invoke(main, ["caption", "--method", "retrieval", "--anchors", str(out), "--pool",
                                  str(pool), "--format", "jsonl", *images[:2]])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == images[:2]
    assert all(r["caption"] in ("a red bus", "photo of a thing") for r in rows)


def test_cli_task_errors_are_clear(runner, tmp_path, specs):  # noqa: F811
    _, out, _ = build_set(runner, tmp_path, specs)
    image = str(next((tmp_path / "data").glob("*.png")))
    result = runner.invoke(main, ["classify", "--anchors", str(out), image])
    assert result.exit_code != 0 and "--labels" in result.output
    result = runner.invoke(main, ["classify", "--anchors", str(out), "--k", "999", "--label", "x", image])
    assert result.exit_code != 0 and "999" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["retrieve", "--anchors", str(out), str(tmp_path / "data")])
    assert result.exit_code != 0 and "--query" in result.output
    result = runner.invoke(main, ["caption", "--method", "retrieval", image])
    assert result.exit_code != 0 and "--anchors" in result.output


def test_csls_matches_its_definition_and_zero_turns_it_off(pipeline):
    image_emb = pipeline.encode_images([_img(i) for i in range(4)])
    text_emb = pipeline.encode_texts(["photo number 1", "a red bus 2", "a cat", "photo number 3", "x"])
    off = AsifPipeline.from_anchors(pipeline.anchors, pipeline.image_encoder, pipeline.text_encoder,
                                    k=6, p=2.0, csls=0)
    plain = off.similarity(image_emb, text_emb)
    torch.testing.assert_close(plain, ASIF(k=6, csls=0).fit(pipeline.anchors).similarity(image_emb, text_emb))
    assert pipeline.csls > 0  # on by default
    anchors, n = pipeline.anchors, pipeline.csls
    r_image = torch.as_tensor(off.asif.similarity(image_emb, anchors.text)).topk(n, 1).values.mean(1)
    r_text = torch.as_tensor(off.asif.similarity(anchors.image, text_emb)).topk(n, 0).values.mean(0)
    torch.testing.assert_close(pipeline.asif.hubness(image_emb, "image"), r_image)
    torch.testing.assert_close(pipeline.similarity(image_emb, text_emb), 2 * plain - r_image[:, None] - r_text)
    # a precomputed relative representation (a caption pool's) gives the same scores
    rel = pipeline.asif.transform(text_emb, modality="text")
    torch.testing.assert_close(pipeline.similarity(image_emb, rel), pipeline.similarity(image_emb, text_emb))
    torch.testing.assert_close(pipeline.similarity(image_emb, rel), pipeline.similarity(image_emb, text_emb))
    with pytest.raises(DataError, match="csls"):
        AsifPipeline.from_anchors(anchors, pipeline.image_encoder, pipeline.text_encoder, csls=-1)


def test_asif_defaults_give_the_pipeline_and_cli_scores(runner, tmp_path, specs):  # noqa: F811
    """One set of defaults: ``ASIF().fit(anchors)`` in Python scores as ``AsifPipeline`` and
    ``nofree classify`` do for the same anchors; ``ASIF.paper()`` does not."""
    from nofree.anchors.anchor_set import AnchorSet
    from nofree.data.images import load_image

    _, out, _ = build_set(runner, tmp_path, specs, n=8)
    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))[:3]
    labels = ["red", "blue", "a bus", "photo number 2"]
    result = runner.invoke(main, ["classify", "--anchors", str(out), *sum((["--label", l] for l in labels), []),
                                  "--template", "{}", "--top", "4", "--format", "json", *images])
    assert result.exit_code == 0, result.output
    cli = torch.tensor([[{t["label"]: t["score"] for t in row["top"]}[l] for l in labels]
                        for row in json.loads(result.output)])
    pipeline = AsifPipeline.load(out)
    image_emb = pipeline.image_encoder.encode([load_image(p) for p in images])
    text_emb = pipeline.text_encoder.encode(labels)
    python = ASIF().fit(AnchorSet.load(out)).similarity(image_emb, text_emb)
    torch.testing.assert_close(python, pipeline.similarity(image_emb, text_emb))
    torch.testing.assert_close(python, cli, atol=2e-6, rtol=0)       # the CLI rounds to 6 decimals
    assert repr(pipeline.asif) == "ASIF()"                            # nothing but the defaults
    paper = ASIF.paper().fit(AnchorSet.load(out)).similarity(image_emb, text_emb)
    assert not torch.allclose(paper, python, atol=1e-3)
