"""SmallCap-style adapter: retrieved pool captions in the prompt, gated cross-attention to the image.

Tiny config-built backbones (a local tiny HF vision model, BERT text model and GPT-2 LM) through
the library and the CLI: a photo's own captions never reach its prompt, training photos never
retrieve through their own anchors, the pool swaps at inference, and bad input is one line.
"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nofree.adapters.smallcap import SmallCap, SmallCapCaptioner, example_captions, leave_out_prompts, train_smallcap
from nofree.cli import main
from nofree.core import DataError, SpecError
from nofree.testing import make_tiny_hf_vision
from tests.test_anchors import make_pairs
from tests.test_train_cli import backbones  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbones):
    """A SmallCap trained one epoch on 6 photos whose own captions are also in the pool."""
    import os

    root = tmp_path_factory.mktemp("smallcap")
    os.environ["NOFREE_CACHE"] = str(root / "cache")
    pairs = make_pairs(root / "data", n=9)
    own = [c for line in pairs.read_text().splitlines() for c in json.loads(line)["captions"]]
    pool = root / "pool.txt"
    pool.write_text("\n".join(own + ["a dog on a sofa", "the cat on the beach", "a man riding a bus",
                                     "two cats", "a red car on the street"]) + "\n")
    result = train_smallcap(pairs, out=root / "adapter", image_encoder=backbones["image"],
                            text_encoder=backbones["text"], lm=backbones["lm"], pool=pool, examples=2,
                            epochs=1, batch_size=4, precision="fp32", progress=False)
    yield {"root": root, "pairs": pairs, "pool": pool, "result": result}
    os.environ.pop("NOFREE_CACHE", None)


def test_training_prompts_never_hold_the_photos_own_captions(trained):
    from nofree.adapters.train import prepare_examples
    from nofree.data.pairs import load_pairs

    adapter = trained["result"].adapter
    pairs = load_pairs(trained["pairs"], split="train")
    own_of = {str(p.image): list(p.captions) for p in pairs}
    examples = prepare_examples(adapter, pairs)
    # the saved run recorded these prompts' digest: recompute the prompts the way training did
    assert (trained["root"] / "adapter" / "anchors" / "manifest.json").is_file()
    assert (trained["root"] / "adapter" / "pool.txt").read_text() == trained["pool"].read_text()
    captioner = SmallCapCaptioner.from_pretrained(trained["root"] / "adapter")
    image_emb = captioner.retrieval.pipeline.encode_images(examples.image_paths)
    own = [own_of[p] for p in examples.image_paths]
    found = example_captions(captioner.retrieval, image_emb, 2, own)
    for captions, mine in zip(found, own):
        assert len(captions) == 2 and not set(captions) & set(mine)
    # without the exclusion a photo's own caption is what retrieval ranks first: the test can fail
    plain = example_captions(captioner.retrieval, image_emb, 2)
    assert any(set(captions) & set(mine) for captions, mine in zip(plain, own))


def test_training_photos_retrieve_through_anchors_without_themselves(trained):
    adapter = trained["result"].adapter
    paths = sorted(set(adapter.anchors.images))
    seen = []

    class Recorder:
        pool = ["a", "b", "c"]

        def ranked(self, image_emb, m):
            return [["x", "y", "z"][:m] for _ in range(len(image_emb))]

    def retrieval_of(rows):
        seen.append({adapter.anchors.images[i] for i in rows})
        return Recorder()

    prompts = leave_out_prompts(adapter, retrieval_of, paths, torch.zeros(len(paths), 4),
                                [[] for _ in paths], folds=3)
    assert len(prompts) == len(paths) and all("X. Y." in p for p in prompts)
    assert len(seen) == 3
    for fold, anchor_images in enumerate(seen):
        members = {p for i, p in enumerate(paths) if i % 3 == fold}
        assert anchor_images and not anchor_images & members and anchor_images | members == set(paths)


def test_caption_and_swap_the_pool_without_retraining(trained, tmp_path):
    directory = trained["root"] / "adapter"
    images = sorted(str(p) for p in (trained["root"] / "data").glob("*.png"))[:3]
    runner = CliRunner()
    result = runner.invoke(main, ["caption", "--method", "smallcap", "--adapter", str(directory),
                                  "--max-tokens", "4", "--format", "jsonl", *images])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == images and all(isinstance(r["caption"], str) for r in rows)

    other = tmp_path / "other.txt"
    other.write_text("a giraffe in a field\na plate of pizza\na boat on a lake\n")
    swapped = SmallCapCaptioner.from_pretrained(directory, pool=other.read_text().splitlines())
    assert swapped.retrieval.pool == other.read_text().splitlines()
    emb = swapped.retrieval.pipeline.encode_images(images)
    for captions in example_captions(swapped.retrieval, emb, 2):
        assert set(captions) <= set(swapped.retrieval.pool)
    result = runner.invoke(main, ["caption", "--method", "smallcap", "--adapter", str(directory), "--pool",
                                  str(other), "--max-tokens", "4", "--format", "jsonl", images[0]])
    assert result.exit_code == 0, result.output


def test_drafts_and_the_retrieved_caption_go_through_consensus(trained):
    from nofree.data.pool import example_windows
    from nofree.core import clean_caption
    from nofree.data.images import load_image

    directory = trained["root"] / "adapter"
    images = sorted(str(p) for p in (trained["root"] / "data").glob("*.png"))[:3]
    plain = SmallCapCaptioner.from_pretrained(directory, max_tokens=4, drafts=1, nbest=1, with_retrieved=False)
    drafted = SmallCapCaptioner.from_pretrained(directory, max_tokens=4, drafts=2, nbest=1, with_retrieved=True,
                                                consensus=3)
    emb = drafted.retrieval.pipeline.encode_images(images)
    m = drafted.adapter.hparams["examples"]
    (first, count), = example_windows(m, 2)[1:]  # the second draft reads MAGIC's second window
    assert (first, count) != (0, m)
    ranked = example_captions(drafted.retrieval, emb, 2 * m)
    second = [drafted.adapter.prompt_text(found[first:first + count]) for found in ranked]
    features = drafted.image_encoder.encode_tokens([load_image(p) for p in images])
    second_drafts = [clean_caption(t) for t in drafted.adapter.caption_features(
        features, prompts=second, **drafted.options)]
    references = drafted.retrieval.top(emb, 3)
    for row, got in enumerate(drafted.caption(images)):
        candidates = [plain.caption([images[row]])[0], second_drafts[row], ranked[row][0].strip()]
        assert got == candidates[drafted.retrieval.cider.choose(candidates, references[row])]
    with pytest.raises(ValueError, match="drafts"):
        SmallCapCaptioner(drafted.adapter, drafted.retrieval, drafts=0)


def test_nbest_keeps_the_consensus_choice_among_the_beams(trained):
    from nofree.core import clean_caption
    from nofree.data.images import load_image

    directory = trained["root"] / "adapter"
    images = sorted(str(p) for p in (trained["root"] / "data").glob("*.png"))[:3]
    nbest = SmallCapCaptioner.from_pretrained(directory, max_tokens=4, beams=3, drafts=1, nbest=3,
                                              with_retrieved=False, consensus=3)
    adapter = nbest.adapter
    features = nbest.image_encoder.encode_tokens([load_image(p) for p in images])
    prompts = nbest.prompts(images)
    returned = adapter.caption_features(features, prompts=prompts, returns=3, **nbest.options)
    best = adapter.caption_features(features, prompts=prompts, **nbest.options)
    assert len(returned) == 3 * len(images)
    assert returned[::3] == best  # each image's returns come best first, the plain beam search's caption
    emb = nbest.retrieval.pipeline.encode_images(images)
    references = nbest.retrieval.top(emb, 3)
    for row, got in enumerate(nbest.caption(images)):
        candidates = [clean_caption(t) for t in returned[3 * row:3 * row + 3]]
        assert got == candidates[nbest.retrieval.cider.choose(candidates, references[row])]
    with pytest.raises(ValueError, match="beam width"):
        SmallCapCaptioner(adapter, nbest.retrieval, beams=2, nbest=3)
    # a narrower beam given alone narrows the default n-best instead of failing (eval --beams 1)
    assert SmallCapCaptioner(adapter, nbest.retrieval, beams=1).nbest == 1
    # left out, the candidate options are the adapter class's cross-validated decoding
    default = SmallCapCaptioner(adapter, nbest.retrieval)
    assert (default.options["beams"], default.drafts, default.nbest, default.with_retrieved, default.consensus) \
        == (3, 2, 3, True, 20) == tuple(SmallCap.decoding.get(k, 20) for k in
                                          ("beams", "drafts", "nbest", "with_retrieved", "consensus"))
    with pytest.raises(ValueError, match="returns"):
        adapter.generate(features, beams=2, returns=3)


def test_cli_offers_smallcap_its_candidates_and_no_one_else(trained):
    directory = trained["root"] / "adapter"
    images = sorted(str(p) for p in (trained["root"] / "data").glob("*.png"))[:2]
    runner = CliRunner()
    args = ["--max-tokens", "4", "--beams", "2", "--drafts", "2", "--nbest", "2", "--consensus", "3",
            "--with-retrieved", "--format", "jsonl", *images]
    result = runner.invoke(main, ["caption", "--method", "smallcap", "--adapter", str(directory), *args])
    assert result.exit_code == 0, result.output
    library = SmallCapCaptioner.from_pretrained(directory, max_tokens=4, beams=2, drafts=2, nbest=2, consensus=3,
                                                with_retrieved=True)
    assert [json.loads(line)["caption"] for line in result.stdout.splitlines()] == library.caption(images)
    too_many = runner.invoke(main, ["caption", "--method", "smallcap", "--adapter", str(directory), "--beams", "2",
                                    "--nbest", "3", images[0]])
    assert too_many.exit_code == 2 and "--nbest 3 cannot exceed the beam width, --beams 2" in too_many.output
    magic = runner.invoke(main, ["caption", "--method", "magic", "--anchors", str(directory / "anchors"),
                                 "--nbest", "2", images[0]])
    assert magic.exit_code != 0 and "takes no --nbest" in magic.output and "Traceback" not in magic.output


def test_bad_input_is_one_line(trained, backbones, tmp_path):
    directory = trained["root"] / "adapter"
    runner = CliRunner()
    image = sorted(str(p) for p in (trained["root"] / "data").glob("*.png"))[0]
    small = tmp_path / "small.txt"
    small.write_text("just one caption\n")
    result = runner.invoke(main, ["caption", "--method", "smallcap", "--adapter", str(directory), "--pool",
                                  str(small), image])
    assert result.exit_code == 2 and "larger file" in result.output and "Traceback" not in result.output
    wrong = runner.invoke(main, ["caption", "--method", "clipcap", "--adapter", str(directory), image])
    assert wrong.exit_code != 0 and "--method smallcap" in wrong.output
    with pytest.raises(DataError, match="not smallcap"):
        SmallCapCaptioner.for_adapter(_fake_adapter(), directory)
    # anchors whose images were encoded by another encoder
    adapter = trained["result"].adapter
    other_image = make_tiny_hf_vision(tmp_path / "vision2", seed=5)
    from nofree.registry import load_encoder

    with pytest.raises(SpecError, match="same image encoder"):
        SmallCap(load_encoder(f"local:{other_image}", modality="image"), adapter.lm, examples=2) \
            .attach_retrieval(adapter.anchors)


def _fake_adapter():
    class Other:
        kind = "clipcap"
    return Other()


def test_eval_reports_smallcap(trained, tmp_path):
    result = CliRunner().invoke(main, ["eval", "--pairs", str(trained["pairs"]), "--method", "smallcap",
                                       "--smallcap", str(trained["root"] / "adapter"), "--no-meteor",
                                       "--samples", "0", "--drafts", "1", "--no-retrieved", "--consensus", "3",
                                       "--report", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "r" / "results.json").read_text())["methods"]["smallcap"]
    assert entry["status"] == "ok" and len(entry["captions"]) == 3
    params = entry["params"]
    assert (params["drafts"], params["with_retrieved"], params["consensus"]) == (1, False, 3)
    assert 0 < entry["metrics"]["distinct"] <= 1
