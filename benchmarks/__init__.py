"""Benchmarks: one module per section of RESULTS.md (see ``python -m benchmarks --help``)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock


def write_json(path: str | Path, data: Any, *, indent: int = 2) -> None:
    """Write a section's result ``data`` to ``path`` as JSON, atomically (a reader or an
    interrupted run never sees half a file), creating the folder."""
    from nofree.artifacts import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=indent, ensure_ascii=False, default=str)


@contextlib.contextmanager
def work_folder(given: Path | None, *, smoke: bool, default: str, prefix: str) -> Iterator[Path]:
    """The folder a section trains and evaluates in: ``given`` if set; else, at smoke size, a temporary
    folder deleted when the section ends (a smoke run writes hundreds of MB of tiny backbones and adapters,
    which nothing reads afterwards), holding the embedding cache too while it lasts, so that the entries of
    those backbones go with them; else ``default``, kept so that a rerun resumes."""
    if given is not None or not smoke:
        yield Path(given or default)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder, \
            mock.patch.dict(os.environ, {"NOFREE_CACHE": str(Path(folder) / "cache")}):
        yield Path(folder)
