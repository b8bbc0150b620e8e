"""Plots of an evaluation report: metric bars, CIDEr differences to a baseline, retrieval R@K
curves, a grid of sample captions.

Each function takes the content of ``results.json`` and writes one PNG; matplotlib runs on the
non-interactive Agg backend so reports can be made on headless machines.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping

CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SCORING_METRICS = ("t2i R@1", "i2t R@1", "zero-shot top-1")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(results: Mapping[str, Any], task: str) -> dict[str, Any]:
    return {n: e for n, e in results["methods"].items() if e.get("status") == "ok" and e["task"] == task}


def metric_bars(path: Path, rows: Mapping[str, Any], metrics: tuple[str, ...], title: str) -> None:
    """Grouped bars: one group per metric, one bar per method (scores ×100); a metric with a
    bootstrap interval in the results (``"CIDEr interval"``) gets it as a whisker."""
    plt = _pyplot()
    names = list(rows)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(metrics) + 0.3 * len(names), 3.6))
    whiskers = False
    for i, name in enumerate(names):
        metrics_of = rows[name]["metrics"]
        x = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        values = [100 * (metrics_of.get(m) or 0.0) for m in metrics]
        bars = ax.bar(x, values, width, label=name)
        # values inside the bars, so that a whisker never crosses its label
        ax.bar_label(bars, fmt="%.0f", fontsize=7, label_type="center", color="white")
        spans = [(xj, v, metrics_of.get(f"{m} interval")) for xj, v, m in zip(x, values, metrics)]
        spans = [(xj, v, s) for xj, v, s in spans if s]
        if spans:
            whiskers = True
            ax.errorbar([xj for xj, _, _ in spans], [v for _, v, _ in spans],
                        yerr=[[v - 100 * s[0] for _, v, s in spans], [100 * s[1] - v for _, v, s in spans]],
                        fmt="none", elinewidth=0.8, capsize=2, ecolor="0.3")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("score ×100")
    ax.set_title(title + ("\n(whiskers: 95% bootstrap interval over the images)" if whiskers else ""), fontsize=10)
    ax.legend(fontsize=8, frameon=False, ncol=min(4, len(names)))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recall_curves(path: Path, rows: Mapping[str, Any]) -> None:
    """R@K for K = 1..10, text→image and image→text, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    for ax, (way, title) in zip(axes, (("t2i", "text → image"), ("i2t", "image → text"))):
        for name, entry in rows.items():
            curve = entry["metrics"]["curve"][way]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
        n_queries = next(iter(rows.values()))["metrics"]["n_texts" if way == "t2i" else "n_images"]
        ax.set_title(f"{title} (n = {n_queries} queries)", fontsize=10)
        ax.set_xlabel("K")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K")
    axes[1].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(path: Path, results: Mapping[str, Any], rows: Mapping[str, Any], samples: int) -> None:
    """Sample photos, each beside every method's caption and the first reference."""
    from nofree.data.images import load_image

    plt = _pyplot()
    n = min(samples, results["n_images"])
    picks = [round(i * (results["n_images"] - 1) / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.3 * n), gridspec_kw={"width_ratios": [1, 2.6]},
                             squeeze=False)
    for (ax_img, ax_txt), i in zip(axes, picks):
        try:
            image = load_image(results["images"][i])
            image.thumbnail((320, 320))
            ax_img.imshow(image)
        except Exception:  # noqa: BLE001 - an unreadable photo leaves its panel empty
            ax_img.text(0.5, 0.5, "(unreadable)", ha="center", va="center")
        ax_img.set_axis_off()
        ax_txt.set_axis_off()
        lines = [f"{name}: {_printable(entry['captions'][i])}" for name, entry in rows.items()]
        lines.append(f"reference: {_printable(results['references'][i][0])}")
        wrapped = "\n".join(textwrap.fill(line, 80, subsequent_indent="    ") for line in lines)
        ax_txt.text(0, 0.5, wrapped, va="center", ha="left", fontsize=8, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _printable(text: str) -> str:
    """Control characters (which untrained LMs can emit) shown as '?' instead of missing glyphs."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def difference_plot(path: Path, comparison: Mapping[str, Any]) -> None:
    """Each method's CIDEr minus the baseline's with its paired-bootstrap interval, one row per
    method (the report's ``"comparison"``; see :mod:`nofree.eval.significance`)."""
    plt = _pyplot()
    rows = list(comparison["methods"].items())[::-1]   # first method on top
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.42 * len(rows)))
    for y, (name, c) in enumerate(rows):
        low, high = (100 * v for v in c["interval"])
        colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "0.35"
        ax.plot([low, high], [y, y], color=colour, linewidth=2, solid_capstyle="butt")
        ax.plot(100 * c["delta"], y, "o", color=colour, markersize=5)
        ax.annotate(f"{100 * c['delta']:+.1f}", (100 * c["delta"], y), textcoords="offset points",
                    xytext=(0, 5), ha="center", fontsize=7)
    ax.axvline(0, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"{comparison['metric']} − {comparison['baseline']}'s (×100)")
    ax.set_title(f"{comparison['metric']} against {comparison['baseline']}: paired bootstrap, 95% interval "
                 "over the images", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out_dir: Path, results: Mapping[str, Any], methods: Mapping[str, Any], *,
                samples: int = 6) -> dict[str, str]:
    """Every plot the results allow; returns ``{plot name: file name}``."""
    written: dict[str, str] = {}
    captioning, scoring = _ok(results, "captioning"), _ok(results, "scoring")
    if captioning:
        metric_bars(out_dir / "captioning.png", captioning, CAPTION_METRICS,
                    f"captioning, {results['split']} ({results['n_images']} images)")
        written["captioning metrics"] = "captioning.png"
        if results.get("comparison"):
            difference_plot(out_dir / "comparison.png", results["comparison"])
            written[f"CIDEr against {results['comparison']['baseline']}"] = "comparison.png"
        if samples > 0:
            sample_grid(out_dir / "samples.png", results, captioning, samples)
            written["sample captions"] = "samples.png"
    if scoring:
        metric_bars(out_dir / "scoring.png", scoring, SCORING_METRICS,
                    f"retrieval R@1 and zero-shot, {results['split']}")
        written["retrieval and zero-shot"] = "scoring.png"
        recall_curves(out_dir / "recall_at_k.png", scoring)
        written["recall@K"] = "recall_at_k.png"
    return written
