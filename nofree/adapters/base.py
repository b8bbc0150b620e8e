"""Shared plumbing of the trainable adapters: frozen backbones, on-disk format, kind registry.

An adapter is a small trainable ``nn.Module`` around frozen backbones (image/text encoders,
a causal LM). The backbones are held as plain attributes, never registered as submodules, so
``parameters()``, ``state_dict()`` and ``.train()`` only ever see the adapter's own weights; the
backbones come frozen (``nofree.encoders.base.freeze``) and stay bit-identical through training.

On disk an adapter is a folder with

- ``config.json``: format name and version, nofree version, adapter kind, its hyperparameters,
  the spec of every backbone (enough to rebuild it), the backbone widths it was built for, and
  the sha256 of the weights file (a torn save is detected, not loaded);
- ``adapter.safetensors``: the adapter's weights only (never the backbone).

Both files are written to temporary names and renamed into place. Loading never executes code.

What ClipCap and the Flamingo-style adapter share on top of :class:`Adapter` (caption decoding,
:class:`~nofree.adapters.captioning.AdapterCaptioner`) lives in :mod:`nofree.adapters.captioning`.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from nofree.artifacts import OVERWRITE, atomic_path, atomic_write_bytes, file_sha256
from nofree.core import DataError, OptionError, SpecError, resolve_device
from nofree.hub import resolve_dir

FORMAT = "nofree-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "adapter.safetensors"

#: adapter kind -> (module, class); ``load_adapter`` dispatches on the recorded kind.
ADAPTER_CLASSES = {"lit": ("nofree.adapters.lit", "LiT"),
                   "clipcap": ("nofree.adapters.clipcap", "ClipCap"),
                   "flamingo": ("nofree.adapters.flamingo", "Flamingo"),
                   "smallcap": ("nofree.adapters.smallcap", "SmallCap")}
#: backbone role -> encoder modality (``None``: a language model)
ROLE_MODALITY = {"image_encoder": "image", "text_encoder": "text", "lm": None}
#: The most trainable parameters a saved config may ask for (4 GiB of float32 weights): far
#: above any adapter nofree trains (ClipCap's MLP on a 4096-wide LM is ~0.84 G), far below what
#: a hand-edited ``prefix_length`` of thousands would try to allocate.
MAX_PLANNED_PARAMETERS = 2**30


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write a safetensors file of CPU copies of ``tensors``; returns its sha256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        sha = file_sha256(tmp)  # of the bytes renamed into place
    return sha


def load_tensors(path: Path, *, expected_sha256: str | None = None,
                 what: str = "tensors") -> dict[str, Tensor]:
    """Read a safetensors file to CPU tensors; a missing, torn or corrupt file is a DataError."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"{path} is missing: the {what} cannot be loaded (was the save interrupted?)")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise DataError(f"{path} does not match the checksum recorded beside it (an interrupted or "
                        "mixed save?); save or train again into this folder")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"{path} is not a readable safetensors file ({err})") from err


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an adapter folder (or ``hf-hub:ORG/NAME[@REVISION]``),
    checked for format and version."""
    path = resolve_dir(directory, what="adapter") / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{directory} is not a saved adapter: {CONFIG_FILE} is missing "
                        "(train one with `nofree train ...` or save one with save_pretrained)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise DataError(f"{path} is not a nofree adapter config (format != {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(f"{path} has format_version {version!r}; this nofree reads up to "
                        f"{FORMAT_VERSION}: upgrade nofree to load it")
    for key in ("kind", "config", "backbone", "dims"):
        if key not in config:
            raise DataError(f"{path} lacks the field {key!r}; the file is damaged")
    if config["kind"] not in ADAPTER_CLASSES:
        raise DataError(f"{path}: unknown adapter kind {config['kind']!r}; "
                        f"known: {', '.join(ADAPTER_CLASSES)}")
    return config


def check_saved_config(target: type["Adapter"], header: dict[str, Any], directory: Path) -> None:
    """Check a saved ``config`` before it builds any module: known settings only, of the types
    the constructor takes, integers inside ``target.config_limits``, and no more trainable
    parameters than ``MAX_PLANNED_PARAMETERS`` or than ``adapter.safetensors`` can fill."""
    path = directory / CONFIG_FILE
    config, dims = header["config"], header["dims"]
    if not isinstance(config, dict) or not isinstance(dims, dict):
        raise DataError(f"{path}: \"config\" and \"dims\" must be JSON objects; the file is damaged")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in dims.values()):
        raise DataError(f"{path}: \"dims\" must hold whole numbers (the backbone widths); the file "
                        "is damaged")
    params = inspect.signature(target.__init__).parameters
    known = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "device"}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise DataError(f"{path}: unknown {target.kind} setting(s) {', '.join(unknown)} (known: "
                        f"{', '.join(known)}); remove them, or load the adapter with the nofree version "
                        f"that wrote it ({header.get('nofree_version', 'unknown')})")
    for name, value in config.items():
        default = known[name]
        whole = isinstance(value, int) and not isinstance(value, bool)
        fits = (value is None and default is None) or \
            (whole and (default is None or type(default) in (int, float))) or \
            (isinstance(value, float) and type(default) is float and math.isfinite(value)) or \
            (type(value) is type(default) and isinstance(value, (str, bool)))
        low, high = target.config_limits.get(name, (-math.inf, math.inf))
        if not fits or (whole and not low <= value <= high):
            wanted = f"a whole number in {low}..{high}" if name in target.config_limits else \
                f"a {type(default).__name__ if default is not None else 'whole number or null'}"
            raise DataError(f"{path}: setting {name}={value!r} is not {wanted}; restore the file "
                            "written with the weights, or retrain the adapter")
    planned = target.planned_parameters({**known, **config}, dims)
    saved = _saved_elements(directory / WEIGHTS_FILE)
    if planned > MAX_PLANNED_PARAMETERS or (saved is not None and planned > 4 * saved + 2**20):
        holds = f" but {WEIGHTS_FILE} holds {saved / 1e6:.1f} M" if saved is not None else ""
        raise DataError(f"{path}: its settings ask for about {planned / 1e6:.0f} M trainable "
                        f"parameters{holds}; the file was edited or belongs to other weights: restore "
                        "it, or retrain the adapter")


def _saved_elements(path: Path) -> int | None:
    """How many numbers a safetensors file holds, from its header only (None if unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except Exception:  # missing or damaged: loading the weights reports it
        return None


def adapter_class(kind: str) -> type["Adapter"]:
    """The adapter class of a kind name ('lit', 'clipcap', 'flamingo')."""
    import importlib

    if kind not in ADAPTER_CLASSES:
        raise SpecError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_CLASSES)}")
    module, name = ADAPTER_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


def load_adapter(directory: str | Path, **kwargs: Any) -> "Adapter":
    """Load any saved adapter (its kind is read from ``config.json``); see ``from_pretrained``."""
    return Adapter.from_pretrained(directory, **kwargs)


def _load_backbone(role: str, spec: str, device: Any) -> Any:
    from nofree.registry import load_encoder, load_lm

    if role == "lm":
        return load_lm(spec, device=device)
    return load_encoder(spec, modality=ROLE_MODALITY[role], device=device)


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer layers of a HF model: the shallowest list whose length is
    the configured layer count (``transformer.h`` in GPT-2, ``model.layers`` in Llama,
    ``encoder.layer`` in BERT)."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    found = [(name.count("."), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers)]
    if not found:
        raise SpecError(f"cannot find the layers of {type(model).__name__} (no ModuleList of "
                        f"{n_layers} layers); this needs a standard transformers model")
    return min(found, key=lambda item: item[:2])[2]


class Adapter(nn.Module):
    """Base of every adapter: trainable weights around frozen, unregistered backbones.

    Subclasses set ``kind``, ``backbone_roles`` and ``feature_kind`` ('embed': pooled image
    embeddings ``(N, D)``; 'tokens': image token grids ``(N, T, W)``), call
    ``super().__init__(backbones, device)``, and implement ``config``, ``backbone_dims``,
    ``batch_loss`` and ``evaluate``. Constructor signature: ``Cls(**backbones, **config, device=)``.
    """

    kind: ClassVar[str] = ""
    backbone_roles: ClassVar[tuple[str, ...]] = ()
    feature_kind: ClassVar[str] = "embed"
    uses_text_features: ClassVar[bool] = False
    #: integer settings and their allowed range, checked before a saved config builds modules
    config_limits: ClassVar[dict[str, tuple[int, int]]] = {}
    #: training batches group captions of similar length (less padding through a big LM)
    bucket_by_length: ClassVar[bool] = False

    def __init__(self, backbones: dict[str, Any], device: str | torch.device | None) -> None:
        super().__init__()
        for role in self.backbone_roles:
            backbone = backbones.get(role)
            if backbone is None:
                raise ValueError(f"{type(self).__name__} needs a {role}")
            modality = ROLE_MODALITY[role]
            if modality is not None and getattr(backbone, "modality", modality) != modality:
                raise SpecError(f"{role} {backbone.spec!r} is a {backbone.modality} encoder, "
                                f"not a {modality} encoder")
            if not isinstance(getattr(backbone, "spec", None), str):
                raise SpecError(f"the {role} has no spec string; adapters record it to rebuild "
                                "the backbone, so pass a nofree encoder/LM (nofree.load_encoder / load_lm)")
        # plain attributes: never registered, never in state_dict / parameters / train()
        object.__setattr__(self, "_backbones", {r: backbones[r] for r in self.backbone_roles})
        object.__setattr__(self, "_device", resolve_device(device))

    @classmethod
    def planned_parameters(cls, config: dict[str, Any], dims: dict[str, int]) -> int:
        """About how many trainable parameters ``cls(**config)`` builds over backbones of the
        widths ``dims`` (as ``backbone_dims`` records them), computed without building anything;
        0 where ``config_limits`` alone keeps the size small."""
        return 0

    # --- backbones ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def backbone(self, role: str) -> Any:
        return self._backbones[role]

    @property
    def image_encoder(self) -> Any:
        return self._backbones["image_encoder"]

    def backbone_specs(self) -> dict[str, str]:
        """Spec string of every backbone, by role."""
        return {role: b.spec for role, b in self._backbones.items()}

    def backbone_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The frozen torch modules inside the backbones, by role (for checks and reports)."""
        for role, backbone in self._backbones.items():
            module = getattr(backbone, "model", None) if role == "lm" else getattr(backbone, "module", None)
            if isinstance(module, nn.Module):
                yield role, module

    def train(self, mode: bool = True) -> "Adapter":
        """Train/eval mode for the adapter's own modules; backbones always stay in eval."""
        super().train(mode)
        for _, module in self.backbone_modules():
            module.train(False)
        return self

    # --- to implement -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able hyperparameters: ``Cls(**backbones, **config())`` rebuilds the architecture."""
        raise NotImplementedError

    def backbone_dims(self) -> dict[str, int]:
        """Backbone widths the weights were built for (checked when loading)."""
        raise NotImplementedError

    def batch_loss(self, batch: Any) -> Tensor:
        """Scalar training loss of one :class:`nofree.adapters.train.Batch`."""
        raise NotImplementedError

    def evaluate(self, examples: Any, *, batch_size: int = 32) -> dict[str, float]:
        """Validation metrics of :class:`nofree.adapters.train.Examples`; the first key is primary."""
        raise NotImplementedError

    # --- parameters ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; ``lr_scale`` multiplies the learning rate of a group."""
        return [{"params": self.trainable_parameters(), "lr_scale": 1.0}]

    def num_parameters(self, *, trainable_only: bool = True) -> int:
        """Scalar parameters of the adapter itself (the backbones are never counted)."""
        return count_parameters(self, trainable_only=trainable_only)

    def parameter_summary(self) -> dict[str, int]:
        """``{'trainable': n, '<role>': n_frozen, ...}`` for reports."""
        summary = {"trainable": self.num_parameters()}
        for role, module in self.backbone_modules():
            summary[role] = count_parameters(module, trainable_only=False)
        return summary

    # --- save / load ----------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The ``config.json`` content (without the weights checksum)."""
        import nofree

        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "nofree_version": nofree.__version__, "kind": self.kind, "config": self.config(),
                "backbone": self.backbone_specs(), "dims": self.backbone_dims()}

    def check_target(self, directory: str | Path, *, overwrite: bool = False) -> None:
        """Raise DataError unless ``directory`` may receive this adapter (absent, empty, holding
        this same adapter architecture on the same backbones, or ``overwrite``)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise DataError(f"{directory} is a file, not a folder; choose another output folder")
        if overwrite or not directory.exists() or not any(directory.iterdir()):
            return
        try:
            existing = read_config(directory)
        except DataError:
            existing = None
        mine = self.header()
        if existing is not None and all(existing.get(k) == mine[k] for k in ("kind", "config", "backbone")):
            return
        what = (f"a different {existing['kind']} adapter" if existing is not None
                else "files that are not a nofree adapter")
        raise OptionError(f"{directory} already holds {what}; refusing to overwrite it. Choose "
                          "another folder, or pass ", OVERWRITE, " to replace it")

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``adapter.safetensors`` (adapter weights only) atomically."""
        directory = Path(directory)
        self.check_target(directory, overwrite=overwrite)
        directory.mkdir(parents=True, exist_ok=True)
        header = self.header()
        header["weights_sha256"] = save_tensors(directory / WEIGHTS_FILE, self.state_dict(),
                                                metadata={"format": FORMAT, "kind": self.kind})
        atomic_write_bytes(directory / CONFIG_FILE,
                           json.dumps(header, indent=2, ensure_ascii=False).encode("utf-8"))
        return directory

    def load_weights(self, path: str | Path, *, expected_sha256: str | None = None) -> None:
        """Load adapter weights, naming any missing, unexpected or mis-shaped tensor."""
        path = Path(path)
        tensors = load_tensors(path, expected_sha256=expected_sha256, what=f"{self.kind} weights")
        expected = self.state_dict()
        problems = [f"tensor {k!r} is missing (expected shape {tuple(v.shape)})"
                    for k, v in expected.items() if k not in tensors]
        problems += [f"tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
        problems += [f"tensor {k!r} is not part of this adapter" for k in tensors if k not in expected]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise DataError(f"{path} does not fit this {self.kind} adapter: {shown}. The file is "
                            "damaged or belongs to another configuration; check config.json beside it")
        self.load_state_dict(tensors, strict=True)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None,
                        image_encoder: Any = None, text_encoder: Any = None, lm: Any = None) -> "Adapter":
        """Rebuild a saved adapter; backbones load from the recorded specs unless given.

        ``directory``: the adapter's folder, or ``hf-hub:ORG/NAME[@REVISION]`` (downloaded into the
        Hugging Face cache, see :mod:`nofree.hub`). A given backbone must carry exactly the
        recorded spec (else :class:`SpecError`). ``device`` is where backbones load and the
        adapter runs (``None``: CPU, or the given LM's).
        """
        directory = resolve_dir(directory, what="adapter")
        header = read_config(directory)
        target = adapter_class(header["kind"])
        if cls is not Adapter and target is not cls:
            raise DataError(f"{directory} holds a {header['kind']} adapter, not {cls.kind}; load it "
                            f"with nofree.adapters.load_adapter() or {target.__name__}.from_pretrained()")
        check_saved_config(target, header, directory)
        config = {**getattr(target, "absent_config", {}), **header["config"]}
        given = {"image_encoder": image_encoder, "text_encoder": text_encoder, "lm": lm}
        for role, value in given.items():
            if value is not None and role not in target.backbone_roles:
                raise ValueError(f"a {target.kind} adapter has no {role}; drop {role}=")
        backbones = {}
        for role in target.backbone_roles:
            spec = header["backbone"].get(role)
            if not isinstance(spec, str):
                raise DataError(f"{directory / CONFIG_FILE} records no spec for the {role}")
            backbone = given[role]
            if backbone is None:
                backbone = _load_backbone(role, spec, device)
            elif getattr(backbone, "spec", None) != spec:
                raise SpecError(f"{directory} was trained with {role} {spec!r}, but "
                                f"{getattr(backbone, 'spec', None)!r} was given; pass the {role} "
                                f"it was trained with, or leave {role}= out to load it from its spec")
            backbones[role] = backbone
        try:
            adapter = target(**backbones, **config, device=device)
        except ValueError as err:
            if isinstance(err, SpecError):
                raise
            raise DataError(f"{directory / CONFIG_FILE}: its settings cannot build a {target.kind} "
                            f"adapter ({err}); restore the file written with the weights") from err
        dims = adapter.backbone_dims()
        wrong = {k: (v, dims.get(k)) for k, v in header["dims"].items() if dims.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in wrong.items())
            raise SpecError(f"{directory}: the backbones' widths differ from training ({detail})")
        adapter.load_weights(directory / WEIGHTS_FILE, expected_sha256=header.get("weights_sha256"))
        return adapter.eval()
