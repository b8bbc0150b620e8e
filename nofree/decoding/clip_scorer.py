"""The CLIP scorer of MAGIC: CLIP image–text logits, candidate texts run as a prefix tree.

:class:`ClipScorer` scores an image against its k candidate texts as a CLIP model does: cosine
× the model's logit scale (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), for open_clip and transformers CLIP models. The k candidates of
one image share their text up to the last word, and CLIP's text tower is causal, so the shared
token prefix runs once and only the candidates' few differing tokens (up to the pooled
end-of-text token), merged into a prefix tree, run on top of its cached keys and values
(:func:`encode_shared_prefix`, which runs the blocks of :mod:`nofree.encoders.text_tower` with
the tree's attention). :class:`PrefixMemory` holds those keys and values across MAGIC's steps.
Candidates are re-tokenised in full, so when a new LM token changes the CLIP tokens of the
prefix's last word the shared prefix is simply shorter: the result equals the plain
``encode_text`` (to float rounding).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.core import bound_text, l2_normalize, resolve_device
from nofree.decoding.attention import Visibility, list_attention
from nofree.decoding.scorers import check_texts
from nofree.encoders.text_tower import TextTower, is_hf_clip, text_pooling, text_tower

__all__ = ["ClipScorer", "PrefixMemory", "encode_shared_prefix"]


def _layers(tower: TextTower, x: Tensor, seen: Visibility, past: Tensor | None,
            pick: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Run the tower's blocks on N flat tokens ``x (N, W)`` that see what ``seen`` says; ``past``:
    held keys/values ``(layers, 2, B, h, P, W/h)`` or None. ``pick (M,)``: the only tokens whose
    output is wanted (see :meth:`TextTower.run`). Returns x and each layer's ``(N, 3, h, W/h)``
    queries | keys | values."""
    def attend(layer: int, qkv: Tensor, rows: Tensor | None) -> Tensor:
        return list_attention(qkv, (past[layer, 0], past[layer, 1]) if past is not None else None, seen, rows)

    return tower.run(x, attend, pick)


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



def encode_shared_prefix(tower: TextTower, ids: Tensor, pool: Tensor, *,
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
    x = tower.embed(ids[img, row, position], position)                        # (N, W)
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
    return tower.features(pooled).view(n_img, k, -1)



class ClipScorer:
    """CLIP image–text logits (cosine × logit scale [+ bias]) with a shared-prefix text cache.

    model: an open_clip CLIP model (``tokenizer`` = ``open_clip.get_tokenizer(name)``,
    ``preprocess`` its eval transform) or a transformers CLIPModel (``tokenizer`` its tokenizer,
    ``preprocess`` its image processor). ``dtype`` is the text tower's matmul dtype (float32
    default; bfloat16 is faster on CPUs with bf16 units, at ~1e-2 relative error).
    ``prefix_cache=False`` runs every candidate from its first token (for comparison).
    ``packed=True`` (default) keeps the text tower's weight matrices packed for the CPU's matrix
    kernels (:mod:`nofree.kernels.packing`; ~1.3–1.7× faster at decoding sizes, a no-op on GPUs).
    ``seconds`` accumulates time spent tokenising and in the text tower.
    """

    def __init__(self, model: Any, tokenizer: Any, *, preprocess: Any = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 prefix_cache: bool = True, packed: bool = True) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.preprocess, self.prefix_cache = tokenizer, preprocess, prefix_cache
        self.is_hf = is_hf_clip(model)
        if not self.is_hf and not hasattr(model, "encode_text"):
            raise TypeError("ClipScorer needs an open_clip or transformers CLIP model, got "
                            f"{type(model).__name__}")
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = float(bias.detach()) if bias is not None else 0.0
        self.tower = text_tower(model, dtype=dtype, packed=packed)  # None: the model's own encode_text
        self.pooling = text_pooling(model, tokenizer)  # the tokens' length and pooled position
        self._ids: OrderedDict[str, Tensor] = OrderedDict()
        self.prefix_memory = PrefixMemory()  # keys/values of recent continuations, across steps
        self.seconds = {"tokenize": 0.0, "text_tower": 0.0}

    @property
    def context_length(self) -> int:
        """Token ids per text (the tokeniser pads or cuts every text to this many)."""
        return self.pooling.context_length

    @property
    def pool_type(self) -> str:
        """How the text tower picks its pooled position (see :class:`~nofree.encoders.text_tower.Pooling`)."""
        return self.pooling.pool_type

    @property
    def eos_id(self) -> int | None:
        """The end-of-text token id (used by ``pool_type == "eos"``)."""
        return self.pooling.eos_id

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
        return self.pooling.index(ids)

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
        check_texts(image_emb, texts)
        text_emb = self.encode_texts(texts)
        image = l2_normalize(image_emb.to(self.device))
        return (self.logit_scale * torch.einsum("bd,bkd->bk", image, text_emb) + self.logit_bias).cpu()
