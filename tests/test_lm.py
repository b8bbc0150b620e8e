"""The frozen LM wrapper: cache reuse, left padding, prefixes and cache selection are exact."""
from __future__ import annotations

import pytest
import torch

from nofree.lm.hf import left_pad
from nofree.testing import tiny_lm

FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp(request.param), family=request.param)


def test_protocol_fields(lm):
    from nofree.core import LanguageModel

    assert isinstance(lm, LanguageModel)
    step = lm.step(torch.tensor(lm.tokenize(["a dog on the beach"])))
    assert step.logits.shape == (1, lm.vocab_size) and step.logits.dtype == torch.float32
    assert step.hidden.shape[::2] == (1, lm.hidden_size)
    assert 0 <= lm.eos_id < lm.vocab_size


def test_optional_capabilities_are_declared_in_core(lm):
    from nofree.core import CacheSizeLM, CandidateLM, HeadlessLM, LanguageModel, StackingLM, offers

    capabilities = (HeadlessLM, CandidateLM, StackingLM, CacheSizeLM)
    assert all(isinstance(lm, capability) and offers(lm, capability) for capability in capabilities)

    class Minimal:  # the required members only
        spec, hidden_size, vocab_size, eos_id, pad_id = "minimal", 4, 8, 0, 0
        tokenize = decode = embed = step = select_cache = staticmethod(lambda *a, **kw: None)

    assert isinstance(Minimal(), LanguageModel)
    assert not any(isinstance(Minimal(), c) or offers(Minimal(), c) for c in capabilities)
    lm.candidate_step = None  # an LM turns a capability off by setting a method of it to None
    try:
        assert not offers(lm, CandidateLM) and offers(lm, HeadlessLM)
    finally:
        del lm.candidate_step


def test_frozen(lm):
    assert all(not p.requires_grad for p in lm.model.parameters())
    lm.model.train()
    assert not lm.model.training


def test_tokenize_decode_round_trip(lm):
    texts = ["a dog on the beach", "the red bus"]
    assert lm.decode(lm.tokenize(texts)) == texts


def test_cache_continuation_equals_full_forward(lm):
    ids = torch.tensor(lm.tokenize(["a man riding a red bus on the beach"]))
    full = lm.step(ids)
    first = lm.step(ids[:, :4])
    rest = lm.step(ids[:, 4:], cache=first.cache)
    torch.testing.assert_close(rest.logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest.hidden, full.hidden[:, 4:], atol=1e-5, rtol=1e-5)
    assert first.cache.get_seq_length() == 4, "step() must not modify the cache it was given"


def test_left_padding_matches_unpadded_rows(lm):
    prompts = lm.tokenize(["a dog on the beach with a man", "the cat"])
    ids, mask = left_pad(prompts, lm.pad_id)
    batched = lm.step(ids, attention_mask=mask)
    nxt = torch.tensor([[5], [9]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    batched2 = lm.step(nxt, cache=batched.cache, attention_mask=mask2)
    for row, prompt in enumerate(prompts):
        alone = lm.step(torch.tensor([prompt]))
        alone2 = lm.step(nxt[row:row + 1], cache=alone.cache)
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched2.logits[row], alone2.logits[0], atol=1e-5, rtol=1e-5)


def test_select_cache_expands_rows_without_touching_source(lm):
    ids = torch.tensor(lm.tokenize(["a dog", "a cat"]))
    step = lm.step(ids)
    expanded = lm.select_cache(step.cache, torch.tensor([0, 0, 1, 1]))
    out = lm.step(torch.tensor([[3], [4], [5], [6]]), cache=expanded)
    for row, (src, token) in enumerate([(0, 3), (0, 4), (1, 5), (1, 6)]):
        ref = lm.step(torch.tensor([[token]]), cache=lm.select_cache(step.cache, torch.tensor([src])))
        torch.testing.assert_close(out.logits[row], ref.logits[0], atol=1e-5, rtol=1e-5)
    assert step.cache.layers[0].keys.shape[0] == 2
    assert lm.cache_nbytes(expanded) == 2 * lm.cache_nbytes(step.cache)


def test_embeds_prefix_equals_ids(lm):
    ids = torch.tensor(lm.tokenize(["a photo of a dog"]))
    torch.testing.assert_close(lm.step(embeds=lm.embed(ids)).logits, lm.step(ids).logits)


def test_bad_calls_are_clear(lm):
    with pytest.raises(ValueError, match="exactly one"):
        lm.step()
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[]], lm.pad_id)
    with pytest.raises(TypeError, match="sequence of strings"):
        lm.tokenize("a dog")


def test_headless_step_and_head_logits_equal_the_full_step(lm):
    ids = torch.tensor(lm.tokenize(["a dog on the beach", "the red bus on a"]))
    full = lm.step(ids)
    headless = lm.step(ids, logits=False)
    assert headless.logits is None
    torch.testing.assert_close(headless.hidden, full.hidden)
    torch.testing.assert_close(lm.head_logits(headless.hidden[:, -1]), full.logits)
    nxt = lm.step(torch.tensor([[4], [5]]), cache=headless.cache)
    ref = lm.step(torch.tensor([[4], [5]]), cache=full.cache)
    torch.testing.assert_close(nxt.logits, ref.logits)


def test_bf16_copy_keeps_float32_outputs_close(lm):
    """to_dtype(bfloat16) is a copy: the original stays float32, outputs come back float32 and
    close to the float32 ones; load_lm(precision=...) caches it and rejects unknown names."""
    fast = lm.to_dtype(torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and lm.dtype == torch.float32 and lm.to_dtype(torch.float32) is lm
    ids = torch.tensor([[5, 6, 7, 8]])
    ref, out = lm.step(ids), fast.step(ids)
    assert out.logits.dtype == torch.float32 and out.hidden.dtype == torch.float32
    torch.testing.assert_close(out.hidden, ref.hidden, atol=0.1, rtol=0.05)
    assert not torch.equal(out.hidden, ref.hidden)  # really computed in bfloat16


def test_load_lm_precision(tmp_path):
    from nofree.core import SpecError
    from nofree.registry import load_lm
    from nofree.testing import make_tiny_lm_dir

    spec = f"local:{make_tiny_lm_dir(tmp_path / 'lm')}"
    fast = load_lm(spec, precision="bf16")
    assert fast.dtype == torch.bfloat16 and load_lm(spec).dtype == torch.float32
    assert load_lm(spec, precision="bf16") is fast
    with pytest.raises(SpecError, match="precision"):
        load_lm(spec, precision="int4")


def test_cache_argument_follows_the_transformers_release():
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; both releases work."""
    from types import SimpleNamespace

    from nofree.lm.hf import cache_argument, cache_of

    class Older:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return SimpleNamespace(past_key_values="older")

    class Newer:
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return SimpleNamespace(cache="newer")

    assert cache_argument(Older()) == "past_key_values" and cache_of(Older().forward()) == "older"
    assert cache_argument(Newer()) == "cache" and cache_of(Newer().forward()) == "newer"
