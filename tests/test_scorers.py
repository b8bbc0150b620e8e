"""Scorers for MAGIC: the shared-prefix CLIP text path equals plain encode_text (open_clip and
transformers CLIP), the ASIF scorer is its ASIF's own similarity (CSLS included), callables plug in."""
from __future__ import annotations

import pytest
import torch

from nofree.core import NofreeError
from nofree.decoding.clip_scorer import ClipScorer
from nofree.decoding.scorers import AsifScorer, CallableScorer, Scorer, as_scorer

# candidate lists that exercise re-tokenisation: a candidate may extend the last word
# ("dog" -> "dogs"), add punctuation, a new word, several words, or be shorter than the rest
TEXTS = [
    ["a dog on", "a dog in", "a dogs", "a dog.", "a dog running", "a doggy", "a do", "a dog,the"],
    ["the red bus", "the red", "the redd", "the red car parked on the street by a tree", "the",
     "the a", "THE RED BUS", "the red bus é"],
    ["", " ", "x", "two cats on a sofa", "two cats on a sofa.", "two cats on a sofas", "2", "!"],
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_open_clip(seed=0, **text_cfg):
    import open_clip

    torch.manual_seed(seed)
    cfg = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    cfg.update(text_cfg)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=32, patch_size=16, width=32,
                                                         layers=1, head_width=16), text_cfg=cfg)
    with torch.no_grad():  # a non-trivial layer scale, when the config has one
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval(), open_clip.get_tokenizer("ViT-B-32")


def plain_scores(model, tokenizer, image_emb, texts, scale):
    flat = [t for row in texts for t in row]
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(flat)), dim=-1)
    text = text.view(len(texts), len(texts[0]), -1)
    return scale * torch.einsum("bd,bkd->bk", torch.nn.functional.normalize(image_emb, dim=-1), text)


@pytest.mark.parametrize("attention", ["native", "torch"])
@pytest.mark.parametrize("text_cfg", [{}, {"pool_type": "last"}, {"ls_init_value": 0.5},
                                      {"layers": 3, "heads": 4, "proj_bias": True, "proj_type": "linear"},
                                      {"width": 128, "heads": 2}],
                         ids=["argmax", "last", "layerscale", "linear-proj", "head-width-64"])
def test_open_clip_shared_prefix_equals_encode_text(text_cfg, attention, monkeypatch):
    if attention == "torch":  # the tree attention's torch twin (no C compiler, NOFREE_NATIVE=0, GPUs)
        monkeypatch.setattr("nofree.decoding.attention._native", lambda qkv, past: None)
    model, tokenizer = tiny_open_clip(**text_cfg)
    image_emb = torch.randn(len(TEXTS), 24)
    scorer = ClipScorer(model, tokenizer)
    assert scorer.tower is not None, "the cached path must be used for a plain causal tower"
    expected = plain_scores(model, tokenizer, image_emb, TEXTS, scorer.logit_scale)
    got = scorer.score(image_emb, TEXTS)
    assert got.shape == (3, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    no_prefix = ClipScorer(model, tokenizer, prefix_cache=False).score(image_emb, TEXTS)
    torch.testing.assert_close(no_prefix, expected, atol=1e-5, rtol=1e-5)
    # one image alone gives the same row (no cross-talk between packed images)
    torch.testing.assert_close(scorer.score(image_emb[1:2], TEXTS[1:2]), expected[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_text_tower_with_plain_causal_attention_equals_encode_text(packed):
    """The frozen-model layer's tower, run with ordinary causal attention by its caller (no
    prefix tree, nothing of nofree.decoding), reproduces the model's own text features."""
    from nofree.encoders.text_tower import text_pooling, text_tower

    model, tokenizer = tiny_open_clip()
    tower, pooling = text_tower(model, packed=packed), text_pooling(model, tokenizer)
    ids = tokenizer(["a dog on the beach", "two cats", ""])
    n, length = ids.shape
    heads, dim = tower.heads, tower.positions.shape[1] // tower.heads

    def attend(layer, qkv, rows):
        q, k, v = qkv.view(n, length, 3, heads, dim).permute(2, 0, 3, 1, 4)          # (n, h, L, d)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(n * length, heads, dim)
        return out if rows is None else out[rows]

    x = tower.embed(ids.reshape(-1), torch.arange(length).repeat(n))
    pooled, qkv = tower.run(x, attend, pick=torch.arange(n) * length + pooling.index(ids))
    assert len(qkv) == len(tower.blocks) and qkv[0].shape == (n * length, 3, heads, dim)
    with torch.no_grad():
        expected = model.encode_text(ids)
    torch.testing.assert_close(tower.features(pooled), expected, rtol=1e-4, atol=1e-4)


def test_open_clip_magic_style_continuations_match():
    """Candidates as MAGIC makes them: one prefix, k different next pieces, growing over steps."""
    model, tokenizer = tiny_open_clip(seed=1)
    scorer = ClipScorer(model, tokenizer)
    pieces = [" man", " men", "s", ".", ",", " riding", "ing", " a", "-", "'s", " 3", "x"]
    image_emb = torch.randn(2, 24)
    prefixes = ["", "a"]
    for word in [" man", " riding", " a", " red", " bus", "."]:
        texts = [[p + piece for piece in pieces] for p in prefixes]
        expected = plain_scores(model, tokenizer, image_emb, texts, scorer.logit_scale)
        torch.testing.assert_close(scorer.score(image_emb, texts), expected, atol=1e-5, rtol=1e-5)
        prefixes = [p + word for p in prefixes]


def test_open_clip_unsupported_tower_falls_back_to_encode_text():
    model, tokenizer = tiny_open_clip(no_causal_mask=True)
    scorer = ClipScorer(model, tokenizer)
    assert scorer.tower is None
    image_emb = torch.randn(len(TEXTS), 24)
    torch.testing.assert_close(scorer.score(image_emb, TEXTS),
                               plain_scores(model, tokenizer, image_emb, TEXTS, scorer.logit_scale),
                               atol=1e-5, rtol=1e-5)


def test_bf16_text_tower_stays_close_and_keeps_the_best_candidate():
    model, tokenizer = tiny_open_clip(seed=2)
    image_emb = torch.randn(len(TEXTS), 24)
    fp32 = ClipScorer(model, tokenizer).score(image_emb, TEXTS)
    bf16 = ClipScorer(model, tokenizer, dtype=torch.bfloat16).score(image_emb, TEXTS)
    scale = ClipScorer(model, tokenizer).logit_scale
    assert (bf16 - fp32).abs().max() < 0.05 * scale
    assert not torch.equal(bf16, fp32)


def test_open_clip_embed_images():
    from PIL import Image

    model, tokenizer = tiny_open_clip()
    import open_clip

    preprocess = open_clip.image_transform(32, is_train=False)
    scorer = ClipScorer(model, tokenizer, preprocess=preprocess)
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    emb = scorer.embed_images(images)
    assert emb.shape == (2, 24)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        direct = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
    torch.testing.assert_close(emb, direct, atol=1e-5, rtol=1e-5)


class CharTokenizer:
    """A stand-in for a CLIP tokenizer: bos=1, one id per character, eos=3, pad=0."""

    def __call__(self, texts, padding=None, truncation=None, max_length=16, return_tensors=None):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            seq = [1] + [4 + ord(c) % 50 for c in text][:max_length - 2] + [3]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_hf_clip_shared_prefix_equals_get_text_features():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=60, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=16, eos_token_id=3, bos_token_id=1,
                                         pad_token_id=0),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        projection_dim=24)
    model = CLIPModel(config).eval()
    tokenizer = CharTokenizer()
    scorer = ClipScorer(model, tokenizer)
    assert scorer.is_hf and scorer.pool_type == "eos"
    texts = [["a dog", "a dot", "a dog on", "a"], ["bus", "buses", "b", "bus stop x"]]
    image_emb = torch.randn(2, 24)
    flat = [t for row in texts for t in row]
    with torch.no_grad():
        out = model.get_text_features(**tokenizer(flat, max_length=16))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    text = torch.nn.functional.normalize(feats, dim=-1).view(2, 4, -1)
    expected = scorer.logit_scale * torch.einsum(
        "bd,bkd->bk", torch.nn.functional.normalize(image_emb, dim=-1), text)
    torch.testing.assert_close(scorer.score(image_emb, texts), expected, atol=1e-5, rtol=1e-5)


# --- ASIF ---------------------------------------------------------------------------------------

class FakeEncoder:
    """A deterministic encoder that counts what it is asked to encode."""

    def __init__(self, dim, seed):
        self.dim, self.seed, self.calls = dim, seed, []

    def encode(self, batch):
        self.calls.append(list(batch))
        rows = []
        for item in batch:
            gen = torch.Generator().manual_seed(hash((str(item), self.seed)) % (2**31))
            rows.append(torch.randn(self.dim, generator=gen))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def fitted_asif(csls, n=12, di=6, dt=5, k=4):
    from nofree.anchors.asif import ASIF

    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(n, di, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, dt, generator=gen), dim=-1)
    return ASIF(k=k, p=3.0, csls=csls).fit((image, text))


@pytest.mark.parametrize("csls", [0, 3])
def test_asif_scorer_scores_with_the_fitted_asifs_own_similarity(csls, monkeypatch):
    asif = fitted_asif(csls)
    text_encoder, image_encoder = FakeEncoder(5, 1), FakeEncoder(6, 2)
    scorer = AsifScorer(asif, text_encoder, image_encoder, temperature=30.0)
    image_emb = scorer.embed_images(["img-a", "img-b"])
    texts = [["a dog", "a cat", "a dog", "a bus"], ["a cat", "red", "blue", "a dog"]]
    got = scorer.score(image_emb, texts)
    for b in range(2):
        direct = asif.similarity(image_emb[b:b + 1], text_encoder.encode(texts[b]))[0]
        torch.testing.assert_close(got[b], 30.0 * direct, atol=1e-5, rtol=1e-5)
    if csls:  # the text side's hubness changes the ranking, not only the scale
        plain = AsifScorer(fitted_asif(0), text_encoder, temperature=30.0).score(image_emb, texts)
        assert not torch.allclose(got - 2 * plain, (got - 2 * plain)[:, :1].expand_as(got), atol=1e-4)
    assert len(set(text_encoder.calls[0])) == len(text_encoder.calls[0]) == 5  # unique strings once
    # a second call on the same images (in another order) reuses their relative representations
    images_seen = []
    transform = asif.transform
    monkeypatch.setattr(asif, "transform", lambda emb, *, modality: (
        images_seen.append(len(emb)) if modality == "image" else None, transform(emb, modality=modality))[1])
    again = scorer.score(image_emb.flip(0), texts[::-1])
    assert images_seen == []
    torch.testing.assert_close(again, got.flip(0))


def test_asif_scorer_needs_a_positive_temperature_and_an_image_encoder():
    with pytest.raises(NofreeError, match="temperature"):
        AsifScorer(fitted_asif(0), FakeEncoder(5, 1), temperature=0)
    with pytest.raises(TypeError, match="image_encoder"):
        AsifScorer(fitted_asif(0), FakeEncoder(5, 1)).embed_images(["x"])


# --- plugging in ----------------------------------------------------------------------------------

def test_callables_plug_in_and_are_checked():
    def fn(image_emb, texts):
        return [[float(len(t)) for t in row] for row in texts]

    scorer = as_scorer(fn)
    assert isinstance(scorer, CallableScorer) and isinstance(scorer, Scorer)
    out = scorer.score(torch.zeros(2, 3), [["a", "bb"], ["ccc", ""]])
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 2.0], [3.0, 0.0]]
    with pytest.raises(NofreeError, match="shape"):
        as_scorer(lambda e, t: torch.zeros(3)).score(torch.zeros(1, 2), [["a", "b"]])
    with pytest.raises(NofreeError, match="same number"):
        scorer.score(torch.zeros(2, 3), [["a", "b"], ["c"]])
    with pytest.raises(NofreeError, match="image_emb"):
        scorer.score(torch.zeros(3, 3), [["a"], ["b"]])
    with pytest.raises(TypeError, match="image embedder"):
        scorer.embed_images(["x"])
    with pytest.raises(TypeError):
        as_scorer(42)
    clip_like = ClipScorer(*tiny_open_clip())
    assert as_scorer(clip_like) is clip_like


def test_magic_with_clip_scorer_end_to_end(tmp_path):
    from nofree.decoding.magic import magic_search
    from nofree.testing import tiny_lm

    lm = tiny_lm(tmp_path, family="gpt2")
    model, tokenizer = tiny_open_clip()
    scorer = ClipScorer(model, tokenizer)
    out = magic_search(lm, scorer, torch.randn(2, 24), prompt_ids=lm.tokenize(["a", "the dog"]),
                       k=10, max_new_tokens=4, stop_at_period=False)
    assert [len(ids) for ids in out.ids] == [4, 4]
    for step in out.steps:
        torch.testing.assert_close(step.image_prob.sum(-1), torch.ones(2))
    assert scorer.seconds["text_tower"] > 0


def test_prefix_memory_across_steps_changes_no_score(monkeypatch):
    """MAGIC's next step scores the same continuations plus one token: the scorer keeps the
    reference rows' keys/values and runs only the new tokens, with the same scores, also when
    a row drops out, a word re-tokenises or the memory overflows."""
    import nofree.decoding.clip_scorer as clip_scorer

    model, tokenizer = tiny_open_clip()
    scorer = ClipScorer(model, tokenizer)
    steps = [[["a man riding", "a man in", "a man on"], ["two cats on", "two cats in", "two cats,"]],
             [["a man riding a", "a man riding the", "a man riding red"],
              ["two cats on a", "two cats on the", "two cats on sofa"]],
             [["two cats on a sofa", "two cats on a red", "two cats on a bus"]],           # row 0 done
             [["two cats on a sofas", "two cats on a sofa.", "two cats on a sofa by"]]]    # "sof|as"
    # (tokens run, most tokens held from earlier steps) of the one pass per step: step 0 runs,
    # per image, "<sot> a man" once + three words and end-of-texts; step 1 holds step 0's
    # reference rows ("<sot> a man riding") and runs a word + end-of-text per row; step 3 holds
    # "<sot> two cats on a sofa", and "sofas" (two tokens, re-tokenising "sofa") starts earlier
    expected = [(18, 0), (12, 4), (6, 5), (7, 6)]
    ran = []
    layers = clip_scorer._layers
    monkeypatch.setattr(clip_scorer, "_layers", lambda tower, x, seen, past, pick=None: ran.append(
        (x.shape[0], 0 if past is None else past.shape[4])) or layers(tower, x, seen, past, pick))
    for step, texts in enumerate(steps):
        image_emb = torch.randn(len(texts), 24)
        ran.clear()
        got = scorer.score(image_emb, texts)
        want = plain_scores(model, tokenizer, image_emb, texts, scorer.logit_scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert ran == [expected[step]], (step, ran)
    assert 0 < len(scorer.prefix_memory) <= scorer.prefix_memory.size
    small = ClipScorer(model, tokenizer)
    small.prefix_memory.size = 1
    for texts in steps:
        image_emb = torch.randn(len(texts), 24)
        torch.testing.assert_close(small.score(image_emb, texts),
                                   plain_scores(model, tokenizer, image_emb, texts, small.logit_scale),
                                   rtol=1e-4, atol=1e-4)
    assert len(small.prefix_memory) == 1
