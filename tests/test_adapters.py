"""Trainable adapters (LiT, ClipCap, Flamingo-style) on frozen tiny backbones.

Backbones: config-built tiny GPT-2 / Llama LMs (nofree.testing.tiny_lm) and small fake
encoders defined here, so these tests depend only on the adapters and the LM wrapper.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nofree.adapters.base import load_adapter
from nofree.adapters.captioning import AdapterCaptioner
from nofree.adapters.clipcap import ClipCap
from nofree.adapters.flamingo import Flamingo, find_decoder_layers
from nofree.adapters.lit import LiT
from nofree.adapters.losses import caption_batch, contrastive_loss, next_token_loss, sigmoid_loss
from nofree.adapters.train import Examples, prepare_examples, train_adapter, validation_warnings
from nofree.core import DataError, Pair, SpecError, l2_normalize
from nofree.testing import tiny_lm

FAMILIES = ["gpt2", "llama"]
CAPTIONS = ["a dog on the beach", "the red bus", "a cat on a sofa", "a man riding a bus"]


# --- fakes -----------------------------------------------------------------------------------

def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class FakeImageEncoder:
    """Pooled: a 2x2 RGB thumbnail through a frozen linear map; tokens: the 4 cells, projected."""

    modality = "image"

    def __init__(self, spec: str = "fake-image:v1", embed_dim: int = 12, token_dim: int = 5) -> None:
        torch.manual_seed(123)
        self.spec, self.embed_dim, self.token_dim = spec, embed_dim, token_dim
        self.module = _frozen(nn.ModuleDict({"pool": nn.Linear(12, embed_dim),
                                             "cell": nn.Linear(3, token_dim)}))
        self.calls = 0

    @staticmethod
    def _cells(images) -> torch.Tensor:
        thumbs = [np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(thumbs)).reshape(len(images), 4, 3) / 127.5 - 1.0

    def encode(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            return l2_normalize(self.module["pool"](self._cells(batch).flatten(1)))

    def encode_tokens(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            return self.module["cell"](self._cells(batch))


class FakeTextEncoder:
    """Mean of frozen per-byte embeddings, L2-normalised."""

    modality = "text"

    def __init__(self, spec: str = "fake-text:v1", embed_dim: int = 16) -> None:
        torch.manual_seed(7)
        self.spec, self.embed_dim, self.token_dim = spec, embed_dim, embed_dim
        self.module = _frozen(nn.EmbeddingBag(256, embed_dim, mode="mean"))
        self.calls = 0

    def encode(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        self.calls += 1
        rows = [torch.tensor(list(text.encode("utf-8")) or [0]) for text in batch]
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        with torch.no_grad():
            return l2_normalize(self.module(torch.cat(rows), offsets))

    def encode_tokens(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        return self.encode(batch)[:, None, :]


class FakeHFTextEncoder:
    """A tiny config-built BERT, mean-pooled over the mask: the shape of a transformers text encoder."""

    modality = "text"
    WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "dog", "cat", "on", "in",
             "beach", "sofa", "red", "bus", "man", "riding", "photo", "of", "two", "cats", "with"]

    def __init__(self, spec: str = "fake-hf-text:v1") -> None:
        from transformers import BertConfig, BertModel, BertTokenizer

        torch.manual_seed(11)
        self.tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(self.WORDS)})
        config = BertConfig(vocab_size=len(self.WORDS), hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
        self.model = _frozen(BertModel(config))
        self.module, self.spec, self.device, self.max_length = self.model, spec, torch.device("cpu"), 64
        self.embed_dim = self.token_dim = 16

    def encode(self, batch, *, batch_size: int = 32) -> torch.Tensor:
        enc = self.tokenizer(list(batch), padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return l2_normalize((hidden * mask).sum(1) / mask.sum(1))


def _image(color) -> Image.Image:
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:4] = color
    array[4:] = [255 - c for c in color]
    return Image.fromarray(array)


IMAGES = [_image((250, 10, 10)), _image((10, 250, 10)), _image((10, 10, 250)), _image((200, 200, 30))]


def _examples(adapter, captions=CAPTIONS, repeats: int = 1) -> Examples:
    images = IMAGES[:len(captions)]
    if adapter.feature_kind == "tokens":
        features = adapter.image_encoder.encode_tokens(images)
    else:
        features = adapter.image_encoder.encode(images)
    index = torch.arange(len(captions)).repeat(repeats)
    texts = [captions[i] for i in index.tolist()]
    text_features, text_mask = adapter.text_inputs(texts) if adapter.uses_text_features else (None, None)
    return Examples(features, index, texts, text_features, text_mask=text_mask)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp(request.param), family=request.param)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("gpt2-single"), family="gpt2")


@pytest.fixture
def image_encoder():
    return FakeImageEncoder()


def _build(kind, lm, image_encoder, **kw):
    torch.manual_seed(0)
    if kind == "clipcap":
        return ClipCap(image_encoder, lm, **{"prefix_length": 2, **kw})
    if kind == "flamingo":
        return Flamingo(image_encoder, lm, **{"num_latents": 4, "heads": 2, "dim_head": 8,
                                              "xattn_every": 1, **kw})
    return LiT(image_encoder, FakeTextEncoder(), **kw)


def _train_steps(adapter, examples, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=lr)
    adapter.train()
    losses = []
    for _ in range(steps):
        batch = examples.batch(torch.arange(len(examples)), adapter.device)
        loss = adapter.batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    adapter.eval()
    return losses


# --- losses ----------------------------------------------------------------------------------

def test_contrastive_loss_matches_cross_entropy_and_groups_positives():
    torch.manual_seed(0)
    img, txt = l2_normalize(torch.randn(5, 8)), l2_normalize(torch.randn(5, 8))
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    expected = 0.5 * (nn.functional.cross_entropy(logits, torch.arange(5))
                      + nn.functional.cross_entropy(logits.t(), torch.arange(5)))
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expected)
    # several captions of one image are all positives: the target spreads over them
    ids = torch.tensor([0, 0, 1, 2, 2])
    logp_rows, logp_cols = logits.log_softmax(1), logits.log_softmax(0)
    same = ids[:, None] == ids[None, :]
    rows = torch.stack([-logp_rows[i, same[i]].mean() for i in range(5)]).mean()
    cols = torch.stack([-logp_cols[same[:, j], j].mean() for j in range(5)]).mean()
    grouped = contrastive_loss(img, txt, scale, image_ids=ids)
    torch.testing.assert_close(grouped, 0.5 * (rows + cols))
    # so swapping two texts of the same image changes nothing (it would without image_ids)
    swap = torch.tensor([1, 0, 2, 4, 3])
    torch.testing.assert_close(contrastive_loss(img, txt[swap], scale, image_ids=ids), grouped)
    assert not torch.allclose(contrastive_loss(img, txt[swap], scale), contrastive_loss(img, txt, scale))


def test_sigmoid_loss_matches_definition():
    torch.manual_seed(1)
    img, txt = l2_normalize(torch.randn(4, 6)), l2_normalize(torch.randn(4, 6))
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    z = 2 * torch.eye(4) - 1
    expected = -torch.log(torch.sigmoid(z * (t * img @ txt.t() + b))).sum() / 4
    torch.testing.assert_close(sigmoid_loss(img, txt, t, b), expected)


def test_caption_batch_pads_with_pad_id_and_ignores_padding():
    ids, mask, labels = caption_batch([[5, 6, 7], [8]], eos_id=2, pad_id=0, n_start=3)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    # logits at the last start position predict the first caption token; eos closes the caption
    assert labels.tolist() == [[-100, -100, 5, 6, 7, 2], [-100, -100, 8, 2, -100, -100]]
    # a real token id 0 is still learned (the reference implementation ignored it)
    _, _, labels0 = caption_batch([[0, 4]], eos_id=2, pad_id=0, n_start=1)
    assert labels0.tolist() == [[0, 4, 2]]
    logits = torch.randn(2, 6, 10)
    assert torch.isfinite(next_token_loss(logits, labels))


# --- frozen backbones ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lit", "clipcap", "flamingo"])
def test_backbone_bit_identical_after_training(kind, gpt2, image_encoder):
    adapter = _build(kind, gpt2, image_encoder)
    backbones = dict(adapter.backbone_modules())
    before = {role: _state(m) for role, m in backbones.items()}
    trainable_before = _state(adapter)
    adapter.train()
    for role, module in backbones.items():
        assert not module.training, f"{role} left eval mode on adapter.train()"
        assert not any(p.requires_grad for p in module.parameters())
    _train_steps(adapter, _examples(adapter), steps=3)
    for role, module in backbones.items():
        _assert_same_state(before[role], module)
    after = adapter.state_dict()
    assert any(not torch.equal(trainable_before[k], after[k]) for k in after), "adapter did not train"
    # the backbone is never part of the adapter's parameters or checkpoint
    backbone_ids = {id(p) for m in backbones.values() for p in m.parameters()}
    assert not backbone_ids & {id(p) for p in adapter.parameters()}
    assert adapter.num_parameters() == sum(p.numel() for p in adapter.parameters())


# --- LiT -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["contrastive", "sigmoid"])
def test_lit_learns_to_retrieve(loss, image_encoder):
    adapter = _build("lit", None, image_encoder, loss=loss)
    examples = _examples(adapter, repeats=2)
    before = adapter.evaluate(examples)
    losses = _train_steps(adapter, examples, steps=60, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0]
    after = adapter.evaluate(examples)
    assert after["val_r1"] == 1.0 and after["val_r1"] >= before["val_r1"]
    assert adapter.logit_scale != pytest.approx(10.0)


def test_lit_tunes_copies_of_the_top_text_layers(image_encoder, tmp_path):
    text_encoder = FakeHFTextEncoder()
    frozen = _state(text_encoder.model)
    torch.manual_seed(0)
    adapter = LiT(image_encoder, text_encoder, text_layers=1)  # checks the copy reproduces the encoder
    assert adapter.num_parameters() > sum(p.numel() for p in adapter.text_head.parameters())
    examples = _examples(adapter, repeats=2)
    assert examples.text_features.dim() == 3 and examples.text_mask.dtype == torch.bool
    losses = _train_steps(adapter, examples, steps=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    _assert_same_state(frozen, text_encoder.model)
    assert not text_encoder.model.training and adapter.text_top.training is False
    emb = adapter.encode_text(CAPTIONS)
    assert emb.shape == (4, image_encoder.embed_dim)
    adapter.save_pretrained(tmp_path / "lit")
    loaded = load_adapter(tmp_path / "lit", image_encoder=image_encoder, text_encoder=text_encoder)
    assert torch.equal(loaded.encode_text(CAPTIONS), emb)
    with pytest.raises(SpecError, match="transformers text encoder"):
        LiT(image_encoder, FakeTextEncoder(), text_layers=1)


def test_lit_scorer_interface(image_encoder):
    adapter = _build("lit", None, image_encoder)
    assert adapter.logit_scale == pytest.approx(10.0)
    image_emb, text_emb = adapter.encode_image(IMAGES[:3]), adapter.encode_text(CAPTIONS)
    assert image_emb.shape == (3, image_encoder.embed_dim) and text_emb.shape == (4, image_encoder.embed_dim)
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(3))
    sim = adapter.similarity(image_emb, text_emb)
    assert sim.shape == (3, 4)
    torch.testing.assert_close(sim, image_emb @ text_emb.t())


# --- ClipCap ------------------------------------------------------------------------------------------

def test_clipcap_loss_decreases_and_the_prefix_steers_the_lm(lm, image_encoder):
    # A tiny random LM barely lets a prefix steer later positions through attention, but the
    # first caption token is predicted right at the prefix: that, it must learn per image.
    adapter = _build("clipcap", lm, image_encoder)
    examples = _examples(adapter, captions=CAPTIONS[:2])  # first tokens differ: 'a' / 'the'
    losses = _train_steps(adapter, examples, steps=40, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1
    first = [row[0] for row in adapter.generate(examples.image_features, max_tokens=1)]
    assert first == [ids[0] for ids in lm.tokenize(CAPTIONS[:2])]


def test_clipcap_prefix_normalises_and_padding_does_not_leak(gpt2, image_encoder):
    adapter = _build("clipcap", gpt2, image_encoder)
    emb = image_encoder.encode(IMAGES[:2])
    torch.testing.assert_close(adapter.prefix(emb * 7.0), adapter.prefix(emb))
    with torch.no_grad():
        batched, labels = adapter.caption_logits(emb, ["a dog", "a man riding a red bus on the beach"])
        alone, _ = adapter.caption_logits(emb[:1], ["a dog"])
    n = alone.shape[1]
    torch.testing.assert_close(batched[0, :n], alone[0], atol=1e-5, rtol=1e-5)
    assert (labels[0, n:] == -100).all()


def test_transformer_mapper_trains(gpt2, image_encoder):
    adapter = _build("clipcap", gpt2, image_encoder, mapper="transformer", clip_length=3,
                     num_layers=2, num_heads=4)
    assert adapter.prefix(image_encoder.encode(IMAGES[:3])).shape == (3, 2, gpt2.hidden_size)
    losses = _train_steps(adapter, _examples(adapter, captions=CAPTIONS[:2]), steps=15, lr=3e-3)
    assert losses[-1] < losses[0]


def _greedy_without_cache(adapter, features, max_tokens):
    """Reference greedy decoding: the full sequence re-run at every step, no KV cache; each
    caption read off the tokens by the decoders' stop rule."""
    from nofree.decoding.stopping import end_caption

    stops = adapter.stop_ids()
    out = []
    with torch.no_grad():
        for row in range(features.shape[0]):
            tokens: list[int] = []
            for _ in range(max_tokens):
                ids = torch.tensor([tokens], dtype=torch.long)
                if isinstance(adapter, ClipCap):
                    embeds = torch.cat([adapter.prefix(features[row:row + 1]), adapter.lm.embed(ids)], 1)
                    logits = adapter.lm.model(inputs_embeds=embeds).logits
                else:
                    full = torch.cat([torch.tensor([adapter.start_ids]), ids], 1)
                    logits = adapter.lm_logits(features[row:row + 1], full)
                last = logits[0, -1]
                if len(tokens) < 2:  # captions have at least two tokens
                    last[list(stops)] = float("-inf")
                tokens.append(int(last.argmax()))
                if tokens[-1] in stops:
                    break
            out.append(end_caption(adapter.lm, tokens, stop_at_period=True, max_tokens=max_tokens)[0])
    return out


@pytest.mark.parametrize("kind", ["clipcap", "flamingo"])
def test_cached_decoding_equals_full_recompute(kind, lm, image_encoder):
    adapter = _build(kind, lm, image_encoder)
    examples = _examples(adapter, captions=CAPTIONS[:3])
    _train_steps(adapter, examples, steps=3, lr=5e-2)  # Flamingo gates become non-zero
    features = examples.image_features
    assert adapter.generate(features, max_tokens=8) == _greedy_without_cache(adapter, features, 8)
    assert adapter.generate(features, max_tokens=8, beams=1) == adapter.generate(features, max_tokens=8)
    beams = adapter.generate(features, max_tokens=8, beams=3)
    assert len(beams) == 3 and all(1 <= len(b) <= 8 for b in beams)


def test_beam_search_finds_higher_likelihood_than_greedy(gpt2, image_encoder):
    adapter = _build("clipcap", gpt2, image_encoder)
    features = image_encoder.encode(IMAGES)

    def mean_logprob(row, tokens):
        with torch.no_grad():
            ids = torch.tensor([tokens])
            embeds = torch.cat([adapter.prefix(features[row:row + 1]), gpt2.embed(ids)], 1)
            logp = gpt2.model(inputs_embeds=embeds).logits[0].log_softmax(-1)
        positions = range(adapter.prefix_length - 1, adapter.prefix_length - 1 + len(tokens))
        return sum(float(logp[p, t]) for p, t in zip(positions, tokens)) / len(tokens)

    greedy = adapter.generate(features, max_tokens=6)
    beam = adapter.generate(features, max_tokens=6, beams=4)
    for row in range(len(IMAGES)):
        assert mean_logprob(row, beam[row]) >= mean_logprob(row, greedy[row]) - 1e-4


# --- Flamingo -------------------------------------------------------------------------------------------

def test_find_decoder_layers(lm):
    layers = find_decoder_layers(lm.model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == lm.model.config.num_hidden_layers
    expected = lm.model.transformer.h if hasattr(lm.model, "transformer") else lm.model.model.layers
    assert layers is expected


@pytest.mark.parametrize("init", [{}, {"gate_init": 0.0, "scale_to_residual": False}, {"dropout": 0.5}],
                         ids=["zero-projections", "paper-zero-gates", "dropout-in-training"])
def test_fresh_flamingo_returns_exactly_the_frozen_lm_logits(lm, image_encoder, init):
    adapter = _build("flamingo", lm, image_encoder, **init)
    adapter.train(bool(init.get("dropout")))  # dropout drops units of branches that add 0
    assert len(adapter.blocks) == len(find_decoder_layers(lm.model))
    ids = torch.tensor(lm.tokenize(["a dog on the beach", "the cat on the sofa"]))
    assert ids.shape == (2, 5)
    tokens = image_encoder.encode_tokens(IMAGES[:2])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        conditioned = adapter.lm_logits(tokens, ids)
    assert torch.equal(conditioned, plain)
    # and cached decoding from the start token equals the plain LM's greedy decoding
    start = torch.tensor([adapter.start_ids] * 2)
    plain_tokens, step = [], lm.step(start)
    for t in range(6):
        logits = step.logits.clone()
        if t < 2:  # captions have at least two tokens
            logits[:, lm.eos_id] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        plain_tokens.append(nxt)
        step = lm.step(nxt, cache=step.cache)
    plain_tokens = torch.cat(plain_tokens, 1).tolist()
    got = adapter.generate(tokens, max_tokens=6, stop_at_period=False)
    for row in range(2):
        assert got[row] == plain_tokens[row][:len(got[row])]


def test_flamingo_dropout_acts_in_training_only_and_is_recorded(lm, image_encoder, tmp_path):
    from nofree.adapters.base import load_adapter

    torch.manual_seed(0)
    adapter = _build("flamingo", lm, image_encoder, dropout=0.5)
    with torch.no_grad():
        for block in adapter.blocks:  # a trained block adds something
            nn.init.normal_(block.to_out.weight, std=0.1)
            nn.init.normal_(block.ff[-1].weight, std=0.1)
    ids = torch.tensor(lm.tokenize(["a dog on the beach"]))
    tokens = image_encoder.encode_tokens(IMAGES[:1])
    with torch.no_grad():
        adapter.train()
        assert not torch.equal(adapter.lm_logits(tokens, ids), adapter.lm_logits(tokens, ids))
        adapter.eval()
        assert torch.equal(adapter.lm_logits(tokens, ids), adapter.lm_logits(tokens, ids))
    adapter.save_pretrained(tmp_path / "a")
    assert load_adapter(tmp_path / "a", image_encoder=image_encoder, lm=lm).config()["dropout"] == 0.5
    with pytest.raises(ValueError, match="dropout must be in"):
        _build("flamingo", lm, image_encoder, dropout=1.0)


def test_gated_block_scaled_to_the_residual_changes_each_position_relatively():
    from nofree.adapters.flamingo import GatedCrossAttentionBlock

    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, heads=2, dim_head=8, ff_mult=2, gate_init=0.5,
                                     scale_to_residual=True)
    assert not block.to_out.weight.detach().any() and not block.ff[-1].weight.detach().any()
    with torch.no_grad():
        nn.init.normal_(block.to_out.weight)
        nn.init.normal_(block.ff[-1].weight)
        y, latents = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
        change = block(y, latents) - y
        # LayerNorm sees the same input at any scale, so the change grows with the stream
        assert torch.allclose(block(100 * y, latents) - 100 * y, 100 * change, rtol=1e-4, atol=1e-3)
        block.scale_to_residual = False
        assert not torch.allclose(block(100 * y, latents) - 100 * y, 100 * change, rtol=1e-2)
    with pytest.raises(ValueError, match="gate_init"):
        GatedCrossAttentionBlock(16, heads=2, dim_head=8, ff_mult=2, gate_init=1.0)


def test_flamingo_saved_before_gate_init_existed_loads_with_the_paper_block(gpt2, image_encoder, tmp_path):
    adapter = _build("flamingo", gpt2, image_encoder, gate_init=0.0, scale_to_residual=False)
    adapter.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "config.json"
    header = json.loads(path.read_text())
    for key in ("gate_init", "scale_to_residual"):
        del header["config"][key]
    path.write_text(json.dumps(header))
    old = Flamingo.from_pretrained(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)
    assert old.hparams["gate_init"] == 0.0 and not old.hparams["scale_to_residual"]
    assert not any(block.scale_to_residual for block in old.blocks)
    assert Flamingo.from_pretrained(tmp_path / "a", image_encoder=image_encoder,
                                    lm=gpt2).hparams == old.hparams


def test_flamingo_param_groups_cover_every_parameter_once(gpt2, image_encoder):
    adapter = _build("flamingo", gpt2, image_encoder, gate_lr_scale=7.0)
    groups = adapter.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in adapter.trainable_parameters())
    gates = {id(b.attn_gate) for b in adapter.blocks} | {id(b.ff_gate) for b in adapter.blocks}
    assert {id(p) for p in groups[1]["params"]} == gates and groups[1]["lr_scale"] == 7.0


def test_flamingo_trains_and_hooks_stay_inert_outside_the_adapter(lm, image_encoder):
    # the paper's block: a random tiny LM's residual stream is ~0.02, so blocks scaled to it
    # (the default) move too little in 40 steps to memorise the captions
    adapter = _build("flamingo", lm, image_encoder, gate_init=0.0, scale_to_residual=False)
    ids = torch.tensor(lm.tokenize(["a cat on a sofa"]))
    with torch.no_grad():
        reference = lm.model(input_ids=ids).logits
    examples = _examples(adapter, captions=CAPTIONS[:2])
    losses = _train_steps(adapter, examples, steps=40, lr=1e-2)
    assert losses[-1] < losses[0] - 0.3  # the tiny LM's logits span little: captions tell more
    assert all(float(b.attn_gate.detach().abs()) > 0 for b in adapter.blocks)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, reference)  # nobody attending: plain LM
        assert not torch.equal(adapter.lm_logits(examples.image_features[:1], ids), reference)
    assert adapter.caption_features(examples.image_features, max_tokens=12) == CAPTIONS[:2]
    adapter.detach()
    with pytest.raises(RuntimeError, match="detached"):
        adapter.lm_logits(examples.image_features[:1], ids)


# --- save / load -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lit", "clipcap", "flamingo"])
def test_save_load_round_trip(kind, gpt2, image_encoder, tmp_path):
    adapter = _build(kind, gpt2, image_encoder)
    examples = _examples(adapter)
    _train_steps(adapter, examples, steps=2, lr=1e-2)
    adapter.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["kind"] == kind and config["format_version"] == 1 and "nofree_version" in config
    assert set(config["backbone"]) == set(adapter.backbone_roles)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(adapter.state_dict())  # adapter weights only
    backbones = {"image_encoder": image_encoder}
    backbones.update({"lm": gpt2} if kind != "lit" else {"text_encoder": adapter.backbone("text_encoder")})
    loaded = load_adapter(tmp_path / "a", **backbones)
    assert type(loaded) is type(adapter) and not loaded.training
    _assert_same_state(_state(adapter), loaded)
    batch = examples.batch(torch.arange(len(examples)), adapter.device)
    with torch.no_grad():
        assert torch.equal(adapter.eval().batch_loss(batch), loaded.batch_loss(batch))
    if kind != "lit":
        assert loaded.generate(examples.image_features, max_tokens=5) == \
            adapter.generate(examples.image_features, max_tokens=5)


def test_load_rebuilds_lm_from_recorded_spec(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    adapter.save_pretrained(tmp_path / "a")
    loaded = ClipCap.from_pretrained(tmp_path / "a", image_encoder=image_encoder)  # LM from its local: spec
    assert loaded.lm.spec == gpt2.spec
    emb = image_encoder.encode(IMAGES[:2])
    assert loaded.generate(emb, max_tokens=4) == adapter.generate(emb, max_tokens=4)


def test_load_errors_are_clear(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    adapter.save_pretrained(tmp_path / "a")
    with pytest.raises(SpecError, match="fake-image:other"):
        ClipCap.from_pretrained(tmp_path / "a", image_encoder=FakeImageEncoder(spec="fake-image:other"),
                                lm=gpt2)
    with pytest.raises(DataError, match="clipcap adapter, not flamingo"):
        Flamingo.from_pretrained(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)
    with pytest.raises(DataError, match="config.json is missing"):
        load_adapter(tmp_path, image_encoder=image_encoder, lm=gpt2)

    from safetensors.torch import load_file, save_file

    path = tmp_path / "a" / "adapter.safetensors"
    tensors = load_file(str(path))
    config_path = tmp_path / "a" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("weights_sha256")  # a hand-edited file: checked tensor by tensor
    config_path.write_text(json.dumps(config))
    name = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != name}, str(path))
    with pytest.raises(DataError, match=f"'{name}' is missing"):
        load_adapter(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)
    save_file({**tensors, name: torch.zeros(3, 3)}, str(path))
    with pytest.raises(DataError, match=rf"'{name}' has shape \(3, 3\)"):
        load_adapter(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_adapter(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)


def test_torn_save_is_detected(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    adapter.save_pretrained(tmp_path / "a")
    other = _build("clipcap", gpt2, image_encoder)
    _train_steps(other, _examples(other), steps=1)
    from safetensors.torch import save_file

    save_file(other.state_dict(), str(tmp_path / "a" / "adapter.safetensors"))  # weights without config
    with pytest.raises(DataError, match="checksum"):
        load_adapter(tmp_path / "a", image_encoder=image_encoder, lm=gpt2)


def test_save_never_clobbers_something_else(gpt2, image_encoder, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    adapter = _build("clipcap", gpt2, image_encoder)
    with pytest.raises(DataError, match="not a nofree adapter"):
        adapter.save_pretrained(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    adapter.save_pretrained(tmp_path / "a")
    adapter.save_pretrained(tmp_path / "a")  # the same adapter again: fine
    with pytest.raises(DataError, match="different clipcap adapter"):
        _build("clipcap", gpt2, image_encoder, prefix_length=3).save_pretrained(tmp_path / "a")
    with pytest.raises(DataError, match="different clipcap adapter"):
        _build("flamingo", gpt2, image_encoder).save_pretrained(tmp_path / "a")
    _build("flamingo", gpt2, image_encoder).save_pretrained(tmp_path / "a", overwrite=True)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["kind"] == "flamingo"


# --- training loop -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lit", "clipcap"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(kind, gpt2, image_encoder, tmp_path):
    settings = dict(batch_size=3, lr=1e-2, seed=5, progress=False, warmup_steps=2)
    full = _build(kind, gpt2, image_encoder)
    examples = _examples(full, repeats=2)
    result = train_adapter(full, examples, epochs=3, out_dir=tmp_path / "full", **settings)
    assert result.steps == 3 * 3 and [h["epoch"] for h in result.history] == [1, 2, 3]

    part = _build(kind, gpt2, image_encoder)
    first = train_adapter(part, examples, epochs=1, out_dir=tmp_path / "part", **settings)
    assert first.steps == 3
    again = _build(kind, gpt2, image_encoder)  # a fresh process: new adapter, state from disk
    _train_steps(again, examples, steps=1)  # its in-memory weights must not matter
    resumed = train_adapter(again, examples, epochs=3, out_dir=tmp_path / "part", resume=True, **settings)
    assert resumed.steps == 9 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    _assert_same_state(_state(full), again)
    assert resumed.step_losses == result.step_losses
    with pytest.raises(DataError, match="other settings"):
        train_adapter(_build(kind, gpt2, image_encoder), examples, epochs=4, out_dir=tmp_path / "part",
                      resume=True, **{**settings, "lr": 0.5})


def test_training_writes_checkpoint_curve_and_validation(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    train = _examples(adapter, captions=CAPTIONS[:2], repeats=2)
    val = _examples(adapter, captions=CAPTIONS[2:])
    result = train_adapter(adapter, train, val_pairs=val, epochs=2, batch_size=2, lr=1e-2,
                           warmup_steps=1, out_dir=tmp_path / "run", progress=False)
    assert all("val_loss" in h and h["val_loss"] > 0 for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    out = tmp_path / "run"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "training" / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == result.steps == 4
    from safetensors import safe_open

    with safe_open(str(out / "training" / "optimizer.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "rng.torch" in names and any(n.endswith(".exp_avg_sq") for n in names)
    loaded = load_adapter(out, image_encoder=image_encoder, lm=gpt2)
    _assert_same_state(_state(adapter), loaded)
    with pytest.raises(DataError, match="not empty"):
        train_adapter(adapter, train, epochs=1, batch_size=2, lr=1e-2, out_dir=out, progress=False)


def test_validation_warnings_name_each_failure_in_plain_words():
    healthy = {"image_gap": 0.9, "val_distinct": 0.95, "val_stutter": 0.0}
    assert validation_warnings("flamingo", healthy) == []
    found = validation_warnings("flamingo", {"image_gap": 0.01, "val_distinct": 0.1, "val_stutter": 0.4})
    assert len(found) == 3
    assert "barely uses the image" in found[0] and "same caption for many photos (only 10%" in found[1]
    assert "40% of validation captions repeat a word back to back" in found[2]
    assert validation_warnings("lit", {"val_loss": 1.0}) == []   # LiT records hold none of these
    # SmallCap's shuffle keeps the retrieved captions: a small gap means it follows them
    smallcap, = validation_warnings("smallcap", {"image_gap": 0.03, "val_distinct": 0.9})
    assert "beyond its retrieved captions" in smallcap and "--method retrieval" in smallcap
    # with the gap's interval and the rise when the prompt moves too, the warning names both
    smallcap, = validation_warnings("smallcap", {"image_gap": 0.03, "image_gap_low": 0.012,
                                                 "image_gap_high": 0.047, "photo_gap": 0.41})
    assert "0.030 (95% interval 0.012 to 0.047)" in smallcap and "rises 0.41 when the prompt" in smallcap


def test_image_gap_has_an_interval_and_a_prompted_adapter_a_photo_gap(gpt2, image_encoder):
    from nofree.adapters.smallcap import SmallCap

    torch.manual_seed(0)
    adapter = SmallCap(image_encoder, gpt2, examples=1, num_latents=4, heads=2, dim_head=8, xattn_every=1)
    base = _examples(adapter, repeats=2)
    prompts = [adapter.prompt_text([caption]) for caption in CAPTIONS]
    examples = Examples(base.image_features, base.image_index, base.texts, image_prompts=prompts)
    # the prompts move with the features only when asked to
    moved = examples.with_images_shuffled(prompts=True)
    kept = examples.with_images_shuffled()
    assert kept.image_prompts == prompts and moved.image_prompts != prompts
    for row in range(len(prompts)):
        source = next(i for i in range(len(prompts))
                      if torch.equal(moved.image_features[row], base.image_features[i]))
        assert source != row and moved.image_prompts[row] == prompts[source]
    # a fresh adapter is the frozen LM: the features change nothing, another photo's prompt does
    fresh = adapter.evaluate(examples, captions=False)
    assert fresh["image_gap"] == 0.0 and fresh["image_gap_low"] == fresh["image_gap_high"] == 0.0
    assert abs(fresh["photo_gap"]) > 1e-3  # a random tiny LM: the loss moves, either way
    # one batch or one caption at a time: the same token-weighted loss
    assert adapter.evaluate(examples, batch_size=1, captions=False)["val_loss"] == pytest.approx(fresh["val_loss"])
    with torch.no_grad():
        for block in adapter.blocks:  # a block that adds something: a gap inside its interval
            nn.init.normal_(block.to_out.weight, std=0.5)
    found = adapter.evaluate(examples, captions=False)
    assert found["image_gap"] != 0.0 and found["image_gap_low"] <= found["image_gap"] <= found["image_gap_high"]
    # adapters without prompts report no photo gap
    clipcap = _build("clipcap", gpt2, image_encoder)
    assert "photo_gap" not in clipcap.evaluate(_examples(clipcap), captions=False)


def test_min_steps_raises_the_epochs_of_a_small_set_and_explicit_epochs_stay(gpt2, image_encoder, tmp_path):
    from nofree.adapters.recipes import RECIPES, recipe_epochs

    adapter = _build("clipcap", gpt2, image_encoder)
    train = _examples(adapter, captions=CAPTIONS[:2], repeats=2)     # 4 captions: 2 steps an epoch
    result = train_adapter(adapter, train, epochs=1, batch_size=2, lr=1e-2, warmup_steps=1, min_steps=5,
                           out_dir=tmp_path / "run", progress=False)
    assert result.steps == 6 and len(result.history) == 3           # ceil(5 / 2) epochs
    enough = train_adapter(_build("clipcap", gpt2, image_encoder), train, epochs=4, batch_size=2, lr=1e-2,
                           min_steps=5, out_dir=tmp_path / "enough", progress=False)
    assert enough.steps == 8                                         # already past min_steps
    assert recipe_epochs("clipcap", None) == (RECIPES["clipcap"]["epochs"], RECIPES["clipcap"]["min_steps"])
    assert recipe_epochs("clipcap", 1) == (1, 0)                     # given epochs are exact


def test_bf16_autocast_training_learns_and_keeps_float32_weights(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    train = _examples(adapter, captions=CAPTIONS[:2], repeats=2)
    frozen = {n: p.clone() for n, p in gpt2.model.named_parameters()}
    result = train_adapter(adapter, train, epochs=3, batch_size=2, lr=1e-2, warmup_steps=1,
                           precision="bf16", out_dir=tmp_path / "run", progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in gpt2.model.named_parameters())
    state = json.loads((tmp_path / "run" / "training" / "state.json").read_text())
    assert state["settings"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        train_adapter(adapter, train, epochs=1, batch_size=2, lr=1e-2, precision="fp16",
                      out_dir=tmp_path / "other", progress=False)


def test_lit_as_magic_scorer_is_its_temperature_times_joint_cosine(image_encoder):
    adapter = _build("lit", None, image_encoder)
    scorer = adapter.scorer()
    image_emb = scorer.embed_images(IMAGES[:2])                      # frozen encoder embeddings
    torch.testing.assert_close(image_emb, image_encoder.encode(IMAGES[:2]))
    texts = [CAPTIONS[:3], CAPTIONS[1:4]]
    scores = scorer.score(image_emb, texts)
    joint = adapter.encode_image(IMAGES[:2])
    expected = torch.stack([adapter.logit_scale * joint[b] @ adapter.encode_text(texts[b]).T for b in range(2)])
    torch.testing.assert_close(scores, expected)
    assert adapter.scorer(temperature=1.0).score(image_emb, texts).abs().max() <= 1.0 + 1e-5


def test_lit_validation_metric_is_retrieval(image_encoder, tmp_path):
    adapter = _build("lit", None, image_encoder)
    examples = _examples(adapter, repeats=2)
    result = train_adapter(adapter, examples, val_pairs=examples, epochs=2, batch_size=4, lr=1e-2,
                           out_dir=tmp_path / "lit", progress=False)
    assert all(0.0 <= h["val_r1"] <= 1.0 for h in result.history)


def test_bad_input_is_refused_before_anything_is_written(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    empty = Examples(torch.zeros(0, image_encoder.embed_dim), torch.zeros(0, dtype=torch.long), [])
    with pytest.raises(DataError, match="training split is empty"):
        train_adapter(adapter, empty, epochs=1, batch_size=2, lr=1e-3, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(DataError, match="training split is empty"):
        train_adapter(adapter, [], epochs=1, batch_size=2, lr=1e-3, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_adapter(adapter, _examples(adapter), epochs=1, batch_size=2, lr=0, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="empty caption"):
        adapter.batch_loss(Examples(image_encoder.encode(IMAGES[:1]), torch.tensor([0]), [""]).batch(
            torch.tensor([0]), adapter.device))


def test_train_entry_points_refuse_bad_input_before_loading_models(tmp_path):
    from nofree.adapters.train import train_clipcap, train_flamingo, train_lit

    image = tmp_path / "0.png"
    IMAGES[0].save(image)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "0.png", "captions": ["a dog"], "split": "val"}) + "\n")
    specs = {"image_encoder": "no-such-backend:x", "lm": "no-such-backend:y"}
    for train in (train_clipcap, train_flamingo):
        with pytest.raises(DataError, match="split='train'"):
            train(pairs, out=tmp_path / "out", epochs=1, **specs)
    with pytest.raises(DataError, match="split='train'"):
        train_lit(pairs, out=tmp_path / "out", image_encoder="no-such-backend:x",
                  text_encoder="no-such-backend:z")
    assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        train_clipcap(pairs, out=tmp_path / "busy", train_split="val", **specs)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


def test_prepare_examples_encodes_each_image_once_and_skips_unreadable(gpt2, tmp_path):
    paths = []
    for i, image in enumerate(IMAGES[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    pairs = [Pair(paths[0], ("a dog on the beach", "a dog")), Pair(str(tmp_path / "bad.png"), ("x",)),
             Pair(paths[1], ("the red bus",)), Pair(paths[2], ()), Pair(paths[0], ("a dog again",))]
    encoder = FakeImageEncoder()
    adapter = ClipCap(encoder, gpt2, prefix_length=2)
    examples = prepare_examples(adapter, pairs)
    assert examples.texts == ["a dog on the beach", "a dog", "the red bus", "a dog again"]
    assert examples.image_index.tolist() == [0, 0, 1, 0]  # one row per distinct image
    assert examples.skipped == [str(tmp_path / "bad.png")]
    torch.testing.assert_close(examples.image_features, encoder.encode(IMAGES[:2]))
    calls = encoder.calls
    train_adapter(adapter, examples, epochs=3, batch_size=2, lr=1e-3, out_dir=tmp_path / "run",
                  progress=False)
    assert encoder.calls == calls  # training reads the precomputed features, never the encoder
    from nofree.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache")
    cached = prepare_examples(adapter, pairs, cache=cache)  # unreadable image: still skipped
    torch.testing.assert_close(cached.image_features, examples.image_features)
    calls = encoder.calls
    assert torch.equal(prepare_examples(adapter, pairs[2:3], cache=cache).image_features,
                       cached.image_features[1:2]) and encoder.calls == calls  # served from disk


def test_hflip_views_are_encoded_once_cached_apart_and_drawn_per_row(gpt2, tmp_path):
    from PIL import ImageOps

    from nofree.adapters.augment import MirroredImageEncoder
    from nofree.cache import EmbeddingCache

    paths = []
    for i, image in enumerate(IMAGES[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        # left and right halves differ, so the mirrored view has other features
        array = np.asarray(image).copy()
        array[:, :4] = 0
        Image.fromarray(array).save(paths[-1])
    pairs = [Pair(path, ("a caption", "another caption")) for path in paths]
    encoder = FakeImageEncoder()
    adapter = ClipCap(encoder, gpt2, prefix_length=2)
    cache = EmbeddingCache(tmp_path / "cache")
    examples = prepare_examples(adapter, pairs, cache=cache, augment="hflip")
    mirrored = [ImageOps.mirror(Image.open(path).convert("RGB")) for path in paths]
    assert examples.view_features.shape == (1, *examples.image_features.shape)
    torch.testing.assert_close(examples.view_features[0], encoder.encode(mirrored))
    assert not torch.allclose(examples.view_features[0], examples.image_features)
    assert MirroredImageEncoder(encoder).spec == "fake-image:v1#hflip"
    calls = encoder.calls
    again = prepare_examples(adapter, pairs, cache=cache, augment="hflip")  # both views from disk
    assert encoder.calls == calls and torch.equal(again.view_features, examples.view_features)

    rows = torch.arange(len(examples)).repeat(20)
    plain = examples.batch(rows, adapter.device).image_features
    assert torch.equal(plain, examples.image_features[examples.image_index[rows]])
    drawn = examples.batch(rows, adapter.device, views=torch.Generator().manual_seed(0)).image_features
    own = (drawn == plain).all(-1)
    flipped = (drawn == examples.view_features[0][examples.image_index[rows]]).all(-1)
    assert bool((own | flipped).all()) and 0.3 < float(flipped.float().mean()) < 0.7
    with pytest.raises(ValueError, match="without views"):
        prepare_examples(adapter, prepare_examples(adapter, pairs), augment="hflip")
    with pytest.raises(ValueError, match="augment must be"):
        prepare_examples(adapter, pairs, augment="rotate")
    train_adapter(adapter, pairs, epochs=1, batch_size=2, lr=1e-3, out_dir=tmp_path / "run",
                  progress=False, augment="hflip", cache=cache)
    state = json.loads((tmp_path / "run" / "training" / "state.json").read_text())
    assert state["settings"]["augment"] == "hflip"
    with pytest.raises(DataError, match="augment"):  # a resumed run keeps its augmentation
        train_adapter(adapter, pairs, epochs=2, batch_size=2, lr=1e-3, out_dir=tmp_path / "run",
                      progress=False, augment="none", cache=cache, resume=True)


def test_crops_add_four_corner_views_to_the_mirrored_one(gpt2, tmp_path):
    from PIL import ImageOps

    from nofree.adapters.augment import corner_crop, view_encoders

    image = Image.fromarray(np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3))  # 20 wide, 10 high
    crops = {corner: np.asarray(corner_crop(corner)(image)) for corner in ("tl", "tr", "bl", "br")}
    full = np.asarray(image)
    assert all(c.shape == (8, 16, 3) for c in crops.values())
    assert (crops["tl"] == full[:8, :16]).all() and (crops["br"] == full[2:, 4:]).all()
    assert (crops["tr"] == full[:8, 4:]).all() and (crops["bl"] == full[2:, :16]).all()
    with pytest.raises(ValueError, match="corner must be"):
        corner_crop("middle")

    encoder = FakeImageEncoder()
    views = view_encoders(encoder, "crops")
    assert [v.spec for v in views] == ["fake-image:v1#hflip"] + [f"fake-image:v1#crop80-{c}" for c in
                                                                ("tl", "tr", "bl", "br")]
    paths = []
    for i, photo in enumerate(IMAGES[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        array = np.asarray(photo).copy()
        array[:2, :3] = 0  # the top-left corner differs from the rest
        Image.fromarray(array).save(paths[-1])
    adapter = ClipCap(encoder, gpt2, prefix_length=2)
    examples = prepare_examples(adapter, [Pair(path, ("a caption",)) for path in paths], augment="crops")
    opened = [Image.open(path).convert("RGB") for path in paths]
    assert examples.view_features.shape == (5, *examples.image_features.shape)
    torch.testing.assert_close(examples.view_features[0], encoder.encode([ImageOps.mirror(o) for o in opened]))
    torch.testing.assert_close(examples.view_features[4], encoder.encode([corner_crop("br")(o) for o in opened]))
    assert not torch.allclose(examples.view_features[1], examples.view_features[4])


def test_adapter_captioner(gpt2, image_encoder, tmp_path):
    adapter = _build("clipcap", gpt2, image_encoder)
    captioner = AdapterCaptioner(adapter, max_tokens=5)
    path = tmp_path / "img.png"
    IMAGES[0].save(path)
    captions = captioner.caption([IMAGES[0], str(path), IMAGES[1]])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions[0] == captions[1]
    with pytest.raises(SpecError, match="trained on"):
        AdapterCaptioner(adapter, FakeImageEncoder(spec="fake-image:other"))
    flamingo = _build("flamingo", gpt2, image_encoder)
    assert len(AdapterCaptioner(flamingo, max_tokens=4, beams=2).caption(IMAGES[:2])) == 2
    # each adapter class's own decoding defaults; explicit settings win
    from nofree.adapters.captioning import DECODING
    from nofree.adapters.smallcap import SmallCap
    assert captioner.options["beams"] == 3 and AdapterCaptioner(flamingo).options["beams"] == 3
    assert AdapterCaptioner(flamingo, beams=1).options["beams"] == 1 and DECODING["beams"] == 1
    assert SmallCap.decoding == {**DECODING, "beams": 3, "drafts": 2, "nbest": 3, "with_retrieved": True}
    assert AdapterCaptioner(adapter, beams=1, no_repeat_ngram=0).options["beams"] == 1
    assert AdapterCaptioner(adapter, no_repeat_ngram=0).options["no_repeat_ngram"] == 0


def test_adapter_captioner_nbest_returns_the_consensus_choice_of_the_beams(gpt2, image_encoder):
    from nofree.adapters.captioning import pool_cider
    from nofree.core import OptionError, clean_caption

    adapter = _build("clipcap", gpt2, image_encoder)  # a random mapper: each image its own beams
    features = image_encoder.encode(IMAGES[:3])
    captioner = AdapterCaptioner(adapter, max_tokens=6, beams=4, nbest=4)
    returned = adapter.caption_features(features, returns=4, **captioner.options)
    got = captioner.caption(IMAGES[:3])
    for row, caption in enumerate(got):
        candidates = [clean_caption(t) for t in returned[4 * row:4 * row + 4]]
        assert caption == candidates[pool_cider().choose(candidates)]
    # nbest 1 is the search's best; a default n-best follows a narrower beam; a larger one is an error
    assert AdapterCaptioner(adapter, max_tokens=6, beams=4, nbest=1).caption(IMAGES[:3]) == \
        [clean_caption(t) for t in returned[::4]]
    assert AdapterCaptioner(adapter, beams=1).nbest == 1 == AdapterCaptioner(adapter).nbest
    with pytest.raises(OptionError, match="beam width"):
        AdapterCaptioner(adapter, beams=2, nbest=3)


def test_adapter_captioner_cleans_captions(gpt2, image_encoder, monkeypatch):
    """A decoded "- a dog." (ClipCap often starts with a bullet) comes out as "A dog."."""
    adapter = _build("clipcap", gpt2, image_encoder)
    decoded = ['- a dog.', '"a cat on a sofa"\nmore text']
    monkeypatch.setattr(adapter, "caption_features", lambda features, **kw: decoded[:len(features)])
    assert AdapterCaptioner(adapter, max_tokens=5).caption(IMAGES[:2]) == ["A dog.", "A cat on a sofa"]


# --- on-disk format fixtures (each format version must keep loading) --------------------------------

#: A LiT adapter saved by format version 1 (fake backbones above): config.json and the weights.
LIT_V1_CONFIG = (
    '{"format":"nofree-adapter","format_version":1,"nofree_version":"0.1.0","kind":"lit","config"'
    ':{"embed_dim":12,"hidden_dim":null,"text_layers":0,"loss":"sigmoid","init_temperature":10.0,'
    '"init_bias":-10.0,"max_temperature":100.0},"backbone":{"image_encoder":"fake-image:v1","text'
    '_encoder":"fake-text:v1"},"dims":{"image_embed_dim":12,"text_embed_dim":16},"weights_sha256"'
    ':"2a1213d50f19a65d455b6c5ae1bc7a21739870d2d602ea492dd506785e4db225"}'
)
LIT_V1_WEIGHTS = (
    "SAEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJraW5kIjoibGl0IiwiZm9ybWF0Ijoibm9mcmVlLWFkYXB0ZXIifSwibG9nX3Rl"
    "bXBlcmF0dXJlIjp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOltdLCJkYXRhX29mZnNldHMiOlswLDRdfSwibG9naXRfYmlhcyI6"
    "eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbXSwiZGF0YV9vZmZzZXRzIjpbNCw4XX0sInRleHRfaGVhZC5iaWFzIjp7ImR0eXBl"
    "IjoiRjMyIiwic2hhcGUiOlsxMl0sImRhdGFfb2Zmc2V0cyI6WzgsNTZdfSwidGV4dF9oZWFkLndlaWdodCI6eyJkdHlwZSI6"
    "IkYzMiIsInNoYXBlIjpbMTIsMTZdLCJkYXRhX29mZnNldHMiOls1Niw4MjRdfX0gfrISQBi2H8GZDJk6wNYQvOrSX7zRZhU7"
    "QZw+vIuiZruYqr87EdsOvNua8LtXKym7ChFQPB6a9ztXGBI+CPWrPt4P6T7pFs8+ecRFPmu8bL6r/0C9s51Yvg3HNLwi2ZS+"
    "JLq1vJIvnb65thy+pe2HPh4bcb5X8/W9qQ0uPsZmEL7wKii9O1YwPRRkzD1g0pK8SAIJPznj5z1EauK9z1MKvr9anb5QsEm+"
    "3IEoP54raT7t/989qh5ivsSPGD60Z+w8Zg/SPCcmGT0C8ga/MCXIPqDIuL6nyNY9Tg7VPjtmqL7JBmq9qEZUvpz6Ej50usg9"
    "qrO0PWt/BL61gN8+WcWrPeYoXD4RUbC+SguoPgVgkD4Ca1e+mUqLveCkWb7TwKM9wIzTvkBY9L2XY1e+Cxb4vX03pT6cjL+9"
    "jD4ZvpbTAb8oiaI94m00PpTODr2OcCo+CBisPbD5/74NxF0+zckdPsCKyL7eBDy+2fvPve2aVr0blSG+O5SXPoSbbz7ACfi6"
    "mpHhPt4RJD7Jr6c9FD+QPhBz1D5ndgk+rVTHPhpn2jy0avE9OnEEP98iob0Ir969oVSiPYuIij30eM0+LcabvdOFvL1IBs6+"
    "yq4/PkAror2bxoW9oE1uvY4+jz6ZIY08gNFRPkh/H73nCw0+ZobyPqpXYL5VNeU+Hu4EvieWpr5xZtE9oaCePb795j5luqg+"
    "hmjyvePq6D6bh4S8oBaJvYgwWT6oopq++181PZW4Wr6ILLC+ZgILvRVLgr6uELY9Fh6ivvNxrz45g+A+dAGXPgEygL4PGSW9"
    "DniAPH7wQr60bCi+1PW0Pp3dSz3mtb8+t85pPpn2wT00ZFS+/LmrvoshMz5ndha+SKMHvkzSEz5mPHU+cD6jPT4cb76DQju+"
    "+gdoPpUXAL7coOS+GXLpPkjJnj7KaYm8v7qGPnlqwr5wrCE+6J/WPvkRqb31CZq+56Cyvt0CWj7Vbs69yjnGPrRyrz20mpA8"
    "N57+PUSuDj7b26g+rrwvPQNqNL4kImu9X4nOPsuxIb7DV16+2xXdvP7XSL4OxS8+v4rRvhOhcr485Iu+bRmxPk0ofT7sagg9"
    "ATt6voESrD4="
)


def test_format_v1_fixture_keeps_loading(tmp_path):
    import base64
    import hashlib

    folder = tmp_path / "lit-v1"
    folder.mkdir()
    (folder / "config.json").write_text(LIT_V1_CONFIG)
    (folder / "adapter.safetensors").write_bytes(base64.b64decode(LIT_V1_WEIGHTS))
    adapter = load_adapter(folder, image_encoder=FakeImageEncoder(), text_encoder=FakeTextEncoder())
    assert isinstance(adapter, LiT) and adapter.loss_kind == "sigmoid"
    assert adapter.logit_scale != pytest.approx(10.0) and float(adapter.logit_bias.detach()) != -10.0
    emb = adapter.encode_text(CAPTIONS)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert hashlib.sha256(base64.b64decode(LIT_V1_WEIGHTS)).hexdigest() == \
        json.loads(LIT_V1_CONFIG)["weights_sha256"]
    from safetensors.torch import load_file

    adapter.save_pretrained(tmp_path / "again")  # re-saving keeps every tensor exactly
    original = load_file(str(folder / "adapter.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize("kind", ["clipcap", "flamingo"])
def test_no_repeat_ngram_forbids_repeated_token_ngrams(kind, lm, image_encoder):
    adapter = _build(kind, lm, image_encoder)
    features = _examples(adapter, captions=CAPTIONS[:3]).image_features

    canon = adapter.word_ids()

    def repeats(row, n):  # tokens that are not words (-1) do not count
        words = [w for w in canon[torch.tensor(row, dtype=torch.long)].tolist() if w >= 0]
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return len(grams) != len(set(grams))

    free = adapter.generate(features, max_tokens=20, stop_at_period=False)
    for n, beams in ((2, 1), (3, 1), (2, 3)):
        rows = adapter.generate(features, max_tokens=20, stop_at_period=False, no_repeat_ngram=n, beams=beams)
        assert not any(repeats(row, n) for row in rows)
        if beams == 1:  # greedy rows agree with unconstrained decoding up to the first repeat
            for row, plain in zip(rows, free):
                if not repeats(plain, n):
                    assert row == plain


def test_no_repeat_word_ngram_compares_words_and_skips_the_prompt(gpt2):
    from nofree.adapters.captioning import NoRepeatWordNGram, word_ids

    canon = word_ids(gpt2.tokenizer, gpt2.vocab_size)
    upper, spaced = (gpt2.tokenize([text])[0][0] for text in ("A", " a"))
    assert upper != spaced and canon[upper] == canon[spaced]
    ids = gpt2.tokenize([" a red bus on a red"])[0]
    scores = torch.zeros(1, gpt2.vocab_size)
    banned = NoRepeatWordNGram(3, 0, canon)(torch.tensor([ids]), scores.clone())
    bus = gpt2.tokenize([" bus"])[0][0]
    assert banned[0, bus] == float("-inf") and torch.isfinite(banned[0, :bus]).all()
    # punctuation is not a word: "red-bus" after "a red bus on a red" repeats the 3-gram too
    hyphen = gpt2.tokenize([" a red bus on a red-"])[0]
    assert canon[gpt2.tokenize(["-"])[0][0]] == -1
    assert NoRepeatWordNGram(3, 0, canon)(torch.tensor([hyphen]), scores.clone())[0, bus] == float("-inf")
    # the same tokens as a prompt (before ``start``) ban nothing
    assert torch.equal(NoRepeatWordNGram(3, len(ids), canon)(torch.tensor([ids]), scores.clone()), scores)
