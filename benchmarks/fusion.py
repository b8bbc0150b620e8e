"""Frozen vs trained fusion on coco-mini: train LiT, ClipCap, Flamingo-style and SmallCap-style
adapters with their default settings on ``train``, then run every method through ``nofree eval``
on ``val``.

    python -m benchmarks.fusion [--smoke] [--json PATH] [--work runs/bench/fusion]

Same frozen backbones for every method (EfficientNet-Lite0, all-MiniLM-L6-v2, SmolLM2-135M), same
700 train pairs as anchors (training-free) or training data (adapters), same 40 val photos and
metric code. Training time is wall time of ``train_lit`` / ``train_clipcap`` / ``train_flamingo``
(each computes its frozen features once, then trains; validation each epoch included).
``--smoke`` runs the same path on tiny config-built backbones and 30 train / 8 val photos.
The report folder (results.json, results.md, plots) is written to ``WORK/report``; the plots are
also copied next to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks import work_folder
from nofree import sample_dir
from nofree.captioning import default_pool_path
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER


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
    args = parser.parse_args(argv)
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
    for kind, (trainer, backbone) in trainers.items():
        if args.reuse_adapters and (work / kind / "config.json").exists() and kind in previous:
            training[kind] = {**previous[kind], "reused": True}
            print(f"reusing the {kind} adapter in {work / kind}", flush=True)
            continue
        start = time.perf_counter()
        result = trainer(pairs, out=work / kind, image_encoder=backbones["image"], overwrite=True,
                         **backbone, **epochs)
        seconds = time.perf_counter() - start
        training[kind] = training_record(result, seconds)
        print(f"trained {kind}: {seconds:.0f} s, {result.steps} steps, last epoch {result.history[-1]}", flush=True)
    (work / "training.json").write_text(json.dumps(training, indent=1, default=str))

    config = eval_config(pairs, anchors=anchors, adapters={k: work / k for k in trainers},
                         backbones=backbones, pool=pool, smoke=args.smoke, limit=args.limit)
    report = run_eval(config, out_dir=work / "report", overwrite=True, echo=print)
    out = {"smoke": args.smoke, "backbones": backbones, "training": training, "report": report}
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


def markdown(out: dict) -> str:
    from nofree.eval.report import METHODS
    from nofree.eval.table import comparison_table, method_tables

    report = out["report"]
    tables = method_tables(report, METHODS)
    lines = [f"{report['n_images']} `{report['split']}` photos, {report['n_references']} reference captions; "
             f"backbones {', '.join(f'`{v}`' for v in out['backbones'].values())}. Scores ×100; seconds "
             "exclude loading models and encoding shared inputs (shown apart as +load).", ""]
    if tables["captioning"]:
        lines += ["Captioning:", "", *tables["captioning"], ""]
        compared = comparison_table(report)
        if compared:  # its "## " heading becomes a bold line: RESULTS.md keeps one heading per section
            lines += [f"**{compared[0].removeprefix('## ')}**", *compared[1:]]
    if tables["scoring"]:
        lines += ["Retrieval among the val pairs and zero-shot COCO categories:", "", *tables["scoring"], ""]
    failed = {n: e for n, e in report["methods"].items() if e.get("status") != "ok"}
    lines += [f"- **{n} failed**: {e.get('error')}" for n, e in failed.items()]
    lines += ["Training on `train` (default settings of `nofree train`):", "",
              "| adapter | trainable parameters | frozen backbone parameters | epochs | steps | train time | last epoch |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, t in out["training"].items():
        last = t["history"][-1] if t["history"] else {}
        shown = ", ".join(f"{k} {v:.3g}" for k, v in last.items()
                          if k.startswith(("val", "train_loss", "image_gap")) and isinstance(v, float))
        lines.append(f"| {kind} | {t['trainable_parameters']:,} | {t['frozen_parameters']:,} | "
                     f"{last.get('epoch', '–')} | {t['steps']} | {t['seconds']:.0f} s{' (earlier run)' if t.get('reused') else ''} | "
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
adapter ignores the image.

Images and texts are compared by nofree's default similarity, ASIF plus the label bridge
(section "ASIF + the image encoder's labels"): with plain ASIF these 40 photos gave retrieval
48.7 CIDEr and text→image R@1 57.5.

How far 40 photos can be trusted: each CIDEr's 95% bootstrap interval over the photos is about
35 points wide (retrieval 47.7–85.2). Paired with retrieval on the same draws of photos, MAGIC's
defaults (+1.4, −11.1 to +14.8), SmallCap-style (−2.1, −16.9 to +11.2) and MAGIC with the LiT
scorer (−4.7, −18.7 to +9.0) are not separated from retrieval; ClipCap (−31.7, −52.7 to −10.2)
and Flamingo-style (−31.9, −47.7 to −17.2) are behind in every draw. ASIF's text→image R@1 of
68.0 has a 95% interval of 57.0–78.5 over the photos (each photo's 5 captions drawn together, as
they share its difficulty), LiT's 48.5 one of 35.5–61.5.

This run reused the adapters trained by the previous full run of this benchmark (their training
table above is that run's) and evaluated them with two changes to the training-free side: the
bundled pool lost its 32 lines with a word typed twice in a row (section "Pool hygiene" of the
sample's README), and the consensus choice among drafts passes over a draft that loops or
stutters while a sound one exists. Against the previous evaluation of the same adapters:
retrieval 66.5 → 65.8 (its one changed caption: the pool typo "a living room with with a couch
and a table" → "A living room with a couple of furniture."), MAGIC 65.5 → 67.2 (4 captions
changed, among them the run-on draft "A woman in a kitchen, a kitchen, a blender, a person, a" →
"A woman in a kitchen is preparing a plate of food."), SmallCap-style 65.1 → 63.8 (it had copied
the typo; now "A room with a desk and a chair."). The trained-only rows are unchanged.

Reading the captions: different photos get different captions in every row; no caption of
retrieval, MAGIC, ClipCap, Flamingo-style or SmallCap-style repeats a word 3-gram or stutters.
MAGIC with the LiT scorer, one steered draft without a consensus choice, wrote "A laptop
computer sitting on a desk with a laptop computer sitting on a table.". One MAGIC caption ends
cut off at the 16-token limit ("A variety of fruit is shown at a fruit stand including bananas,
oranges,"). MAGIC wrote 27 of its 40 captions itself (not a pool caption verbatim).
SmallCap-style's image gap is 0.006 nats: with retrieved examples this close to the photo, its
cross-attention adds almost nothing.

One training's `val` score moves by about 5 CIDEr: ClipCap's 34.1 comes from the same recipe and
pairs that scored 39.3 in an earlier run of this benchmark. Over three training seeds on all 700
pairs (section "Captioning quality against training pairs", its 700-pair column) ClipCap scores
42.5 ± 4.6 (39.2 to 47.7) and Flamingo-style 33.7 ± 3.2 on these photos.
"""


if __name__ == "__main__":
    main()
