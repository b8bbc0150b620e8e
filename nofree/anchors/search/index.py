"""Optional faiss indices over an anchor set, for the ASIF top-k at tens of millions of anchors.

ASIF keeps, for every query, its k nearest anchors. Exact search
(:mod:`nofree.anchors.search.exact`) scans every anchor; at 10^7–10^8 anchors an inverted-file /
product-quantisation index (Jégou et al., 2011; faiss, Douze et al., 2024) visits a few lists of
compressed codes instead. Here the index only proposes *candidates* (``refine`` x k of them):
their cosines are recomputed exactly from the anchors and the best k kept, so values are exact
and only the recall of the top-k set is approximate — measured when the index is built (recall@k
against exact search on sampled anchors used as queries; a query finds itself, which adds at
most 1/k) and reported by ``nofree anchors info``. Re-scoring reads ``refine * k`` anchor rows
per query, so the anchors themselves must be at hand (in memory, or memory-mapped from
``embeddings.safetensors``).

On disk, inside the anchor-set directory (an optional part of format v1; older readers ignore
it): ``index-image.faiss`` and ``index-text.faiss`` (faiss's own binary format: read without
executing code) and an ``"index"`` entry in ``manifest.json`` (factory string, nprobe, whether
the anchors were centred, measured recall). Anything that rewrites the set (``extend``) drops
the index, since it would no longer cover the anchors.

The index is built over the anchors exactly as ASIF prepares them (unit rows, centred on the
anchor mean when ``center``: nofree's default), so its candidates are those ASIF
ranks. Training needs enough points: at least 39 per IVF list and per PQ centroid (faiss's own
guidance); a smaller set keeps exact search and says so instead of failing inside faiss.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nofree.anchors.anchor_set import MANIFEST, AnchorSet, read_manifest
from nofree.artifacts import atomic_path, atomic_write_json
from nofree.core import MODALITIES, DataError

log = logging.getLogger(__name__)

INDEX_FILES = {"image": "index-image.faiss", "text": "index-text.faiss"}
MIN_POINTS_PER_CENTROID = 39
MAX_POINTS_PER_CENTROID = 256  # training sample cap (faiss subsamples beyond this anyway)
DEFAULT_RECALL_QUERIES = 1000
DEFAULT_REFINE = 2  # candidates per kept anchor, re-scored exactly
# Below this many anchors faiss trains on one thread: for small sets its thread start-up costs
# far more than the training itself when torch's OpenMP runtime is loaded too (the threshold is
# a rough bound, not a measured crossover).
SMALL_TRAIN = 200_000
_GATHER_FLOATS = 1 << 25  # bound on the (queries, k, D) block gathered for exact re-scoring


@dataclass(frozen=True, eq=False)
class AnchorIndex:
    """A trained faiss index over one side's prepared anchors (``ntotal`` rows of width ``d``)."""

    modality: str
    factory: str
    center: bool
    nprobe: int | None
    index: Any
    refine: int = DEFAULT_REFINE

    def search(self, query: Tensor, k: int) -> Tensor:
        """Candidate anchor ids ``(Q, k)`` int64 for prepared queries ``(Q, D)``; -1 = none found."""
        q = np.ascontiguousarray(query.detach().cpu().float().numpy())
        _, ids = self.index.search(q, k)
        return torch.from_numpy(ids.astype(np.int64))

    def topk(self, query: Tensor, anchors: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k cosines and anchor ids ``(Q, k)`` of prepared queries: :func:`index_topk`."""
        return index_topk(query, anchors, self, k)


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a core dependency
        raise DataError(f"search indices need faiss: pip install faiss-cpu ({err})") from None
    return faiss


def _needed_points(index: Any) -> int:
    """Training points this index needs: 39 per IVF list / PQ centroid (0 if untrained-free)."""
    faiss = _faiss()
    if index.is_trained:
        return 0
    centroids = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        centroids = max(centroids, ivf.nlist)
        inner = faiss.downcast_index(ivf)
    else:
        inner = faiss.downcast_index(index)
    pq = getattr(inner, "pq", None)
    if pq is not None:
        centroids = max(centroids, pq.ksub)
    return MIN_POINTS_PER_CENTROID * centroids


def default_nprobe(index: Any, k: int) -> int | None:
    """IVF lists visited per query unless told (None: not an IVF index): enough lists to scan
    about 16·k anchors, at least 16. ASIF's k is large (800), and its neighbours spread over many
    lists: on clustered synthetic data (50k anchors, IVF256) recall@800 was 0.51 at 16 lists and
    0.85 at 64, whatever the codes (benchmarks/ray_scale.py, RESULTS.md)."""
    ivf = _faiss().try_extract_index_ivf(index)
    if ivf is None:
        return None
    per_list = max(1.0, index.ntotal / ivf.nlist)
    return int(min(ivf.nlist, max(16, math.ceil(16 * k / per_list))))


def train_index(vectors: Tensor, factory: str, *, nprobe: int | None = None,
                seed: int = 0) -> tuple[Any | None, str]:
    """A faiss index (inner product) over ``vectors (N, D)`` built from ``factory``, visiting
    ``nprobe`` IVF lists per query (None: faiss's default; see :func:`default_nprobe`).

    Returns ``(index, "")``, or ``(None, reason)`` when N is too small to train it (exact search
    is then the right tool anyway). A factory string faiss cannot parse is a DataError.
    """
    faiss = _faiss()
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise DataError(f"index factory {factory!r} (--index / --factory) is not a faiss index_factory "
                        f"string for {dim}-d vectors ({str(err).strip().rsplit(': ', 1)[-1]}); try e.g. "
                        "'IVF1024,Flat', 'IVF4096,PQ32' or 'HNSW32'") from None
    needed = _needed_points(index)
    if n < needed:
        return None, (f"{n} anchors are too few to train {factory!r} (it needs >= {needed}: "
                      f"{MIN_POINTS_PER_CENTROID} per centroid); exact search is used, which is the "
                      "faster choice at this size anyway")
    data = np.ascontiguousarray(vectors.float().numpy())
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False  # only for Hamming pre-filtering, which is not used; slow
    threads = faiss.omp_get_max_threads()
    if n < SMALL_TRAIN:  # many tiny parallel regions: torch's spinning OpenMP threads stall them
        faiss.omp_set_num_threads(1)
    try:
        if needed:
            cap = needed // MIN_POINTS_PER_CENTROID * MAX_POINTS_PER_CENTROID
            sample = data if n <= cap else data[np.random.default_rng(seed).choice(n, cap, replace=False)]
            index.train(sample)
        index.add(data)
    finally:
        faiss.omp_set_num_threads(threads)
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    return index, ""


def measure_recall(index: AnchorIndex, anchors: Tensor, k: int, *,
                   n_queries: int = DEFAULT_RECALL_QUERIES, seed: int = 0) -> float:
    """Mean recall@k of :func:`index_topk` against exact top-k, on sampled anchors as queries."""
    from nofree.anchors.search.exact import cosine_topk

    n = anchors.shape[0]
    pick = torch.from_numpy(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    query = anchors[pick]
    _, exact = cosine_topk(query, anchors, k)
    _, found = index_topk(query, anchors, index, k)
    hits = sum(len(set(e.tolist()) & set(f.tolist())) for e, f in zip(exact, found))
    return hits / (k * len(pick))


def index_topk(query: Tensor, anchors: Tensor, index: AnchorIndex, k: int) -> tuple[Tensor, Tensor]:
    """Top-k cosines ``(Q, k)`` and anchor ids ``(Q, k)`` via the index's candidates.

    Same contract as :func:`nofree.anchors.search.exact.cosine_topk` (decreasing, ties by id): the
    index proposes ``index.refine * k`` candidates, whose cosines are computed exactly (float32)
    and the best k kept; rows for which the index finds fewer than k candidates (few IVF lists
    visited) are answered by exact search.
    """
    from nofree.anchors.search.exact import _canonical, cosine_topk

    query = query.float()
    ids = index.search(query, min(anchors.shape[0], max(k, index.refine * k)))
    values = torch.empty(ids.shape, dtype=torch.float32)
    block = max(1, _GATHER_FLOATS // max(1, k * anchors.shape[1]))
    for a in range(0, ids.shape[0], block):
        rows = ids[a:a + block]
        values[a:a + block] = torch.einsum("qkd,qd->qk", anchors[rows.clamp(min=0)], query[a:a + block])
    values[ids < 0] = -math.inf
    values, order = values.sort(dim=1, descending=True, stable=True)
    values, ids = values[:, :k].contiguous(), ids.gather(1, order)[:, :k].contiguous()
    short = (ids < 0).any(dim=1)
    if bool(short.any()):
        values[short], ids[short] = cosine_topk(query[short], anchors, k)
    return _canonical(values, ids)


def _prepared(anchors: AnchorSet, center: bool) -> dict[str, Tensor]:
    """Both sides as ASIF prepares them (unit rows; centred when ``center``)."""
    from nofree.anchors.relative import prepare_anchors

    return {modality: prepare_anchors(torch.as_tensor(getattr(anchors, modality)), modality, center=center)[0]
            for modality in MODALITIES}


def check_index_entry(entry: Any, file: Path) -> None:
    """Raise ``DataError`` naming ``file`` (a manifest) when its ``"index"`` entry lacks what
    :func:`add_index` writes (hand edits, other tools), instead of a ``KeyError`` later."""
    fix = (f"remove the \"index\" entry from {file}, or add the index again with `nofree anchors "
           f"index {file.parent} --factory ...`")
    if not isinstance(entry, dict) or not isinstance(entry.get("factory"), str):
        raise DataError(f"{file}: the \"index\" entry is not an object with a \"factory\" string; {fix}")
    if entry.get("search") not in ("index", "exact"):
        raise DataError(f"{file}: the \"index\" entry's \"search\" is {entry.get('search')!r}, "
                        f"expected \"index\" or \"exact\"; {fix}")
    if entry["search"] == "exact":
        return
    sides = entry.get("sides")
    if not isinstance(sides, dict) or not sides or not set(sides) <= set(MODALITIES):
        raise DataError(f"{file}: the \"index\" entry has no \"sides\" (an object keyed by "
                        f"{' / '.join(MODALITIES)}); {fix}")
    wanted = {"k": int, "recall_at_k": (int, float), "bytes": int}
    for modality, side in sides.items():
        bad = [key for key, kind in wanted.items() if not isinstance(side, dict) or
               not isinstance(side.get(key), kind) or isinstance(side.get(key), bool)]
        if bad or not isinstance(side.get("nprobe"), (int, type(None))) or \
                not isinstance(side.get("refine", DEFAULT_REFINE), int):
            raise DataError(f"{file}: the \"index\" entry's {modality} side lacks valid "
                            f"{', '.join(bad) or 'nprobe / refine'}; {fix}")


def _write_manifest_entry(path: Path, entry: dict | None) -> None:
    manifest = read_manifest(path)
    if entry is None:
        manifest.pop("index", None)
    else:
        manifest["index"] = entry
    atomic_write_json(path / MANIFEST, manifest, indent=2)


def add_index(anchor_dir: str | Path, factory: str, *, nprobe: int | None = None, center: bool | None = None,
              refine: int = DEFAULT_REFINE, recall_k: int | None = None,
              n_queries: int = DEFAULT_RECALL_QUERIES, anchors: AnchorSet | None = None) -> dict:
    """Train an index of ``factory`` on both sides of the set at ``anchor_dir`` and store it there.

    ``center`` defaults to ASIF's (:data:`~nofree.anchors.asif.ASIF_DEFAULTS`); ``recall_k`` to
    ASIF's default k (min(800, N)), which also sets the default ``nprobe`` of IVF indices
    (:func:`default_nprobe`; ignored by others); ``refine`` candidates per kept anchor are
    re-scored exactly (more: higher recall, slower). Returns the manifest entry written (with the
    measured recall per side, or ``"search": "exact"`` and the reason when the set is too small to
    train the index).
    """
    from nofree.anchors.asif import ASIF_DEFAULTS, default_k

    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 1:
        raise DataError(f"refine must be a positive whole number of candidates per kept anchor, got {refine!r}")
    faiss = _faiss()
    path = Path(anchor_dir)
    anchors = anchors if anchors is not None else AnchorSet.load(path)
    center = ASIF_DEFAULTS["center"] if center is None else bool(center)
    k = min(recall_k or default_k(len(anchors)), len(anchors))
    entry: dict[str, Any] = {"factory": factory, "center": center, "search": "index", "sides": {}}
    built: dict[str, Any] = {}
    for modality, vectors in _prepared(anchors, center).items():  # train both before writing either
        start = time.perf_counter()
        index, reason = train_index(vectors.cpu(), factory)
        if index is None:
            log.warning("%s: %s", path, reason)
            entry, built = {"factory": factory, "center": center, "search": "exact", "reason": reason}, {}
            break
        probes = (nprobe or default_nprobe(index, k)) if faiss.try_extract_index_ivf(index) else None
        if probes is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(probes))
        recall = measure_recall(AnchorIndex(modality, factory, center, probes, index, refine), vectors.cpu(), k,
                                n_queries=n_queries)
        built[modality] = index
        entry["sides"][modality] = {"file": INDEX_FILES[modality], "nprobe": probes, "refine": refine,
                                    "recall_at_k": round(recall, 4), "k": k,
                                    "recall_queries": min(n_queries, len(anchors)),
                                    "build_s": round(time.perf_counter() - start, 2)}
        log.info("%s: %s index on the %s side, recall@%d = %.3f", path, factory, modality, k, recall)
    for modality, file in INDEX_FILES.items():
        if modality not in built:
            (path / file).unlink(missing_ok=True)
            continue
        with atomic_path(path / file) as tmp:
            faiss.write_index(built[modality], str(tmp))
        entry["sides"][modality]["bytes"] = (path / file).stat().st_size
    _write_manifest_entry(path, entry)
    return entry


def load_indexes(anchor_dir: str | Path, *, nprobe: int | None = None) -> dict[str, AnchorIndex]:
    """The set's indices by modality (empty when it has none or fell back to exact search)."""
    path = Path(anchor_dir)
    manifest = read_manifest(path)
    entry = manifest.get("index")
    if not entry or entry.get("search") != "index":
        return {}
    faiss = _faiss()
    dims = {"image": manifest["image_dim"], "text": manifest["text_dim"]}
    out = {}
    for modality in MODALITIES:
        side = entry["sides"].get(modality)
        if side is None:
            continue
        file = path / INDEX_FILES[modality]
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as err:
            raise DataError(f"{file} is missing or unreadable ({str(err).splitlines()[-1]}); add the "
                            f"index again with `nofree anchors index {path} --factory ...`") from None
        if index.ntotal != manifest["n_anchors"] or index.d != dims[modality]:
            raise DataError(f"{file} covers {index.ntotal} x {index.d} but the set has "
                            f"{manifest['n_anchors']} x {dims[modality]} {modality} anchors: add the "
                            f"index again with `nofree anchors index {path} --factory ...`")
        probes = nprobe or side.get("nprobe")
        if probes is not None and faiss.try_extract_index_ivf(index) is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(probes))
        out[modality] = AnchorIndex(modality, entry["factory"], bool(entry["center"]), probes, index,
                                    int(side.get("refine", DEFAULT_REFINE)))
    return out
