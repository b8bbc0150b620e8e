"""The folders and files nofree writes: atomic writes, checksums, locks, and what may be replaced.

Everything a command leaves on disk (an anchor set, an adapter checkpoint, an eval report)
goes through these helpers:

* **atomic writes** — a file is written under a hidden temporary name beside its destination and
  renamed into place (``os.replace``), so a reader never sees half a file; a folder is written
  complete under a temporary name and swapped in by :func:`replace_dir`, the old one removed
  only after the swap;
* **checksums** — :func:`file_record` (size + sha256) and :func:`verify_files`, which checks
  recorded files cheaply (sizes) or fully (sha256 of every byte);
* **what ``overwrite`` may replace** — :func:`check_replaceable` accepts only a missing or
  empty folder or one that is recognisably the artefact the command writes
  (:func:`artifact_kind`), and never the command's input, the current directory, a folder
  above either, the home folder or ``/``;
* **one writer per destination** — :func:`exclusive` holds an ``flock`` on ``.NAME.lock`` beside
  the destination; a second writer stops at once with a one-line error, or waits its turn
  (``wait``) where the first one's result is what it needs (a model unpacked once into the cache);
* **leftovers of killed writes** — :func:`remove_temp_leftovers` deletes the temporary files
  (:func:`temp_path` names) whose writer is gone, and nothing else;
* **files shipped in pieces** — :func:`assemble_parts` joins parts end to end into one file,
  checked against its sha256 before it appears under its name;
* **write failures as one line** — :func:`writing` turns ``OSError`` and safetensors' write
  errors (read-only folder, full disk, no permission) into a :class:`DataError` naming the path
  and the fix.

Errors about the destination are :class:`~nofree.core.OptionError` s naming the caller's
parameter (``option``: :data:`OUT` unless the caller says otherwise; plain words such as
``"anchor set"`` where no parameter sets it), so the command line writes it as its flag.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from nofree.core import DataError, Option, OptionError

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock on this platform: writers are not serialised
    fcntl = None

#: Kinds of artefact, as :func:`artifact_kind` names them.
ANCHOR_SET = "anchor set"
ADAPTER = "adapter checkpoint"
REPORT = "eval report"

_KIND_HINTS = {ANCHOR_SET: "nofree manifest.json", ADAPTER: "nofree adapter config.json",
               REPORT: "nofree results.json"}

#: The parameter naming a destination, and the one asking to replace it, unless a caller says otherwise.
OUT = Option("out")
OVERWRITE = Option("overwrite", True)


# --- checksums ------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, as manifests record their data files."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def verify_files(folder: Path, records: dict[str, Any], *, full: bool, where: Path, fix: str) -> None:
    """Check the files of ``folder`` against ``records`` ({name: file_record}) from ``where``.

    Sizes always (catches truncation and replacement without reading the data); with ``full``
    also each file's sha256 (catches any changed byte). A mismatch is a :class:`DataError`
    naming the file and ending with ``fix``.
    """
    if not isinstance(records, dict):
        raise DataError(f"{where}: field 'files' is not a mapping of file records; {fix}")
    for name, record in records.items():
        file = folder / name
        if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) \
                or not isinstance(record.get("sha256"), str):
            raise DataError(f"{where}: the record of {name} is malformed; {fix}")
        if not file.is_file():
            raise DataError(f"{file} is missing (listed in {where}); {fix}")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise DataError(f"{file} is {size} bytes but {where} records {record['bytes']}: it was "
                            f"truncated or replaced; {fix}")
        if full and file_sha256(file) != record["sha256"]:
            raise DataError(f"{file} does not match the sha256 recorded in {where}: it was changed or "
                            f"damaged after it was written; {fix}")


# --- atomic writes --------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """A hidden, unique temporary name beside ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any, **dumps: Any) -> None:
    """``data`` as UTF-8 JSON (``dumps`` keywords to :func:`json.dumps`) written atomically."""
    atomic_write_bytes(path, (json.dumps(data, **dumps) + "\n").encode("utf-8"))


def temp_dir_beside(path: Path) -> Path:
    """A new hidden folder beside ``path``, to be filled and then moved there by :func:`replace_dir`."""
    path = Path(os.path.abspath(path))  # "." and ".." have no name to put a sibling beside
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def apply_umask(folder: Path) -> None:
    """Give a temp folder (created 0700), its subfolders and files the permissions the user's
    umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``; an existing ``dst`` is renamed aside first and
    deleted only after ``src`` is in place, so a crash leaves one whole folder (old or new)."""
    dst = Path(os.path.abspath(dst))
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# --- write failures as one line -------------------------------------------------------------
def _write_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a core dependency
        return (OSError,)
    return (OSError, SafetensorError)


def _reason(err: BaseException) -> tuple[str, str]:
    """(what went wrong, how to fix it) for a failed write."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code is None:  # safetensors reports the OS error inside its message
        lowered = text.lower()
        code = (errno.ENOSPC if "no space" in lowered or "storagefull" in lowered
                else errno.EROFS if "read-only" in lowered
                else errno.EACCES if "permission denied" in lowered else None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ("no space left on the device (or over quota)",
                "free some space or choose another destination")
    if code == errno.EROFS:
        return "the file system is read-only", "choose a writable destination"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied", "choose a folder you may write to or fix its permissions"
    detail = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
    return detail, "check the destination and try again"


@contextlib.contextmanager
def writing(path: str | os.PathLike, option: str | Option = OUT) -> Iterator[None]:
    """Turn a failed write inside the block into a one-line :class:`DataError` naming ``path``
    (the destination the caller gave as ``option``) and the fix."""
    try:
        yield
    except _write_errors() as err:
        what, fix = _reason(err)
        raise OptionError(f"cannot write {path}: {what}; {fix} (", option, ")") from err


def check_writable(path: str | os.PathLike, option: str | Option = OUT) -> None:
    """Raise a one-line :class:`DataError` now if files cannot be created at ``path`` (a folder,
    existing or to be created): probes the nearest existing folder with an unnamed temp file."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OptionError(f"cannot write {path}: {probe} is a file, not a folder; choose another ", option)
    with writing(path, option):
        with tempfile.TemporaryFile(dir=probe):
            pass


# --- what overwrite may replace -------------------------------------------------------------
def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def artifact_kind(folder: str | os.PathLike) -> str | None:
    """Which nofree artefact ``folder`` holds (:data:`ANCHOR_SET`, :data:`ADAPTER`, :data:`REPORT`),
    judged by the record nofree writes into each; ``None`` for anything else."""
    folder = Path(folder)
    manifest = _read_json(folder / "manifest.json")
    if isinstance(manifest, dict) and manifest.get("format") == "nofree-anchor-set":
        return ANCHOR_SET
    config = _read_json(folder / "config.json")
    state = _read_json(folder / "training" / "state.json")
    if (isinstance(config, dict) and config.get("format") == "nofree-adapter") or \
            (isinstance(state, dict) and state.get("format") == "nofree-training-state"):
        return ADAPTER
    results = _read_json(folder / "results.json")
    if isinstance(results, dict) and "nofree_version" in results and \
            isinstance(results.get("methods"), dict):
        return REPORT
    return None


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both real paths)."""
    return inner == outer or outer in inner.parents


def check_replaceable(target: str | os.PathLike, *, kind: str, inputs: Iterable[str | os.PathLike] = (),
                      option: str | Option = OUT, flag: Option | None = OVERWRITE) -> None:
    """Raise a one-line :class:`DataError` unless ``flag`` (the option asking for the
    replacement; ``None`` for a call that always rewrites its target) may replace ``target``.

    Allowed: a missing or empty folder, or a folder :func:`artifact_kind` recognises as ``kind``.
    Refused whatever it holds: ``/``, the home folder, the current directory or a folder above
    it, and any of ``inputs`` (files or folders the command reads: a file counts as its folder)
    or a folder above one of them.
    """
    real = _real(target)
    home = _real("~")
    refuse = [f"refusing to replace {target}", *([" with ", flag] if flag else [])]
    if real == real.parent or real == home or _within(home, real):
        raise OptionError(*refuse, f": it is {'/' if real == real.parent else 'your home folder'}; "
                          "choose another ", option)
    if _within(_real(os.getcwd()), real):
        raise OptionError(*refuse, ": it is the current directory or holds it; run the command from "
                          "another folder, or choose another ", option)
    for item in inputs:
        source = _real(item)
        folder = source if source.is_dir() else source.parent
        if _within(folder, real):
            raise OptionError(*refuse, f": it holds this command's input {item}; choose another ", option)
    if not real.exists():
        return
    if not real.is_dir():
        raise OptionError(*refuse, f": it is a file, not an {kind}; choose another ", option)
    if not any(real.iterdir()):
        return
    found = artifact_kind(real)
    if found != kind:
        held = f"an {found}" if found else f"no {_KIND_HINTS.get(kind, kind)}"  # every kind: a vowel
        raise OptionError(*refuse, f": it is not an {kind} ({held} found); delete it yourself if it is "
                          "disposable, or choose another ", option)


# --- one writer per destination -------------------------------------------------------------
def _take(fd: int, deadline: float | None) -> bool:
    """Lock ``fd`` exclusively: blocking when ``deadline`` is ``None``, else retrying until that
    ``time.monotonic()``; ``False`` when another process still holds it."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.1, left))


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, option: str | Option = OUT, *,
              wait: bool | float = False) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (``.NAME.lock`` beside it) for the block.

    While another process holds it, ``wait`` decides: ``False`` raises a one-line
    :class:`DataError` at once; ``True`` waits for the holder to release it; a number waits at most
    that many seconds, then raises. The lock file holds the holder's process id and is removed
    on release; a lock file left by a killed process holds no lock (``flock`` locks die with
    their process) and is simply reused.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    target = Path(os.path.abspath(target))
    lock = target.with_name(f".{target.name}.lock")
    deadline = None if wait is True else time.monotonic() + max(0.0, float(wait))
    with writing(target, option):
        lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with writing(target, option):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            taken = _take(fd, deadline)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            waited = f", still held after {float(wait):g} s" if wait is not False and wait > 0 else ""
            raise OptionError(f"{target} is being written by another nofree process (pid {holder}, lock "
                              f"{lock}{waited}); wait for it to finish, or choose another ", option)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed this lock file on release: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


# --- leftovers of interrupted writes ----------------------------------------------------------
#: the names :func:`temp_path` gives: ``.NAME.tmp-PID-XXXXXXXX``
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process, or another user's, counts)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # alive, but not ours to signal
        return True
    return True


def remove_temp_leftovers(folder: str | os.PathLike, names: str = "*", *,
                          older_than: float | None = None) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes (:func:`temp_path`, used by
    :func:`atomic_path` and :func:`atomic_write_bytes`) left in ``folder`` for destinations whose
    name matches the glob ``names``; returns the removed paths.

    Only files named as :func:`temp_path` names them (``.NAME.tmp-PID-XXXXXXXX``) are looked at.
    One is a leftover when its writer is gone: by default, when the process id in its name no
    longer runs on this machine (files of this process and of other users' live processes stay);
    with ``older_than`` (seconds), when it has not changed for that long whatever its process id,
    for folders that processes on other machines may share, where a process id says nothing. A
    file that cannot be removed stays for the next call.
    """
    removed = []
    now = time.time()
    for path in Path(folder).glob(f".{names}.tmp-*"):
        match = _TEMP_NAME.match(path.name)
        if match is None:
            continue
        try:
            if older_than is None:
                stale = not _running(int(match["pid"]))
            else:
                stale = now - path.lstat().st_mtime > older_than
            if stale:
                path.unlink()  # a folder of that name raises, and stays
                removed.append(path)
        except OSError:
            pass
    return removed


# --- one file shipped in pieces ---------------------------------------------------------------
def assemble_parts(parts: Sequence[str | os.PathLike], target: str | os.PathLike, sha256: str, *,
                   what: str = "", fix: str = "", option: str | Option = OUT) -> Path:
    """``target``: the files ``parts`` joined end to end, whose sha256 must be ``sha256`` (hex).

    A ``target`` that exists with that hash is returned as it is (after re-hashing it). Otherwise
    the parts are copied into a temporary file beside it (:func:`temp_path`), hashed on the way,
    flushed to disk and renamed over ``target`` only when the hash matches, so a crash, a full
    disk or a damaged part leaves ``target`` as it was and nothing under its name that would
    load; temporary files of copies whose process died are removed first
    (:func:`remove_temp_leftovers`). A missing part or a mismatch is a :class:`DataError`
    starting with ``what`` and ending with ``fix``; a failed write an :class:`OptionError` naming
    ``option``. Concurrent callers each write their own temporary file and the last rename wins
    (the files are identical).
    """
    target = Path(os.path.abspath(target))
    lead, tail = (f"{what}: " if what else ""), (f"; {fix}" if fix else "")
    if target.is_file() and file_sha256(target) == sha256:
        return target
    missing = [str(part) for part in parts if not Path(part).exists()]
    if missing or not parts:
        raise DataError(f"{lead}cannot assemble {target.name}: part {', '.join(missing) or '(none given)'} "
                        f"is missing{tail}")
    with writing(target, option):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_temp_leftovers(target.parent, glob.escape(target.name))
        tmp = temp_path(target)
        try:
            digest = hashlib.sha256()
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise DataError(f"{lead}the parts {', '.join(str(p) for p in parts)} do not join into the "
                                f"expected file (sha256 {digest.hexdigest()[:12]}... instead of "
                                f"{sha256[:12]}...): a part is damaged or from another release{tail}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


# --- write-then-rename for files another writer produces -------------------------------------
@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (:func:`temp_path`) for the block to write the file to
    (``safetensors.save_file``, an ``open`` of its own); renamed to ``path`` when the block ends,
    removed when it raises, so ``path`` holds its old content or the complete new file. A caller
    that needs the bytes on disk before the rename (a crash then never leaves an empty file under
    the final name) flushes and ``os.fsync`` s its handle inside the block."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the write is the one to report
            tmp.unlink(missing_ok=True)
        raise


def rename_aside(path: Path, suffix: str) -> Path | None:
    """Rename a damaged file to ``path`` + ``suffix`` (kept for a look, no longer read under its
    name); the new path, or ``None`` when it cannot be renamed (gone already, read-only folder)."""
    aside = path.with_name(path.name + suffix)
    try:
        os.replace(path, aside)
    except OSError:
        return None
    return aside
