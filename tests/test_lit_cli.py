"""The CLI reaches a trained LiT (``--lit DIR`` on classify, retrieve and retrieval captioning)
and gives zero-shot probabilities (``classify --probabilities``, a softmax temperature chosen by
cross-validation on the anchors, or the LiT's learned logit scale)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nofree.anchors.calibration import TEMPERATURE_GRID, choose_temperature, class_probabilities
from nofree.cli import main
from nofree.core import DataError
from tests.test_scorer_cli import one_line_error, tiny_lit_world

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["red", "blue", "a bus", "photo number 2"]
POOL = ["a red bus", "photo of a thing", "a dog on grass", "a cat on a sofa", "two cats on a sofa",
        "photo number 3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fresh LiT over tiny towers (saved), an anchor set built with the same towers, photos, a pool."""
    root = tmp_path_factory.mktemp("lit-cli")
    vision, text, lit, pairs, pool = tiny_lit_world(root, POOL, n=8)
    with torch.no_grad():
        lit.log_temperature.fill_(2.5)   # a learned scale other than the initial 10
    result = CliRunner().invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder",
                                       f"local:{vision}", "--text-encoder", f"local:{text}",
                                       "--out", str(root / "anchors")])
    assert result.exit_code == 0, result.output
    return {"lit": lit.save_pretrained(root / "lit"), "anchors": root / "anchors", "pool": pool,
            "folder": root / "data", "images": sorted(str(p) for p in (root / "data").glob("*.png"))[:3]}


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    return CliRunner()


def _lit_cosines(models, texts, images=None):
    from nofree.adapters import load_adapter
    from nofree.data.images import load_image

    lit = load_adapter(models["lit"])
    image_emb = lit.encode_image([load_image(p) for p in images or models["images"]])
    return lit, lit.similarity(image_emb, lit.encode_text(texts))


def _labels():
    return sum((["--label", label] for label in LABELS), [])


def _rows(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_classify_with_a_lit_is_its_cosine_and_logit_scale(models, runner):
    rows = _rows(runner.invoke(main, ["classify", "--lit", str(models["lit"]), *_labels(), "--template", "{}",
                                      "--top", "4", "--probabilities", "--format", "json", *models["images"]]))
    lit, cos = _lit_cosines(models, LABELS)
    assert [row["image"] for row in rows] == models["images"]
    for row, expected in zip(rows, cos):
        scores = torch.tensor([{t["label"]: t["score"] for t in row["top"]}[label] for label in LABELS])
        torch.testing.assert_close(scores, expected, atol=2e-5, rtol=0)
        probabilities = torch.tensor([row["probabilities"][label] for label in LABELS])
        torch.testing.assert_close(probabilities, torch.softmax(lit.logit_scale * expected, 0), atol=2e-5, rtol=0)
        assert abs(float(probabilities.sum()) - 1) < 1e-5
    assert lit.logit_scale == pytest.approx(torch.tensor(2.5).exp().item(), rel=1e-5)
    table = runner.invoke(main, ["classify", "--lit", str(models["lit"]), *_labels(), "--probabilities",
                                 models["images"][0]])
    assert table.exit_code == 0 and ", p 0." in table.output


def test_retrieve_with_a_lit_ranks_by_its_cosine(models, runner, tmp_path):
    query = "a red bus"
    rows = _rows(runner.invoke(main, ["retrieve", "--lit", str(models["lit"]), "--query", query, "--top", "3",
                                      "--format", "json", str(models["folder"])]))
    paths = sorted(str(p) for p in models["folder"].glob("*.png"))
    _, cos = _lit_cosines(models, [query], paths)
    best = cos[:, 0].argsort(descending=True, stable=True)[:3].tolist()
    assert [hit["image"] for hit in rows[0]["results"]] == [paths[i] for i in best]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(POOL) + "\n")
    rows = _rows(runner.invoke(main, ["retrieve", "--lit", str(models["lit"]), "--image-query", models["images"][0],
                                      "--top", "2", "--format", "json", str(texts)]))
    _, cos = _lit_cosines(models, POOL, models["images"][:1])
    assert [hit["caption"] for hit in rows[0]["results"]] == [POOL[i] for i in cos[0].argsort(descending=True)[:2]]


def test_retrieval_captions_with_a_lit_rank_the_pool_by_it(models, runner):
    from nofree.captioning.retrieval import RetrievalCaptioner
    from nofree.data.images import load_image
    from nofree.scoring import load_scorer

    rows = _rows(runner.invoke(main, ["caption", "--method", "retrieval", "--lit", str(models["lit"]),
                                      "--pool", str(models["pool"]), "--format", "json", *models["images"]]))
    captioner = RetrievalCaptioner(load_scorer(f"lit:{models['lit']}"), POOL)
    images = [load_image(p) for p in models["images"]]
    assert [row["caption"] for row in rows] == captioner.caption(images)
    _, cos = _lit_cosines(models, captioner.pool)
    torch.testing.assert_close(captioner.scores(captioner.pipeline.encode_images(images)), cos, atol=1e-5, rtol=0)


def test_lit_and_anchors_exclude_each_other_in_one_line(models, runner):
    lit, anchors, image = str(models["lit"]), str(models["anchors"]), models["images"][0]
    both = ["--lit", lit, "--anchors", anchors]
    one_line_error(runner.invoke(main, ["classify", *both, "--label", "x", image]), "exclude each other")
    one_line_error(runner.invoke(main, ["retrieve", *both, "--query", "x", str(models["folder"])]),
                    "exclude each other")
    one_line_error(runner.invoke(main, ["caption", "--method", "retrieval", *both, image]), "exclude each other")
    one_line_error(runner.invoke(main, ["classify", "--label", "x", image]), "--anchors DIR", "--lit DIR")
    one_line_error(runner.invoke(main, ["classify", "--lit", lit, "--p", "2", "--label", "x", image]),
                    "--p tunes ASIF")
    one_line_error(runner.invoke(main, ["caption", "--method", "clipcap", "--lit", lit, image]), "--adapter")
    one_line_error(runner.invoke(main, ["caption", "--method", "retrieval", "--lit", lit, "--k", "3", image]),
                    "takes no --k")


def test_classify_probabilities_with_anchors(models, runner):
    args = ["classify", "--anchors", str(models["anchors"]), *_labels(), "--top", "4", "--format", "jsonl"]
    plain = [json.loads(line) for line in runner.invoke(main, [*args, *models["images"]]).stdout.splitlines()]
    result = runner.invoke(main, [*args, "--probabilities", *models["images"]])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["top"] for row in rows] == [row["top"] for row in plain]   # the scores do not move
    from nofree.anchors.anchor_set import AnchorSet
    from nofree.anchors.pipeline import AsifPipeline

    chosen = choose_temperature(AnchorSet.load(models["anchors"]), AsifPipeline.load(models["anchors"]).asif)
    for row in rows:
        probabilities = row["probabilities"]
        assert list(probabilities) == LABELS and abs(sum(probabilities.values()) - 1) < 1e-5
        ranked = [t["label"] for t in row["top"]]          # best first, by raw score
        assert sorted(LABELS, key=lambda label: -probabilities[label]) == ranked
        scores = torch.tensor([t["score"] for t in row["top"]])
        torch.testing.assert_close(torch.tensor([probabilities[label] for label in ranked]),
                                   class_probabilities(scores[None], chosen.value)[0], atol=1e-4, rtol=0)


def test_the_temperature_is_chosen_in_the_grid_deterministically(models):
    from nofree.anchors.anchor_set import AnchorSet
    from nofree.anchors.asif import ASIF

    anchors = AnchorSet.load(models["anchors"])
    first, again = choose_temperature(anchors, ASIF()), choose_temperature(anchors, ASIF())
    assert first == again and first.value in TEMPERATURE_GRID == first.grid
    assert first.nll[first.grid.index(first.value)] == min(first.nll) and len(first.nll) == len(TEMPERATURE_GRID)
    assert first.n_photos == 8 and first.folds == 4                 # 8 photos: 4 folds of 2
    # the grid's minimum is found whatever grid is given
    narrow = choose_temperature(anchors, ASIF(), grid=(0.5, 0.05))
    assert narrow.value in (0.5, 0.05) and narrow.nll[narrow.grid.index(narrow.value)] == min(narrow.nll)
    with pytest.raises(DataError, match="at least 4 distinct photos"):
        choose_temperature(anchors.subset(list(range(6))), ASIF())  # 3 photos x 2 captions
    with pytest.raises(DataError, match="temperature"):
        class_probabilities(torch.zeros(1, 3), 0.0)
    probabilities = class_probabilities(torch.tensor([[0.3, -0.1, 0.2]]), 0.1)
    assert torch.equal(probabilities.argsort(descending=True), torch.tensor([[0, 2, 1]]))
    assert float(probabilities.sum()) == pytest.approx(1.0)
