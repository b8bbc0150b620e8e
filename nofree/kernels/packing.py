"""Frozen linear layers with their weights packed once for the CPU's matrix kernels.

A frozen model multiplies by the same weight matrices at every step. ``torch.nn.functional.linear``
reorders (packs) the weight into the GEMM kernel's blocked layout on every call; at decoding
sizes (one to a few hundred rows against a 768 × 3,072 weight) that reordering costs as much as
the multiplication itself. oneDNN, which PyTorch ships for CPUs, can pack a weight once and
reuse it (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``: the kernels
PyTorch's own compiler uses for frozen CPU graphs). The gain is largest in float32: bfloat16
``F.linear`` already runs through oneDNN and gains little (per-layer timings of both in
``benchmarks/RESULTS.md``, "Packed weights").

Packed layers are for inference only: no gradient flows through them (a forward that would need
one raises), and the packed tensor cannot be saved, copied or moved to another device. So nofree
packs *copies* (:func:`packed_copy`, ``HFLanguageModel.packed()``, ``load_lm(..., packed=True)``)
and leaves the model that adapters train through untouched. Float32 results equal
``F.linear``'s up to summation order (~1e-6 relative); bfloat16 ones matched exactly in the
tests.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_DTYPES = (torch.float32, torch.bfloat16)

#: Smallest weight (in × out elements) worth packing, 256 × 1,024: a packed call has a fixed cost
#: (~17 µs, ``benchmarks/RESULTS.md``) that a small layer's multiplication does not repay, so
#: small layers stay unpacked.
MIN_ELEMENTS = 1 << 18


def can_pack(weight: Tensor) -> bool:
    """Whether ``weight`` (out, in) can be packed here: a CPU float32/bfloat16 matrix, with
    PyTorch's oneDNN kernels available (and bfloat16 units for a bfloat16 weight)."""
    if not isinstance(weight, Tensor) or weight.device.type != "cpu" or weight.dim() != 2 or \
            weight.dtype not in _DTYPES or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    return weight.dtype != torch.bfloat16 or bool(ops._is_mkldnn_bf16_supported())


class PackedMatrix:
    """A frozen ``(out, in)`` weight packed for oneDNN; ``linear(x, self)`` multiplies by it."""

    def __init__(self, weight: Tensor) -> None:
        weight = weight.detach()
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def __repr__(self) -> str:
        return f"PackedMatrix(out={self.shape[0]}, in={self.shape[1]}, dtype={self.dtype})"


def worth_packing(weight: Tensor) -> bool:
    """:func:`can_pack` and at least :data:`MIN_ELEMENTS` elements."""
    return weight.numel() >= MIN_ELEMENTS and can_pack(weight)


def pack(weight: Tensor) -> PackedMatrix | Tensor:
    """``weight`` packed when :func:`worth_packing`, else ``weight`` itself."""
    return PackedMatrix(weight) if worth_packing(weight) else weight


#: GELU variants a packed layer can apply to its output inside the matrix kernel
GELUS = {"gelu": "none", "gelu_tanh": "tanh"}


def linear(x: Tensor, weight: PackedMatrix | Tensor, bias: Tensor | None = None, *,
           activation: str | None = None) -> Tensor:
    """``act(x @ weight.T + bias)`` for ``x (..., in)``, with ``weight`` a tensor or a PackedMatrix
    and ``activation`` None, ``"gelu"`` (erf) or ``"gelu_tanh"``; the bias is cast to the weight's
    dtype. A packed weight applies bias and activation inside the matrix kernel (one pass over the
    output instead of three)."""
    if activation is not None and activation not in GELUS:
        raise ValueError(f"activation must be one of {sorted(GELUS)} or None, got {activation!r}")
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    if isinstance(weight, Tensor):
        out = F.linear(x, weight, bias)
        return out if activation is None else F.gelu(out, approximate=GELUS[activation])
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("packed linear layers are for inference only: no gradient flows "
                           "through them; run the unpacked model (the one packed_copy() copied)")
    if x.numel() == 0:  # the packed kernel rejects an empty batch
        out = x.new_zeros(*x.shape[:-1], weight.shape[0])
        out = out if bias is None else out + bias.to(x.dtype)
        return out if activation is None else F.gelu(out, approximate=GELUS[activation])
    if activation is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "gelu", [], GELUS[activation])


def gelu_kind(module: nn.Module) -> str | None:
    """``"gelu"`` / ``"gelu_tanh"`` when ``module`` is exactly a GELU (torch's, or transformers'
    GELUActivation / NewGELUActivation / GELUTanh), else None."""
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    name = type(module).__name__
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    if name == "GELUActivation" and getattr(module, "act", None) is F.gelu:
        return "gelu"
    return None


class PackedLinear(nn.Module):
    """``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) with its weight packed; inference only.

    ``weight`` and ``bias`` stay the original parameters (shared, not copied), so code that reads
    them (tied embeddings, ``get_output_embeddings().weight``) still works.
    """

    def __init__(self, layer: nn.Module, *, activation: str | None = None) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        matrix = layer.weight.t() if _is_conv1d(layer) else layer.weight   # Conv1D keeps (in, out)
        self.out_features, self.in_features = matrix.shape
        self.matrix = PackedMatrix(matrix)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.matrix, self.bias, activation=self.activation)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, dtype={self.matrix.dtype}{act}"


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")  # transformers' GPT-2 layer


def _packable(layer: nn.Module) -> bool:
    # exact types only: a subclass may change what forward does (LoRA, quantised layers)
    return (type(layer) is nn.Linear or _is_conv1d(layer)) and worth_packing(layer.weight)


def packed_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose plain ``nn.Linear``/``Conv1D`` layers (those worth it: see
    :data:`MIN_ELEMENTS`) are :class:`PackedLinear`, and how many were packed. Every parameter
    and buffer is shared with ``model``, not copied; the packed weights are the only new memory
    (one more copy of each packed matrix)."""
    shared: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo=shared)
    count = 0
    for parent in list(twin.modules()):
        fused = _fuse_mlp_gelu(parent)
        count += fused
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return twin, count


#: module class-name endings whose forward is exactly ``act(linear(x))`` (or goes on with that):
#: the linear layer and the activation child to fuse. GPT-2-style MLPs (``c_proj(act(c_fc(x)))``)
#: and BERT-style intermediates (``act(dense(x))``, also ViT's).
_GELU_AFTER = {"MLP": ("c_fc", "act", {"c_fc", "act", "c_proj", "dropout"}),
               "Intermediate": ("dense", "intermediate_act_fn", {"dense", "intermediate_act_fn"})}


def _fuse_mlp_gelu(block: nn.Module) -> int:
    """Put a block's GELU inside its packed linear layer and make the activation the identity;
    1 if fused, else 0. Only the transformers blocks whose forward is exactly that (GPT-2's MLP,
    BERT's intermediate and their copies), recognised by class name and exact children."""
    for ending, (linear_name, act_name, children) in _GELU_AFTER.items():
        names = set(dict(block.named_children()))
        if not type(block).__name__.endswith(ending) or names != children & names or \
                not {linear_name, act_name} <= names:
            continue
        kind = gelu_kind(getattr(block, act_name))
        layer = getattr(block, linear_name)
        if kind is None or not _packable(layer):
            return 0
        setattr(block, linear_name, PackedLinear(layer, activation=kind))
        setattr(block, act_name, nn.Identity())
        return 1
    return 0
