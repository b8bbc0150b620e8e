"""Frozen vs trained fusion on coco-mini: train LiT, ClipCap, Flamingo-style and SmallCap-style
adapters with their default settings on ``train``, then run every method through ``nofree eval``
on ``val``.

    python -m benchmarks.fusion [--smoke] [--json PATH] [--work runs/bench/fusion] [--seeds 0 1 2]

Same frozen backbones for every method (EfficientNet-Lite0, all-MiniLM-L6-v2, SmolLM2-135M), same
700 train pairs as anchors (training-free) or training data (adapters), same 40 val photos and
metric code. Training time is wall time of ``train_lit`` / ``train_clipcap`` / ``train_flamingo``
(each computes its frozen features once, then trains; validation each epoch included).
``--smoke`` runs the same path on tiny config-built backbones and 30 train / 8 val photos.
The report folder (results.json, results.md, plots) is written to ``WORK/report``; the plots are
also copied next to ``--json``.

One training's score is one draw: on 40 photos the training seed alone moves an adapter's CIDEr
by several points (RESULTS.md). Every adapter is therefore trained once per ``--seeds`` entry (the
first seed's adapters in ``WORK/KIND``, the others' in ``WORK/KIND-seedS``); the first seed's
adapters get the full report, and every further seed's adapters are evaluated again beside
caption retrieval (``WORK/report-seedS``) for the table over seeds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from benchmarks import work_folder
from nofree import sample_dir
from nofree.captioning import default_pool_path
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER


#: the seeds of a full run and of ``--smoke`` (two, so that CI runs the code path over seeds)
SEEDS = (0, 1, 2)
SMOKE_SEEDS = (0, 1)


def _frozen_parameters(adapter) -> int:
    return sum(p.numel() for _, module in adapter.backbone_modules() for p in module.parameters())


def write_pairs(out: Path, rows) -> Path:
    """Write ``rows`` (:class:`nofree.core.Pair`) as a JSONL pairs file at ``out``; returns ``out``."""
    out.write_text("".join(json.dumps({"image": p.image, "captions": list(p.captions), "split": p.split,
                                       **p.meta}) + "\n" for p in rows))
    return out


def _small_pairs(folder: Path, n_train: int, n_val: int) -> Path:
    """A pairs file with the first n_train train and n_val val photos of the sample (absolute paths)."""
    from nofree.data.pairs import load_pairs

    pairs = sample_dir() / "pairs.jsonl"
    rows = [*load_pairs(pairs, split="train", limit=n_train), *load_pairs(pairs, split="val", limit=n_val)]
    return write_pairs(folder / "pairs.jsonl", rows)


def tiny_backbones(folder: Path) -> dict[str, str]:
    """Tiny config-built image, text and LM backbones saved under ``folder`` (smoke runs)."""
    from nofree.testing import make_tiny_hf_text, make_tiny_hf_vision, make_tiny_lm_dir

    return {"image": f"local:{make_tiny_hf_vision(folder / 'vision')}",
            "text": f"local:{make_tiny_hf_text(folder / 'text')}",
            "lm": f"local:{make_tiny_lm_dir(folder / 'lm', family='llama')}"}


def frozen_setup(work: Path, smoke: bool) -> tuple[dict[str, str], Path | None, dict]:
    """``(backbones, pool, epochs)`` of a run: the embedded default backbones, the bundled caption
    pool (``None``) and the recipes' epochs (``{}``); with ``smoke``, tiny backbones saved under
    ``work``, the pool's first 2000 lines and one epoch."""
    if not smoke:
        return {"image": DEFAULT_IMAGE_ENCODER, "text": DEFAULT_TEXT_ENCODER, "lm": DEFAULT_LM}, None, {}
    pool = work / "pool.txt"
    pool.write_text("\n".join(default_pool_path().read_text().splitlines()[:2000]) + "\n")
    return tiny_backbones(work / "backbones"), pool, {"epochs": 1}


def build_train_anchors(pairs: Path, backbones: dict[str, str], out: Path) -> None:
    """(Re)build at ``out`` the anchor set of the ``train`` split of ``pairs``."""
    from nofree.anchors.build import build_anchor_set

    if out.exists():
        shutil.rmtree(out)
    build_anchor_set(pairs, split="train", image_encoder=backbones["image"], text_encoder=backbones["text"],
                     out=out)


def adapter_trainers(backbones: dict[str, str], pool: Path | None) -> dict[str, tuple]:
    """``{kind: (train function, its backbone keywords)}`` of every adapter (default recipes)."""
    from nofree.adapters import train_clipcap, train_flamingo, train_lit, train_smallcap

    return {"lit": (train_lit, {"text_encoder": backbones["text"]}),
            "clipcap": (train_clipcap, {"lm": backbones["lm"]}),
            "flamingo": (train_flamingo, {"lm": backbones["lm"]}),
            "smallcap": (train_smallcap, {"lm": backbones["lm"], "text_encoder": backbones["text"],
                                          **({"pool": pool} if pool is not None else {})})}


def training_record(result, seconds: float) -> dict:
    """What a training run reports: wall time, steps, parameter counts, config, per-epoch history."""
    return {"seconds": round(seconds, 1), "steps": result.steps,
            "trainable_parameters": result.adapter.num_parameters(),
            "frozen_parameters": _frozen_parameters(result.adapter),
            "config": result.adapter.config(), "history": result.history}


def adapter_dir(work: Path, kind: str, seed: int) -> Path:
    """Where the ``kind`` adapter trained with ``seed`` lives: ``WORK/KIND`` for seed 0, else
    ``WORK/KIND-seedS``."""
    return work / (kind if seed == 0 else f"{kind}-seed{seed}")


def saved_training(folder: Path) -> dict:
    """The training record of an adapter trained elsewhere (``nofree train``), read from its
    folder's training state: steps and per-epoch history; its wall time is not known."""
    state = json.loads((folder / "training" / "state.json").read_text())
    return {"seconds": None, "steps": state["step"], "history": state["history"],
            "config": state["settings"]["config"]}


def seed_methods() -> list[str]:
    """The report's methods whose result depends on a trained adapter (and so on its seed)."""
    from nofree.eval.report import METHODS

    return [name for name, method in METHODS.items() if set(method.needs) - {"anchors"}]


def eval_config(pairs: Path, *, anchors: Path | None, adapters: dict, backbones: dict[str, str],
                pool: Path | None, smoke: bool, limit: int | None = None):
    """The :class:`~nofree.eval.report.EvalConfig` every method is evaluated with."""
    from nofree.eval.report import EvalConfig

    return EvalConfig(pairs=pairs, anchors=anchors, adapters=adapters, pool=pool, lm=backbones["lm"],
                      limit=limit, meteor=not smoke)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny backbones, a few photos")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--work", type=Path, default=None, help="adapters, anchors and report go here (default "
                        "runs/bench/fusion; --smoke: a temporary folder, deleted at the end)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N val photos")
    parser.add_argument("--reuse-adapters", action="store_true",
                        help="keep the adapters already in --work (with the training record it holds) "
                             "and rerun only the evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"training seeds of every adapter (default {' '.join(map(str, SEEDS))}; --smoke: "
                             f"{' '.join(map(str, SMOKE_SEEDS))}); the first seed's adapters get the full report")
    args = parser.parse_args(argv)
    seeds = args.seeds or (SMOKE_SEEDS if args.smoke else SEEDS)
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        parser.error(f"--seeds: give distinct seeds ≥ 0, not {' '.join(map(str, seeds))}")
    args.seeds = list(seeds)
    with work_folder(args.work, smoke=args.smoke, default="runs/bench/fusion", prefix="nofree-fusion-") as work:
        return _run(args, work)


def _run(args, work: Path) -> dict:
    from nofree.eval.report import run_eval

    work.mkdir(parents=True, exist_ok=True)
    backbones, pool, epochs = frozen_setup(work, args.smoke)
    pairs = _small_pairs(work, 30, 8) if args.smoke else sample_dir() / "pairs.jsonl"
    anchors = work / "anchors"
    build_train_anchors(pairs, backbones, anchors)
    training = {}
    previous = {}
    if args.reuse_adapters and (work / "training.json").exists():
        previous = json.loads((work / "training.json").read_text())
    trainers = adapter_trainers(backbones, pool)
    for seed in args.seeds:
        for kind, (trainer, backbone) in trainers.items():
            folder = adapter_dir(work, kind, seed)
            if args.reuse_adapters and (folder / "config.json").exists():
                record = previous.get(folder.name) or saved_training(folder)
                training[folder.name] = {**record, "reused": True}
                print(f"reusing the {kind} adapter in {folder}", flush=True)
                continue
            start = time.perf_counter()
            result = trainer(pairs, out=folder, image_encoder=backbones["image"], overwrite=True, seed=seed,
                             **backbone, **epochs)
            seconds = time.perf_counter() - start
            training[folder.name] = training_record(result, seconds)
            print(f"trained {folder.name}: {seconds:.0f} s, {result.steps} steps, last epoch {result.history[-1]}",
                  flush=True)
            (work / "training.json").write_text(json.dumps({**previous, **training}, indent=1, default=str))

    main_seed, *other_seeds = args.seeds
    config = eval_config(pairs, anchors=anchors, adapters={k: adapter_dir(work, k, main_seed) for k in trainers},
                         backbones=backbones, pool=pool, smoke=args.smoke, limit=args.limit)
    report = run_eval(config, out_dir=work / "report", overwrite=True, echo=print)
    seed_reports = {main_seed: report}
    for seed in other_seeds:
        config = eval_config(pairs, anchors=anchors, adapters={k: adapter_dir(work, k, seed) for k in trainers},
                             backbones=backbones, pool=pool, smoke=args.smoke, limit=args.limit)
        seed_reports[seed] = run_eval(config, ["retrieval", *seed_methods()], out_dir=work / f"report-seed{seed}",
                                      overwrite=True, echo=print)
    out = {"smoke": args.smoke, "backbones": backbones, "seeds": args.seeds, "training": training,
           "report": report, "seed_results": seed_summary(seed_reports, training, work, list(trainers))}
    if args.work or not args.smoke:
        out["report_dir"] = str(work / "report")
    if args.json:
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        plots = report.get("plots") or {}
        copied = {}
        for name, file in plots.items() if "error" not in plots else ():
            copied[name] = f"fusion-{file}"
            shutil.copy(work / "report" / file, target.parent / copied[name])
        out["plots"] = copied
        target.write_text(json.dumps(out, indent=1, default=str))
    print(markdown(out))
    return out


def seed_summary(reports: dict[int, dict], training: dict, work: Path, kinds: list[str]) -> dict:
    """``{method: {"metric", "per_seed": {seed: {...}}}}`` for every seed-dependent method: its
    headline score (CIDEr, or text→image R@1 for a scoring method), the paired difference to
    the baseline with its interval, the image gap and the adapter's training seconds."""
    out: dict = {}
    for method in seed_methods():
        rows = {}
        for seed, report in reports.items():
            entry = report["methods"].get(method) or {}
            if entry.get("status") != "ok":
                continue
            metrics = entry["metrics"]
            metric = "CIDEr" if entry["task"] == "captioning" else "t2i R@1"
            compared = (report.get("comparison") or {}).get("methods", {}).get(method) or {}
            trained = training.get(adapter_dir(work, method, seed).name) if method in kinds else None
            rows[seed] = {"score": metrics.get(metric), "delta": compared.get("delta"),
                          "interval": compared.get("interval"), "image gap": metrics.get("image gap"),
                          "image gap interval": metrics.get("image gap interval"),
                          "distinct": metrics.get("distinct"),
                          "train_seconds": (trained or {}).get("seconds")}
        if rows:
            out[method] = {"metric": metric, "baseline": reports[next(iter(reports))].get("baseline"),
                           "per_seed": rows}
    return out


def seed_table(summary: dict) -> list[str]:
    """Markdown lines of the table over training seeds (empty with one seed)."""
    if not any(len(m["per_seed"]) > 1 for m in summary.values()):
        return []

    def mean_sd(values: list[float], sign: str = "") -> str:
        if len(values) < 2:
            return f"{values[0]:{sign}.1f}" if values else "–"
        return f"{statistics.fmean(values):{sign}.1f} ± {statistics.stdev(values):.1f}"

    def each(values: list, fmt) -> str:
        return " / ".join("–" if v is None else fmt(v) for v in values)

    def minus(text: str) -> str:   # a real minus sign, and no "−0.000" for a rounded zero
        return text.replace("-", "−") if text.strip("-0.") else text.lstrip("-")

    seeds = sorted({s for m in summary.values() for s in m["per_seed"]})
    rows = []
    for method, m in summary.items():
        per = [m["per_seed"].get(s, {}) for s in seeds]
        scores = [100 * r["score"] for r in per if r.get("score") is not None]
        deltas = [100 * r["delta"] for r in per if r.get("delta") is not None]
        ahead = sum(1 for r in per if r.get("interval") and r["interval"][0] > 0)
        behind = sum(1 for r in per if r.get("interval") and r["interval"][1] < 0)
        gaps_clear = sum(1 for r in per if r.get("image gap interval") and r["image gap interval"][0] > 0)
        has_gap = any(r.get("image gap") is not None for r in per)
        rows.append([method, m["metric"], each([r.get("score") for r in per], lambda v: f"{100 * v:.1f}"),
                     f"**{mean_sd(scores)}**",
                     "–" if not deltas else minus(f"{mean_sd(deltas, '+')} ({ahead} ahead, {behind} behind)"),
                     "–" if not has_gap else f"{each([r.get('image gap') for r in per], lambda v: minus(f'{v:.3f}'))} "
                                             f"({gaps_clear} above 0)",
                     each([r.get("distinct") for r in per], lambda v: f"{100 * v:.1f}"),
                     each([r.get("train_seconds") for r in per], lambda v: f"{v:.0f}")])
    header = ["method", "score", f"per seed ({' / '.join(map(str, seeds))})", "mean ± sd",
              "Δ retrieval, mean ± sd (seeds separated at 95%)", "image gap per seed (intervals above 0)",
              "distinct % per seed", "train s per seed"]
    return ["**Over training seeds**", "",
            f"Every adapter trained once per seed ({', '.join(map(str, seeds))}) with its default recipe on the "
            "same training pairs, each evaluated on the same photos. Scores ×100 (CIDEr; LiT: text→image R@1); "
            "Δ retrieval: CIDEr minus caption retrieval's on the same photos, with the number of seeds whose "
            "paired 95% interval lies wholly above or below 0; image gap in nats (an interval above 0: "
            "that seed's adapter reads the photo's features); train s: wall seconds of the training "
            "(\"–\": trained outside this benchmark, by `nofree train` with the same recipe).", "",
            "| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def markdown(out: dict) -> str:
    from nofree.eval.report import METHODS
    from nofree.eval.table import comparison_table, image_gap_table, method_tables

    report = out["report"]
    tables = method_tables(report, METHODS)
    lines = [f"{report['n_images']} `{report['split']}` photos, {report['n_references']} reference captions; "
             f"backbones {', '.join(f'`{v}`' for v in out['backbones'].values())}. Scores ×100; seconds "
             "exclude loading models and encoding shared inputs (shown apart as +load).", ""]
    if tables["captioning"]:
        lines += ["Captioning:", "", *tables["captioning"], ""]
        for extra in (comparison_table(report), image_gap_table(report)):
            if extra:  # its "## " heading becomes a bold line: RESULTS.md keeps one heading per section
                lines += [f"**{extra[0].removeprefix('## ')}**", *extra[1:]]
        lines += seed_table(out.get("seed_results") or {})
    if tables["scoring"]:
        lines += ["Retrieval among the val pairs and zero-shot COCO categories:", "", *tables["scoring"], ""]
    failed = {n: e for n, e in report["methods"].items() if e.get("status") != "ok"}
    lines += [f"- **{n} failed**: {e.get('error')}" for n, e in failed.items()]
    main_seed = (out.get("seeds") or [0])[0]
    lines += [f"Training on `train` (default settings of `nofree train`, seed {main_seed}):", "",
              "| adapter | trainable parameters | frozen backbone parameters | epochs | steps | train time | last epoch |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in dict.fromkeys(k.split("-seed")[0] for k in out["training"]):
        t = out["training"].get(adapter_dir(Path(), kind, main_seed).name)
        if t is None:
            continue
        last = t["history"][-1] if t["history"] else {}
        shown = ", ".join(f"{k} {v:.3g}" for k, v in last.items()
                          if k.startswith(("val", "train_loss", "image_gap", "photo_gap")) and isinstance(v, float))
        seconds = "–" if t.get("seconds") is None else f"{t['seconds']:.0f} s"
        counts = [f"{t[k]:,}" if k in t else "–" for k in ("trainable_parameters", "frozen_parameters")]
        lines.append(f"| {kind} | {counts[0]} | {counts[1]} | "
                     f"{last.get('epoch', '–')} | {t['steps']} | {seconds}{' (earlier run)' if t.get('reused') else ''} | "
                     f"{shown} |")
    for name, file in (out.get("plots") or {}).items():
        if name in ("captioning metrics", "sample captions") or name.startswith("CIDEr against"):
            lines += ["", f"![{name}](results/{file})"]
    return "\n".join(lines)


NOTES = """Reading the table: every row used the same frozen backbones and the same 700 train
pairs, as anchors (ASIF, retrieval, MAGIC, SmallCap's retrieval) or as training data (LiT,
ClipCap, Flamingo-style, SmallCap-style). Training time counts the frozen features computed once
and every epoch's forward/backward pass through the frozen LM; the training-free rows need no
training, only the anchors' encoding. "distinct %" counts distinct captions per 100 photos,
"3-gram loops %" the captions repeating a word 3-gram; `image_gap` (training table) is
the val loss with each caption paired with another photo minus the true val loss: ~0 means the
adapter ignores the image. The table "How much the trained captioners read the photo" measures
the same on the 200 reference captions at evaluation, with the gap's 95% interval over the
photos, and for SmallCap-style the photo gap, the rise when its retrieved captions come from the
other photo too.

Images and texts are compared by nofree's default similarity, ASIF plus the label bridge
(section "ASIF + the image encoder's labels"): with plain ASIF these 40 photos gave retrieval
48.7 CIDEr and text→image R@1 57.5.

How far 40 photos can be trusted: each CIDEr's 95% bootstrap interval over the photos is about
35 points wide (retrieval 47.7–85.2). Paired with retrieval on the same draws of photos,
SmallCap-style is ahead in 97% of draws (+6.8, −0.1 to +15.6), MAGIC's defaults in 63% (+2.1,
−10.3 to +15.5), MAGIC with the LiT scorer in 26% (−4.6, −18.5 to +9.1): none is separated from
retrieval at 95%. ClipCap (−31.7, −52.7 to −10.2) and Flamingo-style (−30.8, −51.8 to −11.5) are
behind in every draw. ASIF's text→image R@1 of 68.0 has a 95% interval of 57.0–78.5 over the
photos (each photo's 5 captions drawn together, as they share its difficulty), LiT's 48.5 one of
35.5–61.5. The intervals cover the choice of photos, not the training seed.

The seed-0 adapters were trained afresh by an earlier full run of this benchmark with the current
code, recipes and cleaned pool (nothing was chosen from `val`); this run reused them
(`--reuse-adapters`, every seed-0 score as in that run) and evaluated the adapters of training
seeds 1 and 2 beside them (the table over seeds). Seeds 1 and 2 of ClipCap and the Flamingo-style
adapter were trained for it by `nofree train KIND --pairs nofree/sample/pairs.jsonl --seed S --out
runs/bench/fusion/KIND-seedS`, which makes the benchmark's own call (18–19 minutes of wall time
each, with three jobs sharing the two cores), SmallCap-style's by the same command earlier,
LiT's by this run; "–" in the seconds column marks those trained outside it.
`examples/03_frozen_vs_trained.ipynb`, which trains the seed-0 adapters without the per-epoch
validation, gets the same numbers.

Reading the captions: different photos get different captions in every row (92.5–100%); no
caption of retrieval, MAGIC, ClipCap, Flamingo-style or SmallCap-style repeats a word 3-gram or
stutters. MAGIC with the LiT scorer, one steered draft without a consensus choice, wrote "A laptop
computer sitting on a desk with a laptop computer sitting on a table.". MAGIC wrote 25 of its 40
captions itself (not a pool caption verbatim), SmallCap-style 22 (the other 18 are the retrieved
caption, kept by its consensus choice), the Flamingo-style adapter 38. SmallCap-style's own
sentences stay close to its examples ("A man standing on a bike with a dog." where retrieval has
"A man who is putting a hot dog in his mouth."). SmallCap-style reads the photo through its
retrieved captions: its loss rises 0.80 nats when they come from another photo, but only 0.026
(95% interval 0.010 to 0.041) when the photo's features alone do, so its cross-attention adds
little to examples this close to the photo; its lead over retrieval comes from choosing among
its drafts and the retrieved caption.

**Over training seeds, one training's `val` score is one draw.** ClipCap scores 34.1 / 41.5 /
35.2 with seeds 0 / 1 / 2 (36.9 ± 4.0), the Flamingo-style adapter 35.0 / 36.1 / 30.1 (33.7 ±
3.2), SmallCap-style 72.6 / 59.3 / 66.2 (**66.0 ± 6.6, level with retrieval's 65.8**: paired
differences +6.8, −6.5 and +0.4, with intervals −0.1 to +15.6, −19.0 to +4.0 and −12.1 to +12.5).
LiT's text→image R@1 moves little (48.3 ± 0.8), nor does MAGIC with the LiT scorer (59.9 ± 1.4).
ClipCap and the Flamingo-style adapter are behind retrieval at 95% with every seed, and read the
photo with every seed (image gaps 0.77–1.03 nats, every interval above 0). SmallCap-style's
cross-attention adds a gap clearly above 0 only with seed 0 (0.026, 0.010 to 0.041; seeds 1 and
2: 0.016, −0.002 to 0.035, and 0.011, −0.008 to 0.028), while its photo gap, the loss rise when
the retrieved captions come from another photo, stays 0.78–0.86. Its captions read alike across
seeds; the scores move on a handful of photos where one seed keeps the retrieved caption and
another a draft ("A person holding a smartphone in their left hand." scores 0 where "A person
sitting at a table with a computer and a phone." scores 33). The 140 photos of the 5-fold
cross-validation on `train` see further: there the same recipe and decoding are ahead of
retrieval with both training seeds tried, by 3.7 (95% interval +0.2 to +7.5) and 4.0 CIDEr (+1.0
to +7.4; section "ASIF + the image encoder's labels"). Reading the new seeds' captions: ClipCap
writes 37 distinct captions of 40 with seed 1 and 39 with seed 2, the Flamingo-style adapter 39
and 40, without loops; one Flamingo-style caption of seed 1 fuses two words ("A kitchen with a
stove topoven and a refrigerator."). The Flamingo-style scores repeat, to the decimal, the
700-pair column of "Captioning quality against training pairs" (the same recipe and seeds);
ClipCap's column there, 42.5 ± 4.6, came from earlier trainings of the same recipe, and separate
runs of it have moved by as much before (seed 0: 39.3 in an earlier run of this benchmark, 34.1
now).

### Trained fusion: how the recipes were chosen

Model selection used the `train` split only; `val` is looked at once per recipe, in the table
above. Two procedures, both calling the library's `train_adapter` and captioners on frozen
features computed once by nofree's encoders:

- **5-fold cross-validation** (`python -m benchmarks.recipe_cv`, the procedure of that module):
  the 140 `train` photos shuffled once and cut into 5 folds of 28; per fold an adapter trained on
  the other 112 photos (560 captions), one caption per held-out photo, CIDEr against its 5
  captions; mean ± sd over the folds. Used for ClipCap's epochs, mapper, prefix length and
  decoding (table below). The table's numbers come from a script making the same calls on the
  same folds and frozen features; the module itself has been run in its smoke mode only, and
  `python -m benchmarks --only recipe_cv` reruns the default recipe's row.
- **One train-internal holdout** (the last 28 `train` photos, trained on the other 112), single
  seeds, used before the cross-validation existed for the Flamingo-style and SmallCap-style
  block and for the first ClipCap recipe (second table). On 28 photos differences of a few CIDEr
  are noise: ClipCap's 3-epoch recipe scored 43.9 there but 29.1 ± 6.1 in cross-validation.

| ClipCap, 5-fold cross-validation on `train` | steps per fold | greedy CIDEr | beams 3 CIDEr | distinct (greedy / beams) |
| --- | --- | --- | --- | --- |
| MLP mapper, prefix 10, lr 1e-3, 3 epochs, mirrored views (the previous recipe) | 105 | 29.1 ± 6.1 (29.1 / 22.6 / 24.7 / 31.0 / 38.1) | 31.7 ± 12.7 (17.7 / 32.7 / 20.0 / 45.1 / 43.2) | 89% / 86% |
| the same, 6 epochs: **the default recipe, decoded with 3 beams** | 210 | 33.3 ± 13.9 (42.8 / 23.5 / 15.8 / 34.2 / 50.0) | **41.7 ± 13.3** (48.1 / 32.8 / 26.8 / 39.9 / 60.8) | 100% / 98% |
| prefix length 4 (first fold only; stopped) | 105 | 8.6 | – | 68% / – |
| transformer mapper, 8 layers, lr 1e-3 (first fold only; stopped: one caption for all) | 105 | 3.1 | 7.3 | 4% / 7% |

The 6-epoch recipe with beam search beats the previous default (3 epochs, greedy) in every fold
(+2.1 to +22.7 CIDEr, mean +12.6); the fold-to-fold spread (28 photos each) is larger than any
difference between rows, which is why the comparison is made fold by fold.

| run (train-internal holdout, 28 photos) | steps | held loss | image gap | distinct | CIDEr |
| --- | --- | --- | --- | --- | --- |
| caption retrieval (training-free, anchors from the 112 photos) | – | – | – | – | 68.9 |
| ClipCap MLP, lr 1e-3, 400-step cosine schedule, evaluated at step 100 | 100 | 3.04 | 0.65 | 93% | 43.0 |
| the same run at step 200 (held loss rising: 560 captions overfit) | 200 | 3.19 | 0.90 | 100% | 30.9 |
| ClipCap MLP, 3 epochs (105 steps), cosine decay | 105 | 3.06 | 0.64 | 96% | 36.5 |
| the same with mirrored views of the photos: the default recipe | 105 | 3.27 | 0.61 | 89% | 43.9 |
| Flamingo-style, the paper's block (gates at 0, random output projections), unit-scale latents | 105 | 3.35 | 0.000 | 4% | 9.9 |
| the same, latents at 0.02 scale | 105 | 3.37 | 0.002 | 4% | – |
| the same with the feed-forward gates held at 0 | 105 | 3.85 | −0.004 | 4% | – |
| attention gates starting at tanh α = 0.1 | 105 | 3.30 | 0.009 | 4% | – |
| the same, feed-forward gates held at 0 | 105 | 3.64 | 0.100 | 32% | – |
| the same at lr 3e-3 | 105 | 3.95 | 0.000 | 4% | – |
| block outputs scaled to the residual stream's RMS (gates at 0, ×30 gate rate) | 105 | 3.33 | 0.000 | 4% | 7.6 |
| the same, feed-forward gates held at 0 | 105 | 3.25 | 0.253 | 25% | 10.7 |
| the same two with one token (the pooled embedding) instead of the 7×7 grid | 105 | 3.33 | 0.000 | 4% | 6.4–7.5 |
| scaled outputs, output projections at 0 and gates at 0.5 (×30 gate rate) | 105 | 3.32 | 0.194 | 39% | 19.9 |
| the same at the base gate rate (×1) | 105 | 3.33 | 0.354 | 75% | 30.9 |
| the same, feed-forward branch off | 105 | 3.23 | 0.464 | 54% | 12.1 |
| the same without scaling to the residual stream | 105 | 3.34 | 0.099 | 21% | 8.9 |
| scaled, projections at 0, gates 0.5 at ×1, mirrored views | 105 | 3.20 | 0.530 | 86% | 31.8 |
| the same scaled by one typical RMS per layer (measured on the frozen LM) | 105 | 3.33 | 0.113 | 21% | 14.2 |
| the same scaled by each position's RMS capped at 4× that (attention sinks capped) | 105 | 3.36 | 0.142 | 21% | 8.5 |
| each position's own RMS, lr 5e-4: the default recipe | 105 | 3.27 | 0.802 | 100% | 37.7 |
| SmallCap-style untrained (the frozen LM reading 4 retrieved captions) | 0 | – | – | 100% | 28.5 |
| SmallCap-style, 2 epochs, the default block (no mirrored views; retrieval on the cleaned pool: 68.4) | 70 | 3.04 | 0.070 | 96% | 68.1 |
| the same with mirrored views, lr 1e-3: the default recipe | 70 | 2.89 | 0.054 | 100% | 66.9 |
| its captioner with 3 drafts (windows of examples) chosen by CIDEr-D consensus | – | – | – | 96% | 67.2 |
| with the retrieved caption among the candidates (1 draft / 3 drafts; 19 / 16 of 28 copied) | – | – | – | 100% | 70.3 / 70.0 |

What these runs found:
- **ClipCap's loops came from decoding**, not from the mapper: transformers' `generate` with a
  word 3-gram block (nofree's logits processor; transformers' own `no_repeat_ngram_size` compares
  raw token ids and misses "A plate of … a plate of") removes them; cosine decay to 0 beat a
  constant rate (previous defaults: CIDEr 21.4 on `val`). Mirrored views of the photos (encoded
  once, `--augment hflip`) help on held-out CIDEr. On the holdout, a 400-step schedule looked
  worse at step 200 than at step 100 (held-out loss rising), but that run was still at a high
  rate; a full cosine over 6 epochs (210 steps) wins in cross-validation, and beam search gains
  over greedy only with it (table above), so ClipCap's captioner decodes with 3 beams by default.
- **Why the Flamingo-style adapter ignored the image, and the fix.** SmolLM2's residual stream
  grows with depth: RMS 0.11 at the embeddings, 4–7 in the middle layers, 9–19 in the upper ones
  (the first position, an attention sink, ~1000), while a fresh cross-attention block writes
  outputs of RMS ~0.3 at every depth: three times the embeddings at the first block (whose gate
  stays at 0), while in the upper blocks even a gate of 0.5 changes the stream by 1–2%, too
  little to move the logits. And
  with the paper's zero gates the image reaches the LM only through one scalar gate per block,
  which opens only once the randomly projected image features already help the LM; the
  feed-forward branch, which needs no image, learns the caption style first, and the adapter
  writes one sentence for every photo. Two changes make it learn from a few hundred captions:
  each block's outputs are scaled by the RMS of the hidden state they are added to (a gate now
  means the same relative change at every depth), and the output projections start at 0 with the
  gates at 0.5 instead of the gates at 0 (a fresh adapter is still exactly the frozen LM, and
  each output direction learns from the first step). Either alone does little (rows above); the
  gates' learning rate stays at the base rate (×30 closes the attention gates early). The
  resampler was not the problem: one pooled token instead of the grid collapsed the same way.
- **The image reaches the LM through the attention sinks.** Scaling by each position's own RMS
  gives the sink positions (RMS ~1000 from the middle layers on, against 5–20 elsewhere) changes
  of their own size, which every later token reads; one typical RMS per layer, or each
  position's RMS capped at 4× it, starves that channel, and the adapter falls back to a few
  captions (rows above). The channel has a cost: on the 700 `train` pairs, lr 1e-3 made the
  training loss jump from 3.5 to 8 at the peak of the schedule (step ~35) and stay there; at
  5e-4 the same run trains smoothly (mean loss 3.49, 2.68, 2.03 by epoch), so the Flamingo-style recipe
  uses 5e-4.
- **SmallCap-style** shares the block, so it inherits the fix: trained on the same 112 photos it
  ties retrieval on the held-out 28 (68.1 vs 68.4) while writing its own sentences (1 of 28
  copied from the pool), and its image gap is small but positive (0.07; retrieved captions
  already carry most of what the image says). Choosing among drafts and the retrieved caption by
  consensus (as MAGIC's defaults do) mostly picks the retrieved caption and gains ~2 CIDEr over
  retrieval on 28 photos, within noise (this holdout's drafts were disjoint blocks of examples;
  the cross-validated consensus decoding that became the default is described below).
- **On `val`, looked at once with these recipes** (table above, against the previous
  recipes' run): the Flamingo-style adapter went from CIDEr 6.6 and 2.5% distinct captions
  (image gap −0.001) to 40.5 and 95% (gap 0.70); SmallCap-style from 42.7 to 47.3, still below
  retrieval (48.7) and with a small image gap (0.03); ClipCap's 3-epoch recipe made its
  captions more varied (82.5 → 95% distinct, gap 0.55 → 0.75) without raising its CIDEr (28.4 →
  27.0; the 28-photo holdout's 43.9 flattered it); the cross-validated 6-epoch recipe with 3
  beams (table above) reaches 39.3, 100% distinct, image gap 1.06. Retrieval and MAGIC also moved because the pool lost its
  non-captions and repeats (MAGIC 51.9 → 53.0). SmallCap-style with 3 beams, the decoding its
  first cross-validation chose (section "Cross-validation of the trained captioners' recipes"),
  on the same adapter: 47.3 → 50.2 CIDEr, BLEU-4 11.9 → 14.2, 95% distinct, 2 of 40 captions
  copied from the pool; 1.5 above retrieval here, 5.6 ± 2.2 below it in the cross-validation.
- **SmallCap-style's consensus decoding** (the table above), chosen by the second
  cross-validation of its decodings (same section): 2 drafts, after the 4 and the 2 best
  retrieved examples, × the 3 best of each 3-beam search, + the retrieved caption, kept by
  CIDEr-D against the 20 top retrieved captions; 61.5 ± 13.4 against 54.5 ± 12.9 for one 3-beam
  caption, ahead in every fold. On the same adapter: CIDEr 50.2 → 50.5, BLEU-4 14.2 → 11.2,
  METEOR 17.7 → 16.1, ROUGE-L 42.8 → 39.2, distinct 95 → 100%; 20 of the 40 kept captions are
  the retrieved one (retrieval: 48.7). Every caption read: no loops, each names the photo's main
  objects; two follow a wrong retrieved caption into odd sentences ("A man flying through the
  air on top of a tree." for the retrieved "… while riding a bike."). Disclosure: `val` was
  looked at twice for this choice. The default was first set to the 4-draft variant from a
  comparison finished on two folds (CIDEr 48.9 on `val`, BLEU-4 10.0); the full five folds then
  put the 2-draft variant 0.2 CIDEr ahead (61.5 vs 61.3), and the plain rule, the best
  cross-validated score, made it the default, at half the drafts. Neither step used `val`.
- **The Flamingo-style recipe became 6 epochs decoded with 3 beams** (5-fold cross-validation,
  two training seeds: section "Cross-validation of the trained captioners' recipes"; 37.2 ± 9.3
  against 28.5 ± 4.8 CIDEr for 3 epochs greedy, ahead in every fold). Its first training on the
  700 pairs (`--reuse-adapters` kept the other adapters) scored
  35.0 CIDEr against 40.5 for the 3-epoch adapter, BLEU-4 10.0 against 10.9, image gap 0.93
  against 0.70, 95% distinct either way. `val` disagrees with the cross-validation here; 40
  photos are fewer than the 140 of the folds, and the rule (the best cross-validated recipe)
  was kept. Every caption read: no loops, the main object named in most; it hallucinates more
  than retrieval does (a bird "holding a piece of broccoli in its hand", two people in a
  bathroom described as having sex, where the photo shows nothing of the kind).
- **Val was evaluated twice with the previous recipes' adapters**: the first evaluation showed an
  empty ClipCap caption (the mapper's prefix made the LM stop at once); with captions of at
  least two tokens, `--reuse-adapters` re-evaluated them (ClipCap 25.7 → 28.4 CIDEr, distinct
  80 → 82.5%; the other rows unchanged). No setting was chosen from `val`.
- **The untrained SmallCap-style prompt**: the frozen SmolLM2 reading the retrieved captions
  rewrites them (0 of 28 copied) and scores far below copying the best one (28.5 vs 68.9);
  training is what teaches it when to copy."""


if __name__ == "__main__":
    main()
