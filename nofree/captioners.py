"""Re-exports :mod:`nofree.captioning` under ``nofree.captioners``, the import path existing code uses."""
from __future__ import annotations

from nofree.captioning.consensus import consensus_rerank, consensus_scores
from nofree.captioning.drafts import MAGIC_DEFAULTS, MAGIC_PAPER, PLAIN_PROMPT, MagicCaptioner, example_windows
from nofree.captioning.factory import caption_paths, iter_caption_paths, load_captioner
from nofree.captioning.retrieval import CONSENSUS_RERANK, RetrievalCaptioner
from nofree.core import clean_caption
from nofree.data.pool import default_pool_path

__all__ = ["CONSENSUS_RERANK", "MAGIC_DEFAULTS", "MAGIC_PAPER", "PLAIN_PROMPT", "MagicCaptioner",
           "RetrievalCaptioner", "caption_paths", "clean_caption", "consensus_rerank", "consensus_scores",
           "default_pool_path", "example_windows", "iter_caption_paths", "load_captioner"]
