"""Optional compiled helpers for the anchor scan, built on first use with the system C compiler.

``select.c`` holds the threshold selection over a score tile (:func:`select_above`), the loop that
dominates :func:`nofree.anchors.topk.cosine_topk` after the matmul when written in torch ops
(a max over column groups, a compare, ``nonzero``: three passes over every tile). It is plain C99,
compiled once per machine with ``$CC`` (default ``cc``) and ``-O3 -march=native`` into
``$NOFREE_CACHE/native/`` (atomically: a half-written library is never loaded) and called through
``ctypes``. Without a compiler, or with ``NOFREE_NATIVE=0``, :func:`library` returns None and the
scan uses torch ops: same results, slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("select.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99")
_FUNCS = {torch.int32: "nofree_select_i32", torch.int16: "nofree_select_i16", torch.float32: "nofree_select_f32"}
_CTYPES = {torch.int32: ctypes.c_int32, torch.int16: ctypes.c_int16, torch.float32: ctypes.c_float}
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines) or platform.processor()
    except OSError:
        return platform.machine() + platform.processor()


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The compiled helpers, building them on first call; None when they cannot be had."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("NOFREE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        log.info("no C compiler (%s) found: the anchor scan uses torch ops (slower, same results)", compiler)
        return None
    from nofree.cache import default_cache_root

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()
                         + _cpu_key().encode()).hexdigest()[:16]
    target = default_cache_root() / "native" / f"select-{key}.so"
    try:
        if not target.exists():
            _build(target, compiler)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("could not build the native anchor scan (%s); using torch ops instead", detail)
        return None
    for dtype, name in _FUNCS.items():
        fn = getattr(lib, name)
        ptr = ctypes.POINTER(_CTYPES[dtype])
        i32 = ctypes.POINTER(ctypes.c_int32)
        ll = ctypes.c_longlong
        fn.argtypes = [ptr, ll, ll, ll, ptr, i32, i32, ptr, ll]
        fn.restype = ll
    _lib = lib
    return lib


def select_above(s: Tensor, thr: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Entries ``s[r, c] >= thr[r]`` of a CPU tile ``s (R, C)`` (int32, int16 or float32, rows
    contiguous): ``(rows int32, cols int32, values)`` in row-major order. None without the library.

    Large tiles are split by rows over ``torch.get_num_threads()`` threads (the C loop runs
    without the GIL).
    """
    lib = library()
    if lib is None or s.dtype not in _FUNCS or s.device.type != "cpu" or s.stride(1) != 1:
        return None
    thr = thr.to(s.dtype).contiguous()
    rows = s.shape[0]
    threads = min(torch.get_num_threads(), rows // 256)
    if threads <= 1:
        return _select_rows(lib, s, thr)
    bounds = [rows * i // threads for i in range(threads + 1)]
    parts = list(_pool(threads).map(lambda i: _select_rows(lib, s[bounds[i]:bounds[i + 1]],
                                                           thr[bounds[i]:bounds[i + 1]]), range(threads)))
    return (torch.cat([p[0] + b for p, b in zip(parts, bounds)]), torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]))


_pools: dict[int, Any] = {}


def _pool(threads: int) -> Any:
    if threads not in _pools:
        from concurrent.futures import ThreadPoolExecutor

        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="nofree-select")
    return _pools[threads]


def _select_rows(lib: ctypes.CDLL, s: Tensor, thr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    fn = getattr(lib, _FUNCS[s.dtype])
    ptr = ctypes.POINTER(_CTYPES[s.dtype])
    i32 = ctypes.POINTER(ctypes.c_int32)
    rows, cols = s.shape
    cap = max(1024, rows * 8)
    while True:
        out_r = torch.empty(cap, dtype=torch.int32)
        out_c = torch.empty(cap, dtype=torch.int32)
        out_v = torch.empty(cap, dtype=s.dtype)
        n = fn(ctypes.cast(s.data_ptr(), ptr), rows, cols, s.stride(0), ctypes.cast(thr.data_ptr(), ptr),
               ctypes.cast(out_r.data_ptr(), i32), ctypes.cast(out_c.data_ptr(), i32),
               ctypes.cast(out_v.data_ptr(), ptr), cap)
        if n <= cap:
            return out_r[:n], out_c[:n], out_v[:n]
        cap = int(n)
