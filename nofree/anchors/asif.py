"""The ASIF estimator: paired anchors turn two frozen unimodal encoders into one image–text model.

Norelli, Fumero, Maiorca, Moschella, Rodolà, Locatello (2022), "ASIF: Coupled Data Turns
Unimodal Models to Multimodal Without Training" (NeurIPS 2023). An image and a text are compared
through their relative representations over N anchor pairs: rho_img(x) lists x's k nearest image
anchors, rho_txt(y) y's k nearest caption anchors, and the similarity is <rho_img(x), rho_txt(y)>
(the math lives in :mod:`nofree.anchors.relative`). Zero-shot classification takes the class
prompt of highest similarity.

scikit-learn conventions: hyperparameters only in ``__init__``; :meth:`ASIF.fit` stores the
(prepared) anchors in attributes ending in ``_``; :meth:`transform`, :meth:`similarity` and
:meth:`predict` use them.

Defaults. ``ASIF()`` uses nofree's settings, :data:`ASIF_DEFAULTS`, the ones ``AsifPipeline`` and
every CLI command use too (one definition, here): the paper's k = min(800, N), each modality
centred on its anchor mean, a milder power p = 2 and the CSLS hubness correction with 10
neighbours (Lample et al., 2018, "Word translation without parallel data":
``2·s(x, y) − r(x) − r(y)``, see :meth:`ASIF.hubness`). They were chosen by 5-fold
cross-validation on the coco-mini train split (anchors from 4/5 of the photos, text→image R@1 on
the rest): ``benchmarks/asif_quality.py``, reported in ``benchmarks/RESULTS.md``, section "ASIF
on coco-mini (embedded encoders only)" (CV R@1 0.459 with the paper's settings, 0.543 centred
with p = 2, 0.557 with CSLS K = 10 on top; the val split agrees). :meth:`ASIF.paper` gives the
paper's own settings, :data:`ASIF_PAPER` (k = 800 clipped to N, p = 8, no centring, no CSLS).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import Tensor

from nofree.anchors.relative import (SparseRelative, power_normalize, prepare_anchors, relative_topk,
                                     sparse_similarity)
from nofree.anchors.search.exact import DEFAULT_QUERY_CHUNK
from nofree.anchors.search.precision import (DEFAULT_ANCHOR_CHUNK, SCAN_PRECISIONS, AnchorStats, anchor_stats,
                                             resolve_precision)
from nofree.core import MODALITIES, DataError, NofreeError, l2_normalize, resolve_device

#: The paper's number of kept anchors per row (it used 1.6M anchors).
PAPER_K = 800
#: nofree's ASIF settings: ``ASIF()``, ``AsifPipeline`` and the CLI (see the module docstring for
#: the cross-validation that chose them). ``k=None`` means min(800, N).
ASIF_DEFAULTS = {"k": None, "p": 2.0, "center": True, "csls": 10}
#: The paper's settings (Norelli et al., 2022): ``ASIF.paper()``. ``k=None`` means min(800, N).
ASIF_PAPER = {"k": None, "p": 8.0, "center": False, "csls": 0}
#: CSLS compares a query with at most this many anchors of the other modality (a seeded random
#: subset of a larger set).
CSLS_REFERENCE = 10_000


def default_k(n_anchors: int) -> int:
    """k when none is given: the paper's 800, clipped to the number of anchors."""
    return min(PAPER_K, n_anchors)


def _anchor_pair(anchors: Any) -> tuple[Tensor, Tensor]:
    """``(image (N, Di), text (N, Dt))`` from an AnchorSet-like object or a 2-sequence."""
    if hasattr(anchors, "image") and hasattr(anchors, "text"):
        image, text = anchors.image, anchors.text
    elif isinstance(anchors, (tuple, list)) and len(anchors) == 2:
        image, text = anchors
    else:
        raise DataError("ASIF.fit expects an AnchorSet (or anything with .image and .text) or a pair "
                        f"(image_anchors, text_anchors); got {type(anchors).__name__}")
    return torch.as_tensor(image), torch.as_tensor(text)


class ASIF:
    """ASIF image–text similarity from paired anchors.

    Parameters (all keyword-only; defaults :data:`ASIF_DEFAULTS`, the paper's via :meth:`paper`):
        k: kept anchors per relative representation; ``None`` = ``min(800, N)``.
        p: power applied to the kept cosines (signed power, see :mod:`nofree.anchors.relative`).
        k_image, k_text: per-modality k overriding ``k`` (``None`` = use ``k``).
        center: subtract each modality's anchor mean from anchors and queries, then re-normalise.
        csls: CSLS hubness correction, the number of neighbours averaged in :meth:`hubness`
            (0: off, the plain ASIF similarity).
        precision: scan precision for the top-k search, ``"auto"`` | ``"fp32"`` | ``"bf16"`` |
            ``"int8"``; every choice returns the exact float32 top-k (see
            :mod:`nofree.anchors.search.exact`).
        anchor_chunk, query_chunk: chunk sizes bounding the memory of the scan (``anchor_chunk=None``:
            the measured best for the scan precision).
        search: ``"exact"`` (default) or ``"index"``: take top-k candidates from the anchor
            set's faiss index (:mod:`nofree.anchors.search.index`; pass ``indexes=`` to :meth:`fit`),
            re-scored exactly; approximate top-k sets, for sets too large to scan.
        device: where anchors live and the math runs (``None`` = CPU).

    Fitted attributes: ``anchors_`` (what was passed to fit), ``n_anchors_``, ``image_anchors_``
    ``(N, Di)`` and ``text_anchors_`` ``(N, Dt)`` (float32, unit rows, centred if asked),
    ``image_mean_``/``text_mean_`` (``(D,)`` or ``None``), ``k_image_``, ``k_text_``,
    ``image_dim_``, ``text_dim_``.
    """

    def __init__(self, *, k: int | None = ASIF_DEFAULTS["k"], p: float = ASIF_DEFAULTS["p"],
                 k_image: int | None = None, k_text: int | None = None,
                 center: bool = ASIF_DEFAULTS["center"], csls: int = ASIF_DEFAULTS["csls"],
                 precision: str = "auto", anchor_chunk: int | None = None,
                 query_chunk: int = DEFAULT_QUERY_CHUNK, search: str = "exact", device: Any = None) -> None:
        self.k = k
        self.p = p
        self.k_image = k_image
        self.k_text = k_text
        self.center = center
        self.csls = csls
        self.precision = precision
        self.anchor_chunk = anchor_chunk
        self.query_chunk = query_chunk
        self.search = search
        self.device = device

    @classmethod
    def paper(cls, **params: Any) -> "ASIF":
        """The paper's settings, :data:`ASIF_PAPER` (Norelli et al., 2022: k = 800, clipped to the
        number of anchors; p = 8; no centring; no CSLS); ``params`` override any of them."""
        return cls(**{**ASIF_PAPER, **params})

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters, ``{name: value}`` (scikit-learn's convention): ``ASIF(**a.get_params())``
        is an unfitted copy of ``a``."""
        names = ("k", "p", "k_image", "k_text", "center", "csls", "precision", "anchor_chunk", "query_chunk",
                 "search", "device")
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        defaults = ASIF().get_params()
        changed = [f"{n}={v!r}" for n, v in self.get_params().items() if v != defaults[n]]
        return f"ASIF({', '.join(changed)})"

    # --- fitting --------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) or not self.p > 0 \
                or self.p == float("inf"):
            raise DataError(f"ASIF p must be a positive finite number, got {self.p!r}")
        if isinstance(self.csls, bool) or not isinstance(self.csls, int) or self.csls < 0:
            raise DataError(f"ASIF csls must be a whole number of neighbours >= 0 (0 turns CSLS off), "
                            f"got {self.csls!r}")
        if self.precision not in SCAN_PRECISIONS:
            raise DataError(f"ASIF precision must be one of {SCAN_PRECISIONS}, got {self.precision!r}")
        if self.search not in ("exact", "index"):
            raise DataError(f"ASIF search must be 'exact' or 'index', got {self.search!r}")
        for name in ("anchor_chunk", "query_chunk"):
            value = getattr(self, name)
            if name == "anchor_chunk" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"ASIF {name} must be a positive integer"
                                f"{' or None' if name == 'anchor_chunk' else ''}, got {value!r}")

    def _resolve_k(self, name: str, n: int) -> int:
        value = getattr(self, name)
        if value is None and name != "k":
            value = self.k
            name = "k"
        if value is None:
            return default_k(n)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"ASIF {name} must be a positive integer or None, got {value!r}")
        if value > n:
            raise DataError(f"ASIF {name}={value} exceeds the number of anchors ({n}); pass "
                            f"{name} <= {n}, or k=None for min({PAPER_K}, N)")
        return value

    def _prepare(self, anchors: Tensor, modality: str, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Anchors as float32 unit rows on ``device``, centred when ``center``, and their mean."""
        return prepare_anchors(anchors.to(device), modality, center=self.center,
                               chunk=self.anchor_chunk or DEFAULT_ANCHOR_CHUNK)

    def fit(self, anchors: Any, *, indexes: dict | None = None) -> "ASIF":
        """Learn from N anchor pairs: an AnchorSet or ``(image (N, Di), text (N, Dt))``.

        ``indexes`` (``search="index"`` only): ``{modality: AnchorIndex}`` from
        :func:`nofree.anchors.search.index.load_indexes`; a side without one is searched exactly.
        """
        self._check_params()
        image, text = _anchor_pair(anchors)
        if image.ndim != 2 or text.ndim != 2:
            raise DataError(f"anchors must be 2-D: got image {tuple(image.shape)} and text "
                            f"{tuple(text.shape)}")
        if image.shape[0] != text.shape[0]:
            raise DataError(f"anchor counts disagree: {image.shape[0]} image rows, {text.shape[0]} text rows")
        n = int(image.shape[0])
        if n == 0:
            raise DataError("the anchor set is empty: build it from at least one (image, caption) pair")
        k_image, k_text = self._resolve_k("k_image", n), self._resolve_k("k_text", n)
        device = resolve_device(self.device)
        self.image_anchors_, self.image_mean_ = self._prepare(image, "image", device)
        self.text_anchors_, self.text_mean_ = self._prepare(text, "text", device)
        self.anchors_ = anchors
        self.n_anchors_ = n
        self.k_image_, self.k_text_ = k_image, k_text
        self.image_dim_, self.text_dim_ = int(image.shape[1]), int(text.shape[1])
        self.device_ = device
        self._stats: dict[tuple[str, str], AnchorStats] = {}
        self._reference: dict[str, SparseRelative] = {}
        # CSLS r(q) of relative representations given again and again (a caption pool's), for as
        # long as the caller holds them
        self._hubness: weakref.WeakKeyDictionary[SparseRelative, Tensor] = weakref.WeakKeyDictionary()
        self.indexes_ = self._check_indexes(indexes or {}, n)
        return self

    def _check_indexes(self, indexes: dict, n: int) -> dict:
        if self.search == "exact":
            return {}
        for modality, index in indexes.items():
            if index.center != self.center:
                raise DataError(f"the {modality} index was built with center={index.center} but this ASIF "
                                f"has center={self.center}: its candidates would rank other vectors. Use "
                                f"center={index.center} or add the index again with that setting")
            if index.index.ntotal != n:
                raise DataError(f"the {modality} index covers {index.index.ntotal} anchors, not {n}")
        if not indexes:
            logging.getLogger(__name__).warning(
                "search='index' but the anchor set has no usable index (none added, or too few anchors "
                "to train one): using exact search")
        return dict(indexes)

    # --- using it -------------------------------------------------------------------------------
    def _fitted(self) -> None:
        if not hasattr(self, "n_anchors_"):
            raise NofreeError("this ASIF is not fitted yet: call .fit(anchors) first")

    def _queries(self, emb: Any, modality: str) -> Tensor:
        if modality not in MODALITIES:
            raise DataError(f"modality must be one of {MODALITIES}, got {modality!r}")
        x = torch.as_tensor(emb)
        if x.ndim != 2:
            raise DataError(f"{modality} embeddings must be 2-D (n, dim), got shape {tuple(x.shape)}")
        dim = self.image_dim_ if modality == "image" else self.text_dim_
        if x.shape[1] != dim:
            spec = getattr(self.anchors_, f"{modality}_spec", None)
            hint = f" ({spec})" if spec else ""
            raise DataError(f"{modality} embeddings have {x.shape[1]} dims but the fitted {modality} anchors "
                            f"have {dim}: encode with the {modality} encoder that built the anchors{hint}")
        x = l2_normalize(x.to(self.device_))
        mean = self.image_mean_ if modality == "image" else self.text_mean_
        return x if mean is None else l2_normalize(x - mean)

    def transform(self, emb: Any, *, modality: str) -> SparseRelative:
        """rho of ``emb (n, D)`` over the ``modality`` anchors: a :class:`SparseRelative` (n, N)."""
        self._fitted()
        x = self._queries(emb, modality)
        anchors = self.image_anchors_ if modality == "image" else self.text_anchors_
        k = self.k_image_ if modality == "image" else self.k_text_
        if modality in getattr(self, "indexes_", {}):
            cosines, indices = self.indexes_[modality].topk(x.cpu(), anchors.cpu(), k)
            cosines, indices = cosines.to(self.device_), indices.to(self.device_)
            return SparseRelative(power_normalize(cosines, float(self.p)), indices, cosines, self.n_anchors_)
        precision = resolve_precision(self.precision, self.n_anchors_, self.device_)
        stats = None
        if precision != "fp32":
            key = (modality, precision)
            if key not in self._stats:
                self._stats[key] = anchor_stats(anchors, precision,
                                                   chunk=self.anchor_chunk or DEFAULT_ANCHOR_CHUNK)
            stats = self._stats[key]
        return relative_topk(x, anchors, k, float(self.p), precision=precision, stats=stats,
                             anchor_chunk=self.anchor_chunk, query_chunk=self.query_chunk)

    def _relative(self, emb: Any, modality: str) -> SparseRelative:
        """rho of ``emb``: embeddings are transformed, a :class:`SparseRelative` is checked and kept."""
        if not isinstance(emb, SparseRelative):
            return self.transform(emb, modality=modality)
        if emb.n_anchors != self.n_anchors_:
            raise DataError(f"relative representation over {emb.n_anchors} anchors given to an ASIF "
                            f"fitted on {self.n_anchors_}")
        return emb

    def similarity(self, image_emb: Any, text_emb: Any) -> Tensor:
        """``(n_images, n_texts)`` float32 ASIF similarities ⟨rho_img, rho_txt⟩, CSLS-corrected when
        ``csls`` > 0: ``2·s(x, y) − r(x) − r(y)`` with r from :meth:`hubness`.

        Either argument may be embeddings ``(n, D)`` or the :class:`SparseRelative` that
        :meth:`transform` returned for it (to reuse a caption pool's representations).
        """
        self._fitted()
        rho_i, rho_t = self._relative(image_emb, "image"), self._relative(text_emb, "text")
        sim = sparse_similarity(rho_i.values, rho_i.indices, rho_t.values, rho_t.indices, self.n_anchors_)
        if not self.csls:
            return sim
        r_image = self._hubness_of(rho_i, "image", keep=rho_i is image_emb)
        r_text = self._hubness_of(rho_t, "text", keep=rho_t is text_emb)
        return 2 * sim - r_image[:, None] - r_text[None, :]

    def hubness(self, emb: Any, modality: str) -> Tensor:
        """CSLS r(q) ``(n,)`` of queries of ``modality`` (embeddings or their :class:`SparseRelative`):
        the mean of the ``csls`` highest plain ASIF similarities of each query to the other
        modality's anchors (at most :data:`CSLS_REFERENCE` of them, a seeded random subset beyond)."""
        self._fitted()
        if self.csls < 1:
            raise DataError("hubness needs csls >= 1 neighbours; this ASIF has csls=0 (CSLS off)")
        rho = self._relative(emb, modality)
        return self._hubness_of(rho, modality, keep=rho is emb)

    def _hubness_of(self, rho: SparseRelative, modality: str, *, keep: bool) -> Tensor:
        """r(q) of relative representations; ``keep``: remember it for this very object (a caption
        pool's, given again and again) while it lives."""
        if rho in self._hubness:
            return self._hubness[rho]
        other = "text" if modality == "image" else "image"
        if other not in self._reference:
            side = _anchor_pair(self.anchors_)[0 if other == "image" else 1]
            if len(side) > CSLS_REFERENCE:
                pick = torch.randperm(len(side), generator=torch.Generator().manual_seed(0))[:CSLS_REFERENCE]
                side = side[pick]
            self._reference[other] = self.transform(side, modality=other)
        ref = self._reference[other]
        if modality == "image":
            sim = sparse_similarity(rho.values, rho.indices, ref.values, ref.indices, self.n_anchors_)
        else:
            sim = sparse_similarity(ref.values, ref.indices, rho.values, rho.indices, self.n_anchors_).T
        r = sim.topk(min(self.csls, sim.shape[1]), dim=1).values.mean(1)               # (n,)
        if keep:
            self._hubness[rho] = r
        return r

    def predict(self, image_emb: Any, class_text_emb: Any) -> Tensor:
        """Zero-shot class ``(n_images,)`` int64: the class prompt of highest similarity."""
        return self.similarity(image_emb, class_text_emb).argmax(dim=1)
