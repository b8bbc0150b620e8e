"""Building anchor sets: from pairs (locally or on Ray), extending them, importing embeddings.

``shards.py`` is the shard format both engines write (encoded pairs, written atomically,
resumed), ``local.py`` builds and extends sets in this process, ``ray.py`` encodes the shards on
a pool of Ray actors, and ``import_embeddings.py`` turns clip-retrieval output into a set.
``from nofree.anchors.build import build_anchor_set`` loads only what that name needs (PEP 562).
"""
from __future__ import annotations

from nofree._lazy import lazy_getattr

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "build_anchor_set": "nofree.anchors.build.local",
    "extend_anchor_set": "nofree.anchors.build.local",
    "encode_pairs_resumably": "nofree.anchors.build.local",
    "encode_pairs_ray": "nofree.anchors.build.ray",
    "DEFAULT_SHARD_SIZE": "nofree.anchors.build.shards",
    "DEFAULT_CHECKPOINT_S": "nofree.anchors.build.shards",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("nofree.anchors.build", _LAZY, globals())
