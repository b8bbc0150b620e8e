"""The Ray engine of ``build_anchor_set``: shards encoded by a pool of encoder actors.

Ray Data (an existing distributed engine; nofree runs no cluster of its own) streams the pending
shards, one row each (shard index + its pairs), through ``map_batches`` on an actor pool of
``workers`` actors. Each actor builds its own encoders from spec strings (or zero-argument
factories) once, on its GPU when Ray gave it one (GPU actors whenever the cluster has GPUs),
else on CPU, then for each shard reads the images (files or webdataset members), encodes them
with the same :func:`~nofree.anchors.build.shards.encode_shard` as the local engine and writes
``shard-NNNNN.safetensors`` atomically (temporary name, then rename) into ``OUT.partial``. The
driver then assembles the shards in shard order into a normal
:class:`~nofree.anchors.anchor_set.AnchorSet`, so the result equals the single-process build
(same shards, same order).

Failures cost only their own shard: Ray restarts a dead actor and retries its shard
(``max_retries`` times); a shard already on disk is never encoded again, so rerunning a build
that stopped (driver killed, retries exhausted, cluster pre-empted) encodes only the missing
shards. On a multi-node cluster (``ray_address``) the input images and ``OUT.partial`` must be
on storage every node sees (a shared file system), and nofree must be installed on the nodes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.build.shards import (DEFAULT_SHARD_SIZE, assemble_shards, encode_shard, read_shard,
                                         resolve_encoder, shard_path, start_work_dir, write_shard)
from nofree.core import Encoder, MissingDependencyError, NofreeError, Pair, SpecError

log = logging.getLogger(__name__)

#: Environment variables handed to the workers of an existing cluster (offline model loading).
_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME")


def encoder_spec(encoder: str | Callable[[], Encoder], modality: str | None = None) -> str:
    """The spec a Ray build records for ``encoder`` (a spec string, read as a ``modality``
    encoder, or a factory called once)."""
    if isinstance(encoder, str):
        from nofree.registry import normalize_spec

        return normalize_spec(encoder, role=modality)
    if isinstance(encoder, Encoder) or not callable(encoder):
        raise SpecError("engine='ray' needs each encoder as a spec string (e.g. 'embedded:minilm-l6') "
                        "or a zero-argument factory: every Ray actor builds its own encoder, so an "
                        f"already-loaded {type(encoder).__name__} cannot be shipped to them")
    return encoder().spec


class ShardEncoder:
    """A Ray Data actor: builds both encoders once, then encodes and writes whole shards."""

    def __init__(self, image_encoder, text_encoder, image_spec: str, text_spec: str, work_dir: str,
                 batch_size: int) -> None:
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.work_dir = Path(work_dir)
        self.batch_size = batch_size
        self.error = ""  # a user-fixable error (bad spec, missing package) goes back to the driver
        try:
            self.image = resolve_encoder(image_encoder, "image", device)
            self.text = resolve_encoder(text_encoder, "text", device)
            for encoder, spec in ((self.image, image_spec), (self.text, text_spec)):
                if encoder.spec != spec:
                    raise SpecError(f"a Ray worker built {encoder.spec!r} but the build records {spec!r}")
        except NofreeError as err:
            self.error = f"{type(err).__name__}: {err}"

    def __call__(self, batch: dict) -> dict:
        done = {"index": [], "anchors": [], "skipped": [], "error": []}
        for index, rows in zip(batch["index"], batch["pairs"]):
            index = int(index)
            done["error"].append(self.error)
            if self.error:
                done["index"].append(index)
                done["anchors"].append(0)
                done["skipped"].append(0)
                continue
            path = shard_path(self.work_dir, index)
            part = read_shard(path) if path.exists() else None  # finished by an earlier attempt
            if part is None:
                pairs = [Pair(image, tuple(captions)) for image, captions in json.loads(rows)]
                tensors, metadata = encode_shard(pairs, self.image, self.text, self.batch_size)
                write_shard(path, tensors, metadata)
                part = tensors, {"skipped": json.loads(metadata["skipped"])}
            done["index"].append(index)
            done["anchors"].append(int(part[0]["image"].shape[0]))
            done["skipped"].append(len(part[1]["skipped"]))
        return done


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected: an already initialised Ray, the cluster at ``address``, or
    a local instance with ``cpus`` CPUs started here (and shut down on exit)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage reporting
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError("engine='ray' needs Ray Data: pip install 'nofree[ray]' "
                                     f"(ray[data]>=2.9) ({err})") from None
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                               "log_to_driver": log.isEnabledFor(logging.INFO)}
    if address:
        env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **options)
    else:
        ray.init(num_cpus=cpus, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _pending_rows(pairs: Sequence[Pair], work_dir: Path, n_shards: int, shard_size: int) -> list[dict]:
    rows = []
    for index in range(n_shards):
        if not shard_path(work_dir, index).exists():
            chunk = pairs[index * shard_size:(index + 1) * shard_size]
            rows.append({"index": index,
                         "pairs": json.dumps([[p.image, list(p.captions)] for p in chunk], ensure_ascii=False)})
    return rows


def _actor_resources(ray: Any, workers: int | None, local: bool) -> tuple[int, dict]:
    """How many actors, and each one's Ray resources: a GPU each when the cluster has GPUs."""
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), max(1, int(total.get("CPU", 1)))
    if gpus:
        workers = workers or gpus
        log.info("Ray: %d encoder actor(s), one GPU each", workers)
        return workers, {"num_gpus": 1, "num_cpus": 1}
    workers = workers or cpus
    per = max(1, cpus // workers) if local else 1
    log.info("Ray: %d encoder actor(s) on CPU, %d CPU each (no GPU in the cluster)", workers, per)
    return workers, {"num_cpus": per}


def _ray_errors() -> tuple[type[BaseException], ...]:
    """What a failed Ray Data run raises: worker failures, and Ray Data's own stops."""
    import ray.data.exceptions
    import ray.exceptions

    return (ray.exceptions.RayError, ray.data.exceptions.SystemException,
            ray.data.exceptions.ExecutionTimeoutError)


def _root_cause(err: BaseException) -> BaseException:
    """The user-fixable nofree error behind a Ray failure, if there is one."""
    seen = err
    for _ in range(8):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(cause, NofreeError):
            return cause
        if cause is None or cause is seen:
            break
        seen = cause
    return err


def _run_pool(ray: Any, rows: list[dict], encoder_args: dict, n_actors: int, resources: dict,
              max_retries: int, n_shards: int, progress: bool) -> None:
    """Stream ``rows`` (one pending shard each) through a pool of ``ShardEncoder`` actors."""
    from tqdm.auto import tqdm

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # nofree shows its own bar
    bar = tqdm(total=n_shards, initial=n_shards - len(rows), unit="shard", desc="encoding anchors (ray)",
               disable=not progress)
    try:
        with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
                fn_constructor_kwargs=encoder_args, max_restarts=max_retries,
                max_task_retries=max_retries, **resources)
        for row in dataset.iter_rows():
            if row["error"]:
                kind, _, message = row["error"].partition(": ")
                raise {"SpecError": SpecError, "MissingDependencyError": MissingDependencyError}.get(
                    kind, NofreeError)(f"a Ray worker could not start: {message}")
            bar.update(1)
    finally:
        bar.close()
        ctx.enable_progress_bars = saved


def encode_pairs_ray(pairs: Sequence[Pair], image_encoder: str | Callable[[], Encoder],
                     text_encoder: str | Callable[[], Encoder], work_dir: Path, *,
                     batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
                     ray_address: str | None = None, max_retries: int = 3, progress: bool = True,
                     ) -> tuple[AnchorSet, list[str]]:
    """Like :func:`nofree.anchors.build.local.encode_pairs_resumably`, on Ray actors.

    ``workers`` actors (default: one per GPU, else one per CPU of the cluster); ``max_retries``
    restarts of a dead actor and retries of its shard before the build stops (finished shards
    stay in ``work_dir`` for the next run). Returns the anchors and the skipped image paths.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise NofreeError(f"workers must be a positive whole number, got {workers!r}")
    image_spec, text_spec = encoder_spec(image_encoder, "image"), encoder_spec(text_encoder, "text")
    n_shards = start_work_dir(work_dir, pairs, image_spec, text_spec, shard_size, batch_size)
    rows = _pending_rows(pairs, work_dir, n_shards, shard_size)
    if rows:
        local_cpus = max(os.cpu_count() or 1, workers or 1)
        with ray_session(ray_address, None if ray_address else local_cpus) as ray:
            n_actors, resources = _actor_resources(ray, workers, local=not ray_address)
            encoder_args = {"image_encoder": image_encoder, "text_encoder": text_encoder,
                            "image_spec": image_spec, "text_spec": text_spec,
                            "work_dir": str(work_dir.absolute()), "batch_size": batch_size}
            try:
                _run_pool(ray, rows, encoder_args, min(n_actors, len(rows)), resources, max_retries,
                          n_shards, progress)
            except KeyboardInterrupt:
                log.warning("interrupted; finished shards are kept in %s: run the same command again "
                            "to resume", work_dir)
                raise
            except _ray_errors() as err:
                cause = _root_cause(err)
                if cause is not err:
                    raise cause from err
                finished = sum(shard_path(work_dir, i).exists() for i in range(n_shards))
                raise NofreeError(
                    f"the Ray build stopped ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                    f"{finished} of {n_shards} shards are finished in {work_dir}: run the same command "
                    "again to encode only the missing ones") from err
    parts = []
    for index in range(n_shards):
        part = read_shard(shard_path(work_dir, index))
        if part is None:
            shard_path(work_dir, index).unlink(missing_ok=True)
            raise NofreeError(f"shard {index} in {work_dir} is missing or unreadable (removed); run "
                              "the same command again to encode it")
        parts.append(part)
    return assemble_shards(parts, image_spec, text_spec)
