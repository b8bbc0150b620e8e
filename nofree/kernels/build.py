"""Compiling nofree's C kernels (the C files in this folder) on first use, and loading them.

The sources are compiled together into one shared library:

* ``select.c``: the low-precision anchor scan of :mod:`nofree.anchors.search.exact` spends about
  as long *selecting* the candidates from each score tile as the int8 matmul takes to make it; in
  torch that selection is a chain of whole-tile operations (group maxima, compare, nonzero,
  gather, histogram). The C helpers do it in one pass over the tile, and also re-quantise anchor
  chunks, prune the candidates and rank each row's best.
* ``int8_gemm.c``: on CPUs with AVX-512 VNNI, the int8 scan's matmul itself, with the selection
  fused in (:mod:`nofree.anchors.search.int8_gemm`).
* ``attention.c``: attention over a list of visible keys per query, for the CLIP scorer's prefix
  tree of candidate texts (:mod:`nofree.decoding.attention`).

They are optional: every kernel has a torch twin (``exact.py``; the fused matmul: ``torch._int_mm``
and the tile-wise selection; ``attention.py``: masked ``scaled_dot_product_attention``) with the
same results (bit-identical for the scan), used when no C compiler is found, when compiling
fails, or when ``NOFREE_NATIVE=0``. Nothing but :mod:`nofree.kernels.bindings` calls into the
library: it declares the C prototypes and checks the tensors it hands over.

The shared library is built with the system C compiler (``$CC``, else ``cc``) from every source
here into ``$NOFREE_CACHE/native/<key>/`` (default ``~/.cache/nofree``), keyed by the sources,
the compiler command and this CPU, written to a temporary name and renamed
(:func:`nofree.artifacts.atomic_path`), so concurrent first uses and interrupted builds never
leave a half-written library behind.

Loading a shared library runs its code, so a library is loaded only when it is the one nofree
built: each build writes ``nofree_kernels.so.sha256.json`` beside it (the build key and the
library's sha256), and a library without a record that matches its key and its bytes is rebuilt,
never loaded. A cache folder that other users may write to is warned about, since whoever can
write there can replace both files.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from nofree.artifacts import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
#: compiled together into one library; the headers they include are part of its key
SOURCES = (FOLDER / "select.c", FOLDER / "int8_gemm.c", FOLDER / "attention.c")
HEADERS = (FOLDER / "candidates.h", FOLDER / "jobs.h")
LIBRARY = "nofree_kernels.so"
#: written beside the library by the build: {"key": build key, "sha256": the library's sha256}
RECORD = LIBRARY + ".sha256.json"
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-pthread")
#: tried first; dropped when the compiler rejects it (the key includes the CPU either way)
ARCH_FLAGS = ("-march=native",)


class _CompileError(Exception):
    """The compiler's complaint about a build."""


def enabled() -> bool:
    """False when ``NOFREE_NATIVE`` is set to 0/false/no/off."""
    return os.environ.get("NOFREE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_fingerprint() -> str:
    """What the compiled code may depend on when built with -march=native."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _cache_dir() -> Path:
    from nofree.cache import default_cache_root

    return default_cache_root() / "native"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path, key: str) -> bool:
    """Whether ``target`` is the library nofree built for ``key``: the record beside it names
    that key and the sha256 of the file's current bytes."""
    try:
        record = json.loads((target.parent / RECORD).read_text(encoding="utf-8"))
        return isinstance(record, dict) and record.get("key") == key and record.get("sha256") == _sha256(target)
    except (OSError, ValueError):
        return False


def _warn_if_shared(folders: list[Path]) -> None:
    """One warning for each existing folder of the kernel cache that group or others may write."""
    for folder in folders:
        try:
            mode = folder.stat().st_mode
        except OSError:
            continue
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("%s is writable by other users (mode %s): anyone who can write there could "
                        "replace nofree's native library; run `chmod go-w %s` or set NOFREE_CACHE to a "
                        "private folder", folder, stat.filemode(mode), folder)


def _compile(compiler: list[str], flags: tuple[str, ...], target: Path, key: str) -> str | None:
    """Build the library at ``target`` (atomically) with its sha256 record for ``key``; the
    compiler's complaint on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=target.parent):  # can files be created there at all?
            pass
    except OSError as exc:
        return f"cannot write the library under {target.parent}: {exc}"
    try:
        with atomic_path(target) as tmp:
            done = subprocess.run([*compiler, *flags, *map(str, SOURCES), "-o", str(tmp), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                complaint = (done.stderr or done.stdout).strip()[-600:]
                raise _CompileError(complaint or f"exit status {done.returncode}")
            # the record first: a reader that sees it with the previous library rebuilds, never loads
            atomic_write_json(target.parent / RECORD, {"key": key, "sha256": _sha256(tmp), "library": LIBRARY})
        return None
    except (_CompileError, OSError, subprocess.SubprocessError) as exc:
        return str(exc)


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed; None (torch fallback) when unavailable. Its
    functions are declared and called by :mod:`nofree.kernels.bindings` only."""
    if not enabled():
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc")
    errors: list[str] = []
    try:
        source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    except OSError as exc:  # an installation without the package's C files
        source, errors = b"", [f"cannot read {exc.filename}: {exc.strerror}"]
    if source:
        from nofree.cache import default_cache_root

        _warn_if_shared([default_cache_root(), _cache_dir()])
    for flags in (FLAGS + ARCH_FLAGS, FLAGS) if source else ():
        key = hashlib.sha256(source + repr((compiler, flags)).encode() + _cpu_fingerprint().encode()).hexdigest()
        target = _cache_dir() / key[:16] / LIBRARY
        if not _verified(target, key):
            if target.exists():
                log.warning("%s is not the library nofree built (no matching sha256 record beside it); "
                            "rebuilding it instead of loading it", target)
            start = time.perf_counter()
            error = _compile(compiler, flags, target, key)
            if error is not None:
                errors.append(f"{' '.join(compiler + list(flags))}: {error}")
                continue
            if not _verified(target, key):  # replaced again between the build and this check
                errors.append(f"{target} changed right after it was built; not loading it")
                continue
            log.info("built nofree's native kernels in %.1f s: %s", time.perf_counter() - start, target)
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
    log.warning("nofree's native kernels are unavailable (%s); the anchor scan and the CLIP scorer "
                "use their torch versions, which are slower. Install a C compiler (or set CC) to "
                "build them, or set NOFREE_NATIVE=0 to silence this.", "; ".join(errors) or "no compiler")
    return None
