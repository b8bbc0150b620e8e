"""MagicCaptioner: prompts, in-context examples, the greedy shortcut, clear errors."""
from __future__ import annotations

import pytest

from nofree.anchors.pipeline import AsifPipeline
from nofree.captioners import MagicCaptioner, clean_caption
from nofree.core import DataError
from nofree.decoding.magic import magic_search
from nofree.testing import TinyImageEncoder, TinyTextEncoder, tiny_lm
from tests.test_anchors import build, make_pairs
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


def test_greedy_shortcut_equals_magic_with_zero_weights(parts):
    pipeline, lm = parts
    cap = captioner(parts, examples=1, alpha=0.0, beta=0.0)
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


def test_clean_caption():
    assert clean_caption('- "a dog on a beach."\nmore') == "A dog on a beach."
    assert clean_caption("  a cat.\nsecond line") == "A cat."
    assert clean_caption("") == ""
