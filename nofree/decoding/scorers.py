"""Image–text scorers that steer MAGIC decoding (:mod:`nofree.decoding.magic`).

A scorer embeds images once (``embed_images(images) -> (B, D)``) and, at every decoding step,
scores each image against its k candidate texts (``score(image_emb (B, D), texts) -> (B, k)``
float32 logits, already multiplied by the scorer's temperature: MAGIC takes a softmax over the
k candidates on top). Any callable ``(image_emb, texts) -> (B, k)`` plugs in through
:class:`CallableScorer`.

- :class:`ClipScorer` -- a CLIP model (open_clip or transformers): cosine × the model's logit
  scale (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
  Supervision"). The k candidates of one image share their text up to the last word, and
  CLIP's text tower is causal, so the shared token prefix runs once and only the candidates'
  few differing tokens (up to the pooled end-of-text token), merged into a prefix tree, run on
  top of its cached keys and values. Candidates are re-tokenised in full, so when a new LM token
  changes the CLIP tokens of the prefix's last word the shared prefix is simply shorter: the
  result equals the plain ``encode_text`` (to float rounding).
- :class:`AsifScorer` -- ASIF (Norelli et al., 2022, "ASIF: Coupled Data Turns Unimodal Models
  to Multimodal Without Training"): the similarity of the image's and the text's relative
  representations over a set of anchor pairs, × a temperature.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nofree.core import DataError, bound_text, l2_normalize, resolve_device
from nofree.decoding.attention import Visibility, list_attention
from nofree.packing import PackedMatrix, gelu_kind, linear, pack

__all__ = ["Scorer", "CallableScorer", "ClipScorer", "AsifScorer", "as_scorer",
           "DEFAULT_ASIF_TEMPERATURE"]

#: ASIF similarities lie in [0, 1] and the k continuations of one caption differ little. Measured
#: with SmolLM2 + EfficientNet-Lite0/MiniLM anchors (700 coco-mini train pairs, p=8) over 8 val
#: images × 10 steps: the spread across the 45 candidates is bimodal (std median 0.003, q90 0.06).
#: At 100 the candidates that differ in content get a decisive softmax (top mass q75 0.69) while
#: near-identical ones (punctuation, word pieces) stay near uniform (median 0.06); 300 lets the
#: image term pick among near-identical candidates too (median 0.29, q75 0.96), 50 weakens the
#: decisive steps (q75 0.36). Stand-in ASIF per the design notes (k = all 700 anchors).
DEFAULT_ASIF_TEMPERATURE = 100.0


@runtime_checkable
class Scorer(Protocol):
    """Scores images against candidate texts for MAGIC."""

    def embed_images(self, images: Sequence[Any]) -> Tensor: ...      # (B, D) float32

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor: ...  # (B, k)


def _check_texts(image_emb: Tensor, texts: Sequence[Sequence[str]]) -> int:
    """Validate a score() call; return k."""
    if isinstance(texts, str) or not texts or isinstance(texts[0], str):
        raise DataError("texts must be one list of candidate strings per image, e.g. [['a dog', 'a cat']]")
    if image_emb.ndim != 2 or image_emb.shape[0] != len(texts):
        raise DataError(f"image_emb must be (B, D) with B = {len(texts)} text lists, "
                        f"got {tuple(image_emb.shape)}")
    k = len(texts[0])
    if k == 0 or any(len(row) != k for row in texts):
        raise DataError(f"every image needs the same number (>= 1) of candidate texts, got "
                        f"{[len(row) for row in texts]}")
    return k


class CallableScorer:
    """Wrap a function ``fn(image_emb (B, D), texts) -> (B, k)`` (and optionally an image embedder)."""

    def __init__(self, fn: Callable[[Tensor, Sequence[Sequence[str]]], Any],
                 embed_images: Callable[[Sequence[Any]], Tensor] | None = None) -> None:
        self.fn, self._embed_images = fn, embed_images

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        if self._embed_images is None:
            raise TypeError("this CallableScorer has no image embedder: pass embed_images= when "
                            "wrapping the function, or give magic_search the image_emb directly")
        return torch.as_tensor(self._embed_images(images)).float()

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
        k = _check_texts(image_emb, texts)
        out = torch.as_tensor(self.fn(image_emb, texts)).float()
        if out.shape != (len(texts), k):
            raise DataError(f"scorer function returned shape {tuple(out.shape)}, expected (B, k) = "
                            f"{(len(texts), k)}")
        return out


def as_scorer(obj: Any) -> Any:
    """``obj`` if it is a :class:`Scorer`, a :class:`CallableScorer` around a plain callable."""
    if isinstance(obj, Scorer):
        return obj
    if callable(obj):
        return CallableScorer(obj)
    raise TypeError(f"a scorer must have score()/embed_images() or be a callable "
                    f"(image_emb, texts) -> (B, k), got {type(obj).__name__}")


# --- a causal CLIP text tower seen layer by layer ---------------------------------------------

@dataclass(frozen=True)
class _Block:
    """One pre-norm transformer block: x += ls1·out(attn(ln1 x)); x += ls2·fc2(act(fc1(ln2 x)))."""

    ln1: nn.Module
    qkv_w: Tensor | PackedMatrix   # (3W, W), rows q | k | v
    qkv_b: Tensor   # (3W,)
    out_w: Tensor | PackedMatrix
    out_b: Tensor
    ls1: Tensor | None
    ln2: nn.Module
    fc1_w: Tensor | PackedMatrix
    fc1_b: Tensor
    act: nn.Module
    fc2_w: Tensor | PackedMatrix
    fc2_b: Tensor
    ls2: Tensor | None

    @property
    def gelu(self) -> str | None:
        """The GELU fc1 applies inside its matrix kernel, when ``act`` is one and fc1 is packed."""
        return gelu_kind(self.act) if isinstance(self.fc1_w, PackedMatrix) else None


@dataclass(frozen=True)
class _TextTower:
    """Token + position embeddings, blocks, final norm and projection of a causal text tower."""

    token_embedding: nn.Module
    positions: Tensor          # (L, W)
    blocks: tuple[_Block, ...]
    heads: int
    ln_final: nn.Module
    project: Callable[[Tensor], Tensor]


def _lin(x: Tensor, w: Tensor | PackedMatrix, b: Tensor | None) -> Tensor:
    """``x @ w.T + b`` with the matmul (and bias) in ``w``'s dtype and the result in float32."""
    return linear(x.to(w.dtype), w, b).float()


def _mlp(blk: _Block, x: Tensor) -> Tensor:
    """``fc2(act(fc1(x)))`` in float32; a GELU runs inside a packed fc1, whose output then goes to
    fc2 in the weights' dtype (no float32 round trip of the wide hidden layer)."""
    if blk.gelu is not None:
        hidden = linear(x.to(blk.fc1_w.dtype), blk.fc1_w, blk.fc1_b, activation=blk.gelu)
        return _lin(hidden, blk.fc2_w, blk.fc2_b)
    return _lin(blk.act(_lin(x, blk.fc1_w, blk.fc1_b)), blk.fc2_w, blk.fc2_b)


def _layers(tower: _TextTower, x: Tensor, seen: Visibility, past: Tensor | None,
            pick: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Run every block on N flat tokens ``x (N, W)`` that see what ``seen`` says; ``past``: held
    keys/values ``(layers, 2, B, h, P, W/h)`` or None. ``pick (M,)``: the only tokens whose output
    is wanted; the last block runs its attention, output projection and MLP for those alone (its
    keys/values still for all N). Returns x (``(N, W)``, or ``(M, W)`` at ``pick``) and each
    layer's ``(N, 3, h, W/h)`` queries | keys | values."""
    n, width = x.shape
    heads, last = tower.heads, len(tower.blocks) - 1
    new_qkv = []
    for i, blk in enumerate(tower.blocks):
        qkv = _lin(blk.ln1(x), blk.qkv_w, blk.qkv_b).view(n, 3, heads, width // heads)
        new_qkv.append(qkv)
        rows = pick if i == last else None
        o = list_attention(qkv, (past[i, 0], past[i, 1]) if past is not None else None, seen, rows)
        if rows is not None:
            x = x[rows]
        o = _lin(o.reshape(len(x), width), blk.out_w, blk.out_b)
        x = x + (o if blk.ls1 is None else o * blk.ls1)
        m = _mlp(blk, blk.ln2(x))
        x = x + (m if blk.ls2 is None else m * blk.ls2)
    return x, new_qkv


class PrefixMemory:
    """Keys/values of recent reference prefixes of a causal text tower, by their token ids.

    A prefix's keys/values depend on its tokens only (causal attention, absolute positions), so
    those of a held row serve the leading tokens any later text has in common with it, whole or
    not: MAGIC's next step (the same continuation plus one token), also when its last word
    re-tokenises. Holds at most ``size`` rows (least recently used dropped), each as one tensor
    ``(layers, 2, h, length, W/h)`` of keys and values."""

    def __init__(self, size: int = 64) -> None:
        self.size = int(size)
        self._kv: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kv)

    def clear(self) -> None:
        self._kv.clear()

    def _longest(self, row: Sequence[int]) -> tuple[int, Tensor | None]:
        """The held row sharing most leading tokens with ``row``: (that many, its keys/values)."""
        best, best_key, row = 0, None, tuple(row)
        for key in self._kv:
            common = len(os.path.commonprefix([key, row]))
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None
        self._kv.move_to_end(best_key)
        return best, self._kv[best_key]

    def recall(self, rows: Sequence[Sequence[int]]) -> tuple[list[int], Tensor | None]:
        """How many leading tokens of each of B token-id ``rows`` are held, and their keys/values
        ``(layers, 2, B, h, K, W/h)``, K the most held (a row holding fewer is zero beyond: mask
        it); None when nothing is held."""
        hits = [self._longest(row) for row in rows]
        known = [n for n, _ in hits]
        if max(known, default=0) == 0:
            return known, None
        template = next(kv for n, kv in hits if n)
        layers, _, heads, _, dim = template.shape
        held = template.new_zeros(layers, 2, len(rows), heads, max(known), dim)
        for b, (n, kv) in enumerate(hits):
            if n:
                held[:, :, b, :, :n] = kv[:, :, :, :n]
        return known, held

    def store(self, row: Sequence[int], kv: Tensor) -> None:
        """Keep token ids ``row`` with their keys/values ``kv (layers, 2, h, len(row), W/h)``."""
        key = tuple(row)
        self._kv[key] = kv
        self._kv.move_to_end(key)
        while len(self._kv) > self.size:
            self._kv.popitem(last=False)


def encode_shared_prefix(tower: _TextTower, ids: Tensor, pool: Tensor, *,
                         share: bool = True, memory: PrefixMemory | None = None) -> Tensor:
    """Pooled text features ``(B, k, D)`` of ``ids (B, k, L)`` pooled at ``pool (B, k)``.

    Per image the k rows run as a prefix tree, packed into one sequence: rows that agree up to a
    position share that token, which runs once (the candidates' common continuation, candidates
    that re-tokenise the same last word alike, rows identical up to case), each token attending
    to its own ancestors in the tree only. Exact for causal towers. ``memory`` keeps keys/values
    between calls: per image, the row sharing most with the others is the reference; the leading
    tokens the memory holds of it are not run again, and the rows sharing them attend to the
    held keys/values instead (a row that re-tokenises the last word shares fewer of them and runs
    the rest in the tree). The reference's new tokens are then remembered: MAGIC's next step,
    the same continuation plus the chosen token, runs only that token and the candidates.
    ``share=False`` runs every row from position 0 (identical rows still run once). Only the
    pooled positions go through the last block's attention and MLP.
    """
    n_img, k, length = ids.shape
    device = ids.device
    rows, images = torch.arange(k, device=device), torch.arange(n_img, device=device)
    positions = torch.arange(length, device=device)
    # common leading tokens of every pair of rows (k² comparisons of short id rows)
    eq = (ids[:, :, None, :] == ids[:, None, :, :]).long().cumprod(-1).sum(-1)       # (B, k, k)
    agree = eq if share else torch.where(eq == length, eq, torch.zeros_like(eq))
    # 1. what the memory holds: row i starts at start[b, i] (the leading tokens it has in common
    #    with the reference and that are held); rows agreeing through a position have the same
    #    start or both start after it (shown by cases: where each diverges from the reference)
    start, held, ref_rows = torch.zeros(n_img, k, dtype=torch.long, device=device), None, []
    if share and memory is not None:
        ref = eq.sum(2).argmax(1)                                                     # (B,)
        lcp = torch.minimum(eq[images, ref], pool)                                    # (B, k)
        top = lcp.amax(1)                                    # reference tokens shared with a row
        ref_rows = [ids[b, ref[b], :top[b]].tolist() for b in range(n_img)]
        known, held = memory.recall(ref_rows)
        known = torch.tensor(known, device=device)
        start = torch.minimum(lcp, known[:, None])
    # 2. the rows' tokens start .. pool as a prefix tree, packed into one sequence per image:
    #    the token (i, p) is run by the first row j with agree[i, j] > p, and token (a, p) sees
    #    (c, q) iff q <= p and rows a and c agree through q. The N tokens stay flat (image-major).
    span = (positions >= start[..., None]) & (positions <= pool[..., None])        # (B, k, L)
    runner = (agree[..., None] > positions).int().argmax(2)                        # (B, k, L)
    img, row, position = (span & (runner == rows[None, :, None])).nonzero(as_tuple=True)
    per_img = torch.bincount(img, minlength=n_img)
    first = torch.cumsum(per_img, 0) - per_img                                   # (B,) flat index
    slot = torch.arange(len(img), device=device) - first[img]
    width = int(per_img.max())
    packed_pos = torch.arange(width, device=device).repeat(n_img, 1)        # padding: own index
    packed_row = torch.full((n_img, width), -1, dtype=torch.long, device=device)
    packed_pos[img, slot], packed_row[img, slot] = position, row
    x = tower.token_embedding(ids[img, row, position]).float() + \
        tower.positions[position.clamp_max(tower.positions.shape[0] - 1)]   # (N, W)
    real = packed_row >= 0
    r = packed_row.clamp_min(0)
    ancestor = agree[images[:, None, None], r[:, :, None], r[:, None, :]] > packed_pos[:, None, :]
    own = torch.where(real[:, :, None] & real[:, None, :], ancestor,        # padding sees padding
                      ~real[:, :, None] & ~real[:, None, :])                # (B, Q, Q)
    own &= packed_pos[:, None, :] <= packed_pos[:, :, None]
    if held is not None:  # the held positions each token's row starts after
        visible = torch.zeros(n_img, width, dtype=torch.long, device=device)  # padding: none
        visible[img, slot] = start[img, row]
        own = torch.cat([positions[None, None, :held.shape[4]] < visible[:, :, None], own], 2)
    slot_of = torch.full((n_img, k, length), -1, dtype=torch.long, device=device)
    slot_of[img, row, position] = slot
    of_img = images[:, None]
    pick = first[:, None] + slot_of[of_img, runner[of_img, rows, pool], pool]       # (B, k) flat
    pooled, new_qkv = _layers(tower, x, Visibility.from_mask(own, img, slot), held, pick.reshape(-1))
    if ref_rows:  # 3. remember each reference row: held keys/values + this pass's at its tokens
        new = top - known                                                         # (B,)
        at = (known[:, None] + torch.arange(int(new.max()), device=device)).clamp_max(length - 1)
        at = first[:, None] + slot_of[of_img, runner[of_img, ref[:, None], at], at].clamp_min(0)
        kv = torch.stack([qkv[at, 1:].permute(2, 0, 3, 1, 4) for qkv in new_qkv])  # (layers, 2, B, h, m, d)
        for b, (n_known, n_new) in enumerate(zip(known.tolist(), new.tolist())):
            if n_new > 0:
                parts = [held[:, :, b, :, :n_known]] if n_known else []
                memory.store(ref_rows[b], torch.cat(parts + [kv[:, :, b, :, :n_new]], 3))
    return tower.project(tower.ln_final(pooled)).view(n_img, k, -1)


def _weights(dtype: torch.dtype, packed: bool) -> Callable[[Tensor], Tensor | PackedMatrix]:
    """How a tower keeps a weight matrix: in ``dtype``, packed for the CPU kernels if asked."""
    return (lambda w: pack(w.detach().to(dtype))) if packed else (lambda w: w.detach().to(dtype))


def _open_clip_tower(model: Any, dtype: torch.dtype, packed: bool) -> _TextTower | None:
    """The text tower of an open_clip CLIP/CustomTextCLIP, or None when it is not a plain causal one."""
    text = getattr(model, "text", model)
    weight = _weights(dtype, packed)
    attn_mask = getattr(text, "attn_mask", None)
    blocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    if attn_mask is None or blocks is None or getattr(text, "cls_emb", None) is not None:
        return None
    pool_type = getattr(model, "text_pool_type", getattr(text, "pool_type", None))
    if pool_type not in ("argmax", "eos", "last", "first"):
        return None
    out = []
    for blk in blocks:
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        plain_mlp = isinstance(mlp, nn.Sequential) and [n for n, _ in mlp.named_children()] == \
            ["c_fc", "gelu", "c_proj"]
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(blk, "ln_1_kv") or not plain_mlp:
            return None
        ls = [getattr(getattr(blk, name), "gamma", None) for name in ("ls_1", "ls_2")]
        out.append(_Block(blk.ln_1, weight(attn.in_proj_weight), attn.in_proj_bias,
                          weight(attn.out_proj.weight), attn.out_proj.bias, ls[0], blk.ln_2,
                          weight(mlp.c_fc.weight), mlp.c_fc.bias, mlp.gelu,
                          weight(mlp.c_proj.weight), mlp.c_proj.bias, ls[1]))
    proj = text.text_projection
    if proj is None:
        project = lambda x: x  # noqa: E731
    else:
        proj_w, proj_b = (proj.weight, proj.bias) if isinstance(proj, nn.Linear) else (proj.t(), None)
        proj_w = weight(proj_w)
        project = lambda x: _lin(x, proj_w, proj_b)  # noqa: E731
    return _TextTower(text.token_embedding, text.positional_embedding.float(), tuple(out),
                      blocks[0].attn.num_heads, text.ln_final, project)


def _hf_clip_tower(model: Any, dtype: torch.dtype, packed: bool) -> _TextTower:
    """The text tower of a transformers CLIPModel."""
    weight = _weights(dtype, packed)
    text = model.text_model
    out = []
    for layer in text.encoder.layers:
        att = layer.self_attn
        out.append(_Block(layer.layer_norm1,
                          weight(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                          torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
                          weight(att.out_proj.weight), att.out_proj.bias, None, layer.layer_norm2,
                          weight(layer.mlp.fc1.weight), layer.mlp.fc1.bias, layer.mlp.activation_fn,
                          weight(layer.mlp.fc2.weight), layer.mlp.fc2.bias, None))
    proj_w = weight(model.text_projection.weight)
    return _TextTower(text.embeddings.token_embedding, text.embeddings.position_embedding.weight.float(),
                      tuple(out), text.config.num_attention_heads, text.final_layer_norm,
                      lambda x: _lin(x, proj_w, None))


class ClipScorer:
    """CLIP image–text logits (cosine × logit scale [+ bias]) with a shared-prefix text cache.

    model: an open_clip CLIP model (``tokenizer`` = ``open_clip.get_tokenizer(name)``,
    ``preprocess`` its eval transform) or a transformers CLIPModel (``tokenizer`` its tokenizer,
    ``preprocess`` its image processor). ``dtype`` is the text tower's matmul dtype (float32
    default; bfloat16 is faster on CPUs with bf16 units, at ~1e-2 relative error).
    ``prefix_cache=False`` runs every candidate from its first token (for comparison).
    ``packed=True`` (default) keeps the text tower's weight matrices packed for the CPU's matrix
    kernels (:mod:`nofree.packing`; ~1.3–1.7× faster at decoding sizes, a no-op on GPUs).
    ``seconds`` accumulates time spent tokenising and in the text tower.
    """

    def __init__(self, model: Any, tokenizer: Any, *, preprocess: Any = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 prefix_cache: bool = True, packed: bool = True) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.preprocess, self.prefix_cache = tokenizer, preprocess, prefix_cache
        self.is_hf = hasattr(model, "get_text_features") and hasattr(model, "text_model")
        if not self.is_hf and not hasattr(model, "encode_text"):
            raise TypeError("ClipScorer needs an open_clip or transformers CLIP model, got "
                            f"{type(model).__name__}")
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = float(bias.detach()) if bias is not None else 0.0
        with torch.no_grad():
            self.tower = _hf_clip_tower(model, dtype, packed) if self.is_hf else \
                _open_clip_tower(model, dtype, packed)
        if self.is_hf:
            cfg = model.config.text_config
            self.context_length, self.eos_id = int(cfg.max_position_embeddings), int(cfg.eos_token_id)
            self.pool_type = "argmax" if self.eos_id == 2 else "eos"
        else:
            text = getattr(model, "text", model)
            self.context_length = int(getattr(tokenizer, "context_length", None) or text.context_length)
            self.pool_type = getattr(model, "text_pool_type", getattr(text, "pool_type", "argmax"))
            self.eos_id = getattr(model, "text_eos_id", getattr(text, "eos_id", None))
        self._ids: OrderedDict[str, Tensor] = OrderedDict()
        self.prefix_memory = PrefixMemory()  # keys/values of recent continuations, across steps
        self.seconds = {"tokenize": 0.0, "text_tower": 0.0}

    @classmethod
    def from_encoder(cls, encoder: Any, **kw: Any) -> "ClipScorer":
        """From either tower of a loaded ``open_clip:``/``hf-clip:`` encoder (they share the model)."""
        preprocess = getattr(encoder, "preprocess", None) or getattr(encoder, "processor", None)
        return cls(encoder.model, encoder.tokenizer, preprocess=preprocess,
                   device=kw.pop("device", getattr(encoder, "device", None)), **kw)

    @classmethod
    def from_spec(cls, spec: str, *, device: str | torch.device | None = None, **kw: Any) -> "ClipScorer":
        """From a spec, e.g. ``open_clip:ViT-B-32@laion2b_s34b_b79k`` or ``hf-clip:NAME``."""
        from nofree.registry import load_encoder

        return cls.from_encoder(load_encoder(spec, modality="text", device=device), device=device, **kw)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """``(B, D)`` L2-normalised image features of PIL images (or a preprocessed ``(B, 3, S, S)``)."""
        if isinstance(images, Tensor):
            pixels = images
        elif self.preprocess is None:
            raise TypeError("ClipScorer was built without preprocess=: pass the model's image "
                            "transform/processor, or give a preprocessed (B, 3, S, S) tensor")
        elif self.is_hf:
            pixels = self.preprocess(images=[im.convert("RGB") for im in images],
                                     return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        pixels = pixels.to(self.device)
        if self.is_hf:
            out = self.model.get_image_features(pixel_values=pixels)
            out = out if isinstance(out, Tensor) else out.pooler_output
        else:
            out = self.model.encode_image(pixels)
        return l2_normalize(out).cpu()

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """``(N, L)`` CLIP token ids, memoised per string."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if todo:
            bounded = [bound_text(text, self.context_length) for text in todo]
            if self.is_hf:
                ids = self.tokenizer(bounded, padding="max_length", truncation=True,
                                     max_length=self.context_length, return_tensors="pt")["input_ids"]
            else:
                ids = self.tokenizer(bounded)
            for text, row in zip(todo, ids):
                self._ids[text] = row
            while len(self._ids) > 50_000:
                self._ids.popitem(last=False)
        return torch.stack([self._ids[t] for t in texts]).to(self.device)

    def pool_index(self, ids: Tensor) -> Tensor:
        """``(N,)`` the position whose state the text tower pools (end-of-text for CLIP)."""
        if self.pool_type == "argmax":
            return ids.argmax(-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(-1)
        if self.pool_type == "last":
            return torch.full(ids.shape[:1], ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        return torch.zeros(ids.shape[:1], dtype=torch.long, device=ids.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[Sequence[str]]) -> Tensor:
        """``(B, k, D)`` L2-normalised features of B lists of k texts (the fast path)."""
        start = time.perf_counter()
        n_img, k = len(texts), len(texts[0])
        ids = self.tokenize([t for row in texts for t in row])
        mid = time.perf_counter()
        self.seconds["tokenize"] += mid - start
        if self.tower is None:  # not a plain causal tower: the model's own encoder
            feats = self.model.encode_text(ids)
        else:
            pool = self.pool_index(ids).view(n_img, k)
            feats = encode_shared_prefix(self.tower, ids.view(n_img, k, -1), pool,
                                         share=self.prefix_cache,
                                         memory=self.prefix_memory if self.prefix_cache else None)
        self.seconds["text_tower"] += time.perf_counter() - mid
        return l2_normalize(feats.reshape(n_img, k, -1))

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
        """``(B, k)`` float32: logit_scale · cos(image b, text b,i) + logit_bias."""
        _check_texts(image_emb, texts)
        text_emb = self.encode_texts(texts)
        image = l2_normalize(image_emb.to(self.device))
        return (self.logit_scale * torch.einsum("bd,bkd->bk", image, text_emb) + self.logit_bias).cpu()


# --- ASIF --------------------------------------------------------------------------------------

def _dense(rel: Any) -> Tensor:
    """A float32 dense torch tensor from any relative-representation container: a torch tensor
    (dense or sparse), an object with ``to_dense()`` or ``toarray()`` (scipy), or an array."""
    if isinstance(rel, Tensor):
        return (rel.to_dense() if rel.layout != torch.strided else rel).float()
    if hasattr(rel, "to_dense"):
        return torch.as_tensor(rel.to_dense()).float()
    if hasattr(rel, "toarray"):
        rel = rel.toarray()
    return torch.as_tensor(rel).float()


def _relative_dot(text_rel: Any, image_rel: Tensor) -> Tensor:
    """``(U, B)`` inner products of text relative representations with dense image ones ``(B, N)``.

    Row-sparse containers (``values``/``indices`` ``(U, k)``, as ASIF keeps its top-k entries)
    gather k anchors per text instead of densifying; torch sparse tensors use a sparse matmul.
    """
    values, indices = getattr(text_rel, "values", None), getattr(text_rel, "indices", None)
    if isinstance(values, Tensor) and isinstance(indices, Tensor):
        picked = image_rel.T[indices.to(image_rel.device)]                 # (U, k, B)
        return (picked * values.to(image_rel.device).float()[..., None]).sum(1)
    if isinstance(text_rel, Tensor) and text_rel.layout != torch.strided:
        return torch.sparse.mm(text_rel.float(), image_rel.T.contiguous())
    return _dense(text_rel) @ image_rel.T


class AsifScorer:
    """ASIF similarity ⟨ρ_img, ρ_txt⟩ between an image and candidate texts, × ``temperature``.

    asif: a fitted :class:`nofree.anchors.asif.ASIF` (``transform(emb, modality=)`` gives the
    relative representations ``(N, n_anchors)``); text_encoder / image_encoder: the encoders its
    anchors were built with (``image_encoder`` is needed only for :meth:`embed_images`).
    ``image_emb`` passed to :meth:`score` are the image encoder's embeddings ``(B, Di)``; their
    relative representations are computed once per distinct image and kept (``cache_images``).
    Repeated candidate strings within a call are embedded once. ``packed=True`` (default)
    encodes the candidates with the text encoder's packed twin (``text_encoder.packed()``, when
    it has one: same embeddings to ~1e-6, faster matrix kernels on CPUs).
    """

    def __init__(self, asif: Any, text_encoder: Any, image_encoder: Any = None, *,
                 temperature: float = DEFAULT_ASIF_TEMPERATURE, cache_images: int = 1024,
                 packed: bool = True) -> None:
        if not temperature > 0:
            raise DataError(f"temperature must be > 0, got {temperature}")
        if packed and hasattr(text_encoder, "packed"):
            text_encoder = text_encoder.packed()
        self.asif, self.text_encoder, self.image_encoder = asif, text_encoder, image_encoder
        self.temperature, self.cache_images = float(temperature), cache_images
        self._image_rel: OrderedDict[bytes, Tensor] = OrderedDict()
        self.seconds = {"text_encoder": 0.0, "relative": 0.0}

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """``(B, Di)`` image-encoder embeddings (what :meth:`score` takes)."""
        if self.image_encoder is None:
            raise TypeError("AsifScorer was built without image_encoder=: pass the image encoder "
                            "the anchors were built with, or give magic_search its embeddings")
        return self.image_encoder.encode(list(images)).float()

    def image_relative(self, image_emb: Tensor) -> Tensor:
        """``(B, n_anchors)`` dense relative representations, cached per image."""
        image_emb = image_emb.detach().float().cpu()
        keys = [row.numpy().tobytes() for row in image_emb]
        todo = [i for i, key in enumerate(keys) if key not in self._image_rel]
        if todo:
            rel = _dense(self.asif.transform(image_emb[todo], modality="image"))
            for i, row in zip(todo, rel):
                self._image_rel[keys[i]] = row
            while len(self._image_rel) > self.cache_images:
                self._image_rel.popitem(last=False)
        return torch.stack([self._image_rel[key] for key in keys])

    def score(self, image_emb: Tensor, texts: Sequence[Sequence[str]]) -> Tensor:
        """``(B, k)`` float32: temperature · ⟨ρ_img(b), ρ_txt(text b,i)⟩."""
        k = _check_texts(image_emb, texts)
        image_rel = self.image_relative(image_emb)                        # (B, n)
        flat = [t for row in texts for t in row]
        unique = list(dict.fromkeys(flat))
        start = time.perf_counter()
        text_emb = self.text_encoder.encode(unique)                       # (U, Dt)
        mid = time.perf_counter()
        text_rel = self.asif.transform(text_emb, modality="text")         # (U, n), maybe sparse
        sim = _relative_dot(text_rel, image_rel.to(text_emb.device))      # (U, B)
        where = {t: i for i, t in enumerate(unique)}
        index = torch.tensor([where[t] for t in flat]).view(len(texts), k)
        out = sim.cpu()
        self.seconds["text_encoder"] += mid - start
        self.seconds["relative"] += time.perf_counter() - mid
        return self.temperature * out[index, torch.arange(len(texts))[:, None]].float()
