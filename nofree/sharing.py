"""Share an anchor set or a trained adapter on the Hugging Face Hub (``nofree push``).

:func:`push_artifact` checks the folder (an anchor set whose files match its manifest, or an
adapter whose weights match their config), writes a model card (``README.md``: what the artefact
is, the specs that rebuild its frozen models, its sizes, the quality it records, how to load it)
and uploads the folder and the card as one commit with ``HfApi().upload_folder`` into a model
repository (created if missing; ``revision`` names a branch, created from the default one if
missing). The card is never written into the user's folder: the upload is staged in a temporary
folder of links to the folder's files plus the card (a ``README.md`` the folder already holds is
kept instead). Hidden files, lock files and, unless asked for, an adapter run's optimizer state
(``training/optimizer.safetensors``, only needed to resume training) are left out.
``dry_run`` returns the plan (files, sizes, card) without touching the network.

Refused: an anchor set of format v1 (it records absolute paths of this machine; loading it and
saving it again writes v2, which holds none). Warned about: ``local:`` specs, which name folders
on this machine that others cannot load. Anyone loads the upload with ``hf-hub:ORG/NAME``
(:mod:`nofree.hub`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nofree.artifacts import ADAPTER, ANCHOR_SET, artifact_kind
from nofree.core import DataError, Option, OptionError

log = logging.getLogger(__name__)

CARD = "README.md"
#: run state only needed to resume training (left out unless ``include_training_state``)
TRAINING_STATE = ("training/optimizer.safetensors",)


@dataclass
class PushPlan:
    """What :func:`push_artifact` uploads: ``files`` (path in the repository, bytes) from
    ``folder``, the model ``card`` (``None``: the folder's own README.md is kept), and where."""

    folder: Path
    repo_id: str
    kind: str
    files: list[tuple[str, int]]
    card: str | None
    private: bool = False
    revision: str | None = None
    warnings: list[str] = field(default_factory=list)
    commit_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files) + len((self.card or "").encode("utf-8"))


def _repo_id(value: str) -> str:
    from nofree.hub import HUB_PREFIX, parse_hub_ref

    text = value if value.startswith(HUB_PREFIX) else HUB_PREFIX + value
    repo_id, revision = parse_hub_ref(text)
    if revision is not None or "/" not in repo_id:
        raise OptionError(f"{value!r}: give the repository as ORG/NAME (your user name or an organisation, "
                          "then a name), and a branch with ", Option("revision"))
    return repo_id


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _files(folder: Path, *, include_training_state: bool) -> list[tuple[str, int]]:
    """``(posix path in the folder, bytes)`` of every file to upload, sorted."""
    out = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts) or relative.endswith(".lock") or \
                ".tmp-" in parts[-1] or not path.is_file():
            continue
        if relative in TRAINING_STATE and not include_training_state:
            continue
        out.append((relative, path.stat().st_size))
    return out


def _spec_warnings(specs: dict[str, str]) -> list[str]:
    return [f"{role} {spec!r} names a folder on this machine: others cannot load it (a hub model spec "
            "such as hf-vision:ORG/NAME, st:ORG/NAME, hf-lm:ORG/NAME or open_clip:ARCH@TAG can be)"
            for role, spec in specs.items() if isinstance(spec, str) and spec.startswith("local:")]


def _local_note(specs: dict[str, str]) -> list[str]:
    """A card row saying which specs name folders of the uploader's machine (none: no row)."""
    local = [role.replace("_spec", " encoder").replace("_", " ") for role, spec in specs.items()
             if isinstance(spec, str) and spec.startswith("local:")]
    names = " and ".join(local)
    return [_row("note", f"the {names} spec{'s name folders' if len(local) > 1 else ' names a folder'} on the "
                         "uploader's machine: nofree rebuilds them only where those folders exist")] if local else []


def _check_anchor_set(folder: Path) -> dict:
    """The manifest of the anchor set at ``folder``, after a full check; v1 sets are refused."""
    from nofree.anchors.anchor_set import AnchorSet, read_manifest

    manifest = read_manifest(folder)
    if manifest["format_version"] < 2:
        raise DataError(f"{folder} is an anchor set of format v{manifest['format_version']}, which records "
                        "absolute paths of this machine; rewrite it as v2 (relative paths) before pushing: "
                        f"python -c \"from nofree.anchors.anchor_set import AnchorSet as A; "
                        f"A.load('{folder}').save('{folder}', overwrite=True)\"")
    AnchorSet.load(folder)  # checksums, shapes, finiteness: never publish a damaged set
    return manifest


def _check_adapter(folder: Path) -> tuple[dict, dict | None]:
    """The adapter's config and its training state (``None`` when absent), weights checked."""
    from nofree.adapters.base import CONFIG_FILE, WEIGHTS_FILE, file_sha256, read_config

    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights} is missing; push the folder `nofree train` wrote")
    if config.get("weights_sha256") and file_sha256(weights) != config["weights_sha256"]:
        raise DataError(f"{weights} does not match the checksum in {folder / CONFIG_FILE}: an "
                        "interrupted save? Train or save again before pushing")
    if (folder / "anchors").is_dir():  # SmallCap's retrieval set
        _check_anchor_set(folder / "anchors")
    state = None
    state_file = folder / "training" / "state.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            state = None
    return config, state


def _weights_parameters(path: Path) -> int | None:
    from nofree.adapters.base import _saved_elements

    return _saved_elements(path)


def _row(key: str, value: Any) -> str:
    return f"| {key} | {value} |"


def _source_name(pairs: Any) -> str:
    if not isinstance(pairs, str):
        return "?"
    return " + ".join(os.path.basename(part.rstrip("/")) or part for part in pairs.split("::"))


def anchor_set_card(repo_id: str, manifest: dict, files: list[tuple[str, int]]) -> str:
    """The model card of an anchor set (see the module docstring)."""
    total = sum(size for _, size in files)
    rows = [_row("what", "ASIF anchor set: paired (image, caption) embeddings from two frozen "
                         "unimodal encoders (Norelli et al., 2022)"),
            _row("anchors", f"{manifest['n_anchors']:,}"),
            _row("image encoder", f"`{manifest['image_spec']}` ({manifest['image_dim']}-d)"),
            _row("text encoder", f"`{manifest['text_spec']}` ({manifest['text_dim']}-d)"),
            _row("format", f"{manifest['format']} v{manifest['format_version']} (nofree "
                           f"{manifest.get('nofree_version', '?')})"),
            _row("size", f"{human_size(total)} in {len(files)} files"),
            *_local_note({"image_spec": manifest["image_spec"], "text_spec": manifest["text_spec"]})]
    for source in manifest.get("sources", []):
        split = f", split {source['split']}" if source.get("split") else ""
        rows.append(_row("built from", f"{_source_name(source.get('pairs'))}{split}: "
                                       f"{source.get('n_pairs', '?')} pairs (sha256 "
                                       f"{str(source.get('pairs_sha256', ''))[:12]})"))
    skipped = manifest.get("skipped_images", [])
    if skipped:
        rows.append(_row("skipped", f"{len(skipped)} unreadable image(s)"))
    quality = ["No quality measurement is recorded with the set; `nofree eval --anchors "
               f"hf-hub:{repo_id} --pairs VAL.jsonl --method asif --method retrieval` measures one."]
    index = manifest.get("index")
    if isinstance(index, dict) and index.get("search") == "index":
        measured = "; ".join(f"{side}: recall@{s['k']} {s['recall_at_k']:.3f} against exact search"
                             for side, s in index.get("sides", {}).items())
        rows.append(_row("search index", f"faiss `{index.get('factory')}`"))
        quality = [f"Search index `{index.get('factory')}`, measured when it was built: {measured}."]
    return "\n".join([
        "---", "library_name: nofree", "tags:", "- nofree", "- asif", "- anchor-set", "---", "",
        f"# {repo_id}", "",
        "An anchor set for nofree: it turns two unrelated frozen encoders into "
        "one image–text space (zero-shot classification, retrieval, captioning) without training.", "",
        "| | |", "| --- | --- |", *rows, "",
        "## Use", "", "```", f"nofree anchors info hf-hub:{repo_id}",
        f"nofree classify --anchors hf-hub:{repo_id} --labels labels.txt IMAGES...",
        f"nofree caption --method retrieval --anchors hf-hub:{repo_id} IMAGES...", "```", "",
        "```python", "from nofree.anchors.anchor_set import AnchorSet", "",
        f'anchors = AnchorSet.load("hf-hub:{repo_id}")', "```", "",
        "Queries must be encoded with the two encoders above (nofree loads them from these specs).", "",
        "## Quality", "", *quality, "",
        "## Files", "", *[f"- `{name}` ({human_size(size)})" for name, size in files], "",
        "Image paths in `captions.jsonl` are relative to the manifest's `image_root` (the photos are "
        "not part of the upload; the paths identify them).", ""])


def adapter_card(repo_id: str, config: dict, state: dict | None, parameters: int | None,
                 files: list[tuple[str, int]]) -> str:
    """The model card of an adapter (see the module docstring)."""
    kind = config["kind"]
    what = {"lit": "LiT: a locked image tower with a tuned text side (contrastive)",
            "clipcap": "ClipCap: image embedding → prefix of a frozen language model",
            "flamingo": "Flamingo-style: perceiver resampler + gated cross-attention into a frozen LM",
            "smallcap": "SmallCap-style: retrieved captions in the prompt + gated cross-attention into "
                        "a frozen LM (its retrieval anchor set is in `anchors/`)"}.get(kind, kind)
    total = sum(size for _, size in files)
    rows = [_row("what", what),
            *[_row(role.replace("_", " "), f"`{spec}` (frozen)") for role, spec in config["backbone"].items()],
            _row("trainable parameters", f"{parameters:,}" if parameters is not None else "?"),
            _row("settings", ", ".join(f"{k}={v}" for k, v in config["config"].items())),
            _row("format", f"{config['format']} v{config['format_version']} (nofree "
                           f"{config.get('nofree_version', '?')})"),
            _row("size", f"{human_size(total)} in {len(files)} files (adapter weights only, never the backbones)"),
            *_local_note(config["backbone"])]
    quality = ["No training record (`training/state.json`) is in the folder: no quality measurement "
               "is recorded."]
    history = (state or {}).get("history") or []
    if history:
        last = history[-1]
        settings = state.get("settings", {})
        rows.append(_row("training", f"{last.get('epoch')} epochs, {last.get('step')} steps; " + ", ".join(
            f"{k}={settings[k]}" for k in ("batch_size", "lr", "precision", "schedule", "augment") if k in settings)))
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                            if isinstance(v, (int, float)) and k not in ("epoch", "step", "seconds"))
        quality = [f"Measured at the last epoch ({last.get('epoch')}) of training, on the run's own "
                   f"training and validation splits: {metrics}."]
    use = {"lit": [f"nofree classify --lit hf-hub:{repo_id} --labels labels.txt IMAGES...",
                   f"nofree retrieve --lit hf-hub:{repo_id} --query 'a dog on a beach' IMAGE_DIR"],
           }.get(kind, [f"nofree caption --method {kind} --adapter hf-hub:{repo_id} IMAGES..."])
    return "\n".join([
        "---", "library_name: nofree", "tags:", "- nofree", "- adapter", f"- {kind}", "---", "",
        f"# {repo_id}", "",
        f"A trained nofree adapter ({kind}) over frozen pretrained models; the backbones are loaded "
        "from the specs below, only the adapter's own weights are here.", "",
        "| | |", "| --- | --- |", *rows, "",
        "## Use", "", "```", *use, "```", "",
        "```python", "from nofree.adapters import load_adapter", "",
        f'adapter = load_adapter("hf-hub:{repo_id}")', "```", "",
        "## Quality", "", *quality, "",
        "## Files", "", *[f"- `{name}` ({human_size(size)})" for name, size in files], ""])


def plan_push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
              include_training_state: bool = False) -> PushPlan:
    """Check ``folder`` and work out what :func:`push_artifact` would upload (no network)."""
    folder = Path(folder)
    repo_id = _repo_id(repo_id)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give an anchor set or a trained adapter's folder")
    kind = artifact_kind(folder)
    files = _files(folder, include_training_state=include_training_state)
    if kind == ANCHOR_SET:
        manifest = _check_anchor_set(folder)
        card = anchor_set_card(repo_id, manifest, files)
        warnings = _spec_warnings({"image_spec": manifest["image_spec"], "text_spec": manifest["text_spec"]})
    elif kind == ADAPTER and (folder / "config.json").is_file():
        config, state = _check_adapter(folder)
        from nofree.adapters.base import WEIGHTS_FILE

        card = adapter_card(repo_id, config, state, _weights_parameters(folder / WEIGHTS_FILE), files)
        warnings = _spec_warnings(config["backbone"])
        kind = f"{config['kind']} adapter"
    else:
        raise DataError(f"{folder} is neither an anchor set (manifest.json) nor a trained adapter "
                        "(config.json): push the folder `nofree anchors build` or `nofree train` wrote")
    if any(name == CARD for name, _ in files):
        card = None  # the folder's own card is uploaded as it is
    return PushPlan(folder, repo_id, kind, files, card, private, revision, warnings)


def _stage(plan: PushPlan, stage: Path) -> None:
    """Links to the plan's files (copies where links are not allowed) and the card, in ``stage``."""
    for name, _ in plan.files:
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = os.path.abspath(plan.folder / name)
        try:
            os.symlink(source, target)
        except OSError:
            shutil.copy2(source, target)
    if plan.card is not None:
        (stage / CARD).write_text(plan.card, encoding="utf-8")


def push_artifact(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                  revision: str | None = None, dry_run: bool = False, commit_message: str | None = None,
                  include_training_state: bool = False) -> PushPlan:
    """Upload the anchor set or adapter at ``folder`` to the model repository ``repo_id``
    (``ORG/NAME``) with a model card; see the module docstring. Returns the plan, with
    ``commit_url`` set after an upload. ``dry_run``: only the plan."""
    plan = plan_push(folder, repo_id, private=private, revision=revision,
                     include_training_state=include_training_state)
    for warning in plan.warnings:
        log.warning("%s", warning)
    if dry_run:
        return plan
    from nofree.hub import _truthy

    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise OptionError("pushing needs the network, but HF_HUB_OFFLINE=1 is set: unset it (or use ",
                          Option("dry_run", True), " to see what would be uploaded)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    message = commit_message or f"Upload nofree {plan.kind}"
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(plan.repo_id, branch=revision, repo_type="model", exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nofree-push-") as stage:
            _stage(plan, Path(stage))
            commit = api.upload_folder(repo_id=plan.repo_id, folder_path=stage, repo_type="model",
                                       revision=revision, commit_message=message)
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        fix = ("log in with `hf auth login` or set HF_TOKEN (a token with write access)"
               if status in (401, 403) else "check the repository name and try again")
        raise DataError(f"pushing to {plan.repo_id} failed: the hub answered {status or err}; {fix}") from err
    except Exception as err:  # no connection (httpx), offline mode, no token file: one line
        raise DataError(f"pushing to {plan.repo_id} failed ({err.__class__.__name__}: {err}); check the "
                        "network and that you are logged in (`hf auth login` or HF_TOKEN)") from err
    plan.commit_url = getattr(commit, "commit_url", None) or str(commit)
    return plan
