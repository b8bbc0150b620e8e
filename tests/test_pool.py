"""Caption-pool hygiene: non-captions, bad lengths and repeats leave every pool by default."""
from __future__ import annotations

import json
import logging

import pytest

from nofree.captioners import MagicCaptioner, RetrievalCaptioner, default_pool_path, load_captioner
from nofree.cli import main
from nofree.core import DataError
from nofree.data.pairs import load_pairs, load_text_lines
from nofree.data.pool import REASONS, caption_problem, filter_pool
from nofree.testing import TinyImageEncoder, TinyTextEncoder, tiny_lm
from tests.test_anchors import build, make_pairs
from tests.test_cli import build_set, runner, specs  # noqa: F401  (fixtures)

REFUSAL = "I am unable to see an image above."

#: Non-captions, each with the reason it goes: the bundled pool's own (first eight, verbatim)
#: and the other forms the rule is written for.
NOT_CAPTIONS = {
    "meta": [REFUSAL, "I am unable to see the image above.",
             "There is no image here to provide a caption for.",
             "There is no image to be reviewed on this hit.",
             "There is no image to describe for this question.",
             "unable to see this image in this particular hit",
             "no image again there are a lot of these lately",
             "I do not know what this is supposed to be..", "I am not sure what this image is.",
             "I can\u2019t see the image.", "I don't see a picture", "Sorry, I cannot view the photo.",
             "Image not loading", "The picture did not load.", "the image is not available",
             "There is no picture.", "no caption", "The annotator could not see anything.",
             "See https://example.com/cat.jpg for the photo"],
    "empty": ["", "   "],
    "too_short": ["dog", "N/A", "...", "12 34"],
    "too_long": [" ".join(f"word{i}" for i in range(61))],
    # typos of the bundled pool (first three, verbatim), then case, apostrophes and mixed whitespace
    "stutter": ["a living room with with a couch and a table", "a a small bathroom with pink tile and trim",
                "Cars are parked on the the street in front of the building.", "A A red bus.",
                "a dog's dog's bowl on the floor", "The cat  \t cat sleeps"],
}

#: Real captions the rule must keep, some close to a refusal on purpose: they describe a photo
#: (a sign's text, a picture in the room, a baseball hit, an opinion or a question with content;
#: "an image of ..." opens real COCO captions, e.g. the pool's "an image of a car in the snow
#: that hit a pole").
REAL = ["A sign that says no parking.", "An image of a cat on a couch.",
        "an image of a car in the snow that hit a pole", "A bedroom with a picture above the bed.",
        "There is no picture on the wall.", "A blank picture frame on a wall.",
        "The photo does not show the whole building.", "A TV screen that is not showing anything.",
        "The batter swings for the hit.", "Another hit for the batter.", "A man who cannot see the ball.",
        "A blurry photo of a toilet seat in a bathroom.", "A black and white photo of a turkey.",
        "I love the way the sun is creeping behind those two buidings",
        "Why would the cow be grazing in front of those homes?",
        "A bus advertising www.example.com on its side.", "a cat", " ".join(f"word{i}" for i in range(60)),
        # words repeated across punctuation, inside other words or as numbers are not typos
        "A desk with a computer, computer keyboard and a mug.", "A bathroom with a toilet, toilet roll.",
        "A banana on the ana table.", "Player 10 10 yards away", "A bus, bus stop."]


def test_each_kind_of_non_caption_is_dropped_and_real_captions_kept():
    for reason, lines in NOT_CAPTIONS.items():
        for line in lines:
            assert caption_problem(line) == reason, line
    for line in REAL:
        assert caption_problem(line) is None, line
    meta = NOT_CAPTIONS["meta"]
    lines = meta[:9] + REAL[:9] + NOT_CAPTIONS["empty"] + meta[9:] + REAL[9:] + NOT_CAPTIONS["too_short"] \
        + NOT_CAPTIONS["too_long"] + NOT_CAPTIONS["stutter"]
    found = filter_pool(lines)
    assert found.captions == REAL  # kept unchanged, in pool order
    assert found.dropped == {"empty": NOT_CAPTIONS["empty"], "too_short": NOT_CAPTIONS["too_short"],
                             "too_long": NOT_CAPTIONS["too_long"], "meta": NOT_CAPTIONS["meta"],
                             "stutter": NOT_CAPTIONS["stutter"], "duplicate": []}
    assert found.counts == {"empty": 2, "too_short": 4, "too_long": 1, "meta": 19, "stutter": 6, "duplicate": 0}
    assert list(found.counts) == list(REASONS) and found.n_dropped == 32
    assert found.summary() == (f"dropped 32 of {len(lines)} lines (empty 2, too_short 4, too_long 1, meta 19, "
                               "stutter 6)")
    assert filter_pool(found.captions).n_dropped == 0  # idempotent


def test_repeats_collapse_to_the_first_and_count_under_their_first_reason():
    lines = ["a red bus", "A red bus.", "a  red bus", "A RED BUS..", "a red bus .", "a red bus on a road",
             REFUSAL, REFUSAL, "a red bus on a road!"]
    found = filter_pool(lines)
    assert found.captions == ["a red bus", "a red bus on a road", "a red bus on a road!"]
    assert found.dropped["duplicate"] == ["A red bus.", "a  red bus", "A RED BUS..", "a red bus ."]
    assert found.dropped["meta"] == [REFUSAL, REFUSAL]  # a repeated refusal is a refusal
    assert found.counts == {"empty": 0, "too_short": 0, "too_long": 0, "meta": 2, "stutter": 0, "duplicate": 4}
    assert filter_pool([]).captions == [] and filter_pool([]).summary() == "dropped 0 of 0 lines"


def test_the_bundled_pool_is_clean_documented_and_holds_no_val_caption():
    from nofree import sample_dir

    pool = load_text_lines(default_pool_path())
    found = filter_pool(pool)
    assert found.n_dropped == 0 and found.captions == pool  # nothing left to drop
    assert not any("unable to see" in line.lower() for line in pool)
    assert f"{len(pool):,} captions" in (sample_dir() / "README.md").read_text()
    val = {c for p in load_pairs(sample_dir() / "pairs.jsonl", split="val") for c in p.captions}
    assert len(pool) > 20000 and not val & set(pool)  # the leakage rule (also test_data)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from nofree.anchors.pipeline import AsifPipeline

    root = tmp_path_factory.mktemp("pool")
    encoders = TinyImageEncoder(dim=6), TinyTextEncoder(dim=5)
    anchors = build(make_pairs(root / "data", n=6), root / "set", encoders)
    return AsifPipeline.from_anchors(anchors, *encoders, k=6), tiny_lm(root / "lm", family="llama")


def test_captioners_clean_their_pool_unless_told_not_to(pipeline, caplog):
    pipeline, lm = pipeline
    lines = ["photo number 3", REFUSAL, "a red bus 7", "Photo number 3.", "nothing like it here"]
    with caplog.at_level(logging.WARNING):
        retrieval = RetrievalCaptioner(pipeline, lines)
    assert retrieval.pool == ["photo number 3", "a red bus 7", "nothing like it here"]
    assert retrieval.pool_emb.shape[0] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["caption pool: dropped 2 of 5 lines (meta 1, duplicate 1) as non-captions or "
                        "repeats (--raw-pool / clean_pool=False keeps every line)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert RetrievalCaptioner(pipeline, lines, clean_pool=False).pool == lines
        assert RetrievalCaptioner(pipeline, retrieval.pool).pool == retrieval.pool
    assert not caplog.records  # nothing dropped, nothing said
    magic = MagicCaptioner.from_pipeline(pipeline, lm=lm, examples_from="pool", pool=lines, k=4)
    assert magic.pool.pool == retrieval.pool
    raw = MagicCaptioner.from_pipeline(pipeline, lm=lm, examples_from="pool", pool=lines, k=4, clean_pool=False)
    assert raw.pool.pool == lines
    with pytest.raises(DataError, match=r"pool is empty after cleaning \(dropped 2 of 2 lines \(meta 2\)\)"):
        RetrievalCaptioner(pipeline, [REFUSAL, "There is no image here to provide a caption for."])


def test_cli_pool_refusals_are_never_a_caption_unless_raw(runner, tmp_path, specs, caplog):  # noqa: F811
    pairs, out, _ = build_set(runner, tmp_path, specs)
    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))
    pool = tmp_path / "pool.txt"
    lines = [REFUSAL, "a red bus", REFUSAL, "photo of a thing", "There is no image here to provide a caption for.",
             "A red bus."]
    pool.write_text("\n".join(lines) + "\n")
    base = ["caption", "--method", "retrieval", "--anchors", str(out), "--format", "jsonl"]
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(main, [*base, "--pool", str(pool), *images])
    assert result.exit_code == 0, result.output
    captions = [json.loads(line)["caption"] for line in result.stdout.splitlines()]
    assert len(captions) == len(images) and set(captions) <= {"a red bus", "photo of a thing"}
    assert caplog.text.count("caption pool: dropped 4 of 6 lines (meta 3, duplicate 1)") == 1

    # --raw-pool keeps every line: a pool of refusals only is then all there is to return
    refusals = tmp_path / "refusals.txt"
    refusals.write_text(f"{REFUSAL}\n{REFUSAL}\n")
    raw = runner.invoke(main, [*base, "--pool", str(refusals), "--raw-pool", images[0]])
    assert raw.exit_code == 0, raw.output
    assert json.loads(raw.stdout)["caption"] == REFUSAL
    cleaned = runner.invoke(main, [*base, "--pool", str(refusals), images[0]])
    assert cleaned.exit_code == 2 and "pool is empty after cleaning" in cleaned.output
    assert "Traceback" not in cleaned.output
    kept = load_captioner("retrieval", anchor_dir=out, pool=pool, clean_pool=False)
    assert kept.pool == lines


def test_every_command_taking_pool_has_the_raw_pool_switch(runner, tmp_path):  # noqa: F811
    for command in (["caption"], ["eval"], ["train", "smallcap"]):
        assert "--clean-pool / --raw-pool" in runner.invoke(main, [*command, "--help"]).output, command
    pairs = make_pairs(tmp_path / "data", n=3)
    result = runner.invoke(main, ["train", "lit", "--pairs", str(pairs), "--out", str(tmp_path / "lit"),
                                  "--raw-pool"])
    assert result.exit_code == 2 and "--raw-pool are SmallCap's options" in result.output
