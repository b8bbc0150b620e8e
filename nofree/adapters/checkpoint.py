"""Checkpoints of an adapter training run: what ``out_dir`` holds after every epoch, and resuming.

:func:`nofree.adapters.train.train_adapter` writes, after every epoch,

- the adapter (``config.json`` + ``adapter.safetensors``, loadable with ``from_pretrained``);
- ``training/optimizer.safetensors``: AdamW moments and RNG state (tensors; no pickle), and
  ``training/state.json``: epoch, step, losses, validation history, settings and checksums of
  the files above (written last: it is the commit record of the checkpoint);
- ``loss_curve.png``: per-step training loss, epoch means and the validation metric.

Here are the helpers that write and read those files back (optimizer and RNG state split into
safetensors tensors and JSON values) and the check that an output folder may receive a run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.adapters.base import Adapter, atomic_write_bytes, save_tensors
from nofree.artifacts import ADAPTER, OVERWRITE, atomic_path, check_replaceable, check_writable, writing
from nofree.core import DataError, Option, OptionError

log = logging.getLogger(__name__)

STATE_DIR = "training"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CURVE_FILE = "loss_curve.png"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                       meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = value
    return tensors


def _restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_loss_curve(path: Path, step_losses: list[float], history: list[dict[str, Any]], title: str) -> None:
    """Plot training loss per step (and epoch means) with the validation metric, to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.5, label="train loss (step)")
    ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], "o-",
            label="train loss (epoch)")
    metric = next((k for h in history for k in h if k.startswith("val_")), None)
    if metric is not None:
        axis = ax.twinx() if metric != "val_loss" else ax
        points = [(h["step"], h[metric]) for h in history if metric in h]
        axis.plot(*zip(*points), "s--", color="tab:red", label=metric)
        if axis is not ax:
            axis.set_ylabel(metric)
            axis.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper left" if metric != "val_loss" else "best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png")


def check_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool,
                  inputs: Sequence[str | Path] = ()) -> None:
    """Refuse a non-empty ``out_dir`` without a saved run unless ``overwrite``, and with
    ``overwrite`` anything but an adapter checkpoint that is not one of ``inputs`` (the files or
    folders training reads; see :func:`nofree.artifacts.check_replaceable`); refuse an unwritable
    ``out_dir``. Checked before anything is loaded or written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file; choose a folder for the trained adapter")
    check_writable(out_dir)
    if resume and (out_dir / STATE_DIR / STATE_FILE).is_file():
        return
    if overwrite:
        check_replaceable(out_dir, kind=ADAPTER, inputs=inputs)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        if resume:
            raise OptionError(f"{out_dir} is not empty and holds no run to resume; pass ", OVERWRITE,
                              " to start over there, or choose another folder")
        raise OptionError(f"{out_dir} is not empty; pass ", Option("resume", True), " to continue the run "
                          "saved there, ", OVERWRITE, " to start over, or choose another folder")
    if resume:
        log.info("nothing to resume in %s; starting a new run", out_dir)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OptionError(f"{path} is not readable JSON ({err}); start over with ", OVERWRITE) from err
    missing = [k for k in ("epoch", "step", "settings", "history", "step_losses", "optimizer",
                           "adapter_sha256", "optimizer_sha256") if k not in state]
    if missing:
        raise OptionError(f"{path} lacks {', '.join(missing)}; start over with ", OVERWRITE)
    return state


def _save_checkpoint(adapter: Adapter, optimizer: torch.optim.Optimizer, out_dir: Path, *,
                     settings: dict[str, Any], epoch: int, step: int, history: list[dict[str, Any]],
                     step_losses: list[float]) -> None:
    """Adapter, optimizer + RNG tensors, then ``state.json`` (the commit record) last; a failed
    write (read-only folder, full disk) is a one-line DataError naming ``out_dir``."""
    with writing(out_dir):
        _write_checkpoint(adapter, optimizer, out_dir, settings=settings, epoch=epoch, step=step,
                          history=history, step_losses=step_losses)


def _write_checkpoint(adapter: Adapter, optimizer: torch.optim.Optimizer, out_dir: Path, *,
                      settings: dict[str, Any], epoch: int, step: int, history: list[dict[str, Any]],
                      step_losses: list[float]) -> None:
    import nofree

    adapter.save_pretrained(out_dir, overwrite=True)
    adapter_sha = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))["weights_sha256"]
    (out_dir / STATE_DIR).mkdir(exist_ok=True)
    tensors, meta = _optimizer_tensors(optimizer)
    optimizer_sha = save_tensors(out_dir / STATE_DIR / OPTIMIZER_FILE, {**tensors, **_rng_tensors()})
    state = {"format": "nofree-training-state", "format_version": 1,
             "nofree_version": nofree.__version__, "epoch": epoch, "step": step,
             "settings": settings, "history": history, "step_losses": step_losses,
             "optimizer": meta, "adapter_sha256": adapter_sha, "optimizer_sha256": optimizer_sha}
    atomic_write_bytes(out_dir / STATE_DIR / STATE_FILE, json.dumps(state, indent=1).encode("utf-8"))

