"""Learnability: each captioning adapter, trained for seconds on tiny config-built backbones, must
learn a task where the caption is a function of the image, and must fail once its image input is
zeroed. A broken image path (features never reaching the LM, a gate that cannot open, decoding that
drops the conditioning) fails here even when the training loss still falls.

Task: solid-colour photos (with pixel noise) of four colours; the caption names the colour in a
three-word sentence. Unseen photos are new noise draws of shades never trained on.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nofree.adapters.clipcap import ClipCap
from nofree.adapters.flamingo import Flamingo
from nofree.adapters.smallcap import SmallCap
from nofree.adapters.train import Examples, train_adapter
from nofree.lm.hf import load_hf_lm
from nofree.testing import TinyImageEncoder, make_tiny_lm_dir

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (235, 235, 235)}
# only 'red' is one token of the tiny tokenizer: the others are several, each of which must follow
CAPTION = "{} bus on the beach"
# SmallCap's prompt: retrieved captions that name no colour, so the colour must come from the image
PROMPT = "Similar images show: A bus on the beach. This image shows:"


def _photo(rgb, rng: np.random.Generator, shade: float) -> Image.Image:
    pixels = np.clip(np.array(rgb) * shade + rng.normal(0, 12, (8, 8, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def _photos(shades, seed):
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for shade in shades:
        for name, rgb in COLOURS.items():
            images.append(_photo(rgb, rng, shade))
            captions.append(CAPTION.format(name))
    return images, captions


def _features(adapter, images):
    encoder = adapter.image_encoder
    return encoder.encode_tokens(images) if adapter.feature_kind == "tokens" else encoder.encode(images)


def _build(kind, lm):
    encoder = TinyImageEncoder(dim=16, seed=3)
    torch.manual_seed(0)
    if kind == "clipcap":
        return ClipCap(encoder, lm, prefix_length=4, max_caption_tokens=12)
    if kind == "clipcap-transformer":
        return ClipCap(encoder, lm, prefix_length=2, mapper="transformer", clip_length=2, num_layers=1,
                       num_heads=2, max_caption_tokens=12)
    cls = SmallCap if kind == "smallcap" else Flamingo
    return cls(encoder, lm, num_latents=4, resampler_depth=1, heads=2, dim_head=8,
               xattn_every=1, gate_lr_scale=10.0, max_caption_tokens=12)



def _pretrained_tiny_lm(directory):
    """A tiny GPT-2 that has learnt the task's language but not its images: trained on the four
    captions as plain text (alone and after SmallCap's prompt), it gives each colour about a
    quarter of the probability where a caption starts. A random tiny LM's logits are too flat for a conditioning signal to show."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_lm_dir(directory, family="gpt2", seed=1, hidden=48)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    eos = tokenizer.eos_token_id
    texts = [CAPTION.format(name) for name in COLOURS]
    texts += [f"{PROMPT} {text}" for text in texts]  # also after SmallCap's prompt, as it will read them
    rows = [[eos, *tokenizer.encode(text), eos] for text in texts]
    width = max(map(len, rows))
    ids = torch.tensor([row + [eos] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in rows])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return load_hf_lm(directory, spec=f"local:{directory}")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return _pretrained_tiny_lm(tmp_path_factory.mktemp("lm"))


@pytest.mark.parametrize("kind,lr", [("clipcap", 3e-2), ("clipcap-transformer", 1e-2), ("flamingo", 1e-2),
                                     ("smallcap", 1e-2)])
def test_adapter_learns_a_caption_that_follows_from_the_image(kind, lr, lm, tmp_path):
    adapter = _build(kind, lm)
    images, captions = _photos([0.8, 0.9, 1.0], seed=0)
    repeats = 16
    prompts = [PROMPT] * len(images) if kind == "smallcap" else None
    examples = Examples(image_features=_features(adapter, images), image_prompts=prompts,
                        image_index=torch.arange(len(images)).repeat(repeats), texts=captions * repeats)
    train_adapter(adapter, examples, epochs=4, batch_size=8, lr=lr, warmup_steps=10,
                  out_dir=tmp_path / kind, progress=False)

    unseen, truth = _photos([0.85, 0.95], seed=1)
    features = _features(adapter, unseen)
    prompts = [PROMPT] * len(unseen) if kind == "smallcap" else None
    checks = adapter.evaluate(Examples(image_features=features, image_index=torch.arange(len(unseen)),
                                       texts=truth, image_prompts=prompts))
    assert checks["image_gap"] > 0.2  # the loss depends on which photo a caption goes with
    written = [text.strip() for text in adapter.caption_features(features, prompts=prompts, stop_at_period=False)]
    assert written == truth
    blind = adapter.caption_features(torch.zeros_like(features), prompts=prompts, stop_at_period=False)
    assert sum(w.strip() == t for w, t in zip(blind, truth)) <= len(truth) // len(COLOURS)
