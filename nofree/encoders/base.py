"""Frozen towers: the freezing helper and the batching shell every encoder shares.

A *frozen* torch module has ``requires_grad=False`` on every parameter, runs in eval mode, and
stays in eval mode when a parent module calls ``.train()`` (dropout stays off, batch-norm
statistics never move). Trainable code (``nofree.adapters``) may hold a frozen tower inside its
own ``nn.Module`` and train around it without touching its weights.

:class:`FrozenEncoder` turns two per-chunk functions of a backend into the
:class:`nofree.core.Encoder` protocol:

- ``_embed(items) -> (n, D)`` raw pooled features (any dtype, any device);
- ``_tokens(items) -> (tokens (n, t, W), mask (n, t) bool)`` pre-pool token states.

The shell validates the batch, splits it into chunks of ``batch_size`` (texts sorted by length
first so chunks carry little padding; the original order is restored), runs every chunk under
``torch.inference_mode()``, and returns CPU float32 tensors: ``encode`` L2-normalised ``(N, D)``,
``encode_tokens`` ``(N, T, W)`` zero-padded to the longest item of the whole batch.
Returned tensors are ordinary tensors (not inference tensors), so trainable heads can use them.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import types
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from nofree.core import (DataError, MissingDependencyError, Modality, bound_text, l2_normalize,
                         resolve_device)

__all__ = [
    "freeze",
    "is_frozen",
    "FrozenModule",
    "FrozenEncoder",
    "require",
    "mean_pool",
    "pad_token_batches",
    "center_crop_tensor",
]


# --- freezing -------------------------------------------------------------------------------

def _train_keeps_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement ``train`` of a frozen module: whatever ``mode`` says, stay in eval."""
    self.training = False
    for child in self.children():
        child.train(False)
    return self


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place and return it (same object).

    Every parameter gets ``requires_grad=False``; the module and all its submodules go to eval
    mode and their ``train()`` is replaced so that a parent's ``.train()`` (even one holding only
    a submodule) leaves them in eval. State dicts and ``save_pretrained`` are unaffected.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"freeze() takes a torch.nn.Module, got {type(module).__name__}")
    module.requires_grad_(False)
    for sub in module.modules():
        sub.training = False
        sub.train = types.MethodType(_train_keeps_eval, sub)
    return module


def is_frozen(module: nn.Module) -> bool:
    """True when no parameter needs grad and every submodule is in eval mode."""
    return all(not p.requires_grad for p in module.parameters()) and not any(
        m.training for m in module.modules())


class FrozenModule(nn.Module):
    """A wrapper that holds a frozen module: ``FrozenModule(m)(x) == m(x)``, never trained.

    Use it to embed a frozen backbone in a trainable model so the boundary is visible in
    ``repr``; the wrapped module is also frozen in place (see :func:`freeze`).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = freeze(module)
        self.training = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "FrozenModule":
        return _train_keeps_eval(self, mode)


# --- small pure helpers -----------------------------------------------------------------------

def require(module_name: str, pip_name: str, *, what: str) -> types.ModuleType:
    """Import ``module_name`` or raise :class:`MissingDependencyError` naming the pip package.

    ``what`` names the thing that needs it (a spec or backend), e.g. ``"embedded:minilm-l6"``.
    """
    if importlib.util.find_spec(module_name) is None:
        raise MissingDependencyError(
            f"{what} needs the Python package {module_name!r}, which is not installed: "
            f"pip install {pip_name}")
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise MissingDependencyError(
            f"{what}: importing {module_name!r} failed ({err}); reinstall it: pip install {pip_name}"
        ) from err


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(N, T, W)`` over positions where ``mask`` ``(N, T)`` is true.

    Returns ``(N, W)``; a row with an empty mask gives zeros.
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def pad_token_batches(parts: Sequence[tuple[Tensor, Tensor]], width: int) -> tuple[Tensor, Tensor]:
    """Concatenate ``(tokens (n_i, t_i, W), mask (n_i, t_i))`` chunks, zero-padding to max ``t_i``.

    Returns ``(tokens (N, T, W) float32, mask (N, T) bool)`` with padded positions zero/False.
    """
    n = sum(tok.shape[0] for tok, _ in parts)
    t = max((tok.shape[1] for tok, _ in parts), default=0)
    tokens = torch.zeros(n, t, width, dtype=torch.float32)
    mask = torch.zeros(n, t, dtype=torch.bool)
    row = 0
    for tok, m in parts:
        k, length = tok.shape[0], tok.shape[1]
        m = m.to(torch.bool).cpu()
        tokens[row:row + k, :length] = tok.float().cpu() * m.unsqueeze(-1)
        mask[row:row + k, :length] = m
        row += k
    return tokens, mask


def center_crop_tensor(images: Sequence[Any], size: int, mean: Sequence[float],
                       std: Sequence[float]) -> Tensor:
    """PIL images -> ``(N, 3, size, size)`` float32: shorter side to ``size`` (bicubic), centre
    crop, scale to [0, 1], then ``(x - mean) / std`` per channel."""
    import numpy as np
    from PIL import Image

    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)
    for i, image in enumerate(images):
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
        out[i] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return out.sub_(mean_t).div_(std_t)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# --- the encoder shell -----------------------------------------------------------------------

class FrozenEncoder:
    """Base of every frozen encoder (implements :class:`nofree.core.Encoder`).

    Attributes: ``spec`` (the string that rebuilds it), ``modality`` ('image' | 'text'),
    ``embed_dim`` D, ``token_dim`` W, ``device`` (where the module runs; outputs are CPU),
    ``module`` (the frozen torch module, or None), ``logit_scale`` (CLIP-like towers: the
    multiplier of cosines, i.e. ``exp`` of the learned log-scale; None otherwise).
    Subclasses implement ``_embed`` and ``_tokens`` (see the module docstring).
    """

    logit_scale: float | None = None
    #: Text towers: the most tokens the model reads. Texts are cut to this many tokens' worth of
    #: characters (``nofree.core.bound_text``) before tokenising, so one huge caption costs no
    #: more memory than a long one; backends set their own limit (8192 when unknown).
    max_text_tokens: int = 8192

    def __init__(self, *, spec: str, modality: Modality, module: nn.Module | None,
                 device: str | torch.device | None = None, embed_dim: int = 0,
                 token_dim: int = 0) -> None:
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.spec = spec
        self.modality: Modality = modality
        self.device = resolve_device(device)
        self.module = freeze(module) if module is not None else None
        self.embed_dim = int(embed_dim)
        self.token_dim = int(token_dim)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec!r}, modality={self.modality!r}, "
                f"D={self.embed_dim}, W={self.token_dim}, device={str(self.device)!r})")

    def packed(self) -> "FrozenEncoder":
        """An inference-only twin whose linear layers are packed for the CPU's matrix kernels
        (:func:`nofree.kernels.packing.packed_copy`: parameters shared, GELUs fused); made once and kept.
        ``self`` when nothing is worth packing. Adapters keep training through ``self``."""
        twin = self.__dict__.get("_packed_twin")
        if twin is None:
            from nofree.kernels.packing import packed_copy

            twin = self
            if self.module is not None:
                module, count = packed_copy(self.module)
                if count:
                    twin = copy.copy(self)
                    for name, value in list(vars(self).items()):
                        if value is self.module:   # `module` and its aliases (`model`)
                            setattr(twin, name, module)
                    twin._packed_twin = twin
            self._packed_twin = twin
        return twin

    # --- to implement --------------------------------------------------------------------
    def _embed(self, items: list) -> Tensor:
        """``(n, D)`` pooled features of ``n`` valid items (normalisation is done by the shell)."""
        raise NotImplementedError

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        """``(tokens (n, t, W), mask (n, t) bool)`` of ``n`` valid items."""
        raise NotImplementedError

    def _probe_dims(self) -> None:
        """Set ``embed_dim``/``token_dim`` from one forward on a dummy item (a grey image or "a")."""
        if self.modality == "image":
            from PIL import Image

            dummy: Any = Image.new("RGB", (64, 64), (128, 128, 128))
        else:
            dummy = "a"
        with torch.inference_mode():
            self.embed_dim = int(self._embed([dummy]).shape[-1])
            try:
                self.token_dim = int(self._tokens([dummy])[0].shape[-1])
            except NotImplementedError:  # a backend without token states: encode() still works
                self.token_dim = 0

    # --- public API ------------------------------------------------------------------------
    def encode(self, batch: Sequence[Any], *, batch_size: int = 32) -> Tensor:
        """Embeddings ``(N, D)`` float32, L2-normalised, on CPU, without grad. Empty -> ``(0, D)``."""
        items = self._check_batch(batch, batch_size)
        if not items:
            return torch.zeros(0, self.embed_dim)
        parts = self._run(items, batch_size, self._embed)
        return l2_normalize(torch.cat([p.float().cpu() for p in parts]))

    def encode_tokens_with_mask(self, batch: Sequence[Any], *,
                                batch_size: int = 32) -> tuple[Tensor, Tensor]:
        """Pre-pool token states ``(N, T, W)`` float32 (zero-padded) and their mask ``(N, T)`` bool."""
        items = self._check_batch(batch, batch_size)
        if not items:
            return torch.zeros(0, 0, self.token_dim), torch.zeros(0, 0, dtype=torch.bool)
        parts = self._run(items, batch_size, self._tokens)
        return pad_token_batches(parts, self.token_dim)

    def encode_tokens(self, batch: Sequence[Any], *, batch_size: int = 32) -> Tensor:
        """Pre-pool token states ``(N, T, W)`` float32; text is zero-padded to the longest item."""
        return self.encode_tokens_with_mask(batch, batch_size=batch_size)[0]

    # --- internals -------------------------------------------------------------------------
    def _check_batch(self, batch: Sequence[Any], batch_size: int) -> list:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        from PIL import Image

        if isinstance(batch, (str, bytes, Image.Image)) or not hasattr(batch, "__iter__"):
            raise DataError(f"{self.spec}: encode() takes a sequence of items; wrap a single "
                            f"{'text' if self.modality == 'text' else 'image'} in a list")
        items = list(batch)
        if self.modality == "text":
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise DataError(f"{self.spec}: item {i} is a {type(item).__name__}; "
                                    "text encoders take str")
            items = [bound_text(item, self.max_text_tokens) for item in items]
        else:
            for i, item in enumerate(items):
                if not isinstance(item, Image.Image):
                    hint = " (open it with PIL.Image.open(path))" if isinstance(item, str) else ""
                    raise DataError(f"{self.spec}: item {i} is a {type(item).__name__}; image "
                                    f"encoders take PIL.Image.Image{hint}")
        return items

    def _decode_images(self, items: list, indices: list[int]) -> None:
        """Decode lazily opened images now, so a corrupt file is named instead of failing deep
        inside a backend's preprocessing."""
        for i in indices:
            try:
                items[i].load()
            except (OSError, SyntaxError, ValueError) as err:
                name = getattr(items[i], "filename", "") or "an in-memory image"
                raise DataError(f"{self.spec}: item {i} ({name}) cannot be decoded: {err}; "
                                "re-save or drop that image") from err

    def _run(self, items: list, batch_size: int, fn: Callable[[list], Any]) -> list:
        """Apply ``fn`` chunk by chunk under inference mode; results come back in input order."""
        order = list(range(len(items)))
        if self.modality == "text":  # similar lengths share a chunk: less padding, same results
            order.sort(key=lambda i: len(items[i]))
        outputs: list = []
        with torch.inference_mode():
            for sl in _chunks(len(items), batch_size):
                if self.modality == "image":
                    self._decode_images(items, order[sl])
                outputs.append(fn([items[i] for i in order[sl]]))
        if order == sorted(order):
            return outputs
        # undo the sort: split every chunk into rows, then regroup in the original order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        if isinstance(outputs[0], tuple):
            tokens, mask = pad_token_batches(outputs, self.token_dim)
            return [(tokens[inverse], mask[inverse])]
        return [torch.cat([o.float().cpu() for o in outputs])[inverse]]
