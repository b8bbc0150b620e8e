"""Protocols and small dataclasses shared by every part of nofree.

This module imports nothing else from nofree, and nothing heavy beyond torch: it is the
vocabulary the rest of the package speaks. Shapes are written at every tensor boundary:
N items, D embedding width, T tokens, W token width, B batch, V vocabulary, H LM width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")

#: The offline defaults (weights inside pip packages; see ``nofree models``).
DEFAULT_IMAGE_ENCODER = "embedded:effnet-lite0"
DEFAULT_TEXT_ENCODER = "embedded:minilm-l6"
DEFAULT_LM = "embedded:smollm2-135m"


class NofreeError(Exception):
    """An error a user can fix: the message names the input and says how to fix it."""


class SpecError(NofreeError, ValueError):
    """An unknown, malformed or mismatched component spec string."""


class MissingDependencyError(NofreeError, ImportError):
    """A backend needs a package that is not installed; the message says what to install."""


class DataError(NofreeError, ValueError):
    """A bad pairs file, row, image or artefact; the message names the file (and line)."""


@dataclass(frozen=True)
class Option:
    """A parameter of a library call named inside an :class:`OptionError`: with its ``value``,
    with a ``placeholder`` for the value to give (``"DIR"``), or alone."""

    name: str
    value: Any = None
    placeholder: str = ""

    def python(self) -> str:
        """The option as Python code writes it: ``anchor_dir``, ``anchor_dir=DIR``, ``method='magic'``."""
        if self.value is not None:
            return f"{self.name}={self.value!r}"
        return f"{self.name}={self.placeholder}" if self.placeholder else self.name


class OptionError(DataError):
    """A missing, misplaced or bad option of a library call, worded for whoever made the call.

    The message is text and :class:`Option` parts. ``str(err)`` writes each option as Python
    code does (``anchor_dir``, ``method='magic'``); a front end rewrites them in its own words
    with :meth:`worded` (the CLI: ``--anchors``, ``--method magic``), so library code never
    names a command-line flag.
    """

    def __init__(self, *parts: str | Option) -> None:
        self.parts = parts
        super().__init__(self.worded(Option.python))

    def worded(self, spell: Callable[[Option], str]) -> str:
        """The message with each option written by ``spell``."""
        return "".join(part if isinstance(part, str) else spell(part) for part in self.parts)


def option_list(options: Sequence[str]) -> list[str | Option]:
    """``options`` (parameter names) as :class:`OptionError` parts separated by commas."""
    parts: list[str | Option] = []
    for i, name in enumerate(options):
        parts += [", "] * bool(i) + [Option(name)]
    return parts


@runtime_checkable
class Encoder(Protocol):
    """A frozen single-modality encoder.

    ``encode`` returns ``(N, D)`` float32, L2-normalised, computed without grad.
    ``encode_tokens`` returns the pre-pool token grid ``(N, T, W)`` float32 (image encoders:
    spatial cells or ViT patches; text encoders: per-token states, padded with zeros).
    Image inputs are ``PIL.Image.Image``; text inputs are ``str``.
    """

    spec: str
    modality: Modality
    embed_dim: int
    token_dim: int

    def encode(self, batch: Sequence[Any], *, batch_size: int = 32) -> Tensor: ...

    def encode_tokens(self, batch: Sequence[Any], *, batch_size: int = 32) -> Tensor: ...


@dataclass
class LMStep:
    """One forward of a causal LM over a chunk of new positions.

    logits: ``(B, V)`` next-token logits after the last fed position, float32.
    hidden: ``(B, T, H)`` last-layer hidden states of every fed position, float32.
    cache:  opaque KV cache covering everything fed so far; pass it to the next ``step``.
    """

    logits: Tensor
    hidden: Tensor
    cache: Any


@runtime_checkable
class LanguageModel(Protocol):
    """A frozen causal language model seen one decoding step at a time.

    ``step`` accepts token ids ``(B, T)`` or input embeddings ``(B, T, H)`` (prefixes), an
    optional cache from the previous step and an optional ``attention_mask`` ``(B, past+T)``
    (1 = real token, 0 = left padding; :func:`left_pad` builds it). ``select_cache(cache,
    index)`` gathers batch rows (``index`` is ``(B',)`` long) so a cache can be expanded to k
    candidates or narrowed back. Optional capabilities that decoders use when present:
    :class:`HeadlessLM`, :class:`CandidateLM`, :class:`StackingLM`, :class:`CacheSizeLM`.
    """

    spec: str
    hidden_size: int
    vocab_size: int
    eos_id: int
    pad_id: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[Sequence[int]] | Tensor) -> list[str]: ...

    def embed(self, ids: Tensor) -> Tensor: ...

    def step(
        self,
        ids: Tensor | None = None,
        *,
        embeds: Tensor | None = None,
        cache: Any = None,
        attention_mask: Tensor | None = None,
    ) -> LMStep: ...

    def select_cache(self, cache: Any, index: Tensor) -> Any: ...


# Optional capabilities of a LanguageModel. Decoders check them with :func:`offers` and take a
# plainer path when an LM lacks one (or sets one of its methods to None); results are the same
# either way, to float rounding.

@runtime_checkable
class HeadlessLM(Protocol):
    """An LM that can run without its output head (MAGIC's candidate forwards need hidden states only).

    ``step(..., logits=False)`` returns ``LMStep(logits=None, hidden (B, T, H), cache)``;
    ``head_logits(hidden (B, H)) -> (B, V)`` float32 applies the head to the rows that need logits.
    """

    def step(self, ids: Tensor | None = None, *, embeds: Tensor | None = None, cache: Any = None,
             attention_mask: Tensor | None = None, logits: bool = True) -> LMStep: ...

    def head_logits(self, hidden: Tensor) -> Tensor: ...


@runtime_checkable
class CandidateLM(Protocol):
    """An LM that feeds k alternative next tokens per row in one forward ("tree attention").

    ``candidate_step(candidates (B, k), *, cache, attention_mask (B, past))`` puts the k tokens
    side by side after each row's cache, each attending to the row's real cached positions and to
    itself only; it returns ``LMStep(logits=None, hidden (B, k, H) float32, cache of past + k
    positions)``, or None when this cache or attention kernel cannot (the caller then runs one row
    per candidate). ``keep_candidates(cache, rows (b,), chosen (b,), k)`` is the cache after such a
    step holding batch rows ``rows``, each with its past and its candidate ``chosen`` (an index
    into k) appended.
    """

    def candidate_step(self, candidates: Tensor, *, cache: Any, attention_mask: Tensor) -> LMStep | None: ...

    def keep_candidates(self, cache: Any, rows: Tensor, chosen: Tensor, k: int) -> Any: ...


@runtime_checkable
class StackingLM(Protocol):
    """An LM whose caches can be stacked: batches prefilled apart become one batch.

    ``stack_caches(caches, *, insert_at)`` is one cache with the rows of every cache in order;
    shorter ones get empty positions inserted at ``insert_at`` up to the longest (the caller masks
    them out). None when a cache cannot be stacked.
    """

    def select_cache(self, cache: Any, index: Tensor) -> Any: ...

    def stack_caches(self, caches: Sequence[Any], *, insert_at: int) -> Any | None: ...


@runtime_checkable
class CacheSizeLM(Protocol):
    """An LM that reports a cache's size: ``cache_nbytes(cache)``, the bytes of its keys and values."""

    def cache_nbytes(self, cache: Any) -> int: ...


def offers(lm: Any, capability: type) -> bool:
    """Whether ``lm`` offers an optional ``capability`` (:class:`HeadlessLM`, :class:`CandidateLM`,
    :class:`StackingLM`, :class:`CacheSizeLM`): each of its methods is there and not None.

    Unlike ``isinstance`` on a protocol, attributes are looked up as any call would (an LM that
    sets a method to None on itself turns that capability off; a proxy's ``__getattr__`` counts).
    """
    members = [name for name, value in vars(capability).items()
               if callable(value) and not name.startswith("_")]
    return all(callable(getattr(lm, name, None)) for name in members)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad ragged id lists to ``ids (B, T)`` long and ``mask (B, T)`` long (1 = real), the
    ``attention_mask`` form :meth:`LanguageModel.step` reads."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad() needs at least one non-empty sequence per row "
                         "(an empty prompt has nothing to condition on; give the LM a start text)")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, length - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, length - len(seq):] = 1
    return ids, mask


@runtime_checkable
class Captioner(Protocol):
    """Anything that writes one caption per image."""

    def caption(self, images: Sequence[Any], **kw: Any) -> list[str]: ...


@dataclass(frozen=True)
class Pair:
    """One image with its captions. ``image`` is a path; ``meta`` carries extra row fields."""

    image: str
    captions: tuple[str, ...]
    split: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Float32 L2 normalisation along ``dim`` (zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def clean_caption(text: str) -> str:
    """First line, surrounding quotes/bullets/spaces removed, first letter upper-cased."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = text.strip().lstrip("-*• ").strip().strip('"').strip()
    return text[:1].upper() + text[1:]


#: Characters of input text kept per token of a model's input limit. Tokenisers spend about
#: 4-5 characters of English per token (BPE and WordPiece alike) and rarely more than ~20 on
#: long words, numbers or URLs, so 32 characters a token never shortens what the model sees for
#: real text, while a tokeniser's memory (it processes the whole string before truncating to
#: its limit) stays proportional to the model's limit instead of to the input's length.
CHARS_PER_TOKEN = 32


def bound_text(text: str, max_tokens: int) -> str:
    """``text`` cut to ``max_tokens * CHARS_PER_TOKEN`` characters (see ``CHARS_PER_TOKEN``);
    call it before tokenising anything a user supplied."""
    limit = max(1, int(max_tokens)) * CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """Split ``"backend:name[@tag]"`` into ``(backend, name, tag)``.

    ``local:`` paths may contain ``@``/``:``; only the first ``:`` separates the backend, and
    the tag is taken from the last ``@`` only for backends other than ``local``.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(
            f"bad spec {spec!r}: expected 'backend:name[@tag]', e.g. 'embedded:minilm-l6' or "
            "'hf-text:sentence-transformers/all-MiniLM-L6-v2'; run `nofree models` to list backends"
        )
    backend, rest = spec.split(":", 1)
    tag = None
    if backend != "local" and "@" in rest:
        rest, tag = rest.rsplit("@", 1)
    if not backend or not rest:
        raise SpecError(f"bad spec {spec!r}: backend and name must both be non-empty")
    return backend, rest, tag


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a caller asked for; ``None`` means CPU (never chosen silently)."""
    return torch.device("cpu" if device is None else device)
