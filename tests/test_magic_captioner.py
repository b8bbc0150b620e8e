"""MagicCaptioner: prompts, in-context examples, the greedy shortcut, clear errors."""
from __future__ import annotations

import json

import pytest

from nofree.anchors.pipeline import AsifPipeline
from nofree.captioners import MagicCaptioner, RetrievalCaptioner, clean_caption, example_windows
from nofree.cli import main
from nofree.core import DataError
from nofree.decoding.magic import magic_search
from nofree.testing import TinyImageEncoder, TinyTextEncoder, tiny_lm
from tests.test_anchors import build, make_pairs
from tests.test_cli import build_set, runner, specs  # noqa: F401  (fixtures)
from tests.test_tasks import _img


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("magic")
    encoders = TinyImageEncoder(dim=6), TinyTextEncoder(dim=5)
    anchors = build(make_pairs(root / "data", n=6), root / "set", encoders)
    pipeline = AsifPipeline.from_anchors(anchors, *encoders, k=6)
    return pipeline, tiny_lm(root / "lm", family="llama")


def captioner(parts, **kw):
    pipeline, lm = parts
    kw.setdefault("examples_from", "anchors")
    return MagicCaptioner.from_pipeline(pipeline, lm=lm, max_new_tokens=5, k=4, **kw)


def test_examples_are_the_nearest_anchor_captions_in_the_prompt(parts):
    pipeline, _ = parts
    cap = captioner(parts, examples=2)
    image_emb = pipeline.encode_images([_img(4)])
    examples = cap.example_captions(image_emb)[0]
    sim = pipeline.similarity(image_emb, pipeline.anchors.text)[0]
    assert examples[0] == pipeline.anchors.captions[int(sim.argmax())]
    assert len(examples) == 2 and len({e.lower() for e in examples}) == 2
    prompt = cap.prompt_texts(image_emb)[0]
    assert all(e in prompt for e in examples) and cap.prompt in prompt
    assert captioner(parts, examples=0).prompt_texts(image_emb)[0].count("- ") == 0


POOL = ["photo number 3", "Photo number 3.", "a red bus 7", "photo number 4", "nothing like it",
        "photo number 8", "a photo, number 4"]


def test_pool_examples_follow_the_retrieval_ranking(parts):
    pipeline, _ = parts
    image_emb = pipeline.encode_images([_img(4), _img(8)])
    for rerank in (0, 4):  # raw pools (clean_pool=False): ranked() itself counts twins once
        retrieval = RetrievalCaptioner(pipeline, POOL, rerank=rerank, clean_pool=False)
        cap = captioner(parts, examples=3, examples_from="pool", pool=retrieval)
        examples = cap.example_captions(image_emb)
        assert [row[0] for row in examples] == retrieval.caption_embeddings(image_emb)
        for row in examples:
            assert len(row) == 3 and set(row) <= set(POOL)
            assert len({e.lower().rstrip(".") for e in row}) == 3  # case/period twins count once
    plain = RetrievalCaptioner(pipeline, POOL, rerank=0, clean_pool=False)
    sim = plain.scores(image_emb)[0]
    distinct: dict[str, str] = {}
    for j in sim.argsort(descending=True, stable=True).tolist():
        distinct.setdefault(POOL[j].lower().rstrip("."), POOL[j])
    assert plain.ranked(image_emb, 4)[0] == list(distinct.values())[:4]
    from_list = captioner(parts, examples=2, examples_from="pool", pool=POOL)
    assert from_list.example_captions(image_emb) == \
        RetrievalCaptioner(pipeline, POOL, consensus="embedding").ranked(image_emb, 2)
    prompt = from_list.prompt_texts(image_emb)[1]
    assert all(e.rstrip(".") in prompt for e in from_list.example_captions(image_emb)[1])


def test_greedy_shortcut_equals_magic_with_zero_weights(parts):
    pipeline, lm = parts
    cap = captioner(parts, examples=1, alpha=0.0, beta=0.0, trim_cut=False)
    image_emb = pipeline.encode_images([_img(1), _img(5)])
    ids = [lm.tokenizer.encode(t, add_special_tokens=False) for t in cap.prompt_texts(image_emb)]
    reference = magic_search(lm, cap.scorer, image_emb, prompt_ids=ids, k=4, alpha=0.0, beta=0.0,
                             max_new_tokens=5, trace=False)
    assert cap.caption_embeddings(image_emb) == [clean_caption(t) for t in reference.texts]
    assert len(cap.caption([_img(1)])) == 1


def test_bad_settings_are_clear(parts):
    with pytest.raises(DataError, match="prompt is empty"):
        captioner(parts, prompt="  ")
    with pytest.raises(DataError, match="vocabulary"):
        MagicCaptioner.from_pipeline(parts[0], lm=parts[1], k=10**6)
    with pytest.raises(DataError, match="anchor set"):
        MagicCaptioner(parts[1], scorer=None, pipeline=None, examples=3)
    with pytest.raises(DataError, match="choose 'pool' or 'anchors'"):
        captioner(parts, examples_from="web")


def test_clean_caption():
    assert clean_caption('- "a dog on a beach."\nmore') == "A dog on a beach."
    assert clean_caption("  a cat.\nsecond line") == "A cat."
    assert clean_caption("") == ""


def test_cli_caption_magic_jsonl(runner, tmp_path, specs):  # noqa: F811
    """The output contract: one JSON object per image with the path as given and a caption."""
    from nofree.testing import make_tiny_lm_dir

    pairs, out, _ = build_set(runner, tmp_path, specs)
    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))[:2]
    lm_dir = make_tiny_lm_dir(tmp_path / "lm", family="llama")
    pool = tmp_path / "pool.txt"
    pool.write_text("a red bus\nphoto of a thing\na dog on grass\n")
    for extra in ([], ["--examples-from", "anchors", "--beta", "1.0", "--alpha", "0.1"], ["--precision", "bf16"]):
        result = runner.invoke(main, ["caption", "--method", "magic", "--anchors", str(out), "--lm",
                                      f"local:{lm_dir}", "--pool", str(pool), "--k", "4", "--max-tokens", "3",
                                      "--format", "jsonl", *extra, *images])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["image"] for r in rows] == images and all(isinstance(r["caption"], str) for r in rows)
    result = runner.invoke(main, ["caption", "--method", "magic", "--anchors", str(out), "--examples-from",
                                  "web", images[0]])
    assert result.exit_code != 0 and "examples-from" in result.output


def test_cli_names_options_a_method_does_not_take(runner, tmp_path, specs):  # noqa: F811
    _, out, _ = build_set(runner, tmp_path, specs)
    image = str(next((tmp_path / "data").glob("*.png")))
    result = runner.invoke(main, ["caption", "--method", "retrieval", "--anchors", str(out),
                                  "--examples-from", "anchors", "--beta", "1", image])
    assert result.exit_code != 0 and "takes no --beta, --examples-from" in result.output
    result = runner.invoke(main, ["caption", "--method", "retrieval", "--anchors", str(out),
                                  "--precision", "bf16", image])
    assert result.exit_code != 0 and "takes no --precision" in result.output


def test_bf16_captioner_runs_a_bf16_copy_of_the_lm(parts):
    """precision="bf16" decodes with a bfloat16 copy; the float32 LM passed in is left as it was."""
    import torch

    pipeline, lm = parts
    fast = captioner(parts, precision="bf16")
    assert fast.lm.dtype == torch.bfloat16 and lm.dtype == torch.float32
    assert fast.lm.model is not lm.model and fast.lm.spec == lm.spec
    captions = fast.caption_embeddings(pipeline.image_encoder.encode([_img(0), _img(1)]))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    with pytest.raises(DataError, match="precision"):
        captioner(parts, precision="fp16")


def test_cider_retrieval_keeps_the_candidate_with_most_consensus(parts):
    pipeline, _ = parts
    image_emb = pipeline.encode_images([_img(4), _img(8)])
    retrieval = RetrievalCaptioner(pipeline, POOL, rerank=4, references=5)
    tops = retrieval.top(image_emb, 5)
    for top, got in zip(tops, retrieval.caption_embeddings(image_emb)):
        scores = retrieval.cider.scores(top[:4], top)
        assert got == top[max(range(4), key=lambda i: (scores[i], -i))]
    assert RetrievalCaptioner(pipeline, POOL, rerank=0).caption_embeddings(image_emb) == \
        [row[0] for row in tops]  # no re-ranking: the ASIF argmax
    with pytest.raises(DataError, match="consensus must be one of"):
        RetrievalCaptioner(pipeline, POOL, consensus="votes")
    by_embedding = retrieval.with_consensus("embedding")  # shares the encoded pool, ranks the other way
    assert by_embedding.pool_rel is retrieval.pool_rel and retrieval.consensus == "cider"
    assert by_embedding.with_consensus("cider").cider is by_embedding.cider  # n-gram weights counted once
    assert by_embedding.ranked(image_emb, 3) == \
        RetrievalCaptioner(pipeline, POOL, consensus="embedding").ranked(image_emb, 3)


def test_windows_write_one_candidate_each_and_keep_the_consensus_choice(parts, monkeypatch):
    pipeline, lm = parts
    image_emb = pipeline.encode_images([_img(4), _img(8), _img(1)])
    windows = [(0, 2), (1, 2), (3, 1)]
    cap = captioner(parts, examples_from="pool", pool=POOL, windows=windows, consensus=3, with_retrieved=True)
    ranked = cap.example_captions(image_emb, 4)
    prompt = cap.prompt_texts(image_emb, (1, 2))[0]
    assert ranked[0][1] in prompt and ranked[0][2] in prompt and f"- {ranked[0][0]}" not in prompt
    candidates = cap.candidates(image_emb)
    assert [len(row) for row in candidates] == [4, 4, 4]
    # the last candidate is what caption retrieval returns (CIDEr-D consensus), not the first example
    assert [row[-1] for row in candidates] == RetrievalCaptioner(pipeline, POOL).caption_embeddings(image_emb)
    single = captioner(parts, examples_from="pool", pool=POOL, windows=[(1, 2)], with_retrieved=False)
    assert single.caption_embeddings(image_emb) == [row[1] for row in candidates]  # one window, no choice
    refs = cap.pool.top(image_emb, 3)
    chosen = cap.caption_embeddings(image_emb)
    finished = cap.drafts(image_emb)[1]
    assert chosen == [row[cap.pool.cider.choose(row, r, unfinished=[i for i, done in enumerate(ends) if not done])]
                      for row, r, ends in zip(candidates, refs, finished)]
    assert [cap.caption_embeddings(image_emb[i:i + 1])[0] for i in range(3)] == chosen  # batch-independent
    import nofree.captioning.drafts

    monkeypatch.setattr(nofree.captioning.drafts, "DRAFT_ROWS", 2)  # 9 drafts in batches of 2 rows
    assert cap.candidates(image_emb) == candidates
    with pytest.raises(DataError, match="windows must be"):
        captioner(parts, examples_from="pool", pool=POOL, windows=[(-1, 2)])
    with pytest.raises(DataError, match="drafts must be"):
        captioner(parts, examples_from="pool", pool=POOL, drafts=0)
    drafts = captioner(parts, examples_from="pool", pool=POOL, examples=2, drafts=3)
    assert drafts.windows == example_windows(2, 3) == [(0, 2), (0, 1), (0, 3)]
    # the defaults offer the drafts only: one candidate per window, no retrieval caption
    assert [len(row) for row in drafts.candidates(image_emb)] == [3, 3, 3]


def test_a_draft_cut_at_the_length_limit_is_passed_over(parts):
    pipeline, lm = parts
    image_emb = pipeline.encode_images([_img(4), _img(8), _img(1)])
    cap = captioner(parts, examples_from="pool", pool=POOL, windows=[(0, 2), (1, 2)], consensus=3,
                    with_retrieved=True)  # at most 5 new tokens
    candidates, finished = cap.drafts(image_emb)
    assert candidates == cap.candidates(image_emb) and [len(row) for row in finished] == [3, 3, 3]
    assert all(row[-1] for row in finished)  # the retrieval caption is a whole caption
    # the flags are the decoder's own stop reasons
    from nofree.decoding.magic import greedy_search

    prompts = [lm.tokenizer.encode(t, add_special_tokens=False) for t in cap.prompt_texts(image_emb, (0, 2))]
    run = greedy_search(lm, prompts, max_new_tokens=5 + cap.trim_cut)
    assert [row[0] for row in finished] == [stop != "length" and len(ids) <= 5 for ids, stop in zip(run.ids, run.stop)]
    cut = [(r, i) for r, ends in enumerate(finished) for i, done in enumerate(ends) if not done]
    assert cut, "5 tokens should cut some draft of the tiny LM"
    refs = cap.pool.top(image_emb, 3)
    for row, ends, r, got in zip(candidates, finished, refs, cap.caption_embeddings(image_emb)):
        sound = [c for c, done in zip(row, ends) if done]  # never empty: the retrieval caption
        assert got == sound[cap.pool.cider.choose(sound, r)]


def test_a_draft_cut_at_the_limit_is_trimmed_to_its_last_whole_word(parts):
    """trim_cut decodes one token of look-ahead and tidies the drafts the limit cut; the ones that
    ended by themselves, and the consensus flags, are as without it; trim_cut=False cuts."""
    from nofree.decoding.magic import greedy_search
    from nofree.decoding.stopping import trim_cut

    pipeline, lm = parts
    image_emb = pipeline.encode_images([_img(4), _img(8), _img(1)])
    options = dict(examples_from="pool", pool=POOL, windows=[(0, 2), (1, 2)], consensus=3)
    plain_cap, trim_cap = captioner(parts, trim_cut=False, **options), captioner(parts, **options)
    (plain, plain_flags), (trimmed, flags) = plain_cap.drafts(image_emb), trim_cap.drafts(image_emb)
    assert flags == plain_flags
    prompts = [lm.tokenizer.encode(t, add_special_tokens=False) for t in trim_cap.prompt_texts(image_emb, (0, 2))]
    cut, ahead = greedy_search(lm, prompts, max_new_tokens=5), greedy_search(lm, prompts, max_new_tokens=6)
    assert [row[0] for row in plain] == [clean_caption(t) for t in cut.texts]
    assert [row[0] for row in trimmed] == [clean_caption(text if ended else trim_cut(lm, ids, 5)) for ids, text, ended
                                           in zip(ahead.ids, ahead.texts, [row[0] for row in flags])]
    assert not all(row[0] for row in flags), "5 tokens should cut some draft of the tiny LM"


def test_example_window_schedule():
    assert example_windows(4, 8) == [(0, 4), (0, 2), (0, 3), (0, 5), (1, 4), (2, 4), (4, 4), (0, 8)]
    assert example_windows(4, 1) == [(0, 4)] and example_windows(0, 8) == [(0, 0)]
    one = example_windows(1, 8)
    assert one[0] == (0, 1) and len(one) == len(set(one))  # repeated windows are written once


def test_cli_windows_are_parsed_and_checked(runner, tmp_path, specs):  # noqa: F811
    from nofree.testing import make_tiny_lm_dir

    _, out, _ = build_set(runner, tmp_path, specs)
    image = str(next((tmp_path / "data").glob("*.png")))
    lm_dir = make_tiny_lm_dir(tmp_path / "lm", family="llama")
    pool = tmp_path / "pool.txt"
    pool.write_text("a red bus\nphoto of a thing\na dog on grass\n")
    base = ["caption", "--method", "magic", "--anchors", str(out), "--lm", f"local:{lm_dir}", "--pool",
            str(pool), "--max-tokens", "3", "--format", "jsonl"]
    for extra in (["--windows", "0:2,1:1", "--consensus", "2", "--no-retrieved"], ["--drafts", "2"]):
        result = runner.invoke(main, [*base, *extra, image])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, [*base, "--windows", "0-2", image])
    assert result.exit_code != 0 and "FIRST:COUNT" in result.output
    result = runner.invoke(main, ["caption", "--method", "retrieval", "--anchors", str(out),
                                  "--windows", "0:2", image])
    assert result.exit_code != 0 and "takes no --windows" in result.output
