"""MAGIC captioning with drafts and consensus: a frozen LM writes, retrieval picks the draft to keep.

:class:`MagicCaptioner` runs MAGIC (Su et al., 2022, :mod:`nofree.decoding.magic`) per image:
the LM is prompted with captions retrieved for the image as in-context examples, writes several
drafts (one per window of those examples), and the draft that agrees most with the retrieved
captions is kept (:mod:`nofree.captioning.consensus`). The retrieval itself is a
:class:`~nofree.captioning.retrieval.RetrievalCaptioner`; the image–text scorer that may steer
every decoding step lives in :mod:`nofree.decoding.scorers`.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from nofree.captioning.retrieval import RetrievalCaptioner
from nofree.core import DEFAULT_LM, DataError, Option, OptionError, clean_caption
from nofree.data.pool import default_pool_path
from nofree.data.pool import example_windows  # noqa: F401  (re-exported: MAGIC's draft windows)


#: MAGIC defaults for the embedded instruct LM, chosen by 5-fold cross-validation on coco-mini
#: ``train`` (benchmarks/magic_quality.py, RESULTS.md): in-context examples from the caption pool;
#: the LM writes 8 drafts (one per window of :func:`example_windows`), and the draft with the
#: highest CIDEr-D against the image's 20 top retrieved captions is kept (``with_retrieved=True``
#: also offers caption retrieval's own caption as a candidate). No β > 0 tried (the ASIF image term
#: on partial sentences) and no α = 0.1 scored measurably better in CIDEr than α = β = 0, so the
#: image reaches the LM through the retrieved examples; pass ``alpha=0.1, beta=2`` (the paper's
#: values, :data:`MAGIC_PAPER`) to steer every step.
MAGIC_DEFAULTS = {"k": 45, "alpha": 0.0, "beta": 0.0, "max_new_tokens": 16, "trim_cut": True, "examples": 4,
                  "examples_from": "pool", "drafts": 8, "consensus": 20, "with_retrieved": False,
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
    caption that caption retrieval returns for the image (the pool's consensus choice,
    :class:`~nofree.captioning.retrieval.RetrievalCaptioner`'s default), and among more than one
    candidate the kept one has the highest CIDEr-D against the image's top ``consensus`` pool
    captions by ASIF similarity (:mod:`nofree.captioning.consensus`: minimum-Bayes-risk selection
    with retrieved captions as pseudo-references; a draft that loops or stutters, or that ran past
    ``max_new_tokens``, is kept only when every candidate does). ``drafts=1, with_retrieved=False``
    is one plain caption.

    ``trim_cut`` (default) tidies a draft cut at ``max_new_tokens``, so that a caption that has to
    be kept (one draft, or every draft cut) does not end mid-word or on a function word ("… apples
    on a pl" → "… apples"; :func:`nofree.decoding.stopping.trim_cut`, which reads one token of
    look-ahead: the search runs one step further). Letting such drafts run on to the end of their
    sentence instead (up to 8 more tokens) cost 1.8 CIDEr on one draft per photo in cross-validation
    (RESULTS.md): the 135M LM's long drafts ramble.

    ``packed=True`` (default) decodes with ``lm.packed()`` when the LM offers it: the same LM
    with its linear weights packed for the CPU's matrix kernels (:mod:`nofree.kernels.packing`; float32
    outputs equal to ~1e-6, 1.2–2× faster steps), shared with every captioner of that LM.
    """

    def __init__(self, lm: Any, scorer: Any, *, pipeline: Any = None, image_encoder: Any = None,
                 examples_from: str = MAGIC_DEFAULTS["examples_from"],
                 prompt: str = MAGIC_DEFAULTS["prompt"], examples: int = MAGIC_DEFAULTS["examples"],
                 k: int = MAGIC_DEFAULTS["k"], alpha: float = MAGIC_DEFAULTS["alpha"],
                 beta: float = MAGIC_DEFAULTS["beta"],
                 max_new_tokens: int = MAGIC_DEFAULTS["max_new_tokens"],
                 trim_cut: bool = MAGIC_DEFAULTS["trim_cut"], pool: Any = None,
                 drafts: int = MAGIC_DEFAULTS["drafts"], windows: Sequence[tuple[int, int]] | None = None,
                 consensus: int = MAGIC_DEFAULTS["consensus"],
                 with_retrieved: bool = MAGIC_DEFAULTS["with_retrieved"], packed: bool = True,
                 clean_pool: bool = True) -> None:
        if not prompt or not prompt.strip():
            raise OptionError("the MAGIC prompt is empty: give ", Option("prompt"),
                              f" a short instruction, e.g. {PLAIN_PROMPT!r}")
        if examples and pipeline is None:
            raise DataError("in-context examples need an anchor set (pipeline=) to draw captions from")
        if k > lm.vocab_size:
            raise OptionError(Option("k", k), f" is larger than the LM's vocabulary ({lm.vocab_size}); "
                              "use a smaller ", Option("k"))
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
        self.trim_cut = bool(trim_cut)

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
        caption when ``with_retrieved`` (:meth:`retrieved_captions`); see :meth:`drafts`."""
        return self.drafts(image_emb)[0]

    def drafts(self, image_emb: Tensor) -> tuple[list[list[str]], list[list[bool]]]:
        """``(candidates, finished)``: each image's candidate captions as :meth:`candidates` says,
        and for each whether it ended by itself (at eos or a period; the retrieval caption always
        has) within ``max_new_tokens``, rather than being cut there (and tidied, see ``trim_cut``).

        Greedy drafts (α = β = 0) of all windows decode together, at most :data:`DRAFT_ROWS` rows
        at a time (their KV cache: ~0.6 GB for SmolLM2); steered ones run window by window."""
        from nofree.decoding.magic import greedy_search, magic_search

        ranked = self.example_captions(image_emb, max(a + n for a, n in self.windows))
        limit = self.max_new_tokens + self.trim_cut  # one token of look-ahead for trim_cut
        out: list[list[str]] = [[] for _ in range(len(image_emb))]
        finished: list[list[bool]] = [[] for _ in range(len(image_emb))]
        prompts = [[self.lm.tokenizer.encode(t, add_special_tokens=False)
                    for t in self.prompt_texts(image_emb, window, ranked)] for window in self.windows]
        if self.alpha == 0 and self.beta == 0:
            # greedy (identical tokens, tested): the drafts of all windows and images in batches
            # of DRAFT_ROWS, whose prefill groups prompts by length and whose steps read the
            # weights once for all rows
            flat = [ids for window in prompts for ids in window]
            runs = [greedy_search(self.lm, flat[start:start + DRAFT_ROWS], max_new_tokens=limit)
                    for start in range(0, len(flat), DRAFT_ROWS)]
            written = [draft for run in runs for draft in self._ended(run)]
            drafts = [written[i:i + len(image_emb)] for i in range(0, len(written), len(image_emb))]
        else:
            runs = [magic_search(self.lm, self.scorer, image_emb, prompt_ids=prompt_ids, k=self.k,
                                 alpha=self.alpha, beta=self.beta, max_new_tokens=limit,
                                 trace=False) for prompt_ids in prompts]
            drafts = [self._ended(run) for run in runs]
        for window in drafts:
            for row, ends, (text, ended) in zip(out, finished, window):
                row.append(clean_caption(text))
                ends.append(ended)
        if self.with_retrieved:
            for row, ends, retrieved in zip(out, finished, self.retrieved_captions(image_emb)):
                row.append(retrieved)
                ends.append(True)
        return out, finished

    def retrieved_captions(self, image_emb: Tensor) -> list[str]:
        """What caption retrieval returns for each image: the pool caption agreeing most (CIDEr-D)
        with the image's other top retrieved captions, the same pool and ranking as the examples.
        The examples themselves are ordered by embedding consensus, which gives better drafts, while
        the CIDEr-D choice is the better caption (RESULTS.md, "Embedded language models")."""
        return self.pool.with_consensus("cider").caption_embeddings(image_emb)

    def _ended(self, run: Any) -> list[tuple[str, bool]]:
        """Each row of a search run (with ``trim_cut``, to one token past ``max_new_tokens``): its
        text, and whether it ended by itself within ``max_new_tokens``; a cut row's text is trimmed
        (``trim_cut``) or the search's."""
        from nofree.decoding.stopping import trim_cut

        out = []
        for ids, stop, text in zip(run.ids, run.stop, run.texts):
            ended = stop != "length" and len(ids) <= self.max_new_tokens
            out.append((text if ended or not self.trim_cut else trim_cut(self.lm, ids, self.max_new_tokens), ended))
        return out

    def caption_embeddings(self, image_emb: Tensor) -> list[str]:
        """Captions for images already embedded by the image encoder ``(B, Di)``: each image's
        candidate agreeing most with its ``consensus`` top pool captions (CIDEr-D), passing over a
        draft cut at the length limit while one that ended by itself is left."""
        candidates, finished = self.drafts(image_emb)
        if all(len(row) == 1 for row in candidates):
            return [row[0] for row in candidates]
        references = self.pool.top(image_emb, self.consensus)
        return [row[self.pool.cider.choose(row, refs, unfinished=[i for i, done in enumerate(ends) if not done])]
                for row, refs, ends in zip(candidates, references, finished)]

    def caption(self, images: Sequence[Any], **_: Any) -> list[str]:
        """One caption per image (paths or PIL images)."""
        if self.pipeline is not None:
            image_emb = self.pipeline.encode_images(images)
        else:
            image_emb = self.scorer.embed_images(images)
        return self.caption_embeddings(image_emb)


def _magic_lm(lm: Any, device: Any, precision: str) -> Any:
    """MAGIC's LM: a spec (default the embedded LM) loaded, or an LM object, in ``precision``."""
    from nofree.registry import LM_PRECISIONS, load_lm

    if precision not in LM_PRECISIONS:
        raise DataError(f"precision must be one of {tuple(LM_PRECISIONS)}, got {precision!r}")
    if lm is None or isinstance(lm, str):
        return load_lm(lm or DEFAULT_LM, device=device, precision=precision)
    return lm.to_dtype(LM_PRECISIONS[precision]) if precision != "fp32" else lm
