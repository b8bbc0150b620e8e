"""Captioners: one ``caption(images) -> list[str]`` protocol over every method.

- :class:`RetrievalCaptioner` picks, for each image, a caption from a text pool by ASIF
  similarity, then re-ranks the top ``m`` candidates by *consensus*: how close each is, in the
  text encoder's space, to the other candidates (Devlin et al., 2015, "Exploring Nearest
  Neighbor Approaches for Image Captioning", choose the caption most similar to its
  neighbours). The pool's embeddings and ASIF relative representations are computed once.
- ``MagicCaptioner`` (``nofree.decoding``) and ``AdapterCaptioner`` (``nofree.adapters``)
  implement the same protocol.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.core import DataError, clean_caption, l2_normalize


def default_pool_path() -> Path:
    """The bundled caption pool: 24k COCO captions, none of them of a sample photo."""
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


class RetrievalCaptioner:
    """Caption images with the best pool caption under an ASIF pipeline.

    ``pool`` is a list of candidate captions (e.g. ``caption_corpus.txt``; never the evaluation
    references). ``rerank`` is the number m of top candidates re-ranked by consensus
    (0 = plain argmax of the ASIF similarity), ``consensus_weight`` the mix described in
    :func:`consensus_rerank`.
    """

    def __init__(self, pipeline: Any, pool: Sequence[str], *, rerank: int = 100,
                 consensus_weight: float = 1.0, chunk: int = 4096) -> None:
        if len(pool) == 0:
            raise DataError("the caption pool is empty: give --pool a text file with one caption a line")
        if rerank < 0:
            raise DataError(f"rerank must be >= 0, got {rerank}")
        self.pipeline = pipeline
        self.pool = list(pool)
        self.rerank = min(rerank, len(self.pool))
        self.consensus_weight = consensus_weight
        self.chunk = chunk
        self.pool_emb = l2_normalize(pipeline.encode_texts(self.pool))  # (P, Dt)
        self.pool_rel = pipeline.asif.transform(self.pool_emb, modality="text")

    def scores(self, image_emb: Tensor) -> Tensor:
        """ASIF similarity ``(B, P)`` of images to every pool caption (the pipeline's, CSLS included)."""
        return self.pipeline.similarity(image_emb, self.pool_rel)

    def ranked(self, image_emb: Tensor, m: int) -> list[list[str]]:
        """For each image ``(B, Di)``, its ``m`` best distinct pool captions, best first.

        Best means highest consensus among the top ``rerank`` pool captions by ASIF (plain
        ASIF order when ``rerank`` <= 1); captions equal up to case and a final period count once.
        """
        sim = self.scores(image_emb)
        depth = min(max(self.rerank, m), len(self.pool))
        top = sim.argsort(dim=1, descending=True, stable=True)[:, :depth]   # ties: pool order
        top_scores = sim.gather(1, top)
        if self.rerank > 1:
            order = consensus_scores(top_scores, self.pool_emb[top], weight=self.consensus_weight)
            top = top.gather(1, order.argsort(dim=1, descending=True, stable=True))
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



#: MAGIC defaults for the embedded instruct LM, chosen by 5-fold cross-validation on coco-mini
#: ``train`` (benchmarks/magic_quality.py, RESULTS.md): 4 in-context examples from the caption
#: pool. Every β > 0 tried (the ASIF image term on partial sentences) and α = 0.1 scored no better
#: in CIDEr than α = β = 0, so the image reaches the LM through the retrieved examples; pass
#: ``alpha=0.1, beta=2`` (the paper's values, :data:`MAGIC_PAPER`) to steer every step.
MAGIC_DEFAULTS = {"k": 45, "alpha": 0.0, "beta": 0.0, "max_new_tokens": 16, "examples": 4,
                  "examples_from": "pool",
                  "prompt": "Write a short caption of a photo, in the style of these captions of similar photos."}
#: The MAGIC paper's weights (Su et al., 2022, COCO): what a scorer-steered run uses.
MAGIC_PAPER = {"alpha": 0.1, "beta": 2.0}
PLAIN_PROMPT = "Write a short caption of a photo."


class MagicCaptioner:
    """MAGIC captions (Su et al., 2022): a frozen LM steered by an image–text scorer.

    ``prompt`` is the instruction (wrapped in the LM's chat template when it has one); with
    ``examples`` > 0, m captions chosen for the image are listed in the prompt as in-context
    examples (``pipeline`` is then required): ``examples_from="pool"`` takes the m best captions
    of ``pool`` (a :class:`RetrievalCaptioner` or a list of captions; default the bundled 24k
    COCO captions) by ASIF retrieval + consensus, ``"anchors"`` the m anchor captions nearest to
    the image by ASIF. The scorer (e.g.
    :class:`~nofree.decoding.scorers.AsifScorer`) sees only the generated continuation.
    """

    def __init__(self, lm: Any, scorer: Any, *, pipeline: Any = None, image_encoder: Any = None,
                 examples_from: str = MAGIC_DEFAULTS["examples_from"],
                 prompt: str = MAGIC_DEFAULTS["prompt"], examples: int = MAGIC_DEFAULTS["examples"],
                 k: int = MAGIC_DEFAULTS["k"], alpha: float = MAGIC_DEFAULTS["alpha"],
                 beta: float = MAGIC_DEFAULTS["beta"],
                 max_new_tokens: int = MAGIC_DEFAULTS["max_new_tokens"], pool: Any = None) -> None:
        if not prompt or not prompt.strip():
            raise DataError("the MAGIC prompt is empty: give --prompt a short instruction, e.g. "
                            f"{PLAIN_PROMPT!r}")
        if examples and pipeline is None:
            raise DataError("in-context examples need an anchor set (pipeline=) to draw captions from")
        if k > lm.vocab_size:
            raise DataError(f"k={k} is larger than the LM's vocabulary ({lm.vocab_size}); use a smaller --k")
        if examples_from not in ("pool", "anchors"):
            raise DataError(f"examples_from={examples_from!r}: choose 'pool' or 'anchors'")
        self.lm, self.scorer, self.pipeline = lm, scorer, pipeline
        self.examples_from = examples_from
        if examples and examples_from == "pool" and not isinstance(pool, RetrievalCaptioner):
            if pool is None:
                from nofree.data.pairs import load_text_lines

                pool = load_text_lines(default_pool_path())
            pool = RetrievalCaptioner(pipeline, pool)
        self.pool = pool if examples and examples_from == "pool" else None
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
        from nofree.core import DEFAULT_LM
        from nofree.decoding.scorers import AsifScorer
        from nofree.registry import LM_PRECISIONS, load_lm

        if precision not in LM_PRECISIONS:
            raise DataError(f"precision must be one of {tuple(LM_PRECISIONS)}, got {precision!r}")
        if lm is None or isinstance(lm, str):
            lm = load_lm(lm or DEFAULT_LM, device=device, precision=precision)
        elif precision != "fp32":
            lm = lm.to_dtype(LM_PRECISIONS[precision])
        extra = {} if temperature is None else {"temperature": temperature}
        scorer = AsifScorer(pipeline.asif, pipeline.text_encoder, pipeline.image_encoder, **extra)
        return cls(lm, scorer, pipeline=pipeline, **options)

    def example_captions(self, image_emb: Tensor) -> list[list[str]]:
        """For each image, its ``examples`` distinct in-context captions (pool or anchors)."""
        if not self.examples:
            return [[] for _ in range(len(image_emb))]
        if self.pool is not None:
            return self.pool.ranked(image_emb, self.examples)
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
                if len(chosen) == self.examples:
                    break
            out.append(chosen)
        return out

    def prompt_texts(self, image_emb: Tensor) -> list[str]:
        """The full prompt of each image (instruction, examples, chat template)."""
        texts = []
        for examples in self.example_captions(image_emb):
            user = self.prompt if not examples else \
                self.prompt + "\n" + "\n".join(f"- {c.rstrip('.')}." for c in examples)
            texts.append(self.lm.chat_prompt(user))
        return texts

    def caption_embeddings(self, image_emb: Tensor) -> list[str]:
        """Captions for images already embedded by the image encoder ``(B, Di)``."""
        from nofree.decoding.magic import greedy_search, magic_search

        prompt_ids = [self.lm.tokenizer.encode(t, add_special_tokens=False) for t in self.prompt_texts(image_emb)]
        if self.alpha == 0 and self.beta == 0:  # identical tokens (tested), without the k-candidate forwards
            out = greedy_search(self.lm, prompt_ids, max_new_tokens=self.max_new_tokens)
        else:
            out = magic_search(self.lm, self.scorer, image_emb, prompt_ids=prompt_ids, k=self.k,
                               alpha=self.alpha, beta=self.beta, max_new_tokens=self.max_new_tokens,
                               trace=False)
        return [clean_caption(text) for text in out.texts]

    def caption(self, images: Sequence[Any], **_: Any) -> list[str]:
        """One caption per image (paths or PIL images)."""
        if self.pipeline is not None:
            image_emb = self.pipeline.encode_images(images)
        else:
            image_emb = self.scorer.embed_images(images)
        return self.caption_embeddings(image_emb)


def load_captioner(method: str, *, anchor_dir: Any = None, adapter_dir: Any = None, pool: Any = None,
                   lm: str | None = None, device: Any = None, options: dict | None = None) -> Any:
    """The captioner the CLI's ``--method`` names, built from an anchor set or an adapter."""
    options = dict(options or {})
    if method in ("retrieval", "magic"):
        if anchor_dir is None:
            raise DataError(f"--method {method} needs --anchors DIR (an anchor set from "
                            "`nofree anchors build`)")
        from nofree.anchors.pipeline import AsifPipeline
        from nofree.cache import EmbeddingCache

        pipeline = AsifPipeline.load(anchor_dir, device=device, cache=EmbeddingCache())
        if method == "retrieval":
            from nofree.data.pairs import load_text_lines

            unused = sorted(k for k in options if k not in {"max_new_tokens"})
            if unused:
                raise DataError(f"--method retrieval takes no {_flags(unused)}")
            return RetrievalCaptioner(pipeline, load_text_lines(pool or default_pool_path()))
        if pool is not None:
            from nofree.data.pairs import load_text_lines

            options["pool"] = load_text_lines(pool)
        return MagicCaptioner.from_pipeline(pipeline, lm=lm, device=device, **options)
    if method in ("clipcap", "flamingo"):
        if adapter_dir is None:
            raise DataError(f"--method {method} needs --adapter DIR (from `nofree train {method}`)")
        from nofree.adapters import AdapterCaptioner, load_adapter

        unused = sorted(k for k in options if k != "max_new_tokens")
        if unused:
            raise DataError(f"--method {method} takes no {_flags(unused)}")
        adapter = load_adapter(adapter_dir, device=device)
        if adapter.kind != method:
            raise DataError(f"{adapter_dir} holds a {adapter.kind} adapter, not {method}: "
                            f"use --method {adapter.kind}")
        return AdapterCaptioner(adapter, max_tokens=options.get("max_new_tokens", 30))
    raise DataError(f"unknown captioning method {method!r}: choose retrieval, magic, clipcap or flamingo")


def _flags(options: Sequence[str]) -> str:
    """Captioner option names as the CLI spells them (``max_new_tokens`` -> ``--max-tokens``)."""
    return ", ".join("--max-tokens" if o == "max_new_tokens" else "--" + o.replace("_", "-") for o in options)


def caption_paths(captioner: Any, paths: Sequence[str], *, batch_size: int = 8,
                  progress: bool = True) -> list[dict]:
    """``[{"image": path, "caption": text}, ...]`` in input order, batch by batch with a progress bar.

    An unreadable image does not stop the run: its row has ``caption: None`` and an ``error``.
    """
    from tqdm.auto import tqdm

    from nofree.data.images import load_images

    rows: list[dict] = []
    with tqdm(total=len(paths), unit="image", desc="captioning", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            loaded = load_images(chunk)
            captions = captioner.caption(loaded.images) if loaded.images else []
            by_index = dict(zip(loaded.indices, captions))
            errors = dict(loaded.skipped)
            for index, path in enumerate(chunk):
                if index in by_index:
                    rows.append({"image": path, "caption": by_index[index]})
                else:
                    rows.append({"image": path, "caption": None, "error": errors.get(path, "unreadable")})
            bar.update(len(chunk))
    return rows
