"""Training loop shared by every adapter, and one entry point per method for the CLI.

``train_adapter`` trains any :class:`~nofree.adapters.base.Adapter` with AdamW on the adapter's
own parameters (the frozen backbones never change). Frozen features are computed once before
training (through the on-disk :class:`nofree.cache.EmbeddingCache` when one is given), never
once per epoch. After every epoch ``out_dir`` receives a checkpoint (see
:mod:`nofree.adapters.checkpoint`): the adapter (``config.json`` + ``adapter.safetensors``),
``training/optimizer.safetensors`` and ``training/state.json`` (optimizer, RNG state and run
record; written last) and ``loss_curve.png``.

``resume=True`` continues from the last finished epoch and ends with exactly the weights an
uninterrupted run gives (the example order of epoch e depends only on ``seed`` and e, and the
learning rate only on the step). Nothing is written before every input has been checked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.adapters.base import Adapter, load_tensors
from nofree.adapters.recipes import RECIPES, recipe_epochs
from nofree.adapters.checkpoint import (CURVE_FILE, OPTIMIZER_FILE, STATE_DIR, STATE_FILE, _read_state,
                                        _restore_optimizer, _restore_rng, _save_checkpoint, check_out_dir,
                                        save_loss_curve)
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER, DataError, Pair, resolve_device

log = logging.getLogger(__name__)


# --- examples ---------------------------------------------------------------------------------

@dataclass
class Batch:
    """One training batch: ``image_features`` ``(B, D)`` or ``(B, T, W)`` on the adapter's device,
    ``image_ids`` ``(B,)`` (equal for captions of one image), ``texts`` (B captions) and, for LiT,
    ``text_features`` ``(B, Dt)`` frozen text embeddings."""

    image_features: Tensor
    image_ids: Tensor
    texts: list[str]
    text_features: Tensor | None = None
    text_mask: Tensor | None = None
    prompts: list[str] | None = None


@dataclass
class Examples:
    """(image, caption) training examples with frozen features precomputed once.

    ``image_features`` ``(M, D)`` or ``(M, T, W)``: one row per distinct image (CPU float32);
    ``image_index`` ``(N,)`` long: each example's image row; ``texts``: N captions;
    ``text_features``: None, frozen text embeddings ``(N, Dt)``, or (LiT with trainable top text
    layers) intermediate token states ``(N, T, Wt)`` with ``text_mask`` ``(N, T)`` bool;
    ``skipped``: image paths that could not be read; ``image_prompts``: None, or one text per
    image row that a prompted adapter reads before the caption (e.g. retrieved captions);
    ``image_paths``: each image row's path when known; ``view_features``: None, or augmented
    views ``(V, M, ...)`` of every image row (:mod:`nofree.adapters.augment`).
    """

    image_features: Tensor
    image_index: Tensor
    texts: list[str]
    text_features: Tensor | None = None
    skipped: list[str] = field(default_factory=list)
    text_mask: Tensor | None = None
    image_prompts: list[str] | None = None
    image_paths: list[str] = field(default_factory=list)
    view_features: Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.image_index.shape != (n,):
            raise ValueError(f"image_index must be ({n},), got {tuple(self.image_index.shape)}")
        if n and (int(self.image_index.min()) < 0 or int(self.image_index.max()) >= len(self.image_features)):
            raise ValueError("image_index points outside image_features")
        if self.image_prompts is not None and len(self.image_prompts) != len(self.image_features):
            raise ValueError(f"image_prompts must have one text per image row ({len(self.image_features)}), "
                             f"got {len(self.image_prompts)}")
        if self.text_features is not None and self.text_features.shape[0] != n:
            raise ValueError(f"text_features must have {n} rows, got {self.text_features.shape[0]}")
        if self.view_features is not None and self.view_features.shape[1:] != self.image_features.shape:
            raise ValueError(f"view_features must be (V, *{tuple(self.image_features.shape)}), got "
                             f"{tuple(self.view_features.shape)}")

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, rows: Tensor, device: torch.device, *, views: torch.Generator | None = None) -> Batch:
        """The examples ``rows``; with ``views`` (a generator) and ``view_features``, each row takes
        its photo's own features or one of its augmented views, uniformly at random."""
        index = self.image_index[rows]
        features = self.image_features[index]
        if views is not None and self.view_features is not None:
            pick = torch.randint(0, len(self.view_features) + 1, (len(index),), generator=views)
            for view, view_features in enumerate(self.view_features, start=1):
                chosen = (pick == view).nonzero().flatten()
                features[chosen] = view_features[index[chosen]]
        text_features = None if self.text_features is None else self.text_features[rows].to(device)
        text_mask = None if self.text_mask is None else self.text_mask[rows].to(device)
        prompts = None if self.image_prompts is None else [self.image_prompts[i] for i in index.tolist()]
        return Batch(image_features=features.to(device), image_ids=index,
                     texts=[self.texts[i] for i in rows.tolist()], text_features=text_features,
                     text_mask=text_mask, prompts=prompts)

    def epoch_batches(self, batch_size: int, generator: torch.Generator, *,
                      bucket_by_length: bool = False) -> list[Tensor]:
        """Row indices of each batch of one epoch, shuffled by ``generator``.

        With ``bucket_by_length``, runs of 16 batches are sorted by caption length before being
        cut, and the batches are shuffled again: far less padding, still a random order.
        """
        order = torch.randperm(len(self), generator=generator)
        if not bucket_by_length:
            return list(order.split(batch_size))
        span = batch_size * 16
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span].tolist()
            chunk.sort(key=lambda i: len(self.texts[i]))
            batches += list(torch.tensor(chunk, dtype=torch.long).split(batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def with_images_shuffled(self, seed: int = 0, *, prompts: bool = False) -> "Examples":
        """The same captions, each paired with another photo's features: feature rows are permuted
        by a fixed-seed derangement (no photo keeps its own features when there are two or more).
        Each photo keeps its own prompt unless ``prompts``, which moves the prompts with the
        features (a caption then meets everything derived from another photo)."""
        m = len(self.image_features)
        order = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
        target = torch.empty(m, dtype=torch.long)
        target[order] = order.roll(1)  # each photo takes the next one's features in a random cycle
        image_prompts = self.image_prompts
        if prompts and image_prompts is not None:
            image_prompts = [image_prompts[i] for i in target.tolist()]
        return Examples(image_features=self.image_features[target], image_index=self.image_index,
                        texts=self.texts, text_features=self.text_features, text_mask=self.text_mask,
                        image_prompts=image_prompts)

    def digest(self) -> str:
        """sha256 of the texts, image index and feature shape: identifies a training set."""
        record = [self.texts, self.image_index.tolist(), list(self.image_features.shape)]
        if self.image_prompts is not None:
            record.append(self.image_prompts)
        h = hashlib.sha256(json.dumps(record).encode("utf-8"))
        return h.hexdigest()


def _encode_images(encoder: Any, paths: list[str], kind: str, cache: Any,
                   progress: bool) -> tuple[Tensor, list[int], list[str]]:
    """Features of the readable images among ``paths``: (features, kept indices, skipped paths)."""
    from nofree.data.images import load_images

    if cache is not None:
        try:
            return cache.encode(encoder, paths, kind=kind, progress=progress), list(range(len(paths))), []
        except DataError:
            pass  # some image is unreadable: find which, then encode the rest
    loaded = load_images(paths)
    skipped = [path for path, _ in loaded.skipped]
    if not loaded.images:
        return torch.zeros(0), [], skipped
    if cache is not None:
        features = cache.encode(encoder, [paths[i] for i in loaded.indices], kind=kind, progress=progress)
    elif kind == "tokens":
        features = encoder.encode_tokens(loaded.images)
    else:
        features = encoder.encode(loaded.images)
    return features, loaded.indices, skipped


def prepare_examples(adapter: Adapter, pairs: Sequence[Pair] | Examples, *, cache: Any = None,
                     what: str = "training", progress: bool = False, augment: str = "none") -> Examples:
    """Frozen features of every (image, caption) of ``pairs``, computed once.

    Images go through the adapter's image encoder (pooled or token grids per
    ``adapter.feature_kind``); for LiT the captions also go through its frozen text encoder.
    ``cache`` is an optional :class:`nofree.cache.EmbeddingCache`. Unreadable images are skipped,
    logged and listed in ``Examples.skipped``. ``augment`` (:mod:`nofree.adapters.augment`) adds
    ``view_features``, encoded once too. Already-prepared ``Examples`` pass through.
    """
    from nofree.adapters.augment import view_encoders

    encoders = view_encoders(adapter.image_encoder, augment)
    if isinstance(pairs, Examples):
        if encoders and pairs.view_features is None:
            raise ValueError(f"augment={augment!r}, but these examples were prepared without views; "
                             f"pass augment={augment!r} to prepare_examples")
        return pairs
    pairs = [pair for pair in pairs if pair.captions]
    paths = list(dict.fromkeys(str(pair.image) for pair in pairs))  # one row per distinct image
    features, kept, skipped = (
        _encode_images(adapter.image_encoder, paths, adapter.feature_kind, cache, progress)
        if paths else (torch.zeros(0), [], []))
    if skipped:
        log.warning("%s: skipped %d unreadable image(s): %s", what, len(skipped), ", ".join(skipped[:5]))
    row_of = {paths[i]: row for row, i in enumerate(kept)}
    texts: list[str] = []
    index: list[int] = []
    for pair in pairs:
        row = row_of.get(str(pair.image))
        if row is not None:
            texts += list(pair.captions)
            index += [row] * len(pair.captions)
    text_features = text_mask = None
    if adapter.uses_text_features and texts:
        text_features, text_mask = adapter.text_inputs(texts, cache=cache)
    views = None
    if encoders and kept:
        views = torch.stack([_encode_images(view, [paths[i] for i in kept], adapter.feature_kind, cache,
                                            progress)[0].float() for view in encoders])
    return Examples(image_features=features.float(), image_index=torch.tensor(index, dtype=torch.long),
                    texts=texts, text_features=text_features, skipped=skipped, text_mask=text_mask,
                    image_paths=[paths[i] for i in kept], view_features=views)


# --- the loop ---------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a training run produced: the trained ``adapter`` (eval mode), its ``out_dir``, the
    per-epoch ``history`` (epoch, step, train_loss, seconds, validation metrics), the total
    ``steps``, the per-step ``step_losses`` and the ``loss_curve`` PNG path."""

    adapter: Adapter
    out_dir: Path
    history: list[dict[str, Any]]
    steps: int
    step_losses: list[float]
    loss_curve: Path | None


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def train_adapter(adapter: Adapter, train_pairs: Sequence[Pair] | Examples, *,
                  val_pairs: Sequence[Pair] | Examples | None = None, epochs: int, batch_size: int,
                  lr: float, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
                  seed: int = 0, device: str | torch.device | None = None, progress: bool = True,
                  weight_decay: float = 0.0, warmup_steps: int = 20, grad_clip: float | None = 1.0,
                  schedule: str = "cosine", precision: str = "fp32", augment: str = "none",
                  min_steps: int = 0, cache: Any = None) -> TrainResult:
    """Train ``adapter`` on ``train_pairs`` (pairs or prepared :class:`Examples`), checkpointing
    to ``out_dir`` after every epoch; see the module docstring.

    ``resume``: continue the run saved in ``out_dir`` (same settings and data; ``epochs`` may be
    raised to train longer). Without it, a non-empty ``out_dir`` is an error unless
    ``overwrite``. ``device`` must be the adapter's (where its backbone was loaded); ``None``
    means that. Learning rate (times each parameter group's ``lr_scale``, see
    ``Adapter.param_groups``): linear warmup over ``warmup_steps``, then ``schedule="cosine"``
    decays it to 0 at the last step of ``epochs`` (raising ``epochs`` on resume stretches the
    rest of the curve) or ``"constant"`` keeps it. ``precision="bf16"`` runs the
    training and validation forward/backward under bfloat16 autocast (weights, optimizer state and
    the loss stay float32; the frozen backbone is untouched): about 2–3× faster through a frozen
    LM on CPUs with bf16 matrix units. Inference is float32 either way. ``augment``: extra views
    of each training photo (:mod:`nofree.adapters.augment`), drawn at random per row and step.
    ``min_steps``: when ``epochs`` passes over this training set give fewer optimiser steps, train
    for as many epochs as reach ``min_steps`` (the recipes' rule for small sets,
    :mod:`nofree.adapters.recipes`); 0 trains exactly ``epochs``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}")
    _check_positive(epochs=epochs, batch_size=batch_size, lr=lr)
    if not isinstance(epochs, int) or not isinstance(batch_size, int):
        raise ValueError("epochs and batch_size must be whole numbers")
    if device is not None and resolve_device(device) != adapter.device:
        raise ValueError(f"device={device!r}, but the adapter and its backbone are on {adapter.device}; "
                         "load the backbone on the device you train on")
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_DIR / STATE_FILE
    saved = None
    if resume and state_path.is_file():
        saved = _read_state(state_path)
    else:
        check_out_dir(out_dir, resume=resume, overwrite=overwrite)
    adapter.check_target(out_dir, overwrite=overwrite)
    train = prepare_examples(adapter, train_pairs, cache=cache, what="training", progress=progress,
                             augment=augment)
    if len(train) == 0:
        raise DataError("the training split is empty (no readable image with a caption); check the "
                        "pairs file and its 'split' field")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    if min_steps and epochs * steps_per_epoch < min_steps:
        raised = math.ceil(min_steps / steps_per_epoch)
        log.info("%d training captions give %d steps an epoch: %d epochs instead of %d, for at least %d steps",
                 len(train), steps_per_epoch, raised, epochs, min_steps)
        epochs = raised
    val = (prepare_examples(adapter, val_pairs, cache=cache, what="validation", progress=progress)
           if val_pairs is not None else None)
    if val is not None and len(val) == 0:
        log.warning("the validation split is empty; training without validation")
        val = None
    settings = {"kind": adapter.kind, "config": adapter.config(), "backbone": adapter.backbone_specs(),
                "batch_size": batch_size, "lr": lr, "seed": seed, "weight_decay": weight_decay,
                "warmup_steps": warmup_steps, "grad_clip": grad_clip, "precision": precision,
                "schedule": schedule, "augment": augment,
                "train_digest": train.digest()}
    optimizer = torch.optim.AdamW(adapter.param_groups(), lr=lr, weight_decay=weight_decay)
    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    start_epoch, step = 0, 0
    if saved is not None:
        # a state file without these settings comes from a run that trained with these values
        before = {"precision": "fp32", "schedule": "constant", "augment": "none", **saved["settings"]}
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise DataError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); "
                            "resume with the same ones, or start over with overwrite=True")
        adapter.load_weights(out_dir / "adapter.safetensors", expected_sha256=saved["adapter_sha256"])
        tensors = load_tensors(out_dir / STATE_DIR / OPTIMIZER_FILE,
                               expected_sha256=saved["optimizer_sha256"], what="optimizer state")
        _restore_optimizer(optimizer, tensors, saved["optimizer"])
        _restore_rng(tensors)
        start_epoch, step = saved["epoch"], saved["step"]
        history, step_losses = saved["history"], saved["step_losses"]
        log.info("resuming %s from epoch %d (step %d)", out_dir, start_epoch, step)
    else:
        torch.manual_seed(seed)

    from tqdm.auto import tqdm

    curve = out_dir / CURVE_FILE if (out_dir / CURVE_FILE).exists() else None
    for epoch in range(start_epoch, epochs):
        began = time.perf_counter()
        adapter.train()
        shuffle = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        rows = train.epoch_batches(batch_size, shuffle, bucket_by_length=adapter.bucket_by_length)
        bar = tqdm(rows, total=steps_per_epoch, desc=f"{adapter.kind} epoch {epoch + 1}/{epochs}",
                   disable=not progress)
        epoch_losses = []
        for batch_rows in bar:
            batch = train.batch(batch_rows, adapter.device, views=shuffle)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0) * lr_factor(
                    step, warmup_steps=warmup_steps, total_steps=epochs * steps_per_epoch, schedule=schedule)
            with _autocast(adapter.device, precision):
                loss = adapter.batch_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {float(loss)} at step {step + 1}; "
                                         "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(adapter.trainable_parameters(), grad_clip)
            optimizer.step()
            step += 1
            epoch_losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{sum(epoch_losses[-20:]) / len(epoch_losses[-20:]):.4f}")
        adapter.eval()
        record = {"epoch": epoch + 1, "step": step, "train_loss": sum(epoch_losses) / len(epoch_losses)}
        if val is not None:
            with _autocast(adapter.device, precision):
                record.update(adapter.evaluate(val))
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if isinstance(v, float)})
        bar.close()
        record["seconds"] = time.perf_counter() - began
        history.append(record)
        step_losses += epoch_losses
        log.info("%s epoch %d/%d: %s", adapter.kind, epoch + 1, epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        _save_checkpoint(adapter, optimizer, out_dir, settings=settings, epoch=epoch + 1, step=step,
                         history=history, step_losses=step_losses)
        curve = out_dir / CURVE_FILE
        save_loss_curve(curve, step_losses, history, f"{adapter.kind}: {out_dir.name}")
    adapter.eval()
    if history:
        validation_warnings(adapter.kind, history[-1])
    return TrainResult(adapter=adapter, out_dir=out_dir, history=history, steps=step,
                       step_losses=step_losses, loss_curve=curve)


#: Training precisions: autocast of the forward/backward (not the anchor scan's or an LM's dtype).
TRAIN_PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps``, then 1 (``constant``) or a half cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def validation_warnings(kind: str, record: dict[str, Any]) -> list[str]:
    """Plain-words warnings (logged and returned) when a captioning adapter's last validation
    record says it ignores the image (a val-loss gap under 0.05 nats between shuffled and true
    image features, named with its interval over the photos when known, or fewer than half the
    photos getting a caption of their own) or that its captions degenerate (more than 10% of them
    with a word directly following itself, see :mod:`nofree.eval.degeneration`)."""
    warnings = []
    gap, distinct, stutter = record.get("image_gap"), record.get("val_distinct"), record.get("val_stutter")
    if gap is not None and gap < 0.05:
        from nofree.adapters.base import adapter_class

        warning = adapter_class(kind).weak_image_warning.format(**_gap_fields(record))
        warnings.append(f"the {kind} adapter {warning}")
    if distinct is not None and distinct < 0.5:
        warnings.append(f"the {kind} adapter writes the same caption for many photos (only "
                        f"{100 * distinct:.0f}% of validation photos get a distinct caption)")
    if stutter is not None and stutter > 0.1:
        warnings.append(f"the {kind} adapter's captions stutter: {100 * stutter:.0f}% of validation captions "
                        "repeat a word back to back (\"sink, sink\"); it needs more training pairs or steps")
    for text in warnings:
        log.warning(text)
    return warnings


def _gap_fields(record: dict[str, Any]) -> dict[str, Any]:
    """What a ``weak_image_warning`` may name: ``gap``, ``gap_text`` (the gap with its interval
    over the photos when the record has one) and ``photo_gap_text`` (a clause on the loss rise
    when a photo's prompt moves with its features, or empty)."""
    gap, low, high, photo = (record.get(key) for key in ("image_gap", "image_gap_low", "image_gap_high",
                                                          "photo_gap"))
    gap_text = f"{gap:.3f}" if low is None or high is None else f"{gap:.3f} (95% interval {low:.3f} to {high:.3f})"
    photo_text = "" if photo is None else f" (it rises {photo:.2f} when the prompt comes from that photo too)"
    return {"gap": gap, "gap_text": gap_text, "photo_gap_text": photo_text}


def _autocast(device: torch.device, precision: str) -> Any:
    """bfloat16 autocast on ``device`` for ``precision="bf16"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --- one entry point per method (the CLI calls these) --------------------------------------------

def load_splits(pairs_path: str | Path, train_split: str,
                val_split: str | None) -> tuple[list[Pair], list[Pair] | None]:
    """The training pairs (a missing split is an error) and the validation pairs (``None`` when
    ``val_split`` is empty or absent from the file, with a warning)."""
    from nofree.data.pairs import load_pairs

    train_pairs = load_pairs(pairs_path, split=train_split)
    val_pairs = None
    if val_split:
        try:
            val_pairs = load_pairs(pairs_path, split=val_split)
        except DataError as err:
            log.warning("no validation: %s", err)
    return train_pairs, val_pairs


def train_from_pairs(kind: str, pairs_path: str | Path, *, backbones: dict[str, str],
                     hparams: dict[str, Any], out: str | Path, epochs: int, batch_size: int,
                     lr: float, resume: bool = False, overwrite: bool = False,
                     device: str | torch.device | None = None, seed: int = 0,
                     train_split: str = "train", val_split: str | None = "val",
                     cache_dir: str | Path | None = None, progress: bool = True,
                     **train_kw: Any) -> TrainResult:
    """Load pairs and backbones, build a ``kind`` adapter, train it into ``out`` (see train_adapter).

    ``backbones`` maps roles to specs; ``cache_dir`` is the embedding cache root (``None``: the
    default ``$NOFREE_CACHE`` or ``~/.cache/nofree``). A missing ``val_split`` only disables
    validation; a missing ``train_split`` is an error.
    """
    from nofree.adapters.base import _load_backbone, adapter_class
    from nofree.cache import EmbeddingCache

    check_out_dir(out, resume=resume, overwrite=overwrite, inputs=[pairs_path])
    _check_positive(epochs=epochs, batch_size=batch_size, lr=lr)
    train_pairs, val_pairs = load_splits(pairs_path, train_split, val_split)
    loaded = {role: _load_backbone(role, spec, device) for role, spec in backbones.items()}
    torch.manual_seed(seed)
    adapter = adapter_class(kind)(**loaded, **hparams, device=device)
    return train_adapter(adapter, train_pairs, val_pairs=val_pairs, epochs=epochs,
                         batch_size=batch_size, lr=lr, out_dir=out, resume=resume,
                         overwrite=overwrite, seed=seed, progress=progress,
                         cache=EmbeddingCache(cache_dir), **train_kw)


def train_lit(pairs_path: str | Path, *, out: str | Path, image_encoder: str = DEFAULT_IMAGE_ENCODER,
              text_encoder: str = DEFAULT_TEXT_ENCODER, epochs: int = RECIPES["lit"]["epochs"],
              batch_size: int = RECIPES["lit"]["batch_size"], lr: float = RECIPES["lit"]["lr"],
              loss: str = "contrastive", embed_dim: int | None = None,
              hidden_dim: int | None = None, text_layers: int = 0, **kw: Any) -> TrainResult:
    """Train a LiT text head on ``pairs_path`` (frozen features cached; seconds on a CPU).

    Defaults suit ~1k pairs: on coco-mini (700 train captions) validation R@1 peaks after ~8
    epochs and then slowly declines. ``text_layers=1`` also tunes the text encoder's top layer
    (about 20 s an epoch on two CPU cores instead of well under one). Other keywords:
    ``resume``, ``overwrite``, ``device``, ``seed``, ``train_split``, ``val_split``,
    ``cache_dir``, ``progress``, ``weight_decay``, ``warmup_steps``, ``grad_clip``.
    """
    return train_from_pairs("lit", pairs_path, backbones={"image_encoder": image_encoder,
                                                          "text_encoder": text_encoder},
                            hparams={"loss": loss, "embed_dim": embed_dim, "hidden_dim": hidden_dim,
                                     "text_layers": text_layers},
                            out=out, epochs=epochs, batch_size=batch_size, lr=lr, **kw)


def train_clipcap(pairs_path: str | Path, *, out: str | Path, image_encoder: str = DEFAULT_IMAGE_ENCODER,
                  lm: str = DEFAULT_LM, epochs: int | None = None,
                  batch_size: int = RECIPES["clipcap"]["batch_size"], lr: float = RECIPES["clipcap"]["lr"],
                  mapper: str = "mlp", prefix_length: int = 10, precision: str = "bf16",
                  augment: str = str(RECIPES["clipcap"]["augment"]), **kw: Any) -> TrainResult:
    """Train a ClipCap mapper into a frozen LM on ``pairs_path``; keywords as in :func:`train_lit`.

    Defaults (:data:`nofree.adapters.recipes.RECIPES`) suit ~1k captions on a CPU (``epochs=None``:
    the recipe's, raised on smaller sets to its ``min_steps``): the rate is
    far above the paper's 2e-5 because a small set gives only tens of steps per epoch (coco-mini:
    44), warmed up then decayed to 0 on a cosine over 6 epochs (cross-validated against 3 on
    coco-mini ``train``; RESULTS.md, "Trained fusion"). Each epoch
    runs the 135M-parameter LM forward and backward over every caption (minutes on two CPU
    cores), under bf16 autocast by default (``precision="fp32"`` to turn it off).
    """
    epochs, kw["min_steps"] = recipe_epochs("clipcap", epochs)
    return train_from_pairs("clipcap", pairs_path, backbones={"image_encoder": image_encoder, "lm": lm},
                            hparams={"mapper": mapper, "prefix_length": prefix_length},
                            out=out, epochs=epochs, batch_size=batch_size, lr=lr, precision=precision,
                            augment=augment, **kw)


def train_flamingo(pairs_path: str | Path, *, out: str | Path, image_encoder: str = DEFAULT_IMAGE_ENCODER,
                   lm: str = DEFAULT_LM, epochs: int | None = None,
                   batch_size: int = RECIPES["flamingo"]["batch_size"], lr: float = RECIPES["flamingo"]["lr"],
                   num_latents: int = 32, xattn_every: int = 5, gate_lr_scale: float = 1.0,
                   gate_init: float = 0.5, scale_to_residual: bool = True, dropout: float = 0.0,
                   precision: str = "bf16", augment: str = str(RECIPES["flamingo"]["augment"]),
                   **kw: Any) -> TrainResult:
    """Train a Flamingo-style resampler + gated cross-attention on ``pairs_path``; keywords as in
    :func:`train_lit`, small-data defaults as in :func:`train_clipcap`. ``gate_init``,
    ``scale_to_residual`` and ``dropout`` as in :class:`~nofree.adapters.flamingo.Flamingo`: with
    the paper's initialisation (``gate_init=0``, ``scale_to_residual=False``) a few hundred
    captions teach the adapter the caption style but never to use the image (RESULTS.md,
    "Trained fusion"); the warning at the end of training says so when it happens."""
    epochs, kw["min_steps"] = recipe_epochs("flamingo", epochs)
    return train_from_pairs("flamingo", pairs_path, backbones={"image_encoder": image_encoder, "lm": lm},
                            hparams={"num_latents": num_latents, "xattn_every": xattn_every,
                                     "gate_lr_scale": gate_lr_scale, "gate_init": gate_init,
                                     "scale_to_residual": scale_to_residual, "dropout": dropout},
                            out=out, epochs=epochs, batch_size=batch_size, lr=lr, precision=precision,
                            augment=augment, **kw)
