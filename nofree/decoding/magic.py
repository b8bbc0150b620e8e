"""MAGIC decoding: a frozen LM writes text while an image–text scorer steers every step.

Su et al., 2022, "Language Models Can See: Plugging Visual Controls in Text Generation"
(MAGIC: iMAge-Guided text generatIon with CLIP). Nothing is trained. At each greedy step the
LM proposes its top-k next tokens V(k); each candidate v gets

    score(v) = (1 − α)·p_LM(v | x<t)                          model confidence
             − α·max_j cos(h_v, h_j)                          degeneration penalty
             + β·softmax_{v' ∈ V(k)}(s(I, text(x_gen ⊕ v')))[v]   image relevance

where p_LM is the full-vocabulary softmax, h are last-layer hidden states (h_j over every
earlier position, prompt included, padding excluded), x_gen is the continuation generated so far
(the prompt is not scored) and s is a scorer's image–text logit (:mod:`nofree.decoding.scorers`:
CLIP cosine × its logit scale, :mod:`nofree.decoding.clip_scorer`, or ASIF similarity × a
temperature). The highest score wins; with α = β = 0 this is exactly greedy decoding.

:func:`magic_search` is the whole method in one loop, read top to bottom. One batched LM forward
per step covers all B×k candidates. The LM is any :class:`nofree.core.LanguageModel`; the
optional capabilities declared beside it make the loop cheaper, never different. With a
:class:`~nofree.core.CandidateLM` (every transformers LM with a dynamic cache) the k candidates
of a row sit side by side after its cache, each attending to the cache and to itself only (tree
attention): the cache is read once per row, never copied k times, and the chosen candidate's
keys/values and hidden state carry on, so no second forward is needed. Other LMs get the cache
expanded to k rows per image, one candidate per row; when that expanded cache would pass
``cache_budget`` bytes (long prompts, large batches) the candidates run in row chunks and the
chosen tokens once more on the unexpanded cache.
With α = 0 the candidates' hidden states are not needed (only the penalty uses them): no
candidate forward runs, and the chosen tokens step like greedy decoding. A row's caption ends by
the rule of :mod:`nofree.decoding.stopping` (eos, dropped; a period after a word, kept; the length
limit), and finished rows drop out of the batch (their output never changes again).

Why this is not a transformers ``LogitsProcessor``: a processor sees only the next-token scores
``(B, V)`` and the ids so far. The degeneration penalty needs the last-layer hidden state each
candidate *would* produce, i.e. a forward of every candidate, which a processor never sees; it
could carry only the image term (β·softmax over the top-k), which without the penalty is a
different method. :func:`nofree.decoding.hf_generate.magic_custom_generate` instead plugs the
whole loop into ``model.generate(custom_generate=...)``.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.core import (CacheSizeLM, CandidateLM, DataError, HeadlessLM, LMStep, StackingLM, l2_normalize,
                         left_pad, offers)
from nofree.decoding.stopping import add_token

__all__ = ["Generation", "StepTrace", "magic_search", "greedy_search", "prefill", "length_groups"]

#: Most bytes of k-expanded KV cache magic_search holds at once (see its ``cache_budget``).
CANDIDATE_CACHE_BUDGET = 1 << 30
#: Fewest leading tokens, common to every prompt of a batch, that :func:`prefill` runs once.
SHARED_PREFIX_MIN = 8


@dataclass
class StepTrace:
    """Diagnostics of one MAGIC step for the ``b`` rows still decoding (all ``(b, k)`` unless noted).

    rows: ``(b,)`` original batch index of each row; candidates: token ids; lm_prob: p_LM;
    penalty: max cosine to earlier hidden states (NaN for candidates pruned before their forward,
    see ``magic_search(prune=)``); image_prob: scorer softmax (None when β = 0);
    chosen: ``(b,)`` index into k of the winning candidate.
    """

    rows: Tensor
    candidates: Tensor
    lm_prob: Tensor
    penalty: Tensor
    image_prob: Tensor | None
    chosen: Tensor


@dataclass
class Generation:
    """The result of a decoding run over B prompts.

    ids: generated token ids per row (prompt and eos excluded); texts: their decoded text;
    stop: why each row stopped ('eos', 'period' or 'length'); steps: one :class:`StepTrace` per
    step (empty for greedy); seconds: wall time per phase (prefill, lm_candidates, penalty,
    texts, scorer, select) for profiling.
    """

    ids: list[list[int]]
    texts: list[str]
    stop: list[str]
    steps: list[StepTrace] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _check_prompts(lm: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if isinstance(prompt_ids, Tensor) or not prompt_ids or isinstance(prompt_ids[0], int):
        raise DataError("prompt_ids must be a non-empty list of token-id lists, one per image "
                        "(e.g. lm.tokenize(['A picture of'] * n_images))")
    for row, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise DataError(f"prompt_ids[{row}] is empty: the LM needs at least one token to condition "
                            "on; start from a short text such as 'A picture of' or the bos token")
        bad = [t for t in prompt if not 0 <= int(t) < lm.vocab_size]
        if bad:
            raise DataError(f"prompt_ids[{row}] has ids outside the vocabulary [0, {lm.vocab_size}): "
                            f"{bad[:5]}")
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _append_tokens(lm: Any, rows: Tensor, tokens: list[int], generated: list[list[int]],
                   stop: list[str], stop_at_period: bool, max_new_tokens: int) -> list[int]:
    """Append each live row's chosen token by the stop rule (:func:`nofree.decoding.stopping.add_token`:
    eos is not kept), record why rows stop, and return the positions (into ``rows``) of the rows
    that go on."""
    keep = []
    for i, (r, token) in enumerate(zip(rows.tolist(), tokens)):
        reason = add_token(lm, generated[r], token, stop_at_period=stop_at_period, max_tokens=max_new_tokens)
        if reason is None:
            keep.append(i)
        else:
            stop[r] = reason
    return keep


def prefill(lm: Any, prompt_ids: Sequence[Sequence[int]]) -> tuple[Any, Tensor]:
    """Run B prompts: the LM's step (logits ``(B, V)``, hidden ``(B, T, H)``, cache) and the
    mask ``(B, T)`` (1 = real token).

    Two savings, both exact up to float rounding (position ids count real tokens only, so every
    row computes what it would alone):

    * the longest prefix common to every prompt (a chat template and instruction, typically),
      when at least :data:`SHARED_PREFIX_MIN` tokens, runs once and its cache serves all rows;
    * the rest of each prompt runs in groups of similar length (:func:`length_groups`), so that
      short prompts are not padded to the longest one; the groups' caches are then stacked, with
      masked gaps between the shared prefix and each row's own tokens: ``[shared][pad][own]``.

    LMs that cannot stack caches (not a :class:`~nofree.core.StackingLM`) get the prompts simply
    left-padded.
    """
    n = len(prompt_ids)
    if n == 1 or not offers(lm, StackingLM):
        ids, mask = left_pad(prompt_ids, lm.pad_id)
        return lm.step(ids, attention_mask=mask), mask
    shortest, first, shared = min(len(p) for p in prompt_ids), prompt_ids[0], 0
    while shared < shortest - 1 and all(p[shared] == first[shared] for p in prompt_ids):
        shared += 1           # each row keeps at least one own token: its logits come from it
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    head = lm.step(torch.tensor([list(first[:shared])])) if shared else None
    parts, order = [], []
    for rows in length_groups([len(p) - shared for p in prompt_ids]):
        own, own_mask = left_pad([prompt_ids[r][shared:] for r in rows], lm.pad_id)
        cache = lm.select_cache(head.cache, torch.zeros(len(rows), dtype=torch.long)) if head else None
        mask = torch.cat([own_mask.new_ones(len(rows), shared), own_mask], 1)
        parts.append((lm.step(own, cache=cache, attention_mask=mask), own_mask))
        order += rows
    if len(parts) == 1:
        (out, own_mask), = parts
        logits, hidden, cache = out.logits, out.hidden, out.cache
    else:
        cache = lm.stack_caches([out.cache for out, _ in parts], insert_at=shared)
        if cache is None:     # not a cache the LM can stack: one left-padded batch after all
            ids, mask = left_pad(prompt_ids, lm.pad_id)
            return lm.step(ids, attention_mask=mask), mask
        width = max(m.shape[1] for _, m in parts)   # the longest own part; shorter ones get gaps
        own_mask = torch.cat([torch.cat([m.new_zeros(len(m), width - m.shape[1]), m], 1) for _, m in parts])
        hidden = torch.cat([torch.cat([o.hidden.new_zeros(len(o.hidden), width - o.hidden.shape[1],
                                                          o.hidden.shape[2]), o.hidden], 1) for o, _ in parts])
        logits = torch.cat([o.logits for o, _ in parts])
    if order != sorted(order):  # back to the callers' row order
        back = torch.empty(n, dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(n)
        logits, hidden, own_mask = logits[back], hidden[back], own_mask[back]
        cache = lm.select_cache(cache, back)
    if head is not None:      # the shared prefix's hidden states lead every row
        hidden = torch.cat([head.hidden.expand(n, -1, -1), hidden], 1)
    mask = torch.cat([own_mask.new_ones(n, shared), own_mask], 1)
    return LMStep(logits=logits, hidden=hidden, cache=cache), mask


def length_groups(lengths: Sequence[int], *, slack: float = 1.25) -> list[list[int]]:
    """Row indices grouped by length (shortest first): in a group the longest row is at most
    ``slack`` times the shortest, so left padding wastes little."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    groups: list[list[int]] = []
    for r in order:
        if groups and lengths[r] <= slack * lengths[groups[-1][0]]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _tick(seconds: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = seconds.get(name, 0.0) + now - start
    return now


@torch.inference_mode()
def magic_search(lm: Any, scorer: Any, image_emb: Tensor | None, *,
                 prompt_ids: Sequence[Sequence[int]], k: int = 45, alpha: float = 0.1,
                 beta: float = 2.0, max_new_tokens: int = 16, stop_at_period: bool = True,
                 trace: bool = True, cache_budget: int = CANDIDATE_CACHE_BUDGET,
                 prune: bool = True) -> Generation:
    """MAGIC greedy decoding of one continuation per image.

    lm: a :class:`nofree.core.LanguageModel`; scorer: a :class:`~nofree.decoding.scorers.Scorer`
    or any callable ``(image_emb (b, D), texts: b lists of k str) -> (b, k)`` logits (ignored,
    may be None, when ``beta == 0``); image_emb: ``(B, D)`` from ``scorer.embed_images``;
    prompt_ids: B token-id lists (ragged, left-padded here). k: candidates per step (≤ V);
    alpha: degeneration-penalty weight; beta: image weight. Rows stop on eos (not kept), on a
    token containing '.' after at least one word (kept; when ``stop_at_period``) or after
    ``max_new_tokens`` (:mod:`nofree.decoding.stopping`). ``trace=False`` skips the per-step
    diagnostics. A :class:`~nofree.core.HeadlessLM` (``head_logits(hidden (b, H)) -> (b, V)``,
    ``step(..., logits=False)``) is asked for the candidates' hidden states only, and its output
    head runs on the b chosen rows; one that is also a :class:`~nofree.core.CandidateLM`
    (``candidate_step`` / ``keep_candidates``) runs them with tree attention.
    cache_budget (LMs without tree attention): most bytes of k-expanded cache held at once (for
    a :class:`~nofree.core.CacheSizeLM`). Beyond it the candidates run in chunks of rows, their caches are
    dropped, and the b chosen tokens run once more on the b-row cache: the same tokens, memory
    bounded by the budget rather than by b·k·(prompt length).
    prune: run the candidate forward only for candidates that can still win. The penalty term
    moves a score by at most |α|, so a candidate whose other two terms fall more than 2|α|
    below another candidate's cannot be chosen whatever its hidden state: exact (the same
    tokens as ``prune=False``), and it saves most of the LM's candidate work once the image
    term separates the candidates (not with random-weight models, whose scores are flat). The
    pruned candidates' ``StepTrace.penalty`` is NaN.
    """
    _check_prompts(lm, prompt_ids, max_new_tokens)
    k = int(k) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k
    n_rows = len(prompt_ids)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= lm.vocab_size:
        raise DataError(f"k={k!r} candidates per step must be an int in [1, vocab size "
                        f"{lm.vocab_size}]; MAGIC uses k=45")
    if beta != 0:
        from nofree.decoding.scorers import as_scorer

        scorer = as_scorer(scorer)
        if image_emb is None or image_emb.ndim != 2 or image_emb.shape[0] != n_rows:
            got = None if image_emb is None else tuple(image_emb.shape)
            raise DataError(f"image_emb must be (B, D) with B = {n_rows} prompts, got {got}; "
                            "compute it with scorer.embed_images(images)")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    # 1. prefill the prompts; `past` holds unit-norm hidden states of every real position so far
    out, mask = prefill(lm, prompt_ids)
    logits, cache = out.logits, out.cache                        # (b, V), cache of b rows
    past = l2_normalize(out.hidden)                              # (b, T, H)
    past_real = mask.to(past.device).bool()                      # (b, T)
    rows = torch.arange(n_rows)                                  # batch index of each live row
    # a headless LM skips its output head for the b·k candidates and applies it to the b chosen
    # ones only; one with tree attention runs the candidates side by side after each row's cache
    head = lm.head_logits if offers(lm, HeadlessLM) else None
    tree_step = lm.candidate_step if offers(lm, CandidateLM) else None
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    stop: list[str] = ["length"] * n_rows
    steps: list[StepTrace] = []
    start = _tick(seconds, "prefill", start)

    for _ in range(max_new_tokens):
        b = len(rows)
        # 2. the LM's top-k candidates and their full-vocabulary probabilities
        lm_prob, candidates = logits.softmax(-1).topk(k, dim=-1)            # (b, k) each
        # 3. image relevance of (continuation so far ⊕ candidate), softmax over the k candidates
        image_prob = None
        if beta != 0:
            cand_ids = candidates.tolist()
            texts = lm.decode([generated[r] + [v] for i, r in enumerate(rows.tolist())
                               for v in cand_ids[i]])
            texts = [texts[i * k:(i + 1) * k] for i in range(b)]
            start = _tick(seconds, "texts", start)
            logit = scorer.score(image_emb[rows], texts)                     # (b, k)
            image_prob = logit.to(lm_prob.device, torch.float32).softmax(-1)
            start = _tick(seconds, "scorer", start)
        # 4. which candidates need their hidden state: the penalty moves a score by at most |α|
        #    (cosines lie in [-1, 1]), so a candidate whose score, penalty aside, is more than
        #    2|α| below another's can never win (prune=True); `sub (b, k')` lists those that run
        sub = torch.arange(k).expand(b, k)
        if alpha != 0 and prune:
            reach = abs(alpha) * (1 + 1e-3) + 1e-6                            # margin for rounding
            rest = (1.0 - alpha) * lm_prob + (beta * image_prob if image_prob is not None else 0.0)
            alive = rest + reach >= (rest - reach).amax(-1, keepdim=True)     # (b, k)
            width = int(alive.sum(-1).max())
            sub = (~alive).int().argsort(dim=-1, stable=True)[:, :width].cpu()   # alive first
        width = sub.shape[1]
        sub_cands = candidates.gather(1, sub.to(candidates.device))          # (b, k')
        # 5. those b·k' candidates in one forward: side by side after each row's cache (tree
        #    attention), or for LMs without it one row per candidate on the k'-expanded cache
        #    (row chunks under the budget). Only the penalty needs them: none when α = 0.
        tree = tree_step(sub_cands, cache=cache, attention_mask=mask) \
            if tree_step and head and alpha != 0 else None
        cand_hidden = None
        if tree is not None:
            cand_hidden = l2_normalize(tree.hidden)                           # (b, k', H)
        elif alpha != 0:
            expand = torch.arange(b).repeat_interleave(width)                # (b·k',)
            cand_mask = torch.cat([mask[expand], mask.new_ones(b * width, 1)], 1)
            per_row = lm.cache_nbytes(cache) // b if offers(lm, CacheSizeLM) else 0
            chunk = b * width if per_row * b * width <= cache_budget else \
                max(1, cache_budget // max(per_row, 1))
            hidden = []
            for lo in range(0, b * width, chunk):
                part = slice(lo, lo + chunk)
                cand = lm.step(sub_cands.reshape(-1, 1)[part], cache=lm.select_cache(cache, expand[part]),
                               attention_mask=cand_mask[part], **({"logits": False} if head else {}))
                hidden.append(cand.hidden[:, -1])
            cand_hidden = l2_normalize(torch.cat(hidden)).view(b, width, -1)   # (b, k', H)
        start = _tick(seconds, "lm_candidates", start)
        # 6. degeneration penalty: max cosine to every earlier real position (NaN: not run)
        penalty = torch.zeros_like(lm_prob)
        if cand_hidden is not None:
            cosine = torch.einsum("bkh,bth->bkt", cand_hidden, past)
            ran = cosine.masked_fill(~past_real[:, None, :], float("-inf")).amax(-1)   # (b, k')
            penalty = torch.full_like(lm_prob, float("nan")).scatter_(1, sub.to(lm_prob.device), ran)
        start = _tick(seconds, "penalty", start)
        # 7. greedy choice; the chosen candidate's cache row and logits carry on
        score = (1.0 - alpha) * lm_prob - alpha * penalty
        if image_prob is not None:
            score = score + beta * image_prob
        score = score.masked_fill(penalty.isnan(), float("-inf"))             # pruned: cannot win
        chosen = score.argmax(-1).cpu()                                      # (b,) index into k
        at = (sub == chosen[:, None]).int().argmax(-1)                       # (b,) index into k'
        tokens = candidates.cpu()[torch.arange(b), chosen].tolist()
        if trace:
            steps.append(StepTrace(rows, candidates, lm_prob, penalty, image_prob, chosen))
        keep = _append_tokens(lm, rows, tokens, generated, stop, stop_at_period, max_new_tokens)
        if not keep:
            start = _tick(seconds, "select", start)
            break
        keep_t = torch.tensor(keep)
        next_mask = torch.cat([mask[keep_t], mask.new_ones(len(keep), 1)], 1)
        if tree is not None:  # the chosen candidates' keys/values and logits carry on
            cache = lm.keep_candidates(tree.cache, keep_t, at[keep_t], width)
            logits = head(tree.hidden[keep_t, at[keep_t]]).float()
        elif cand_hidden is not None and chunk >= b * width:  # the chosen rows' cache and logits
            pick = keep_t * width + at[keep_t]                               # rows of the b·k' batch
            cache = lm.select_cache(cand.cache, pick)
            logits = head(cand.hidden[pick, -1]).float() if head else cand.logits[pick]
        else:  # chunked, or no candidate forward (α = 0): the chosen tokens on the b-row cache
            nxt = lm.step(torch.tensor(tokens)[keep_t][:, None], cache=lm.select_cache(cache, keep_t),
                          attention_mask=next_mask)
            cache, logits = nxt.cache, nxt.logits
        mask = next_mask
        if cand_hidden is not None:
            past = torch.cat([past[keep_t], cand_hidden[keep_t, at[keep_t]][:, None]], 1)
            past_real = torch.cat([past_real[keep_t], past_real.new_ones(len(keep), 1)], 1)
        rows = rows[keep_t]
        start = _tick(seconds, "select", start)

    return Generation(ids=generated, texts=lm.decode(generated), stop=stop, steps=steps,
                      seconds=seconds)


@torch.inference_mode()
def greedy_search(lm: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                  stop_at_period: bool = True) -> Generation:
    """Plain greedy decoding with :func:`magic_search`'s batching and stopping rules.

    The reference MAGIC with α = β = 0 must reproduce token for token.
    """
    _check_prompts(lm, prompt_ids, max_new_tokens)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    out, mask = prefill(lm, prompt_ids)
    logits, cache = out.logits, out.cache
    rows = torch.arange(len(prompt_ids))
    generated: list[list[int]] = [[] for _ in prompt_ids]
    stop = ["length"] * len(prompt_ids)
    start = _tick(seconds, "prefill", start)
    for _ in range(max_new_tokens):
        tokens = logits.argmax(-1).tolist()                                  # (b,)
        keep = _append_tokens(lm, rows, tokens, generated, stop, stop_at_period, max_new_tokens)
        if not keep:
            break
        keep_t = torch.tensor(keep)
        if len(keep) < len(rows):
            cache, mask, rows = lm.select_cache(cache, keep_t), mask[keep_t], rows[keep_t]
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], 1)
        nxt = torch.tensor([[tokens[i]] for i in keep])
        out = lm.step(nxt, cache=cache, attention_mask=mask)
        logits, cache = out.logits, out.cache
    _tick(seconds, "steps", start)
    return Generation(ids=generated, texts=lm.decode(generated), stop=stop, seconds=seconds)
