"""Captioners: one ``caption(images) -> list[str]`` protocol over every method.

- :class:`RetrievalCaptioner` picks, for each image, a caption from a text pool by ASIF
  similarity, then re-ranks the top ``m`` candidates by *consensus* with the other retrieved
  captions (Devlin et al., 2015, "Exploring Nearest Neighbor Approaches for Image Captioning",
  choose the caption most similar to its neighbours): by CIDEr-D against the top retrieved
  captions (:mod:`nofree.decoding.consensus`, the default) or by mean cosine in the text
  encoder's space. The pool's embeddings and ASIF relative representations are computed once.
- ``MagicCaptioner`` (``nofree.decoding``) and ``AdapterCaptioner`` (``nofree.adapters``)
  implement the same protocol.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from nofree.core import DataError, clean_caption, l2_normalize

log = logging.getLogger(__name__)


def default_pool_path() -> Path:
    """The bundled caption pool: 24k COCO captions, none of them of a sample photo (cleaned by
    :func:`nofree.data.pool.filter_pool`: no line of it is dropped)."""
    from nofree import sample_dir

    return sample_dir() / "caption_corpus.txt"


def consensus_scores(asif_scores: Tensor, candidate_emb: Tensor, *, weight: float = 1.0) -> Tensor:
    """``(B, m)`` consensus score of each row's top-m candidates (higher is better).

    ``asif_scores`` ``(B, m)`` are the image–text scores of each row's top-m candidates and
    ``candidate_emb`` ``(B, m, Dt)`` their text embeddings (L2-normalised). The consensus of a
    candidate is its mean cosine to the row's other candidates; the score mixes it with the
    max-scaled ASIF score: ``weight·consensus + (1−weight)·score/max(score)``.
    """
    m = candidate_emb.shape[1]
    if m == 1:
        return torch.ones_like(asif_scores)
    cos = candidate_emb @ candidate_emb.transpose(1, 2)
    consensus = (cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)) / (m - 1)
    scaled = asif_scores / asif_scores.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return weight * consensus + (1 - weight) * scaled


def consensus_rerank(asif_scores: Tensor, candidate_emb: Tensor, *, weight: float = 1.0) -> Tensor:
    """``(B,)`` index of the chosen candidate per row: the argmax of :func:`consensus_scores`."""
    return consensus_scores(asif_scores, candidate_emb, weight=weight).argmax(dim=1)


#: How RetrievalCaptioner re-ranks its top candidates, and the default m for each (5-fold
#: cross-validation on coco-mini ``train``, benchmarks/magic_quality.py: CIDEr-D consensus over
#: the top 50 with 50 pseudo-references 52.0, embedding consensus over the top 100 47.2).
CONSENSUS_RERANK = {"cider": 50, "embedding": 100}


def _rerank_depth(consensus: str, rerank: int | None) -> int:
    """``rerank``, or the default m of ``consensus``; an unknown consensus is a clear error."""
    if consensus not in CONSENSUS_RERANK:
        raise DataError(f"consensus must be one of {tuple(CONSENSUS_RERANK)}, got {consensus!r}")
    return CONSENSUS_RERANK[consensus] if rerank is None else rerank


class RetrievalCaptioner:
    """Caption images with the best pool caption under an ASIF pipeline (or a CLIP-like scorer).

    ``pipeline`` is the joint image–text space that ranks the pool: an
    :class:`~nofree.anchors.pipeline.AsifPipeline` (ASIF similarity), or a
    :class:`~nofree.scoring.ScorerSpace` (the cosine of a CLIP-like model or a LiT: CLIPRe);
    "ASIF" below means whichever it is.

    ``pool`` is a list of candidate captions (e.g. ``caption_corpus.txt``; never the evaluation
    references). ``rerank`` is the number m of top candidates (by ASIF similarity) re-ranked by
    consensus (0 or 1 = plain argmax of the ASIF similarity; default :data:`CONSENSUS_RERANK`).
    ``consensus="cider"`` scores each candidate by CIDEr-D against the top ``references``
    retrieved captions (leaving itself out; n-gram weights from the pool), ``"embedding"`` by its
    mean text-encoder cosine to the other candidates, mixed with the ASIF score by
    ``consensus_weight`` (see :func:`consensus_scores`).

    ``clean_pool=True`` (default) first drops the pool's non-captions, too short or too long
    lines and repeats (:func:`nofree.data.pool.filter_pool`; one warning says how many and why),
    so ``self.pool`` may be shorter than ``pool``; ``False`` keeps every line as given.
    """

    def __init__(self, pipeline: Any, pool: Sequence[str], *, rerank: int | None = None,
                 consensus: str = "cider", references: int = 50, consensus_weight: float = 1.0,
                 chunk: int = 4096, clean_pool: bool = True) -> None:
        cleaned = ""
        if clean_pool:
            from nofree.data.pool import filter_pool

            found = filter_pool(pool)
            if found.n_dropped:
                cleaned = found.summary()
                log.warning("caption pool: %s as non-captions or repeats (--raw-pool / clean_pool=False "
                            "keeps every line)", cleaned)
            pool = found.captions
        if len(pool) == 0:
            raise DataError("the caption pool is empty" + (f" after cleaning ({cleaned})" if cleaned else "")
                            + ": give --pool a text file with one caption a line")
        rerank = _rerank_depth(consensus, rerank)
        if rerank < 0 or references < 1:
            raise DataError(f"rerank must be >= 0 and references >= 1, got {rerank} and {references}")
        self.pipeline = pipeline
        self.pool = list(pool)
        self.rerank = min(rerank, len(self.pool))
        self.consensus, self.references = consensus, min(references, len(self.pool))
        self.consensus_weight = consensus_weight
        self.chunk = chunk
        self._cider = None
        self.pool_emb = l2_normalize(pipeline.encode_texts(self.pool))  # (P, Dt)
        asif = getattr(pipeline, "asif", None)  # ASIF: the pool's relative representations, once
        self.pool_rel = asif.transform(self.pool_emb, modality="text") if asif is not None else self.pool_emb

    def with_consensus(self, consensus: str, rerank: int | None = None) -> "RetrievalCaptioner":
        """The same pool (embeddings shared, nothing re-encoded) re-ranked another way."""
        other = copy.copy(self)
        other.rerank = min(_rerank_depth(consensus, rerank), len(self.pool))
        other.consensus = consensus
        return other

    @property
    def cider(self) -> Any:
        """:class:`~nofree.decoding.consensus.CiderD` with n-gram weights from the pool (built once)."""
        if self._cider is None:
            from nofree.decoding.consensus import CiderD

            self._cider = CiderD(self.pool)
        return self._cider

    def top(self, image_emb: Tensor, n: int) -> list[list[str]]:
        """Each image's ``n`` pool captions of highest ASIF similarity, best first (ties: pool order)."""
        sim = self.scores(image_emb)
        top = sim.argsort(dim=1, descending=True, stable=True)[:, :min(n, len(self.pool))]
        return [[self.pool[j] for j in row] for row in top.tolist()]

    def scores(self, image_emb: Tensor) -> Tensor:
        """ASIF similarity ``(B, P)`` of images to every pool caption (the pipeline's, CSLS included)."""
        return self.pipeline.similarity(image_emb, self.pool_rel)

    def ranked(self, image_emb: Tensor, m: int) -> list[list[str]]:
        """For each image ``(B, Di)``, its ``m`` best distinct pool captions, best first.

        Best means highest consensus among the top ``rerank`` pool captions by ASIF, then the
        rest in ASIF order (plain ASIF order when ``rerank`` <= 1); captions equal up to case and
        a final period count once.
        """
        sim = self.scores(image_emb)
        depth = min(max(self.rerank, m, self.references if self.consensus == "cider" else 0), len(self.pool))
        top = sim.argsort(dim=1, descending=True, stable=True)[:, :depth]   # ties: pool order
        top_scores = sim.gather(1, top)
        if self.rerank > 1 and self.consensus == "embedding":
            order = consensus_scores(top_scores[:, :self.rerank], self.pool_emb[top[:, :self.rerank]],
                                     weight=self.consensus_weight)
            top = torch.cat([top[:, :self.rerank].gather(1, order.argsort(dim=1, descending=True, stable=True)),
                             top[:, self.rerank:]], dim=1)
        elif self.rerank > 1:
            reordered = []
            for row in top.tolist():
                texts = [self.pool[j] for j in row]
                score = self.cider.scores(texts[:self.rerank], texts[:self.references])
                head = sorted(range(len(score)), key=lambda i: (-score[i], i))
                reordered.append([row[i] for i in head] + row[self.rerank:])
            top = torch.tensor(reordered, dtype=torch.long)
        out = []
        for row in top.tolist():
            chosen: dict[str, str] = {}
            for j in row:
                chosen.setdefault(self.pool[j].strip().rstrip(".").lower(), self.pool[j].strip())
                if len(chosen) == m:
                    break
            out.append(list(chosen.values()))
        return out

    def caption_embeddings(self, image_emb: Tensor) -> list[str]:
        """Captions for already-encoded images ``(B, Di)``."""
        return [row[0] for row in self.ranked(image_emb, 1)]

    def caption(self, images: Sequence[Any], **_: Any) -> list[str]:
        """One caption per image (paths or PIL images)."""
        return self.caption_embeddings(self.pipeline.encode_images(images))



def example_windows(examples: int, drafts: int) -> list[tuple[int, int]]:
    """The in-context example windows ``(first, count)`` of MAGIC's drafts, over the image's
    ranked pool captions: the ``examples`` best, then fewer, more, and shifted windows
    (``examples=4``: 0:4, 0:2, 0:3, 0:5, 1:4, 2:4, 4:4, 0:8), the first ``drafts`` of them."""
    m = int(examples)
    schedule = [(0, m), (0, max(1, m // 2)), (0, max(1, m - 1)), (0, m + 1), (1, m), (2, m), (m, m), (0, 2 * m)]
    return list(dict.fromkeys(schedule))[:max(1, int(drafts))] if m else [(0, 0)]


#: MAGIC defaults for the embedded instruct LM, chosen by 5-fold cross-validation on coco-mini
#: ``train`` (benchmarks/magic_quality.py, RESULTS.md): in-context examples from the caption pool;
#: the LM writes 8 drafts (one per window of :func:`example_windows`), the retrieval caption is
#: added, and the candidate with the highest CIDEr-D against the image's 20 top retrieved
#: captions is kept. Every β > 0 tried (the ASIF image term on partial sentences) and α = 0.1
#: scored no better in CIDEr than α = β = 0, so the image reaches the LM through the retrieved
#: examples; pass ``alpha=0.1, beta=2`` (the paper's values, :data:`MAGIC_PAPER`) to steer
#: every step.
MAGIC_DEFAULTS = {"k": 45, "alpha": 0.0, "beta": 0.0, "max_new_tokens": 16, "examples": 4,
                  "examples_from": "pool", "drafts": 8, "consensus": 20, "with_retrieved": True,
                  "prompt": "Write a short caption of a photo, in the style of these captions of similar photos."}
#: The MAGIC paper's weights (Su et al., 2022, COCO): what a scorer-steered run uses.
MAGIC_PAPER = {"alpha": 0.1, "beta": 2.0}
PLAIN_PROMPT = "Write a short caption of a photo."
#: Most greedy drafts decoded in one batch (8 photos × 8 windows): bigger batches read the LM's
#: weights once for more rows, and hold more KV cache (~9 MB per SmolLM2 draft of ~190 tokens).
DRAFT_ROWS = 64


class MagicCaptioner:
    """MAGIC captions (Su et al., 2022): a frozen LM steered by an image–text scorer.

    ``prompt`` is the instruction (wrapped in the LM's chat template when it has one); with
    ``examples`` > 0, m captions chosen for the image are listed in the prompt as in-context
    examples (``pipeline`` is then required): ``examples_from="pool"`` takes the m best captions
    of ``pool`` by ASIF retrieval + consensus (a :class:`RetrievalCaptioner`, whose ranking is used
    as it is, or a list of captions, ranked by embedding consensus as the defaults were tuned and
    cleaned unless ``clean_pool=False`` (see :class:`RetrievalCaptioner`); default the bundled
    24k COCO captions), ``"anchors"`` the m anchor captions nearest to
    the image by ASIF. The scorer (e.g.
    :class:`~nofree.decoding.scorers.AsifScorer`) sees only the generated continuation.
    ``pipeline`` may also be a CLIP-like scorer's :class:`~nofree.scoring.ScorerSpace`
    (:meth:`from_scorer`): its own cosine then ranks the pool (CLIPRe) and there are no anchors.

    Several candidates, one kept (pool examples only): the LM writes ``drafts`` captions, each
    with another window ``(first, count)`` of the image's ranked pool captions as its examples
    (:func:`example_windows`; ``windows`` gives the list explicitly), ``with_retrieved`` adds the
    retrieval caption itself, and among more than one candidate the kept one has the highest
    CIDEr-D against the image's top ``consensus`` pool captions by ASIF similarity
    (:mod:`nofree.decoding.consensus`: minimum-Bayes-risk selection with retrieved captions as
    pseudo-references). ``drafts=1, with_retrieved=False`` is one plain caption.

    ``packed=True`` (default) decodes with ``lm.packed()`` when the LM offers it: the same LM
    with its linear weights packed for the CPU's matrix kernels (:mod:`nofree.packing`; float32
    outputs equal to ~1e-6, 1.2–2× faster steps), shared with every captioner of that LM.
    """

    def __init__(self, lm: Any, scorer: Any, *, pipeline: Any = None, image_encoder: Any = None,
                 examples_from: str = MAGIC_DEFAULTS["examples_from"],
                 prompt: str = MAGIC_DEFAULTS["prompt"], examples: int = MAGIC_DEFAULTS["examples"],
                 k: int = MAGIC_DEFAULTS["k"], alpha: float = MAGIC_DEFAULTS["alpha"],
                 beta: float = MAGIC_DEFAULTS["beta"],
                 max_new_tokens: int = MAGIC_DEFAULTS["max_new_tokens"], pool: Any = None,
                 drafts: int = MAGIC_DEFAULTS["drafts"], windows: Sequence[tuple[int, int]] | None = None,
                 consensus: int = MAGIC_DEFAULTS["consensus"],
                 with_retrieved: bool = MAGIC_DEFAULTS["with_retrieved"], packed: bool = True,
                 clean_pool: bool = True) -> None:
        if not prompt or not prompt.strip():
            raise DataError("the MAGIC prompt is empty: give --prompt a short instruction, e.g. "
                            f"{PLAIN_PROMPT!r}")
        if examples and pipeline is None:
            raise DataError("in-context examples need an anchor set (pipeline=) to draw captions from")
        if k > lm.vocab_size:
            raise DataError(f"k={k} is larger than the LM's vocabulary ({lm.vocab_size}); use a smaller --k")
        if examples_from not in ("pool", "anchors"):
            raise DataError(f"examples_from={examples_from!r}: choose 'pool' or 'anchors'")
        if examples and examples_from == "anchors" and not hasattr(pipeline, "anchors"):
            raise DataError("examples from the anchors need an ASIF anchor set; this scorer ranks the "
                            "caption pool itself: take the examples from the pool")
        if drafts < 1:
            raise DataError(f"drafts must be >= 1, got {drafts}")
        if not examples or examples_from != "pool":
            drafts, windows, with_retrieved = 1, None, False  # several candidates need the pool's rankings
        windows = example_windows(examples, drafts) if windows is None else [(int(a), int(n)) for a, n in windows]
        if not windows or any(a < 0 or n < 0 for a, n in windows):
            raise DataError(f"windows must be (first >= 0, count >= 0) pairs, got {windows}")
        if consensus < 1:
            raise DataError(f"consensus (pseudo-references) must be >= 1, got {consensus}")
        self.lm = lm.packed() if packed and hasattr(lm, "packed") else lm
        self.scorer, self.pipeline = scorer, pipeline
        self.examples_from = examples_from
        if examples and examples_from == "pool" and not isinstance(pool, RetrievalCaptioner):
            if pool is None:
                from nofree.data.pairs import load_text_lines

                pool = load_text_lines(default_pool_path())
            # examples ranked by embedding consensus: the order the defaults were tuned with
            pool = RetrievalCaptioner(pipeline, pool, consensus="embedding", clean_pool=clean_pool)
        self.pool = pool if examples and examples_from == "pool" else None
        self.windows, self.consensus, self.with_retrieved = windows, int(consensus), bool(with_retrieved)
        self.image_encoder = image_encoder or (pipeline.image_encoder if pipeline is not None else None)
        self.prompt, self.examples = prompt.strip(), int(examples)
        self.k, self.alpha, self.beta, self.max_new_tokens = int(k), float(alpha), float(beta), int(max_new_tokens)

    @classmethod
    def from_pipeline(cls, pipeline: Any, *, lm: Any = None, device: Any = None,
                      temperature: float | None = None, precision: str = "fp32",
                      **options: Any) -> "MagicCaptioner":
        """A captioner over an :class:`~nofree.anchors.pipeline.AsifPipeline` and an LM spec/object.

        ``precision``: the LM's arithmetic, ``"fp32"`` or ``"bf16"`` (see
        :func:`nofree.registry.load_lm`).
        """
        from nofree.decoding.scorers import AsifScorer

        lm = _magic_lm(lm, device, precision)
        extra = {} if temperature is None else {"temperature": temperature}
        scorer = AsifScorer(pipeline.asif, pipeline.text_encoder, pipeline.image_encoder, **extra)
        return cls(lm, scorer, pipeline=pipeline, **options)

    @classmethod
    def from_scorer(cls, space: Any, *, lm: Any = None, device: Any = None, precision: str = "fp32",
                    **options: Any) -> "MagicCaptioner":
        """A captioner steered by a CLIP-like scorer or a LiT (a :class:`~nofree.scoring.ScorerSpace`,
        from :func:`nofree.scoring.load_scorer`), whose own cosine ranks the caption pool (CLIPRe):
        no anchor set. ``alpha``/``beta`` default to the paper's :data:`MAGIC_PAPER` (the tuned
        :data:`MAGIC_DEFAULTS` turn the ASIF image term off); other options as :meth:`from_pipeline`.
        """
        options = {**MAGIC_PAPER, **options}
        return cls(_magic_lm(lm, device, precision), space.scorer, pipeline=space, **options)

    def example_captions(self, image_emb: Tensor, count: int | None = None) -> list[list[str]]:
        """For each image, its ``count`` (default ``examples``) best distinct captions, best
        first (pool or anchors)."""
        count = self.examples if count is None else count
        if not count:
            return [[] for _ in range(len(image_emb))]
        if self.pool is not None:
            return self.pool.ranked(image_emb, count)
        anchors = self.pipeline.anchors
        sim = self.pipeline.similarity(image_emb, anchors.text)  # (B, N)
        order = sim.argsort(dim=1, descending=True)
        out = []
        for row in order.tolist():
            chosen: list[str] = []
            for j in row:
                caption = anchors.captions[j].strip()
                if caption.lower() not in {c.lower() for c in chosen}:
                    chosen.append(caption)
                if len(chosen) == count:
                    break
            out.append(chosen)
        return out

    def prompt_texts(self, image_emb: Tensor, window: tuple[int, int] | None = None,
                     ranked: list[list[str]] | None = None) -> list[str]:
        """The full prompt of each image (instruction, examples, chat template) for one example
        ``window`` ``(first, count)`` (default: the first of ``windows``)."""
        first, count = window or self.windows[0]
        if ranked is None:
            ranked = self.example_captions(image_emb, first + count)
        texts = []
        for examples in ranked:
            examples = examples[first:first + count]
            user = self.prompt if not examples else \
                self.prompt + "\n" + "\n".join(f"- {c.rstrip('.')}." for c in examples)
            texts.append(self.lm.chat_prompt(user))
        return texts

    def candidates(self, image_emb: Tensor) -> list[list[str]]:
        """Each image's candidate captions: one written per example window, then the retrieval
        caption when ``with_retrieved`` (the best-ranked pool caption).

        Greedy drafts (α = β = 0) of all windows decode together, at most :data:`DRAFT_ROWS` rows
        at a time (their KV cache: ~0.6 GB for SmolLM2); steered ones run window by window."""
        from nofree.decoding.magic import greedy_search, magic_search

        ranked = self.example_captions(image_emb, max(a + n for a, n in self.windows))
        out: list[list[str]] = [[] for _ in range(len(image_emb))]
        prompts = [[self.lm.tokenizer.encode(t, add_special_tokens=False)
                    for t in self.prompt_texts(image_emb, window, ranked)] for window in self.windows]
        if self.alpha == 0 and self.beta == 0:
            # greedy (identical tokens, tested): the drafts of all windows and images in batches
            # of DRAFT_ROWS, whose prefill groups prompts by length and whose steps read the
            # weights once for all rows
            flat = [ids for window in prompts for ids in window]
            texts = [text for start in range(0, len(flat), DRAFT_ROWS)
                     for text in greedy_search(self.lm, flat[start:start + DRAFT_ROWS],
                                               max_new_tokens=self.max_new_tokens).texts]
            drafts = [texts[i:i + len(image_emb)] for i in range(0, len(texts), len(image_emb))]
        else:
            drafts = [magic_search(self.lm, self.scorer, image_emb, prompt_ids=prompt_ids, k=self.k,
                                   alpha=self.alpha, beta=self.beta, max_new_tokens=self.max_new_tokens,
                                   trace=False).texts for prompt_ids in prompts]
        for window_texts in drafts:
            for row, text in zip(out, window_texts):
                row.append(clean_caption(text))
        if self.with_retrieved:
            for row, examples in zip(out, ranked):
                row.append(examples[0].strip())
        return out

    def caption_embeddings(self, image_emb: Tensor) -> list[str]:
        """Captions for images already embedded by the image encoder ``(B, Di)``."""
        candidates = self.candidates(image_emb)
        if all(len(row) == 1 for row in candidates):
            return [row[0] for row in candidates]
        references = self.pool.top(image_emb, self.consensus)
        return [row[self.pool.cider.choose(row, refs)] for row, refs in zip(candidates, references)]

    def caption(self, images: Sequence[Any], **_: Any) -> list[str]:
        """One caption per image (paths or PIL images)."""
        if self.pipeline is not None:
            image_emb = self.pipeline.encode_images(images)
        else:
            image_emb = self.scorer.embed_images(images)
        return self.caption_embeddings(image_emb)


def _magic_lm(lm: Any, device: Any, precision: str) -> Any:
    """MAGIC's LM: a spec (default the embedded LM) loaded, or an LM object, in ``precision``."""
    from nofree.core import DEFAULT_LM
    from nofree.registry import LM_PRECISIONS, load_lm

    if precision not in LM_PRECISIONS:
        raise DataError(f"precision must be one of {tuple(LM_PRECISIONS)}, got {precision!r}")
    if lm is None or isinstance(lm, str):
        return load_lm(lm or DEFAULT_LM, device=device, precision=precision)
    return lm.to_dtype(LM_PRECISIONS[precision]) if precision != "fp32" else lm


def load_captioner(method: str, *, anchor_dir: Any = None, adapter_dir: Any = None, pool: Any = None,
                   lm: str | None = None, device: Any = None, options: dict | None = None,
                   clean_pool: bool = True, scorer: str | None = None) -> Any:
    """The captioner the CLI's ``--method`` names, built from an anchor set or an adapter.

    ``pool``: a caption file, cleaned as :class:`RetrievalCaptioner` says unless ``clean_pool``
    is False. ``scorer``: MAGIC's scorer spec (:mod:`nofree.scoring`): ``asif`` (the default,
    with the anchor set), or a CLIP-like model or trained LiT, which ranks the pool itself
    (no anchor set) and steers with the paper's α, β unless ``options`` say otherwise."""
    options = dict(options or {})
    if scorer is not None:
        from nofree.scoring import ASIF_SCORER, load_scorer, normalize_scorer_spec

        if method != "magic":
            raise DataError(f"--scorer steers MAGIC only (--method {method} takes none): drop --scorer, "
                            "or use --method magic")
        scorer = normalize_scorer_spec(scorer)
        if scorer == ASIF_SCORER and anchor_dir is None:
            raise DataError("--scorer asif scores through an anchor set: add --anchors DIR (from `nofree "
                            "anchors build`), or give a CLIP-like --scorer (open_clip:ARCH@TAG, "
                            "hf-clip:NAME, local:DIR, lit:DIR), which needs none")
        if scorer != ASIF_SCORER:
            if anchor_dir is not None:
                raise DataError(f"--scorer {scorer} ranks the caption pool itself and uses no anchor set: "
                                "drop --anchors, or use --scorer asif to score with the anchors")
            from nofree.cache import EmbeddingCache

            options = _magic_options(options, pool)
            space = load_scorer(scorer, device=device, cache=EmbeddingCache())
            return MagicCaptioner.from_scorer(space, lm=lm, device=device, clean_pool=clean_pool, **options)
    if method in ("retrieval", "magic"):
        if anchor_dir is None:
            clip = " or a CLIP-like --scorer (open_clip:ARCH@TAG, hf-clip:NAME, local:DIR, lit:DIR)"
            raise DataError(f"--method {method} needs --anchors DIR (an anchor set from `nofree anchors "
                            f"build`){clip if method == 'magic' else ''}")
        from nofree.anchors.pipeline import AsifPipeline
        from nofree.cache import EmbeddingCache

        pipeline = AsifPipeline.load(anchor_dir, device=device, cache=EmbeddingCache())
        if method == "retrieval":
            from nofree.data.pairs import load_text_lines

            unused = sorted(k for k in options if k not in {"max_new_tokens"})
            if unused:
                raise DataError(f"--method retrieval takes no {_flags(unused)}")
            return RetrievalCaptioner(pipeline, load_text_lines(pool or default_pool_path()),
                                      clean_pool=clean_pool)
        options = _magic_options(options, pool)
        return MagicCaptioner.from_pipeline(pipeline, lm=lm, device=device, clean_pool=clean_pool, **options)
    if method in ("clipcap", "flamingo", "smallcap"):
        if adapter_dir is None:
            raise DataError(f"--method {method} needs --adapter DIR (from `nofree train {method}`)")
        decoding = {"max_new_tokens": "max_tokens", "beams": "beams", "no_repeat_ngram": "no_repeat_ngram"}
        unused = sorted(k for k in options if k not in decoding)
        if unused:
            raise DataError(f"--method {method} takes no {_flags(unused)}")
        decode = {decoding[k]: v for k, v in options.items()}
        if method == "smallcap":
            from nofree.adapters.smallcap import SmallCapCaptioner
            from nofree.cache import EmbeddingCache
            from nofree.data.pairs import load_text_lines

            return SmallCapCaptioner.from_pretrained(
                adapter_dir, pool=load_text_lines(pool) if pool is not None else None, device=device,
                cache=EmbeddingCache(), clean_pool=clean_pool, **decode)
        from nofree.adapters import AdapterCaptioner, load_adapter

        adapter = load_adapter(adapter_dir, device=device)
        if adapter.kind != method:
            raise DataError(f"{adapter_dir} holds a {adapter.kind} adapter, not {method}: "
                            f"use --method {adapter.kind}")
        return AdapterCaptioner(adapter, **decode)
    raise DataError(f"unknown captioning method {method!r}: choose retrieval, magic, clipcap, flamingo or smallcap")


def _magic_options(options: dict, pool: Any) -> dict:
    """``options`` checked for ``--method magic`` and with the ``pool`` file's captions added."""
    adapter_only = sorted(k for k in ("beams", "no_repeat_ngram") if k in options)
    if adapter_only:
        raise DataError(f"--method magic takes no {_flags(adapter_only)} (they set a trained "
                        "adapter's decoding)")
    if pool is not None:
        from nofree.data.pairs import load_text_lines

        return {**options, "pool": load_text_lines(pool)}
    return options


def _flags(options: Sequence[str]) -> str:
    """Captioner option names as the CLI spells them (``max_new_tokens`` -> ``--max-tokens``)."""
    return ", ".join("--max-tokens" if o == "max_new_tokens" else "--" + o.replace("_", "-") for o in options)


def caption_paths(captioner: Any, paths: Sequence[str], *, batch_size: int = 8,
                  progress: bool = True, strict: bool = False) -> list[dict]:
    """``[{"image": path, "caption": text}, ...]`` in input order: :func:`iter_caption_paths`
    collected into a list."""
    return list(iter_caption_paths(captioner, paths, batch_size=batch_size, progress=progress,
                                   strict=strict))


def iter_caption_paths(captioner: Any, paths: Sequence[str], *, batch_size: int = 8,
                       progress: bool = True, strict: bool = False) -> Iterator[dict]:
    """``{"image": path, "caption": text}`` for each image in input order, yielded batch by batch
    as each is captioned (with a progress bar), so a caller can hand results out as they finish.

    An unreadable image does not stop the run: its row has ``caption: None`` and an ``error``;
    the skipped images are reported once at the end (``logging``). ``strict=True`` raises the
    first unreadable image's ``DataError`` (naming the file) instead.
    """
    from tqdm.auto import tqdm

    from nofree.data.images import load_image, report_skipped

    skipped: list[str] = []
    try:
        with tqdm(total=len(paths), unit="image", desc="captioning", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = list(paths[start:start + batch_size])
                images, errors = [], {}
                for path in chunk:
                    try:
                        images.append(load_image(path))
                    except DataError as err:
                        if strict:
                            raise
                        errors[path] = str(err)
                        skipped.append(str(path))
                captions = iter(captioner.caption(images) if images else [])
                rows = [{"image": path, "caption": None, "error": errors[path]} if path in errors
                        else {"image": path, "caption": next(captions)} for path in chunk]
                bar.update(len(chunk))
                yield from rows
    finally:
        report_skipped(skipped)
