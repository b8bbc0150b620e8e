"""The label bridge: the image encoder's classifier head, read as words, beside ASIF."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.asif import ASIF
from nofree.anchors.calibration import choose_temperature
from nofree.anchors.labels import LABEL_DEFAULTS, Bridged, LabelBridge, bridge_for, label_view
from nofree.anchors.pipeline import AsifPipeline
from nofree.cli import main
from nofree.core import DataError, l2_normalize
from nofree.decoding.scorers import AsifScorer
from nofree.encoders.heads import ClassifierHead
from nofree.testing import TinyImageEncoder, TinyTextEncoder

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
OTHER_CLASSES = ("dog", "cat", "bicycle")


class HeadedImageEncoder(TinyImageEncoder):
    """The tiny image encoder with a classifier head set from outside (``None``: no head)."""

    def __init__(self, head: ClassifierHead | None = None) -> None:
        super().__init__(dim=16, seed=0)
        self.head = head

    def classifier_head(self):
        return self.head


def photos(colour: str, n: int, seed: int) -> list[Image.Image]:
    """``n`` solid photos of ``colour``, each channel shifted by up to ±25."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shift = torch.randint(-25, 26, (3,), generator=gen).tolist()
        out.append(Image.new("RGB", (16, 16), tuple(min(255, max(0, c + s)) for c, s in zip(COLOURS[colour], shift))))
    return out


@pytest.fixture(scope="module")
def toy():
    """A colour world: a head that recognises the colours (prototype weights from separate photos),
    anchors whose captions are *shuffled* (they say nothing about their photos), held-out photos
    and one caption per colour."""
    encoder, text_encoder = HeadedImageEncoder(), TinyTextEncoder(dim=32)
    names = tuple(COLOURS) + OTHER_CLASSES
    protos = torch.stack([encoder.encode(photos(c, 8, seed=100 + i)).mean(0) for i, c in enumerate(COLOURS)])
    protos = l2_normalize(protos - protos.mean(0))
    other = l2_normalize(torch.randn(len(OTHER_CLASSES), 16, generator=torch.Generator().manual_seed(3)))
    encoder.head = ClassifierHead(torch.cat([protos, 0.3 * other]), names)
    captions = [f"a {c} square" for c in COLOURS]
    anchor_photos = [im for i, c in enumerate(COLOURS) for im in photos(c, 6, seed=i)]
    anchor_captions = [captions[(i * 7 + 3) % len(captions)] for i in range(len(anchor_photos))]  # shuffled
    anchors = AnchorSet(encoder.encode(anchor_photos), text_encoder.encode(anchor_captions), tuple(anchor_captions),
                        encoder.spec, text_encoder.spec)
    held = torch.cat([encoder.encode(photos(c, 3, seed=50 + i)) for i, c in enumerate(COLOURS)])
    owner = torch.arange(len(COLOURS)).repeat_interleave(3)
    return encoder, text_encoder, anchors, held, owner, text_encoder.encode(captions)


def t2i_hits(sim: torch.Tensor, owner: torch.Tensor) -> float:
    """Share of captions (columns) whose best photo is one of theirs."""
    return (owner[sim.argmax(0)] == torch.arange(sim.shape[1])).float().mean().item()


def test_the_bridge_finds_what_the_head_sees_when_the_anchors_cannot(toy):
    encoder, text_encoder, anchors, held, owner, caption_emb = toy
    plain = AsifPipeline.from_anchors(anchors, encoder, text_encoder, label_weight=0)
    bridged = AsifPipeline.from_anchors(anchors, encoder, text_encoder, label_weight=5.0)
    assert isinstance(plain.asif, ASIF) and isinstance(bridged.asif, LabelBridge)
    assert t2i_hits(plain.similarity(held, caption_emb), owner) <= 0.5      # the anchors are shuffled
    assert t2i_hits(bridged.asif.label_similarity(held, caption_emb), owner) == 1.0
    assert t2i_hits(bridged.similarity(held, caption_emb), owner) == 1.0
    # the same bridge reading a head whose class names are rotated finds the wrong colours
    names = encoder.head.names
    rotated = ClassifierHead(encoder.head.weight, names[1:4] + names[:1] + names[4:])
    wrong = bridge_for(ASIF().fit(anchors), anchors, HeadedImageEncoder(rotated), text_encoder)
    assert t2i_hits(wrong.label_similarity(held, caption_emb), owner) == 0.0


def test_weight_zero_or_no_head_is_plain_asif(toy):
    encoder, text_encoder, anchors, held, _, caption_emb = toy
    expected = ASIF().fit(anchors).similarity(held, caption_emb)
    for pipeline in (AsifPipeline.from_anchors(anchors, encoder, text_encoder, label_weight=0.0),
                     AsifPipeline.from_anchors(anchors, HeadedImageEncoder(None), text_encoder)):
        assert torch.equal(pipeline.similarity(held, caption_emb), expected)
        assert pipeline.label_settings == {"label_weight": 0.0}
    defaults = AsifPipeline.from_anchors(anchors, encoder, text_encoder)
    assert defaults.label_settings == {"label_weight": LABEL_DEFAULTS["weight"],
                                       "label_temperature": LABEL_DEFAULTS["temperature"]}


def test_the_fused_similarity_keeps_asif_spread_on_the_anchors(toy):
    encoder, text_encoder, anchors, *_ = toy
    bridge = AsifPipeline.from_anchors(anchors, encoder, text_encoder, label_weight=3.0).asif
    asif_sim = torch.as_tensor(bridge.asif.similarity(anchors.image, anchors.text))
    fused = bridge.similarity(anchors.image, anchors.text)
    assert fused.std().item() == pytest.approx(asif_sim.std().item(), rel=1e-4)
    assert not torch.allclose(fused / fused.std(), asif_sim / asif_sim.std(), atol=1e-3)


def test_transformed_sides_refit_and_scorer_give_the_same_numbers(toy):
    encoder, text_encoder, anchors, held, _, caption_emb = toy
    bridge = AsifPipeline.from_anchors(anchors, encoder, text_encoder).asif
    expected = bridge.similarity(held, caption_emb)
    pool = bridge.transform(caption_emb, modality="text")
    assert isinstance(pool, Bridged)
    assert torch.allclose(bridge.similarity(held, pool), expected, atol=1e-6)
    assert torch.allclose(bridge.similarity(bridge.transform(held, modality="image"), pool), expected, atol=1e-6)
    assert torch.allclose(bridge.refit(anchors).similarity(held, caption_emb), expected, atol=1e-6)
    with pytest.raises(DataError, match="pass the embeddings"):
        bridge.similarity(held, bridge.asif.transform(caption_emb, modality="text"))
    scorer = AsifScorer(bridge, text_encoder, temperature=2.0, packed=False)
    texts = [[f"a {c} square" for c in COLOURS]] * len(held)
    for _ in range(2):  # the second call reads the cached image representations
        assert torch.allclose(scorer.score(held, texts), 2.0 * expected, atol=1e-5)


def test_label_view_is_a_unit_mixture_of_the_class_names():
    weight = torch.eye(3, 4)
    label_emb = l2_normalize(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    image = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]])
    sharp = label_view(image, weight, label_emb, temperature=1e-3)
    assert torch.allclose(sharp, label_emb[[0, 2]], atol=1e-5)       # t -> 0: the top class's name
    flat = label_view(image, weight, label_emb, temperature=1e3)
    assert torch.allclose(flat[0], flat[1], atol=1e-2)               # t -> inf: every name alike
    assert torch.allclose(flat.norm(dim=1), torch.ones(2))


def test_calibration_refits_the_bridge_on_each_fold(toy):
    encoder, text_encoder, anchors, *_ = toy
    bridge = AsifPipeline.from_anchors(anchors, encoder, text_encoder).asif
    bridged, plain = choose_temperature(anchors, bridge), choose_temperature(anchors, bridge.asif)
    assert bridged.folds >= 2 and bridged.value in bridged.grid
    assert bridged.nll != plain.nll                # the folds' scores are the bridge's, not plain ASIF's


@pytest.mark.parametrize("weight, temperature, words", [
    (-1.0, 0.25, "label weight"), (float("nan"), 0.25, "label weight"), (True, 0.25, "label weight"),
    (1.0, 0.0, "label temperature"), (1.0, float("inf"), "label temperature")])
def test_bad_settings_are_named(toy, weight, temperature, words):
    encoder, text_encoder, anchors, *_ = toy
    with pytest.raises(DataError, match=words):
        AsifPipeline.from_anchors(anchors, encoder, text_encoder, label_weight=weight, label_temperature=temperature)
    with pytest.raises(DataError, match=words):  # checked even where the encoder has no head
        AsifPipeline.from_anchors(anchors, HeadedImageEncoder(None), text_encoder, label_weight=weight,
                                  label_temperature=temperature)


def test_a_head_of_other_dimensions_is_refused(toy):
    encoder, text_encoder, anchors, *_ = toy
    head = ClassifierHead(torch.randn(2, 7), ("a", "b"))
    with pytest.raises(DataError, match="7-d image embeddings"):
        bridge_for(ASIF().fit(anchors), anchors, HeadedImageEncoder(head), text_encoder)
    with pytest.raises(DataError, match="one weight row per class name"):
        ClassifierHead(torch.randn(2, 7), ("a",))


def test_cli_takes_the_weight_where_asif_compares(tmp_path):
    from click.testing import CliRunner

    image = tmp_path / "a.png"
    photos("red", 1, seed=0)[0].save(image)
    result = CliRunner().invoke(main, ["caption", "--method", "magic", "--scorer", "hf-clip:some/clip",
                                       "--label-weight", "1", str(image)])
    assert result.exit_code != 0 and "--label-weight" in result.output and "--anchors" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["classify", "--anchors", str(tmp_path), "--label", "x",
                                       "--label-weight", "-1", str(image)])
    assert result.exit_code != 0 and "--label-weight" in result.output


@pytest.mark.embedded
def test_the_embedded_encoders_get_the_bridge_and_it_helps_on_the_sample(sample_dir):
    """Real weights: the default pipeline over the sample's train anchors carries the label bridge,
    and text->image R@1 on the val photos is higher with it than without."""
    from nofree.cache import EmbeddingCache
    from nofree.data.pairs import load_pairs
    from nofree.eval import retrieval_report
    from nofree.registry import load_encoder

    cache = EmbeddingCache()
    image_encoder, text_encoder = load_encoder("embedded:effnet-lite0"), load_encoder("embedded:minilm-l6")
    split = {name: load_pairs(sample_dir / "pairs.jsonl", split=name) for name in ("train", "val")}
    captions = {name: [c for p in pairs for c in p.captions] for name, pairs in split.items()}
    anchors = AnchorSet(cache.encode(image_encoder, [p.image for p in split["train"] for _ in p.captions]),
                        cache.encode(text_encoder, captions["train"]), tuple(captions["train"]),
                        image_encoder.spec, text_encoder.spec)
    image = cache.encode(image_encoder, [p.image for p in split["val"]])
    text = cache.encode(text_encoder, captions["val"])
    owner = torch.arange(len(split["val"])).repeat_interleave(5)
    r1 = {}
    for weight in (None, 0.0):
        pipeline = AsifPipeline.from_anchors(anchors, image_encoder, text_encoder, cache=cache, label_weight=weight)
        assert isinstance(pipeline.asif, LabelBridge) == (weight is None)
        r1[weight] = retrieval_report(pipeline.similarity(image, text), owner)["t2i"]["R@1"]
    assert r1[None] > r1[0.0] + 0.05
