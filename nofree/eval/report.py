"""``nofree eval``: every fusion method on one pairs file and split, one report.

The training-free methods (ASIF scoring, caption retrieval, MAGIC with the ASIF or LiT scorer, or
with a CLIP-like ``scorer`` spec that ranks the pool itself) and the trained ones (LiT, ClipCap,
Flamingo-style) run on the same evaluation images with the same frozen backbones and go through
the same metric code, so the table compares like with like. The report folder holds

- ``results.json``: every metric with its n, the split, all specs and hyperparameters, the
  nofree version, seconds per method (model loading counted apart), each caption and each
  image's CIDEr;
- ``results.md``: the tables, with a bootstrap interval of each captioning method's CIDEr and
  each one's paired difference to a baseline (caption retrieval unless ``baseline`` names
  another; :mod:`nofree.eval.significance`);
- plots (see :mod:`nofree.eval.plots`): metric bars per method, the CIDEr differences to the
  baseline with their intervals, retrieval R@K curves, and a grid of sample photos with each
  method's caption beside a reference.

``results.json`` is rewritten after every method, so an interrupted run keeps what finished.
Each row records its inputs (:func:`nofree.eval.inputs.row_inputs`): ``resume=True`` keeps a
finished row whose inputs are unchanged, runs it again otherwise, and keeps the finished rows of
methods not asked for this time. A method that raises is reported as failed and the others still run.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER, DataError, Option, OptionError
from nofree.eval.inputs import changed_magic_settings, magic_options, row_inputs, scorer_spec

log = logging.getLogger(__name__)

SCORING, CAPTIONING = "scoring", "captioning"
RECALL_KS = tuple(range(1, 11))


@dataclass(frozen=True)
class Method:
    """One row of the report: what it computes and which inputs it needs."""

    name: str
    task: str                      # SCORING (retrieval R@K + zero-shot) or CAPTIONING
    needs: tuple[str, ...]         # "anchors" and/or adapter kinds: "lit", "clipcap", "flamingo", "smallcap"
    label: str


METHODS = {m.name: m for m in (
    Method("asif", SCORING, ("anchors",), "ASIF (frozen encoders + anchors)"),
    Method("lit", SCORING, ("lit",), "LiT (trained text head)"),
    Method("retrieval", CAPTIONING, ("anchors",), "caption retrieval by ASIF + CIDEr-D consensus"),
    Method("magic", CAPTIONING, ("anchors",), "MAGIC, nofree defaults (8 drafts + consensus)"),
    Method("magic-lit", CAPTIONING, ("anchors", "lit"), "MAGIC, LiT scorer (α=0.1, β=2, one draft)"),
    Method("clipcap", CAPTIONING, ("clipcap",), "ClipCap (trained prefix)"),
    Method("flamingo", CAPTIONING, ("flamingo",), "Flamingo-style (trained x-attn)"),
    Method("smallcap", CAPTIONING, ("smallcap",), "SmallCap-style (retrieved captions + trained x-attn)"),
)}


@dataclass
class EvalConfig:
    """What ``run_eval`` evaluates and with what. Paths may be ``str`` or ``Path``."""

    pairs: Any
    split: str | None = "val"
    limit: int | None = None
    anchors: Any = None                         # anchor set dir; built from anchor_split if None
    anchor_split: str = "train"
    adapters: dict[str, Any] = field(default_factory=dict)   # kind -> adapter dir
    pool: Any = None                            # caption pool: retrieval, MAGIC's examples
    clean_pool: bool = True                     # drop the pool's non-captions and repeats first
    lm: str = DEFAULT_LM
    scorer: str | None = None                   # the magic row's scorer spec (nofree.scoring); None: asif
    labels: Sequence[str] | None = None         # zero-shot classes (default: the pairs' categories)
    magic: dict[str, Any] = field(default_factory=dict)      # MagicCaptioner options
    max_tokens: int = 30                        # adapters' caption length limit
    decoding: dict[str, Any] = field(default_factory=dict)   # adapters' AdapterCaptioner options
    candidates: dict[str, Any] = field(default_factory=dict)  # drafts / consensus / with_retrieved of magic, smallcap
    batch_size: int = 8
    device: str = "cpu"
    meteor: bool = True
    baseline: str | None = None                 # captioning method the others are compared to (None: retrieval if run)
    label_weight: float | None = None           # ASIF's label bridge (nofree.anchors.labels); None: the default


def available_methods(config: EvalConfig) -> list[str]:
    """The methods whose inputs ``config`` provides (anchors can always be built)."""
    have = {"anchors", *config.adapters}
    return [name for name, m in METHODS.items() if set(m.needs) <= have]


class _Context:
    """Evaluation data and lazily loaded, shared models; counts seconds spent loading them."""

    def __init__(self, config: EvalConfig, out_dir: Path, progress: bool) -> None:
        from nofree.data.pairs import load_pairs

        self.config, self.out_dir, self.progress = config, out_dir, progress
        self.pairs = [p for p in load_pairs(config.pairs, split=config.split, limit=config.limit)
                      if p.captions]
        if not self.pairs:
            raise OptionError(f"no pairs with captions in {config.pairs}"
                              + (f" for split={config.split!r}" if config.split else "")
                              + "; check ", Option("split"), " (the pairs' 'split' field)")
        self.paths = [p.image for p in self.pairs]
        self.references = [list(p.captions) for p in self.pairs]
        self.load_seconds, self._loading = 0.0, False
        self._memo: dict[tuple, Any] = {}

    def _load(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per key; the outermost load's seconds go to ``load_seconds``."""
        if key not in self._memo:
            outermost, self._loading = not self._loading, True
            start = time.perf_counter()
            try:
                self._memo[key] = build()
            finally:
                if outermost:
                    self._loading = False
                    self.load_seconds += time.perf_counter() - start
        return self._memo[key]

    # --- shared models ---------------------------------------------------------------------
    def encoder(self, spec: str, modality: str) -> Any:
        from nofree.registry import load_encoder

        return self._load(("encoder", spec), lambda: load_encoder(spec, modality=modality,
                                                                   device=self.config.device))

    def lm(self, spec: str) -> Any:
        from nofree.registry import load_lm

        return self._load(("lm", spec), lambda: load_lm(spec, device=self.config.device))

    def anchor_dir(self) -> Path:
        if self.config.anchors is not None:
            from nofree.hub import resolve_dir

            return resolve_dir(self.config.anchors, what="anchor set")  # a folder, or hf-hub:ORG/NAME
        built = self.out_dir / "anchors"
        if not (built / "manifest.json").exists():
            from nofree.anchors.build import build_anchor_set

            log.info("no anchor set given: building one from split %r of %s into %s",
                     self.config.anchor_split, self.config.pairs, built)
            self._load(("built-anchors",), lambda: build_anchor_set(
                self.config.pairs, split=self.config.anchor_split, out=built,
                image_encoder=self.encoder(DEFAULT_IMAGE_ENCODER, "image"),
                text_encoder=self.encoder(DEFAULT_TEXT_ENCODER, "text"),
                device=self.config.device, progress=self.progress))
        return built

    def pipeline(self) -> Any:
        def build() -> Any:
            from nofree.anchors.anchor_set import AnchorSet
            from nofree.anchors.pipeline import AsifPipeline
            from nofree.cache import EmbeddingCache

            anchors = AnchorSet.load(self.anchor_dir())
            check_no_leak(anchors, self.config.pairs, self.config.split)
            return AsifPipeline.from_anchors(anchors, self.encoder(anchors.image_spec, "image"),
                                             self.encoder(anchors.text_spec, "text"),
                                             cache=EmbeddingCache(), label_weight=self.config.label_weight)
        return self._load(("pipeline",), build)

    def pool_path(self) -> Path:
        from nofree.data.pool import default_pool_path

        return Path(self.config.pool or default_pool_path())

    def retrieval(self) -> Any:
        """One :class:`RetrievalCaptioner` over the pool, shared by retrieval and MAGIC's examples."""
        from nofree.captioning.retrieval import RetrievalCaptioner
        from nofree.data.pairs import load_text_lines

        return self._load(("retrieval",), lambda: RetrievalCaptioner(self.pipeline(),
                                                                    load_text_lines(self.pool_path()),
                                                                    clean_pool=self.config.clean_pool))

    def adapter(self, kind: str) -> Any:
        from nofree.adapters.base import ROLE_MODALITY, load_adapter, read_config

        if kind not in self.config.adapters:
            raise OptionError(f"method needs a {kind} adapter: pass ", Option(kind, placeholder="DIR"),
                              f" (from `nofree train {kind}`)")
        from nofree.hub import resolve_dir

        directory = resolve_dir(self.config.adapters[kind], what=f"{kind} adapter")

        def build() -> Any:
            header = read_config(directory)
            if header["kind"] != kind:
                raise DataError(f"{directory} holds a {header['kind']} adapter, not {kind}")
            backbones = {role: self.lm(spec) if role == "lm" else self.encoder(spec, ROLE_MODALITY[role])
                         for role, spec in header["backbone"].items()}
            return load_adapter(directory, device=self.config.device, **backbones)
        return self._load(("adapter", kind), build)

    def image_emb(self) -> torch.Tensor:
        """``(n_images, Di)`` ASIF image-encoder embeddings of the evaluation photos."""
        return self._load(("image_emb",), lambda: self.pipeline().encode_images(self.paths))

    def labels(self) -> list[str]:
        if self.config.labels:
            return list(self.config.labels)
        from nofree.data.pairs import load_pairs

        return sorted({c for p in load_pairs(self.config.pairs) for c in p.meta.get("categories", [])})


def check_no_leak(anchors: Any, pairs: Any, split: str | None) -> None:
    """Refuse anchors built from the evaluation split of the same pairs file: an evaluation
    caption must never be an anchor."""
    target = os.path.realpath(str(pairs))
    for source in anchors.meta.get("sources", []):
        same_file = os.path.realpath(str(source.get("pairs", ""))) == target
        if same_file and (source.get("split") is None or split is None or source.get("split") == split):
            raise DataError(f"the anchor set was built from split {source.get('split')!r} of {pairs}, "
                            f"which overlaps the evaluation split {split!r}: build anchors from "
                            "another split (e.g. train) so evaluation captions never leak")


# --- one function per task ---------------------------------------------------------------------
def _scoring_metrics(ctx: _Context, sim_fn: Callable[[torch.Tensor | None, Sequence[str]], torch.Tensor],
                     image_emb: torch.Tensor) -> dict[str, Any]:
    """Retrieval R@K both ways among the eval pairs (R@1 with a bootstrap interval over the
    images), and zero-shot hit rate over ``labels``."""
    from nofree.eval.retrieval import r1_intervals, retrieval_report
    from nofree.eval.zeroshot import hit_rate

    texts = [c for ref in ctx.references for c in ref]
    owner = torch.arange(len(ctx.references)).repeat_interleave(
        torch.tensor([len(ref) for ref in ctx.references]))
    sim = sim_fn(image_emb, texts)
    report = retrieval_report(sim, owner, ks=RECALL_KS)
    metrics: dict[str, Any] = {f"{way} R@{k}": report[way][f"R@{k}"] for way in ("t2i", "i2t") for k in (1, 5, 10)}
    if len(ctx.references) > 1:
        metrics.update(r1_intervals(sim, owner))
    metrics["curve"] = {way: [report[way][f"R@{k}"] for k in RECALL_KS] for way in ("t2i", "i2t")}
    metrics["n_texts"], metrics["n_images"] = report["t2i"]["n"], report["i2t"]["n"]
    labels = ctx.labels()
    rows = [i for i, p in enumerate(ctx.pairs) if p.meta.get("categories")]
    if labels and rows:
        index = {label: j for j, label in enumerate(labels)}
        truth = [[index[c] for c in ctx.pairs[i].meta["categories"] if c in index] for i in rows]
        keep = [r for r, t in zip(rows, truth) if t]
        truth = [t for t in truth if t]
        if keep:
            prompts = [f"a photo of a {label}." for label in labels]
            scores = sim_fn(image_emb[keep], prompts)
            metrics["zero-shot top-1"] = hit_rate(scores, truth, k=1)
            metrics["zero-shot top-5"] = hit_rate(scores, truth, k=min(5, len(labels)))
            metrics["n_zero_shot"], metrics["n_classes"] = len(keep), len(labels)
    return metrics


def _eval_asif(ctx: _Context) -> tuple[dict, dict, dict]:
    pipeline = ctx.pipeline()
    sim = lambda image_emb, texts: pipeline.similarity(image_emb, pipeline.encode_texts(texts))  # noqa: E731
    metrics = _scoring_metrics(ctx, sim, ctx.image_emb())
    return metrics, _asif_params(pipeline), {}


def _eval_lit(ctx: _Context) -> tuple[dict, dict, dict]:
    lit = ctx.adapter("lit")
    from nofree.data.images import load_image

    with torch.no_grad():
        image = lit.encode_image([load_image(p) for p in ctx.paths])
    metrics = _scoring_metrics(ctx, lambda emb, texts: lit.similarity(emb, lit.encode_text(texts)), image)
    return metrics, {"adapter": str(ctx.config.adapters["lit"]), **lit.config()}, {}


def _asif_params(pipeline: Any) -> dict[str, Any]:
    params = {key: getattr(pipeline.asif, key) for key in ("k", "p", "center") if hasattr(pipeline.asif, key)}
    return {"anchors": len(pipeline.anchors), "image_encoder": pipeline.anchors.image_spec,
            "text_encoder": pipeline.anchors.text_spec, "asif": {**params, "csls": pipeline.csls, **pipeline.label_settings}}


def _batched(fn: Callable[[Sequence[Any]], list[str]], items: Sequence[Any], batch_size: int,
             desc: str, progress: bool) -> list[str]:
    from tqdm.auto import tqdm

    out: list[str] = []
    with tqdm(total=len(items), unit="image", desc=desc, disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            out += fn(items[start:start + batch_size])
            bar.update(min(batch_size, len(items) - start))
    return out


def _eval_retrieval(ctx: _Context) -> tuple[dict, dict, list[str]]:
    captioner = ctx.retrieval()
    captions = captioner.caption_embeddings(ctx.image_emb())
    return {}, {"pool": str(ctx.pool_path()), "pool_size": len(captioner.pool),
                "clean_pool": ctx.config.clean_pool,
                **_asif_params(ctx.pipeline())}, captions


def _magic(ctx: _Context, scorer_name: str) -> tuple[dict, dict, list[str]]:
    from nofree.captioning.drafts import MagicCaptioner

    pipeline = ctx.pipeline()
    options = magic_options(ctx.config, "magic-lit" if scorer_name == "lit" else "magic")
    # examples ranked by embedding consensus, as MAGIC's defaults were tuned (retrieval: CIDEr-D)
    pool = ctx.retrieval().with_consensus("embedding") \
        if options["examples"] and options["examples_from"] == "pool" else None
    lm = ctx.lm(ctx.config.lm)
    if scorer_name == "asif":
        captioner = MagicCaptioner.from_pipeline(pipeline, lm=lm, pool=pool, **options)
    else:
        lit = ctx.adapter("lit")
        if lit.image_encoder.spec != pipeline.anchors.image_spec:
            raise DataError(f"the LiT adapter's image encoder {lit.image_encoder.spec!r} differs from "
                            f"the anchors' {pipeline.anchors.image_spec!r}; MAGIC+LiT needs both on one")
        captioner = MagicCaptioner(lm, lit.scorer(), pipeline=pipeline, pool=pool, **options)
    image_emb = ctx.image_emb()
    captions = _batched(lambda rows: captioner.caption_embeddings(image_emb[list(rows)]),
                        range(len(image_emb)), ctx.config.batch_size, f"MAGIC+{scorer_name}", ctx.progress)
    if pool is not None:
        options["pool"] = str(ctx.pool_path())
    return {}, {"lm": ctx.config.lm, "scorer": scorer_name, **options, **_asif_params(pipeline)}, captions


def _eval_adapter(ctx: _Context, kind: str) -> tuple[dict, dict, list[str]]:
    from nofree.adapters import AdapterCaptioner

    adapter = ctx.adapter(kind)
    options = {"max_tokens": ctx.config.max_tokens, "batch_size": ctx.config.batch_size, **ctx.config.decoding}
    if kind == "smallcap":
        from nofree.adapters.smallcap import SmallCapCaptioner
        from nofree.cache import EmbeddingCache
        from nofree.data.pairs import load_text_lines

        pool = load_text_lines(ctx.config.pool) if ctx.config.pool is not None else None
        captioner = SmallCapCaptioner.for_adapter(adapter, ctx.config.adapters[kind], pool=pool,
                                                  cache=EmbeddingCache(), clean_pool=ctx.config.clean_pool,
                                                  **options, **ctx.config.candidates)
        check_no_leak(captioner.retrieval.pipeline.anchors, ctx.config.pairs, ctx.config.split)
    else:
        captioner = AdapterCaptioner(adapter, **options)
    captions = _batched(captioner.caption, ctx.paths, ctx.config.batch_size, kind, ctx.progress)
    gaps = _image_gaps(ctx, adapter, captioner.prompts if kind == "smallcap" else None)
    return gaps, {"adapter": str(ctx.config.adapters[kind]), "max_tokens": ctx.config.max_tokens,
                  "beams": captioner.options["beams"], "no_repeat_ngram": captioner.options["no_repeat_ngram"],
                  "nbest": captioner.nbest, **adapter.backbone_specs(), **adapter.config(),
                  **{k: getattr(captioner, k) for k in ("drafts", "consensus", "with_retrieved")   # SmallCap's
                     if hasattr(captioner, k)}}, captions


def _image_gaps(ctx: _Context, adapter: Any, prompts_of: Callable[[Sequence[str]], list[str]] | None) -> dict:
    """How much a trained captioner's loss on the split's reference captions depends on the photo
    (:meth:`nofree.adapters.captioning.CaptioningAdapter.evaluate`): ``caption loss`` (nats per
    token), ``image gap`` (its rise with each photo's features given to another photo's captions)
    with its 95% ``image gap interval`` over the photos, and, for an adapter that reads a prompt
    per photo (``prompts_of``: SmallCap-style's retrieved captions), ``photo gap`` (the prompt
    moved too)."""
    from nofree.adapters.train import prepare_examples

    examples = prepare_examples(adapter, ctx.pairs)
    if prompts_of is not None:
        examples.image_prompts = prompts_of(examples.image_paths)
    found = adapter.evaluate(examples, batch_size=ctx.config.batch_size, captions=False)
    out = {"caption loss": found["val_loss"]}
    if "image_gap" in found:
        out["image gap"] = found["image_gap"]
    if "image_gap_low" in found:
        out["image gap interval"] = [found["image_gap_low"], found["image_gap_high"]]
    if "photo_gap" in found:
        out["photo gap"] = found["photo_gap"]
    return out


def _magic_scored(ctx: _Context) -> tuple[dict, dict, list[str]]:
    """The magic row steered by ``config.scorer`` (a CLIP-like model or a LiT), whose own cosine
    ranks the pool (CLIPRe): no anchors; the paper's α, β unless ``config.magic`` says otherwise."""
    from nofree.cache import EmbeddingCache
    from nofree.captioning.drafts import MagicCaptioner
    from nofree.captioning.retrieval import RetrievalCaptioner
    from nofree.data.pairs import load_text_lines
    from nofree.scoring import load_scorer

    spec = scorer_spec(ctx.config)
    space = ctx._load(("scorer", spec), lambda: load_scorer(spec, device=ctx.config.device,
                                                            cache=EmbeddingCache()))
    options = magic_options(ctx.config, "magic")
    pool = None
    if options["examples"] and options["examples_from"] == "pool":
        pool = ctx._load(("scorer-pool", spec), lambda: RetrievalCaptioner(
            space, load_text_lines(ctx.pool_path()), consensus="embedding", clean_pool=ctx.config.clean_pool))
    captioner = MagicCaptioner(ctx.lm(ctx.config.lm), space.scorer, pipeline=space, pool=pool, **options)
    image_emb = ctx._load(("scorer-image-emb", spec), lambda: space.encode_images(ctx.paths))
    captions = _batched(lambda rows: captioner.caption_embeddings(image_emb[list(rows)]),
                        range(len(image_emb)), ctx.config.batch_size, "MAGIC+scorer", ctx.progress)
    if pool is not None:
        options["pool"] = str(ctx.pool_path())
    return {}, {"lm": ctx.config.lm, "scorer": spec, **options}, captions


RUNNERS: dict[str, Callable[[_Context], tuple[dict, dict, Any]]] = {
    "asif": _eval_asif, "lit": _eval_lit, "retrieval": _eval_retrieval,
    "magic": lambda ctx: _magic(ctx, "asif") if scorer_spec(ctx.config) == "asif" else _magic_scored(ctx),
    "magic-lit": lambda ctx: _magic(ctx, "lit"),
    "clipcap": lambda ctx: _eval_adapter(ctx, "clipcap"),
    "flamingo": lambda ctx: _eval_adapter(ctx, "flamingo"),
    "smallcap": lambda ctx: _eval_adapter(ctx, "smallcap"),
}


# --- the run ------------------------------------------------------------------------------------
def run_eval(config: EvalConfig, methods: Sequence[str] | None = None, *, out_dir: str | Path,
             overwrite: bool = False, resume: bool = False, samples: int = 6, progress: bool = True,
             echo: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Evaluate ``methods`` (default: all whose inputs are given) and write the report folder.

    Returns the ``results.json`` content. Raises :class:`DataError` for unusable input found
    before any method runs; a method failing while it runs is recorded as failed instead.
    """
    from nofree import __version__
    from nofree.eval.plots import write_plots
    from nofree.eval.significance import compare_report
    from nofree.eval.table import write_markdown

    methods = list(methods or available_methods(config))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DataError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    scorer = scorer_spec(config)
    if scorer != "asif" and "magic" not in methods:
        raise OptionError(Option("scorer"), f" steers the magic row, which is not among the methods run "
                          f"({', '.join(methods)}): add ", Option("method", "magic"), ", or drop ",
                          Option("scorer"))
    missing = {m: [n for n in METHODS[m].needs if n != "anchors" and n not in config.adapters] for m in methods}
    missing = {m: n for m, n in missing.items() if n}
    if missing:
        parts: list[str | Option] = []
        for m, needs in missing.items():
            parts += ["; "] * bool(parts) + [f"method {m} needs "]
            for i, need in enumerate(needs):
                parts += [", "] * bool(i) + [Option(need, placeholder="DIR")]
        raise OptionError(*parts, " (adapters come from `nofree train`)")
    baseline = _baseline(config.baseline, methods)
    out_dir = Path(out_dir)
    results_path = out_dir / "results.json"
    if overwrite:  # only an earlier report, never an input or a folder holding one
        from nofree.artifacts import REPORT, check_replaceable

        inputs = [config.pairs, config.anchors, config.pool, *config.adapters.values()]
        check_replaceable(out_dir, kind=REPORT, inputs=[i for i in inputs if isinstance(i, (str, os.PathLike))],
                          option=Option("out_dir"))
    previous = _previous_results(results_path, overwrite=overwrite, resume=resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _Context(config, out_dir, progress)
    results: dict[str, Any] = {
        "nofree_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pairs": str(config.pairs), "split": config.split, "limit": config.limit,
        "n_images": len(ctx.pairs), "n_references": sum(map(len, ctx.references)),
        "images": ctx.paths, "references": ctx.references, "device": config.device,
        "baseline": baseline, "methods": {},
    }
    for name in methods:
        old = previous.get("methods", {}).get(name)
        try:
            inputs = row_inputs(ctx, name, METHODS[name])
        except Exception:  # noqa: BLE001 - the method's own run reports the fault
            log.debug("inputs of %s unreadable", name, exc_info=True)
            inputs = None
        if old and old.get("status") == "ok" and resume and old.get("images") == ctx.paths \
                and inputs is not None and old.get("inputs") == inputs:
            echo(f"{name}: kept from the previous run ({results_path})")
            results["methods"][name] = old
            continue
        echo(f"{name}: {method_label(config, name)} ...")
        results["methods"][name] = entry = _run_method(ctx, name)
        if inputs is not None:
            entry["inputs"] = inputs
        echo(f"{name}: {entry['status']} in {entry['wall_s']:.1f} s"
             + (f" ({entry['error']})" if entry["status"] == "failed" else ""))
        _write_json(results_path, results)
    if resume:  # finished rows of methods not run this time stay in the report
        kept = {name: old for name, old in previous.get("methods", {}).items()
                if name in METHODS and name not in methods and old.get("images") == ctx.paths}
        for name in kept:
            echo(f"{name}: kept from the previous run ({results_path}; not run this time)")
        done = {**kept, **results["methods"]}
        results["methods"] = {name: done[name] for name in METHODS if name in done}
        if baseline is None and "retrieval" in done:
            results["baseline"] = "retrieval"
    results["anchors"] = _anchor_record(ctx)
    results["comparison"] = compare_report(results)
    _write_json(results_path, results)
    write_markdown(out_dir / "results.md", results, METHODS)
    try:
        results["plots"] = write_plots(out_dir, results, METHODS, samples=samples)
    except Exception as err:  # a plot must never cost the numbers
        log.warning("plots failed: %s", err)
        results["plots"] = {"error": f"{type(err).__name__}: {err}"}
    _write_json(results_path, results)
    write_markdown(out_dir / "results.md", results, METHODS)
    return results


def _baseline(chosen: str | None, methods: Sequence[str]) -> str | None:
    """The captioning method the report compares the others to: ``chosen`` (which must be run),
    else caption retrieval when it is run, else none."""
    if chosen is None:
        return "retrieval" if "retrieval" in methods else None
    captioning = [m for m in methods if METHODS[m].task == CAPTIONING]
    if chosen not in captioning:
        raise OptionError(Option("baseline", chosen), " is not among the captioning methods run ("
                          + (", ".join(captioning) or "none") + "): add ", Option("method", chosen),
                          " or choose one of them")
    return chosen


def method_label(config: EvalConfig, name: str) -> str:
    """What the report calls row ``name``: its fixed description, or for a magic row run with
    settings other than nofree's defaults, the settings that differ."""
    changed = changed_magic_settings(config) if name == "magic" else {}
    return "MAGIC, " + ", ".join(f"{k} {v}" for k, v in changed.items()) if changed else METHODS[name].label


def _run_method(ctx: _Context, name: str) -> dict[str, Any]:
    method = METHODS[name]
    loads_before, start = ctx.load_seconds, time.perf_counter()
    entry: dict[str, Any] = {"task": method.task, "label": method_label(ctx.config, name), "images": ctx.paths}
    try:
        metrics, params, captions = RUNNERS[name](ctx)
        entry.update(status="ok", params=params)
        if method.task == CAPTIONING:
            from nofree.eval.captioning import caption_metrics
            from nofree.eval.degeneration import degeneration
            from nofree.eval.significance import mean_interval

            scored = caption_metrics(list(captions), ctx.references, meteor=ctx.config.meteor)
            per_image = scored.pop("CIDEr per image")
            metrics = {**metrics, **scored, **degeneration(captions)}
            if len(per_image) > 1:
                metrics["CIDEr interval"] = mean_interval(per_image)
            entry["captions"] = list(captions)
            entry["per_image"] = {"CIDEr": per_image}
        entry["metrics"] = metrics
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one failing method must not stop the others
        log.debug("method %s failed", name, exc_info=True)
        entry.update(status="failed", error=f"{type(err).__name__}: {err}",
                     traceback=traceback.format_exc(limit=8))
    load_s = ctx.load_seconds - loads_before
    entry["load_s"] = round(load_s, 3)
    entry["wall_s"] = round(time.perf_counter() - start - load_s, 3)
    return entry


def _anchor_record(ctx: _Context) -> dict[str, Any] | None:
    pipeline = ctx._memo.get(("pipeline",))
    if pipeline is None:
        return None
    return {"dir": str(ctx.anchor_dir()), **_asif_params(pipeline),
            "sources": pipeline.anchors.meta.get("sources", [])}


def _previous_results(path: Path, *, overwrite: bool, resume: bool) -> dict[str, Any]:
    if not path.exists():
        return {}
    if not (overwrite or resume):
        raise OptionError(f"{path} already exists: pass ", Option("resume", True), " to keep its finished "
                          "methods, ", Option("overwrite", True), " to replace it, or choose another ",
                          Option("out_dir"))
    if overwrite:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise OptionError(f"cannot resume from {path} ({err}); pass ", Option("overwrite", True),
                          " to start afresh") from err


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from nofree.artifacts import atomic_write_json

    atomic_write_json(path, data, indent=1, ensure_ascii=False, default=str)
