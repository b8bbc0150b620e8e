"""Attention over listed visible keys: nofree's C kernel and its torch twin against a direct
float64 computation, and the CLIP scorer the same with either."""
from __future__ import annotations

import pytest
import torch

import nofree.decoding.attention as attention
from nofree.decoding.attention import Visibility, list_attention
from nofree.kernels.bindings import available

pytestmark = pytest.mark.usefixtures("one_thread")


def random_case(seed, *, n_seq=3, heads=2, dim=64, held=5, spread=1.0, longest=8):
    """Ragged sequences of tokens, each seeing a random subset of its sequence's held positions
    and of its own earlier slots (always itself); padding slots see padding, like the scorer's."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n_seq,), generator=g)
    width = int(lengths.max())
    img = torch.arange(n_seq).repeat_interleave(lengths)
    slot = torch.cat([torch.arange(int(n)) for n in lengths])
    real = torch.zeros(n_seq, width, dtype=torch.bool)
    real[img, slot] = True
    own = (torch.rand(n_seq, width, width, generator=g) < 0.5).tril() | torch.eye(width, dtype=torch.bool)
    own = torch.where(real[:, :, None] & real[:, None, :], own, ~real[:, :, None] & ~real[:, None, :])
    cached = (torch.rand(n_seq, width, held, generator=g) < 0.6) & real[:, :, None]
    mask = torch.cat([cached, own], 2)
    qkv = torch.randn(len(img), 3, heads, dim, generator=g) * spread
    past = tuple(torch.randn(n_seq, heads, held, dim, generator=g) for _ in range(2)) if held else None
    return qkv, past, Visibility.from_mask(mask, img, slot)


def direct(qkv, past, seen):
    """softmax(q·k/√d over the visible keys)·v per token, in float64, from the mask."""
    out = []
    dim = qkv.shape[3]
    for n, (b, s) in enumerate(zip(seen.img.tolist(), seen.slot.tolist())):
        tokens = (seen.img == b).nonzero().flatten()
        keys = [past[0][b].transpose(0, 1)] if past is not None else []
        values = [past[1][b].transpose(0, 1)] if past is not None else []
        keys.append(qkv[tokens, 1])
        values.append(qkv[tokens, 2])
        k, v = torch.cat(keys).double(), torch.cat(values).double()        # (P + Q_b, H, D)
        visible = seen.mask[b, s, :len(k)]
        score = torch.einsum("hd,khd->hk", qkv[n, 0].double(), k) / dim ** 0.5
        weight = score.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hk,khd->hd", weight, v))
    return torch.stack(out).float()


def torch_twin(monkeypatch):
    monkeypatch.setattr(attention, "_native", lambda qkv, past: None)


@pytest.mark.parametrize("dim", [64, 24])  # 64: the AVX-512 path where the CPU has it; 24: the portable one
@pytest.mark.parametrize("held", [0, 5])
def test_native_and_torch_equal_the_direct_computation(dim, held, monkeypatch):
    if not available():
        pytest.skip("no C compiler: only the torch twin runs (checked below)")
    for seed in range(4):
        qkv, past, seen = random_case(seed, dim=dim, held=held)
        expected = direct(qkv, past, seen)
        torch.testing.assert_close(list_attention(qkv, past, seen), expected, rtol=1e-5, atol=1e-5)
        rows = torch.tensor([len(qkv) - 1, 0, 0, 2])                    # any order, repeats
        picked = list_attention(qkv, past, seen, rows)
        torch.testing.assert_close(picked, expected[rows], rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as m:
        torch_twin(m)
        torch.testing.assert_close(list_attention(qkv, past, seen), expected, rtol=1e-5, atol=1e-5)


def test_torch_twin_equals_the_direct_computation(monkeypatch):
    torch_twin(monkeypatch)
    for seed in range(3):
        qkv, past, seen = random_case(seed, dim=16, held=3)
        torch.testing.assert_close(list_attention(qkv, past, seen), direct(qkv, past, seen),
                                   rtol=1e-5, atol=1e-5)


def test_scores_far_apart_keep_only_the_best_key():
    """Score gaps beyond float32's exp range: the others weigh exactly 0, as in a plain softmax."""
    if not available():
        pytest.skip("no C compiler")
    qkv, past, seen = random_case(7, dim=64, held=4, spread=30.0)
    torch.testing.assert_close(list_attention(qkv, past, seen), direct(qkv, past, seen), rtol=1e-4, atol=1e-4)


def test_visibility_lists_keys_as_the_kernel_numbers_them():
    qkv, past, seen = random_case(3, held=5)
    n_seq, width = seen.mask.shape[:2]
    for n, (b, s) in enumerate(zip(seen.img.tolist(), seen.slot.tolist())):
        cols = seen.cols[seen.offsets[n]:seen.offsets[n + 1]].tolist()
        first = int((seen.img < b).sum())
        tokens = int((seen.img == b).sum())
        expected = [b * 5 + p for p in range(5) if seen.mask[b, s, p]] + \
            [n_seq * 5 + first + j for j in range(tokens) if seen.mask[b, s, 5 + j]]
        assert cols == expected


def test_threads_split_the_rows_without_changing_a_bit(monkeypatch):
    """Above ~32k visible keys the kernel splits the query rows over threads: each row is computed
    the same way whatever thread runs it."""
    if not available():
        pytest.skip("no C compiler")
    qkv, past, seen = random_case(11, n_seq=16, held=40, longest=240)
    assert len(seen.cols) + len(qkv) > 2 * 32768
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = list_attention(qkv, past, seen)
        torch.set_num_threads(3)
        three = list_attention(qkv, past, seen)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    torch_twin(monkeypatch)
    torch.testing.assert_close(one, list_attention(qkv, past, seen), rtol=1e-5, atol=1e-5)
