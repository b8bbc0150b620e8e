"""Embedded language models compared as MAGIC's writer: SmolLM2-135M-Instruct against Gemma 3 270M.

Everything else is nofree's default training-free captioner (``nofree caption --method magic``:
EfficientNet-Lite0 + all-MiniLM-L6-v2 composed by ASIF with the label bridge, the bundled
24k-caption pool, the :data:`~nofree.captioning.MAGIC_DEFAULTS`); only ``lm=`` changes. Per LM:

- **cross-validation on ``train``** with the folds of benchmarks/magic_quality.py
  (:func:`benchmarks.magic_quality.cv_folds`: anchors from the pairs of the other folds, captions
  for the held-out photos, all scored together against their own references);
- **``val`` once** (anchors from all 700 ``train`` pairs; 40 photos);
- three settings from one decoding pass: the default (8 greedy drafts, CIDEr-D consensus against
  the top 20 retrieved captions, a draft cut at the length limit passed over), the same drafts
  with caption retrieval's own choice as a ninth candidate and the top 50 as pseudo-references
  (the best cross-validated training-free setting in magic_quality's notes), and the single
  draft with the first window of 4 pool examples (the LM's writing alone, no choice); caption
  retrieval itself (no LM) on the same folds, for comparison;
- **new captions**: the share of kept captions that are not a pool caption verbatim (case,
  spaces and the final period aside), since a draft may copy one of its in-context examples;
- **seconds per photo** of the default at batch 8 (8 photos × 8 drafts decoded together), one
  torch thread, the LMs' weights packed as the captioner does: the ``val`` batches captioned by
  each LM in turn (:func:`time_lms`), so that both see the same machine load;
- a **sanity check** of each dequantised model: its greedy continuation of a plain prompt.

An embedded LM whose packages are not installed (Gemma is optional: ``pip install 'nofree[gemma]'``)
is listed as skipped.

    OMP_NUM_THREADS=1 python -m benchmarks.embedded_lms [--lm SPEC ...] [--folds 5] [--per-fold N]
                                                        [--json PATH] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks import write_json
from nofree.data.pool import duplicate_key
DEFAULT_LMS = ("embedded:smollm2-135m", "embedded:gemma3-270m")
#: a plain prompt whose greedy continuation shows that the dequantised weights write fluent text
SANITY_PROMPT = "The most common animals in a city park are"
#: suffix of the timing baseline: the LM's captioner with its caches never stacked (prompts
#: left-padded into one batch, k candidates one row each)
UNSTACKED = " (caches not stacked)"
SETTINGS = ("default: 8 drafts, CIDEr-D consensus (top 20)",
            "8 drafts + caption retrieval's choice, CIDEr-D consensus (top 50)",
            "one draft, 4 pool examples, greedy")
#: the row of caption retrieval (no LM) on the same photos
RETRIEVAL = "caption retrieval (no LM): CIDEr-D consensus of the top 50"
#: pseudo-references of the second setting
WIDE_CONSENSUS = 50


def caption_all(captioner, retrieval, image_emb, batch_size: int) -> tuple[dict[str, list[str]], float]:
    """The captions of every setting in :data:`SETTINGS` (one decoding pass) and of caption
    retrieval, and the seconds the default took (its drafts and its choice, as
    ``captioner.caption_embeddings`` makes it)."""
    out: dict[str, list[str]] = {name: [] for name in (*SETTINGS, RETRIEVAL)}
    seconds = 0.0
    cider = captioner.pool.cider
    for i in range(0, len(image_emb), batch_size):
        emb = image_emb[i:i + batch_size]
        start = time.perf_counter()
        rows, finished = captioner.drafts(emb)
        refs = captioner.pool.top(emb, captioner.consensus)
        cut = [[j for j, done in enumerate(ends) if not done] for ends in finished]
        out[SETTINGS[0]] += [row[cider.choose(row, r, unfinished=u)] for row, r, u in zip(rows, refs, cut)]
        seconds += time.perf_counter() - start
        picks = retrieval.caption_embeddings(emb)
        wide = captioner.pool.top(emb, WIDE_CONSENSUS)
        out[SETTINGS[1]] += [(row + [p])[cider.choose(row + [p], r, unfinished=u)]
                             for row, p, r, u in zip(rows, picks, wide, cut)]
        out[SETTINGS[2]] += [row[0] for row in rows]
        out[RETRIEVAL] += picks
    return out, seconds


def caption_runs(lm, runs, image_emb, batch_size: int, tokens: dict, pool) -> tuple[dict[str, list[str]], float]:
    """:func:`caption_all` with ``lm`` over ``runs`` (``(held rows, pipeline, example pool)``, as
    :func:`benchmarks.magic_quality.cv_folds` gives them; ``held`` None: every row of ``image_emb``),
    the captions of all runs concatenated per setting, and the default's seconds summed; caption
    retrieval ranks ``pool`` with each run's pipeline."""
    from nofree.captioning import MagicCaptioner
    from nofree.captioning.retrieval import RetrievalCaptioner

    captions: dict[str, list[str]] = {name: [] for name in (*SETTINGS, RETRIEVAL)}
    seconds = 0.0
    for held, pipeline, examples in runs:
        captioner = MagicCaptioner.from_pipeline(pipeline, lm=lm, pool=examples, **tokens)
        retrieval = RetrievalCaptioner(pipeline, pool)
        out, s = caption_all(captioner, retrieval, image_emb if held is None else image_emb[held], batch_size)
        seconds += s
        for name in captions:
            captions[name] += out[name]
    return captions, seconds


def time_lms(specs, fold, image_emb, batch_size: int, tokens: dict) -> dict[str, dict]:
    """Seconds per photo of the default captioner of each LM in ``specs``, timed in turns on the
    same batches (one warm-up batch each, then every batch of ``image_emb`` by each LM in turn),
    so that both see the same machine load: the median and the range over the batches."""
    from nofree.captioning import MagicCaptioner
    from nofree.registry import load_lm

    _, pipeline, examples = fold
    captioners = {spec: MagicCaptioner.from_pipeline(pipeline, lm=load_lm(spec), pool=examples, **tokens)
                  for spec in specs}
    for spec in specs:  # the baseline of batched prefill: the same LM as one without stacked caches
        unstacked = copy.copy(captioners[spec])
        unstacked.lm = copy.copy(unstacked.lm)
        unstacked.lm.stack_caches = unstacked.lm.candidate_step = None   # core.offers() then says no
        captioners[f"{spec}{UNSTACKED}"] = unstacked
    batches = [image_emb[i:i + batch_size] for i in range(0, len(image_emb), batch_size)]
    rounds: dict[str, list[float]] = {spec: [] for spec in captioners}
    for captioner in captioners.values():
        captioner.caption_embeddings(batches[0])
    for batch in batches:
        for spec, captioner in captioners.items():
            start = time.perf_counter()
            captioner.caption_embeddings(batch)
            rounds[spec].append((time.perf_counter() - start) / len(batch))
    out = {spec: {"median": statistics.median(v), "min": min(v), "max": max(v), "batches": len(v)}
           for spec, v in rounds.items() if not spec.endswith(UNSTACKED)}
    for spec in out:
        base = rounds[f"{spec}{UNSTACKED}"]
        out[spec]["unstacked_median"] = statistics.median(base)
        out[spec]["speedup"] = statistics.median(b / t for b, t in zip(base, rounds[spec]))
    return out


def score(captions: list[str], references: list[list[str]], pool_set: set[str], seconds: float) -> dict:
    from benchmarks.magic_quality import _score

    result = _score(captions, references, seconds, per_image=True)
    result["new_share"] = sum(duplicate_key(c) not in pool_set for c in captions) / len(captions)
    return result


def against_retrieval(scored: dict) -> None:
    """Add to each setting of ``scored`` (one LM, one of cv / val) its CIDEr difference to caption
    retrieval on the same photos, with the paired bootstrap's 95% interval."""
    from nofree.eval.significance import compare_to

    compared = compare_to({name: r["cider_per_image"] for name, r in scored.items()}, RETRIEVAL)
    for name, difference in compared.items():
        scored[name]["vs_retrieval"] = difference


def main(argv=None) -> dict:
    from benchmarks.asif_quality import anchors_of, encode_split
    from benchmarks.magic_quality import cv_folds, examples_pool
    from nofree.anchors.pipeline import AsifPipeline
    from nofree.cache import EmbeddingCache
    from nofree.captioning import default_pool_path
    from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
    from nofree.data.pairs import load_text_lines
    from nofree.decoding.magic import greedy_search
    from nofree.registry import list_lms, load_encoder, load_lm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", action="append", dest="lms", help=f"LM spec (repeatable; default: "
                        f"{', '.join(DEFAULT_LMS)})")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--per-fold", type=int, help="caption only this many held-out photos per fold")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="2 folds of 2 photos, 3 val photos, 4 tokens, "
                        "a 2,000-caption pool")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lms = args.lms or list(DEFAULT_LMS)

    cache = EmbeddingCache()
    image_encoder = load_encoder(DEFAULT_IMAGE_ENCODER, modality="image")
    text_encoder = load_encoder(DEFAULT_TEXT_ENCODER, modality="text")
    train, val = (encode_split(s, image_encoder, text_encoder, cache) for s in ("train", "val"))
    if args.smoke:
        val.image_emb, val.pairs = val.image_emb[:3], val.pairs[:3]
    pool = load_text_lines(default_pool_path())[: 2000 if args.smoke else None]
    pool_set = {duplicate_key(c) for c in pool}
    tokens = {"max_new_tokens": 4} if args.smoke else {}

    def pipeline_of(anchors):
        return AsifPipeline.from_anchors(anchors, image_encoder, text_encoder, cache=cache)

    folds = cv_folds(train, pipeline_of, pool, args.folds, smoke=args.smoke, per_fold=args.per_fold)
    cv_refs = [list(train.pairs[i].captions) for held, _, _ in folds for i in held.tolist()]
    val_pipeline = pipeline_of(anchors_of(train))
    val_folds = [(None, val_pipeline, examples_pool(val_pipeline, pool))]
    val_refs = [list(p.captions) for p in val.pairs]

    installed = {row.spec: row for row in list_lms() if row.kind == "embedded"}
    results: dict[str, dict] = {}
    for spec in lms:
        if spec in installed and not installed[spec].installed:  # an optional install: skipped, said so
            print(f"{spec}: not installed (pip install {installed[spec].package}); skipped", flush=True)
            results[spec] = {"skipped": f"not installed: pip install {installed[spec].package}"}
            continue
        start = time.perf_counter()
        lm = load_lm(spec)
        load_seconds = time.perf_counter() - start
        prompt = lm.tokenizer.encode(lm.chat_prompt(SANITY_PROMPT), add_special_tokens=False)
        sanity = greedy_search(lm, [prompt], max_new_tokens=24, stop_at_period=False).texts[0]
        row = {"load_seconds": load_seconds, "params": sum(p.numel() for p in lm.model.parameters()),
               "vocab": lm.vocab_size, "sanity": sanity, "cv": {}, "val": {}}
        for where, runs, refs, image_emb in (("cv", folds, cv_refs, train.image_emb),
                                             ("val", val_folds, val_refs, val.image_emb)):
            captions, seconds = caption_runs(lm, runs, image_emb, args.batch_size, tokens, pool)
            row[where] = {name: score(captions[name], refs, pool_set, seconds) for name in captions}
            against_retrieval(row[where])
            for name in captions:
                r = row[where][name]
                print(f"{spec} {where} {name[:40]:40s} CIDEr {100 * r['metrics']['CIDEr']:5.1f} "
                      f"new {r['new_share']:.2f} {r['seconds_per_image']:.2f} s/photo", flush=True)
        results[spec] = row
    timed = [spec for spec in lms if "skipped" not in results[spec]]
    for spec, seconds in time_lms(timed, val_folds[0], val.image_emb, args.batch_size, tokens).items():
        results[spec]["timing"] = seconds
    out = {"lms": results, "folds": 2 if args.smoke else args.folds, "per_fold": args.per_fold,
           "n_cv_images": len(cv_refs), "n_val_images": len(val_refs), "threads": args.threads,
           "batch_size": args.batch_size, "pool": len(pool), "sanity_prompt": SANITY_PROMPT}
    print(markdown(out))
    if args.json:
        write_json(args.json, out)
    return out


def markdown(out: dict) -> str:
    lines = ["| LM | setting | CV CIDEr | CV Δ retrieval (95%) | CV BLEU-4 | CV new captions | val CIDEr | "
             "val Δ retrieval (95%) | val BLEU-4 | val new captions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def delta(r: dict) -> str:
        d = r.get("vs_retrieval")
        if not d:
            return "–"
        low, high = d["interval"]

        def signed(value: float) -> str:   # a real minus sign, and a rounded zero without one
            text = f"{100 * value:+.1f}"
            return "0.0" if text in ("+0.0", "-0.0") else text.replace("-", "−")

        return f"{signed(d['delta'])} ({signed(low)} to {signed(high)})"

    def cells(cv: dict, val: dict) -> str:
        return " | ".join(f"{100 * r['metrics']['CIDEr']:.1f} | {delta(r)} | {100 * r['metrics']['BLEU-4']:.1f} | "
                          f"{100 * r['new_share']:.0f}%" for r in (cv, val)) + " |"

    measured = [row for row in out["lms"].values() if "skipped" not in row]
    if measured and RETRIEVAL in measured[0]["cv"]:   # the same with every LM: shown once
        lines.append(f"| – | {RETRIEVAL} | {cells(measured[0]['cv'][RETRIEVAL], measured[0]['val'][RETRIEVAL])}")
    for spec, row in out["lms"].items():
        if "skipped" in row:
            lines.append(f"| `{spec}` | {row['skipped']} | | | | | | | | |")
            continue
        for name in SETTINGS:
            if name in row["cv"]:
                lines.append(f"| `{spec}` | {name} | {cells(row['cv'][name], row['val'][name])}")
    subset = f", the first {out['per_fold']} held-out photos of each" if out.get("per_fold") else ""
    lines += ["", f"CV: {out['folds']} folds over the `train` photos{subset} ({out['n_cv_images']} captioned; "
              f"anchors from the other folds' pairs); val: {out['n_val_images']} photos, anchors from all 700 "
              f"train pairs; {out['pool']:,}-caption pool. Δ retrieval: CIDEr minus caption retrieval's on the "
              "same photos, with the 95% interval of a paired bootstrap over the photos. New captions: kept "
              "captions that are not a pool caption verbatim.", "",
              f"| LM | parameters | vocabulary | load (s) | s/photo, default, batch {out['batch_size']}, "
              f"{out['threads']} thread: median (range) | caches not stacked: s/photo, speed-up | "
              f"greedy continuation of \"{out['sanity_prompt']}\" |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for spec, row in out["lms"].items():
        if "skipped" in row:
            continue
        t = row["timing"]
        sanity = " ".join(row["sanity"].split()).replace("|", "/")
        lines.append(f"| `{spec}` | {row['params'] / 1e6:.0f}M | {row['vocab']:,} | {row['load_seconds']:.0f} | "
                     f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f}) | {_unstacked(t)} | {sanity} |")
    lines += ["", f"s/photo: `caption_embeddings` of the {out['n_val_images']} `val` photos in batches of "
              f"{out['batch_size']}, the LMs in turns on each batch (after one warm-up batch each), so both "
              "see the same load; caches not stacked: the same captioner with `stack_caches` and "
              "`candidate_step` switched off (one left-padded prefill, one row per candidate), timed in the "
              "same turns, and the median over batches of its time over the default's; load (s): `load_lm` "
              "in the benchmark's process."]
    return "\n".join(lines)


def _unstacked(timing: dict) -> str:
    if "speedup" not in timing:   # results recorded without the baseline
        return "–"
    return f"{timing['unstacked_median']:.2f}, {timing['speedup']:.2f}×"


NOTES = """Measured with nofree's default similarity (ASIF + the label bridge) and MAGIC's current
defaults; the captions of SmolLM2's rows are those of the section "Training-free captioning
quality" (the same folds, pool and settings: 57.8 / 63.8 / 52.6 in cross-validation, 67.9 / 64.2
/ 60.2 on `val`).

What it says (Gemma 3 270M base, an optional install, against the default SmolLM2-135M-Instruct):
- **Gemma writes better drafts.** One draft with 4 pool examples: 57.6 against 52.6 CIDEr in
  cross-validation (`val`: 60.0 against 60.2); 8 drafts and the consensus choice: 59.2 against
  57.8 (`val`: 62.7 against 67.9). Its kept captions are more often its own sentences (72–90%
  against 47–69%). Neither LM's drafts alone reach caption retrieval (63.8 in cross-validation,
  65.8 on `val`).
- **With caption retrieval's own caption as a ninth candidate and 50 pseudo-references, Gemma
  is ahead of retrieval**: 66.0 against 63.8 in cross-validation (+2.2, paired 95% interval −1.0
  to +5.6), 61% of the kept captions its own; 71.1 against 65.8 on `val` (+5.3, −3.0 to +13.8),
  45% its own. Neither lead is separated from 0 at 95%. SmolLM2 in the same setting is level
  with retrieval in cross-validation (63.8, 45% its own) and below it on `val` (64.2): its drafts
  win the consensus less often, and are not better captions when they do. This setting is the
  best cross-validated training-free captioner measured on this sample: `nofree caption --method
  magic --lm embedded:gemma3-270m --with-retrieved --consensus 50`. The same through `nofree eval
  --pairs nofree/sample/pairs.jsonl --method retrieval --method magic --lm embedded:gemma3-270m
  --with-retrieved --consensus 50` gives the same 71.1 on `val` (ahead in 90% of the bootstrap
  draws; 2.4 s per photo with another job on the machine; 95% distinct captions, no loops). Read
  against the references: 17 of its 40 captions are retrieval's, and where it differs it mostly
  rewords the same retrieved content, right or wrong with it ("Two zebras grazing in a field next
  to a tree." where retrieval has "a zebra and a giraffe in the wild", for three zebras; a cat and
  a dog at a window are a bear in both). One copies an upper-case pool caption and stops on a
  broken word: "A MAN IS ON THE MOTOR BIKE WITH A HELL." (retrieval: "A man who is putting a hot
  dog in his mouth."; the photo: a man playing with a Wii controller).
- **The defaults stay as they are.** For SmolLM2 the setting with retrieval's caption scores 6
  CIDEr more in cross-validation than its drafts alone, but returns retrieval's caption for more
  than half of the photos, which `--method retrieval` does directly; MAGIC's default stays the
  one in which the LM writes most captions. Gemma is not the default LM: it is a ~250 MB optional
  install under the Gemma Terms of Use, and triples the load time.
- **Time**: the default captioner takes about as long per photo with either LM (1.94 s with Gemma,
  1.92 s with SmolLM2, batch 8, one thread, timed in turns with another job on the machine);
  Gemma takes three times as long to load (50 against 16 s: transformers converts the GGUF
  tokenizer and dequantises 268M parameters, 168M of them the 262,144-token embedding). Gemma's
  local layers keep a sliding window of 512 positions (`DynamicSlidingWindowLayer`); while no
  prompt has filled it, `HFLanguageModel` stacks them and feeds MAGIC's candidates side by side as
  it does SmolLM2's plain layers (`lm.hf.holds_every_position`); without that (the "caches not
  stacked" column) Gemma takes 1.67× as long, SmolLM2 2.06×, with the same captions.
- Prompt: Gemma 3 270M is a base model, so `chat_prompt` gives it `<bos>` + the instruction and
  examples as a plain document, which it continues with the next list item (without `<bos>` its
  greedy continuations repeat one word). A new line after the examples changed the first run's
  cross-validated scores by at most 0.1 and was dropped because a plain prompt (the sanity row)
  then made the model start over.
- Steered MAGIC (α = 0.1, β = 2, `nofree caption --alpha 0.1 --beta 2 --drafts 1`) runs with Gemma
  too: the degeneration penalty's candidates go side by side while the window has room and one
  row each once it is full (both tested on tiny random Gemma 3 models whose window is full from
  the start, fills during decoding, or stays open); it is not in this table.
- The first run of this table (2026-12-06) ranked by plain ASIF (caption retrieval 52.0 in
  cross-validation) and offered the photo's first in-context example as MAGIC's ninth candidate;
  there Gemma's default setting scored 53.9 against SmolLM2's 52.8."""


if __name__ == "__main__":
    main()
