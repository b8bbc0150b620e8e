"""Label inputs of the captioning adapters (nofree.adapters.label_input): the image encoder's
classifier read as words, as an extra input of ClipCap and the Flamingo-style adapter."""
from __future__ import annotations

import pytest
import torch

from nofree.adapters.base import load_adapter
from nofree.adapters.clipcap import ClipCap
from nofree.adapters.flamingo import Flamingo
from nofree.adapters.train import Examples, train_adapter, with_label_inputs
from nofree.anchors.labels import LABEL_TEMPLATE, label_view
from nofree.core import DataError, SpecError, l2_normalize
from nofree.encoders.heads import ClassifierHead
from nofree.testing import TinyImageEncoder, TinyTextEncoder, tiny_lm
from tests.test_labels import COLOURS, HeadedImageEncoder, photos

NAMES = tuple(COLOURS) + ("dog", "cat")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm"), family="llama")


@pytest.fixture(scope="module")
def encoders():
    image = HeadedImageEncoder()
    image.head = ClassifierHead(torch.randn(len(NAMES), image.embed_dim, generator=torch.Generator().manual_seed(0)),
                                NAMES)
    return image, TinyTextEncoder(dim=12)


def _build(kind, lm, encoders, **kw):
    image, text = encoders
    torch.manual_seed(0)
    settings = {"label_encoder": text.spec, "label_dim": text.embed_dim, **kw}
    if kind == "clipcap":
        adapter = ClipCap(image, lm, prefix_length=2, **settings)
    else:
        adapter = Flamingo(image, lm, num_latents=4, heads=2, dim_head=8, xattn_every=1, **settings)
    if settings["label_encoder"]:
        adapter.labels.embed_label_names(text)
    return adapter


@pytest.mark.parametrize("kind", ["clipcap", "flamingo"])
def test_label_view_is_the_bridge_view_of_the_pooled_embedding(kind, lm, encoders):
    image, text = encoders
    adapter = _build(kind, lm, encoders)
    names = l2_normalize(text.encode([LABEL_TEMPLATE.format(n) for n in NAMES]))
    assert torch.allclose(adapter.labels.label_emb, names)
    emb = image.encode(photos("red", 3, seed=0))
    expected = label_view(emb, image.head.weight, names, adapter.labels.temperature)
    assert torch.allclose(adapter.labels(emb), expected, atol=1e-6)


def test_fresh_flamingo_with_label_inputs_is_still_the_frozen_lm(lm, encoders):
    image, _ = encoders
    adapter = _build("flamingo", lm, encoders)
    ids = torch.tensor(lm.tokenize(["a red square"]))
    with torch.no_grad():
        assert torch.equal(adapter.lm_logits(image.encode_tokens(photos("red", 1, seed=0)), ids),
                           lm.model(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["clipcap", "flamingo"])
def test_the_label_input_reaches_the_loss_and_round_trips(kind, lm, encoders, tmp_path):
    image, _ = encoders
    adapter = _build(kind, lm, encoders)
    pics = photos("red", 2, seed=1) + photos("blue", 2, seed=2)
    features = image.encode_tokens(pics) if kind == "flamingo" else image.encode(pics)
    texts = ["a red square", "a red square", "a blue square", "a blue square"]
    examples = Examples(image_features=features, image_index=torch.arange(4), texts=texts)
    # two steps: a fresh Flamingo-style block's output projections are 0, so nothing upstream of
    # them gets a gradient before they have moved once
    train_adapter(adapter, examples, epochs=2, batch_size=4, lr=1e-2, warmup_steps=0, out_dir=tmp_path / "run",
                  progress=False)
    adapter.train()
    adapter.batch_loss(examples.batch(torch.arange(4), adapter.device)).backward()
    first = adapter.mapper.net[0] if kind == "clipcap" else adapter.label_proj
    label_grad = first.weight.grad[:, image.embed_dim:] if kind == "clipcap" else first.weight.grad
    assert label_grad.abs().sum() > 0  # the label view is an input the loss depends on
    assert adapter.labels.label_emb.grad is None and "labels.label_emb" in adapter.state_dict()
    adapter.eval()
    adapter.save_pretrained(tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", image_encoder=image, lm=lm)  # no text encoder needed
    assert loaded.config() == adapter.config() and loaded.config()["label_dim"] == 12
    assert torch.equal(loaded.labels.label_emb, adapter.labels.label_emb)
    assert loaded.caption_features(features, max_tokens=4) == adapter.caption_features(features, max_tokens=4)


def test_label_inputs_fail_clearly(lm, encoders, tmp_path):
    image, text = encoders
    adapter = _build("clipcap", lm, encoders, label_encoder=text.spec)
    adapter.labels.label_emb.zero_()
    with pytest.raises(RuntimeError, match="embed_label_names"):
        adapter.prefix(image.encode(photos("red", 1, seed=0)))
    with pytest.raises(SpecError, match="set up for"):
        adapter.labels.embed_label_names(TinyTextEncoder(dim=12, seed=5))
    with pytest.raises(SpecError, match="label_dim"):
        _build("clipcap", lm, encoders, label_dim=7)
    with pytest.raises(ValueError, match="classifier head"):
        ClipCap(TinyImageEncoder(dim=16), lm, label_encoder=text.spec, label_dim=12)
    # a saved adapter with label inputs, loaded over an image encoder without a head
    trained = _build("clipcap", lm, encoders)
    trained.save_pretrained(tmp_path / "a")
    headless = HeadedImageEncoder()
    with pytest.raises(DataError, match="classifier head"):
        load_adapter(tmp_path / "a", image_encoder=headless, lm=lm)


def test_auto_label_inputs_follow_the_image_encoder(encoders):
    image, _ = encoders
    assert with_label_inputs(TinyImageEncoder(dim=16), {"label_encoder": "auto"}) == ({"label_encoder": ""}, None)
    assert with_label_inputs(image, {"mapper": "mlp"}) == ({"mapper": "mlp"}, None)
    hparams, names = with_label_inputs(image, {"label_encoder": ""})
    assert hparams == {"label_encoder": ""} and names is None
