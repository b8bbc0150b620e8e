"""Benchmarks: one module per section of RESULTS.md (see ``python -m benchmarks --help``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any, *, indent: int = 2) -> None:
    """Write a section's result ``data`` to ``path`` as JSON, atomically (a reader or an
    interrupted run never sees half a file), creating the folder."""
    from nofree.artifacts import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=indent, ensure_ascii=False, default=str)
