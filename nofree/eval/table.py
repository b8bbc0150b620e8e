"""``results.md`` of an evaluation report: the captioning table, the scoring table, the settings.

Scores are shown ×100 (DESIGN.md §8); times are seconds of the method itself, with the seconds
spent loading models it was the first to need shown apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

CAPTION_COLUMNS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# distinct-caption rate (%), captions repeating a word 3-gram (%), most repeats of one 3-gram,
# captions in which a word directly follows itself (%)
DEGENERATION_COLUMNS = ("distinct %", "3-gram loops %", "worst loop", "stutters %")
#: bootstrap intervals of the R@1 columns over the images (a photo's captions drawn together)
INTERVAL_COLUMNS = ("t2i R@1 95% CI", "i2t R@1 95% CI")
SCORING_COLUMNS = ("t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10",
                   "zero-shot top-1", "zero-shot top-5")


def _cell(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _interval(bounds: Any) -> str:
    return "–" if not bounds else f"{100 * bounds[0]:.1f}–{100 * bounds[1]:.1f}"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}".replace("-", "−")


def _nats(value: float) -> str:
    """A loss or loss difference in nats, three decimals, with a real minus sign and no "-0.000"."""
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text.replace("-", "−")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def method_tables(results: Mapping[str, Any], methods: Mapping[str, Any]) -> dict[str, list[str]]:
    """Markdown lines of the captioning and the scoring table (empty lists when no such rows)."""
    out: dict[str, list[str]] = {"captioning": [], "scoring": []}
    rows: dict[str, list[list[str]]] = {"captioning": [], "scoring": []}
    for name, entry in results["methods"].items():
        if entry.get("status") != "ok":
            continue
        metrics, task = entry["metrics"], entry["task"]
        columns = CAPTION_COLUMNS if task == "captioning" else SCORING_COLUMNS
        n = metrics.get("n", metrics.get("n_images"))
        if task == "captioning":
            extra = [_interval(metrics.get("CIDEr interval")), _cell(metrics.get("distinct")),
                     _cell(metrics.get("repeat_3gram")), str(metrics.get("worst_repeat", "–")),
                     _cell(metrics.get("stutter"))]
        else:
            extra = [_interval(metrics.get("t2i R@1 interval")), _interval(metrics.get("i2t R@1 interval"))]
        seconds = f"{entry['wall_s']:.1f}" + (f" (+{entry['load_s']:.0f} load)" if entry.get("load_s", 0) >= 1 else "")
        label = (entry.get("label") or (methods[name].label if name in methods else "")).replace("|", "/")
        rows[task].append([f"{name}", label,
                           *(_cell(metrics.get(c)) for c in columns), *extra, str(n), seconds])
    if rows["captioning"]:
        out["captioning"] = _table(["method", "what", *CAPTION_COLUMNS, "CIDEr 95% CI", *DEGENERATION_COLUMNS,
                                    "n images", "seconds"], rows["captioning"])
    if rows["scoring"]:
        out["scoring"] = _table(["method", "what", *SCORING_COLUMNS, *INTERVAL_COLUMNS, "n images", "seconds"],
                                rows["scoring"])
    return out


def comparison_table(results: Mapping[str, Any]) -> list[str]:
    """Markdown lines comparing each captioning method's CIDEr with the report's baseline (its
    ``"comparison"``: a paired bootstrap over the images); empty when the report has none."""
    from nofree.eval.significance import LEVEL, RESAMPLES

    comparison = results.get("comparison")
    if not comparison:
        return []
    baseline = comparison["baseline"]
    rows = [[name, _signed(c["delta"]), f"{_signed(c['interval'][0])} to {_signed(c['interval'][1])}",
             f"{100 * c['ahead']:.0f}%"] for name, c in comparison["methods"].items()]
    return [f"## CIDEr against {baseline}", "",
            f"Each method's CIDEr minus {baseline}'s on the same images, with its {100 * LEVEL:.0f}% interval "
            f"from a paired bootstrap ({RESAMPLES:,} draws of the images with replacement, both methods scored "
            "on each draw). An interval that contains 0 means these images cannot tell the two apart; "
            "\"ahead\": the share of draws in which the method scores higher. The intervals cover the "
            "choice of images only, not a trained adapter's seed or training data.", "",
            *_table(["method", "Δ CIDEr", f"{100 * LEVEL:.0f}% interval", "ahead"], rows), ""]


def image_gap_table(results: Mapping[str, Any]) -> list[str]:
    """Markdown lines on how much each trained captioner reads the photo (the ``image gap`` its
    row measured on the references); empty when no row has one."""
    rows = []
    for name, entry in results["methods"].items():
        metrics = entry.get("metrics") or {}
        if entry.get("status") == "ok" and "image gap" in metrics:
            interval = metrics.get("image gap interval")
            photo = metrics.get("photo gap")
            rows.append([name, _nats(metrics["caption loss"]), _nats(metrics["image gap"]),
                         "–" if not interval else f"{_nats(interval[0])} to {_nats(interval[1])}",
                         "–" if photo is None else _nats(photo)])
    if not rows:
        return []
    return ["## How much the trained captioners read the photo", "",
            "caption loss: the adapter's cross-entropy on the reference captions (nats per token); "
            "image gap: its rise when each photo's captions are read with another photo's features "
            "(~0: the adapter ignores the image), with a 95% bootstrap interval over the photos; photo "
            "gap (SmallCap-style): the rise when the retrieved captions of its prompt come from that "
            "other photo too.", "",
            *_table(["method", "caption loss", "image gap", "95% interval", "photo gap"], rows), ""]


def write_markdown(path: Path, results: Mapping[str, Any], methods: Mapping[str, Any]) -> None:
    """Write ``results.md`` for ``results`` (the content of ``results.json``)."""
    lines = [f"# nofree evaluation: {results['pairs']} (split {results['split']!r}, "
             f"{results['n_images']} images, {results['n_references']} reference captions)", "",
             f"nofree {results['nofree_version']}, {results['created']}, device {results['device']}. "
             "Scores ×100; seconds exclude model loading (shown apart as +load). distinct %: distinct captions per "
             "100 photos; 3-gram loops %: captions repeating a word 3-gram; worst loop: "
             "the most times one 3-gram occurs in a caption; stutters %: captions in which a word directly "
             "follows itself. CIDEr 95% CI: a bootstrap interval over the images.", ""]
    tables = method_tables(results, methods)
    if tables["captioning"]:
        lines += ["## Captioning", "", *tables["captioning"], ""]
        lines += comparison_table(results)
        lines += image_gap_table(results)
    if tables["scoring"]:
        lines += ["## Retrieval among the evaluation pairs and zero-shot classification", "",
                  *tables["scoring"], "",
                  "Zero-shot: an image counts as a hit when the top class is one of its annotated "
                  "categories (prompt 'a photo of a {label}.').", ""]
    failed = {n: e for n, e in results["methods"].items() if e.get("status") != "ok"}
    if failed:
        lines += ["## Failed", ""] + [f"- **{n}**: {e.get('error')}" for n, e in failed.items()] + [""]
    plots = results.get("plots") or {}
    if isinstance(plots, dict) and plots and "error" not in plots:
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    anchors = results.get("anchors")
    lines += ["## Settings", ""]
    if anchors:
        lines.append(f"- anchors: {anchors['dir']} ({anchors['anchors']} pairs; {anchors['image_encoder']} + "
                     f"{anchors['text_encoder']}; ASIF {anchors['asif']})")
    for name, entry in results["methods"].items():
        if entry.get("status") == "ok":
            params = {k: v for k, v in entry["params"].items()
                      if k not in ("anchors", "image_encoder", "text_encoder", "asif")}
            lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
