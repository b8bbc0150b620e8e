"""The nofree command line with slowed-down image encoders, for interrupt tests.

``python -m tests.slow_cli ARGS...`` runs ``nofree ARGS...``; every image encoder it loads sleeps
``NOFREE_TEST_DELAY`` seconds (default 0.5) before each batch, so a test can interrupt a run in
the middle, after its first results are out.
"""
from __future__ import annotations

import functools
import os
import time

import nofree.registry
from nofree.cli import main

_load_encoder = nofree.registry.load_encoder


@functools.wraps(_load_encoder)
def _slow_load_encoder(*args, **kwargs):
    encoder = _load_encoder(*args, **kwargs)
    if encoder.modality == "image":
        encode, delay = encoder.encode, float(os.environ.get("NOFREE_TEST_DELAY", "0.5"))

        def slow_encode(batch, **kw):
            time.sleep(delay)
            return encode(batch, **kw)

        encoder.encode = slow_encode
    return encoder


nofree.registry.load_encoder = _slow_load_encoder

if __name__ == "__main__":
    main(prog_name="nofree")
