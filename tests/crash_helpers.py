"""Crash injection for failure tests: encoders that kill their own process, as a crashed worker would.

They live with the tests, not in the package, since no user code should ever call ``os._exit``.
"""
from __future__ import annotations

import json
import os

from nofree.testing import TinyTextEncoder


class FailingTextEncoder(TinyTextEncoder):
    """For failure tests only: a :class:`TinyTextEncoder` (same spec, same embeddings) that
    appends each batch it encodes to ``log_file`` (one JSON list a line) and kills its own
    process, as a crashed or pre-empted worker would, when a text contains ``trigger`` while
    ``flag_file`` exists (``once``: removing the flag first, so a retry succeeds)."""

    def __init__(self, dim: int = 8, seed: int = 0, *, log_file: str, flag_file: str,
                 trigger: str = "poison", once: bool = False, device=None) -> None:
        super().__init__(dim, seed, device=device)
        self.log_file, self.flag_file, self.trigger, self.once = str(log_file), str(flag_file), trigger, once

    def encode(self, batch, *, batch_size: int = 32):
        with open(self.log_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(list(batch)) + "\n")
        if os.path.exists(self.flag_file) and any(self.trigger in text for text in batch):
            if self.once:
                os.remove(self.flag_file)
            os._exit(17)
        return super().encode(batch, batch_size=batch_size)
