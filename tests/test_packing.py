"""Packed linear layers: same results as the plain ones, shared parameters, inference only; packed
LMs decode the same tokens, packed CLIP towers give the same scores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nofree.decoding.magic import greedy_search, magic_search
from nofree.kernels import packing
from nofree.kernels.packing import PackedLinear, PackedMatrix, can_pack, linear, pack, packed_copy
from nofree.testing import tiny_lm

pytestmark = [pytest.mark.skipif(not can_pack(torch.zeros(2, 2)),
                                 reason="PyTorch has no oneDNN linear kernels on this machine"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _pack_tiny_layers(monkeypatch):
    """The tiny test models' layers are below the size worth packing: pack them anyway."""
    monkeypatch.setattr(packing, "MIN_ELEMENTS", 0)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp(request.param), family=request.param)


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (1, 24), (0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_nn_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    x = torch.randn(shape)
    out = PackedLinear(layer)(x)
    assert out.shape == layer(x).shape and out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_packed_matrix_matches_f_linear_exactly():
    torch.manual_seed(0)
    weight, x = torch.randn(40, 24).bfloat16(), torch.randn(9, 24).bfloat16()
    if not can_pack(weight):
        pytest.skip("no bfloat16 units on this CPU")
    matrix = pack(weight)
    assert isinstance(matrix, PackedMatrix) and matrix.dtype == torch.bfloat16
    assert torch.equal(linear(x, matrix), torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(7, 24), (0, 24)])
def test_gelu_inside_the_packed_kernel_equals_gelu_after(activation, shape):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(40, 24), torch.randn(40), torch.randn(shape)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate=approximate)
    for matrix in (PackedMatrix(weight), weight):
        torch.testing.assert_close(linear(x, matrix, bias, activation=activation), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        linear(x, weight, bias, activation="relu")


def test_gpt2_mlp_gets_its_gelu_fused_into_c_fc(lm):
    fast = lm.packed()
    fused = [m for m in fast.model.modules() if isinstance(m, PackedLinear) and m.activation]
    if lm.model.config.model_type == "gpt2":
        assert len(fused) == lm.model.config.n_layer
        assert all(m.activation == "gelu_tanh" for m in fused)   # GPT-2's "gelu_new"
        mlp, original = fast.model.transformer.h[0].mlp, lm.model.transformer.h[0].mlp
        assert isinstance(mlp.act, nn.Identity) and not isinstance(original.act, nn.Identity)
        assert mlp.c_fc.weight is original.c_fc.weight
    else:  # a gated MLP (Llama) is not of that shape: left as it is
        assert fused == []
    assert packing.gelu_kind(nn.GELU()) == "gelu" and packing.gelu_kind(nn.GELU("tanh")) == "gelu_tanh"
    assert packing.gelu_kind(nn.ReLU()) is None


def test_gpt2_conv1d_is_packed_with_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(40, 24)  # weight (in, out): y = x @ W + b
    x = torch.randn(3, 24)
    torch.testing.assert_close(PackedLinear(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_packed_copy_shares_parameters_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.LayerNorm(4))
    twin, count = packed_copy(model)
    assert count == 2
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm]
    assert isinstance(twin[0], PackedLinear) and isinstance(twin[2], PackedLinear)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert p is q, f"{name} was copied, not shared"
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)


def test_what_is_not_packed(monkeypatch):
    class Scaled(nn.Linear):  # a subclass may mean another forward: left alone
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 4).half())
    _, count = packed_copy(model)
    assert count == 0
    monkeypatch.setattr(packing, "MIN_ELEMENTS", 32)  # too small to be worth it
    assert packed_copy(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 8)))[1] == 1
    assert not can_pack(torch.zeros(3)) and not can_pack(torch.zeros(2, 2, dtype=torch.float16))
    assert pack(torch.zeros(2, 2, dtype=torch.float16)).dtype == torch.float16  # unchanged


def test_packed_layers_refuse_gradients():
    layer = PackedLinear(nn.Linear(4, 3))
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (2, 3)


def test_packed_lm_matches_and_is_made_once(lm):
    fast = lm.packed()
    assert fast.is_packed and not lm.is_packed and "packed" in repr(fast)
    assert lm.packed() is fast and fast.packed() is fast
    assert fast.model.get_output_embeddings().weight is lm.model.get_output_embeddings().weight
    ids = torch.tensor(lm.tokenize(["a man riding a red bus on the beach"]))
    plain, packed = lm.step(ids), fast.step(ids)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed.hidden, plain.hidden, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="packed"):
        fast.to_dtype(torch.bfloat16)


def test_packed_lm_decodes_the_same_tokens(lm):
    prompts = lm.tokenize(["a picture of", "the man riding a red bus on the beach with", "cat"])
    assert greedy_search(lm.packed(), prompts, max_new_tokens=8).ids == \
        greedy_search(lm, prompts, max_new_tokens=8).ids

    def scorer(image_emb, texts):  # prefers texts with many "a"s, so β changes the choices
        return torch.tensor([[float(t.count("a")) for t in row] for row in texts])

    images = torch.zeros(3, 2)
    kw = dict(prompt_ids=prompts, k=8, alpha=0.1, beta=2.0, max_new_tokens=8)
    assert magic_search(lm.packed(), scorer, images, **kw).ids == magic_search(lm, scorer, images, **kw).ids


def test_packed_lm_from_the_registry(tmp_path):
    from nofree.registry import load_lm
    from nofree.testing import make_tiny_lm_dir

    make_tiny_lm_dir(tmp_path)
    spec = f"local:{tmp_path}"
    fast = load_lm(spec, packed=True)
    assert fast.is_packed and fast is load_lm(spec).packed() and not load_lm(spec).is_packed


def test_packed_clip_tower_gives_the_same_scores():
    import open_clip

    from nofree.decoding.clip_scorer import ClipScorer

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1,
                                                         head_width=16),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    packed, plain = ClipScorer(model, tokenizer), ClipScorer(model, tokenizer, packed=False)
    assert isinstance(packed.tower.blocks[0].qkv_w, PackedMatrix)
    assert isinstance(plain.tower.blocks[0].qkv_w, torch.Tensor)
    assert packed.tower.blocks[0].gelu == "gelu" and plain.tower.blocks[0].gelu is None  # fused in fc1
    texts = [["a dog on", "a dogs", "the red bus"], ["two cats", "a sofa.", "x"]]
    image_emb = torch.randn(2, 24)
    torch.testing.assert_close(packed.score(image_emb, texts), plain.score(image_emb, texts),
                               rtol=1e-4, atol=1e-4)


def test_text_encoder_packed_twin_embeds_the_same(tmp_path):
    from nofree.decoding.scorers import AsifScorer
    from nofree.encoders.hf import HFTextEncoder
    from nofree.testing import make_tiny_hf_text

    from transformers import AutoModel, AutoTokenizer

    folder = make_tiny_hf_text(tmp_path, hidden=32)
    encoder = HFTextEncoder(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                            spec="test:bert")
    twin = encoder.packed()
    assert twin is not encoder and encoder.packed() is twin and twin.packed() is twin
    assert twin.model is twin.module and encoder.model is encoder.module    # aliases follow
    assert not any(isinstance(m, PackedLinear) for m in encoder.model.modules())   # left alone
    fused = [m for m in twin.model.modules() if isinstance(m, PackedLinear) and m.activation == "gelu"]
    assert len(fused) == encoder.model.config.num_hidden_layers            # BERT's intermediate
    texts = ["a dog on the beach", "two red buses", "x"]
    torch.testing.assert_close(twin.encode(texts), encoder.encode(texts), rtol=1e-5, atol=1e-5)
    assert AsifScorer(None, encoder).text_encoder is twin
    assert AsifScorer(None, encoder, packed=False).text_encoder is encoder
