"""What each row of a ``nofree eval`` report depends on, recorded with it so that a resumed run
keeps a finished row only while those inputs are unchanged (:func:`row_inputs`), and the
option sets of the MAGIC rows, which both the run and that record read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nofree.artifacts import file_sha256


def row_inputs(ctx: Any, name: str, method: Any) -> dict[str, Any]:
    """What a row's result depends on, recorded with it: ``resume`` keeps a finished row only
    when these are unchanged. Files by content (the anchor set by its manifest's checksums, an
    adapter folder and the caption pool by sha256), models by spec, the ASIF comparison by its
    label-bridge settings, and the settings given for the row (MAGIC's whole effective option set;
    a trained captioner's token limit and the decoding options given, the rest being its saved
    defaults, which its folder's checksum covers). JSON-shaped, as read back from results.json."""
    config, needs = ctx.config, method.needs
    inputs: dict[str, Any] = {}
    uses_asif = "anchors" in needs and not (name == "magic" and scorer_spec(config) != "asif")
    if uses_asif:
        inputs["anchors"] = _anchor_digest(ctx.anchor_dir())
        inputs["asif"] = ctx.pipeline().label_settings
    for kind in needs:
        if kind != "anchors":
            from nofree.hub import resolve_dir

            inputs[kind] = _folder_digest(resolve_dir(config.adapters[kind], what=f"{kind} adapter"))
    if method.task == "scoring":
        inputs["labels"] = ctx.labels()
    elif name in ("clipcap", "flamingo", "smallcap"):
        inputs["decoding"] = {"max_tokens": config.max_tokens, **config.decoding,
                              **(config.candidates if name == "smallcap" else {})}
    else:  # retrieval and the MAGIC rows
        inputs["pool"] = file_sha256(ctx.pool_path())
    if name == "smallcap" and config.pool is not None:
        inputs["pool"] = file_sha256(Path(config.pool))
    if name in ("retrieval", "smallcap", "magic", "magic-lit"):
        inputs["clean_pool"] = config.clean_pool
    if name.startswith("magic"):
        inputs.update(lm=config.lm, scorer=scorer_spec(config) if name == "magic" else "lit",
                      magic=magic_options(config, name))
    return json.loads(json.dumps(inputs, default=str))


def _folder_digest(folder: Path) -> str:
    """sha256 over an adapter folder's files (names and contents), leaving out its training
    state and plots, which do not change what the adapter computes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith("training/") or path.suffix == ".png":
            continue
        digest.update(f"{relative}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _anchor_digest(folder: Path) -> Any:
    """An anchor set's identity: its manifest's data-file checksums (sets saved before those were
    recorded: the whole folder's)."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return manifest.get("files") or _folder_digest(folder)


def magic_options(config: Any, name: str) -> dict[str, Any]:
    """The ``MagicCaptioner`` options of row ``name``: nofree's defaults (8 greedy drafts and a
    consensus choice) with the ASIF scorer; the paper's α, β with a CLIP-like scorer, and on one
    draft for "magic-lit" (which exists to steer with the LiT scorer; each steered draft costs ~10
    greedy ones); ``config.magic`` over either, and ``config.candidates`` over the "magic" row."""
    from nofree.captioning.drafts import MAGIC_DEFAULTS, MAGIC_PAPER

    steered: dict[str, Any] = {}
    if name == "magic-lit":
        steered = {**MAGIC_PAPER, "drafts": 1, "with_retrieved": False}
    elif scorer_spec(config) != "asif":
        steered = dict(MAGIC_PAPER)
    return {**MAGIC_DEFAULTS, **steered, **config.magic, **(config.candidates if name == "magic" else {})}


def changed_magic_settings(config: Any) -> dict[str, Any]:
    """The magic row's settings that are not nofree's defaults: its LM, scorer and
    ``MagicCaptioner`` options (empty for a default run)."""
    from nofree.captioning.drafts import MAGIC_DEFAULTS
    from nofree.core import DEFAULT_LM

    changed: dict[str, Any] = {"lm": config.lm} if config.lm != DEFAULT_LM else {}
    if scorer_spec(config) != "asif":
        changed["scorer"] = scorer_spec(config)
    changed.update({k: v for k, v in magic_options(config, "magic").items() if MAGIC_DEFAULTS.get(k) != v})
    return changed


def scorer_spec(config: Any) -> str:
    """The magic row's scorer spec, normalised (``asif`` when none is given)."""
    from nofree.scoring import ASIF_SCORER, normalize_scorer_spec

    return ASIF_SCORER if config.scorer is None else normalize_scorer_spec(config.scorer)
