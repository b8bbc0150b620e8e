"""Caption metrics with the standard COCO caption evaluation code (pycocoevalcap).

BLEU-1..4 (Papineni et al., 2002), METEOR 1.5 (Denkowski & Lavie, 2014), ROUGE-L (Lin, 2004),
CIDEr (Vedantam et al., 2015) and optionally SPICE (Anderson et al., 2016), as computed by the
COCO caption server code (Chen et al., 2015, "Microsoft COCO Captions: Data Collection and
Evaluation Server"): captions are lower-cased and tokenised with the Stanford PTB tokenizer that
ships with pycocoevalcap, punctuation tokens are dropped, then each scorer runs on the tokens.
BLEU is corpus-level with the 'closest' reference length; CIDEr's document frequencies come
from the references of the evaluated set, so CIDEr depends on the whole set.

Scores are returned as pycocoevalcap gives them (BLEU/METEOR/ROUGE-L/SPICE in [0, 1], CIDEr
usually in [0, 10]); ``as_percent`` and ``format_table`` multiply by 100 for tables.

The tokenizer is run here directly (same jar, same options, same punctuation list) with its
temporary file in the system temp folder, so scoring works when the installed package folder is
read-only and when several evaluations run at once. Java (8 or newer) must be on ``PATH``.
SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use; offline it is
skipped up front (``"SPICE": None`` and a note saying what is missing), never left to hang.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from nofree.core import DataError, MissingDependencyError

log = logging.getLogger(__name__)

#: Metric names in table order (all keys of ``caption_metrics``' result besides "n" and "notes").
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

# Tokens the COCO evaluation drops after PTB tokenisation (brackets stay, as -lrb- / -rrb-).
_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"})


def _package_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError:
        raise MissingDependencyError("caption metrics need pycocoevalcap: pip install "
                                     "'pycocoevalcap>=1.2' (or pip install 'nofree[eval]')") from None
    return Path(list(pycocoevalcap.__path__)[0])


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MissingDependencyError("caption metrics (PTB tokenizer, METEOR) need Java 8 or newer "
                                     "on PATH: install a JRE, e.g. `apt-get install "
                                     "openjdk-17-jre-headless`")
    return java


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """COCO-evaluation tokenisation: PTB tokens, lower-cased, punctuation dropped, space-joined.

    One output string per input sentence (an empty sentence gives ``""``).
    """
    if not sentences:
        return []
    jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    java = _require_java()
    # one sentence per line: every kind of line break inside a sentence becomes a space
    lines = [" ".join(sentence.split()) for sentence in sentences]
    fd, name = tempfile.mkstemp(prefix="nofree-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write("\n".join(lines).encode("utf-8"))
        done = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", "-encoding", "utf-8", name],
                              capture_output=True)
    finally:
        os.unlink(name)
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer ({jar}) failed: {done.stderr.decode(errors='replace')[-500:]}")
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) > len(lines):
        raise RuntimeError(f"the PTB tokenizer returned {len(out)} lines for {len(lines)} sentences")
    out += [""] * (len(lines) - len(out))  # trailing empty sentences print no line
    return [" ".join(token for token in line.rstrip().split(" ") if token and token not in _PUNCTUATION)
            for line in out]


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here (``None`` when it can): missing Java, CoreNLP jars or write access."""
    if shutil.which("java") is None:
        return "needs Java 8+ on PATH"
    spice_dir = _package_dir() / "spice"
    missing = [name for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not (spice_dir / "lib" / name).is_file()]
    if missing:
        return (f"needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {spice_dir / 'lib'}; with "
                "internet run `python -c \"from pycocoevalcap.spice.get_stanford_models import "
                "get_stanford_models as g; g()\"` once")
    if not os.access(spice_dir, os.W_OK):
        return f"needs write access to {spice_dir} (SPICE keeps its temp and cache folders there)"
    return None


def _align(predictions: Mapping[Any, str] | Sequence[str],
           references: Mapping[Any, Sequence[str]] | Sequence[Sequence[str]]
           ) -> tuple[list[str], list[list[str]]]:
    """Predictions and references as two parallel lists, validated."""
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise DataError("predictions and references must both be dicts keyed by the same ids, or "
                        "both lists in the same order")
    if isinstance(predictions, Mapping):
        if set(predictions) != set(references):
            missing = [k for k in references if k not in predictions][:3]
            extra = [k for k in predictions if k not in references][:3]
            raise DataError(f"prediction and reference ids differ (no prediction for {missing}, "
                            f"no references for {extra})")
        ids = list(predictions)
        hyps, refs = [predictions[k] for k in ids], [references[k] for k in ids]
    else:
        ids = list(range(len(predictions)))
        hyps, refs = list(predictions), list(references)
        if len(hyps) != len(refs):
            raise DataError(f"{len(hyps)} predictions but {len(refs)} reference lists; give one "
                            "list of reference captions per prediction")
    if not hyps:
        raise DataError("no predictions to score")
    for key, hyp, ref in zip(ids, hyps, refs):
        if not isinstance(hyp, str):
            raise DataError(f"prediction {key!r} is {type(hyp).__name__}, expected a string")
        if isinstance(ref, str) or not ref or not all(isinstance(r, str) for r in ref):
            raise DataError(f"references of {key!r} must be a non-empty list of strings, got {ref!r:.80}")
    return hyps, [list(ref) for ref in refs]


def caption_metrics(predictions: Mapping[Any, str] | Sequence[str],
                    references: Mapping[Any, Sequence[str]] | Sequence[Sequence[str]], *,
                    spice: bool = False, meteor: bool = True) -> dict[str, Any]:
    """COCO caption metrics of one prediction per image against its reference captions.

    ``predictions``/``references``: parallel lists (``references[i]`` are the captions of the
    image that ``predictions[i]`` describes), or dicts keyed by the same image ids.
    ``meteor=False`` skips METEOR (it starts a JVM with a 2 GB heap and takes ~10 s);
    ``spice=True`` adds SPICE where it can run.

    Returns ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE": float | None,
    "n": number of images, "notes": list of str, "CIDEr per image": list of float}``; a metric
    that was skipped is ``None`` and ``notes`` says why. "CIDEr per image" is each image's
    CIDEr-D in input order (document frequencies from the whole set); their mean is "CIDEr".
    """
    hyps, refs = _align(predictions, references)
    package = _package_dir()
    tokens = ptb_tokenize([*hyps, *(r for ref in refs for r in ref)])
    res, gts, cursor = {}, {}, len(hyps)
    for i, ref in enumerate(refs):
        res[i] = [tokens[i]]
        gts[i] = tokens[cursor:cursor + len(ref)]
        cursor += len(ref)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    result: dict[str, Any] = dict.fromkeys(METRICS)
    notes: list[str] = []
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for order, value in enumerate(bleu, start=1):
        result[f"BLEU-{order}"] = float(value)
    result["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    cider, cider_per_image = Cider().compute_score(gts, res)
    result["CIDEr"] = float(cider)
    if meteor:
        result["METEOR"] = _meteor(gts, res)
    else:
        notes.append("METEOR skipped: not requested (meteor=False)")
    if not spice:
        notes.append("SPICE skipped: not requested (spice=True computes it)")
    else:
        reason = spice_unavailable_reason()
        if reason is None:
            try:
                from pycocoevalcap.spice.spice import Spice

                result["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except (subprocess.CalledProcessError, OSError, ValueError) as err:
                reason = f"failed to run ({err}); see {package / 'spice'}"
        if reason is not None:
            notes.append(f"SPICE skipped: {reason}")
            log.warning("SPICE skipped: %s", reason)
    result["n"] = len(hyps)
    result["notes"] = notes
    result["CIDEr per image"] = [float(v) for v in cider_per_image]
    return result


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:  # stop the JVM now rather than whenever the object is collected
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def as_percent(scores: Mapping[str, Any], digits: int = 1) -> dict[str, float | None]:
    """The metrics of a ``caption_metrics`` result ×100, rounded (``None`` stays ``None``)."""
    return {name: None if scores.get(name) is None else round(100 * float(scores[name]), digits)
            for name in METRICS}


def format_table(rows: Mapping[str, Mapping[str, Any]], digits: int = 1) -> str:
    """A Markdown table, one row per method: metrics ×100 (``-`` where skipped) and n."""
    header = ["method", *METRICS, "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, scores in rows.items():
        percent = as_percent(scores, digits)
        cells = ["-" if percent[m] is None else f"{percent[m]:.{digits}f}" for m in METRICS]
        lines.append("| " + " | ".join([method, *cells, str(scores.get("n", ""))]) + " |")
    return "\n".join(lines)
