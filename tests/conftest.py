"""Shared test setup: offline, deterministic, quiet."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield


@pytest.fixture(autouse=True, scope="session")
def _session_embedding_cache(tmp_path_factory):
    """The suite's embeddings go to a cache of its own, never into the user's: tests encode with tiny models
    in temporary folders, whose entries would outlive them there. Compiled kernels and assembled model
    weights (``native/``, ``models/``) are the same bytes whoever builds them, so the session's cache links
    to the user's folders rather than building them again. Tests that set ``NOFREE_CACHE`` themselves
    still get their own."""
    from nofree.cache import default_cache_root

    user = default_cache_root()
    root = tmp_path_factory.mktemp("nofree-cache")
    for shared in ("native", "models"):
        try:
            (user / shared).mkdir(parents=True, exist_ok=True)
            (root / shared).symlink_to(user / shared, target_is_directory=True)
        except OSError:  # an unwritable home: the session's cache builds its own copy
            pass
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NOFREE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny ops are dominated by thread hand-off on a busy
    machine with few cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_dir():
    """The bundled coco-mini sample (180 photos, pairs.jsonl, caption_corpus.txt)."""
    from nofree import sample_dir as _sample_dir

    return _sample_dir()
