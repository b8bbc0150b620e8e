"""What nofree writes: --overwrite replaces only its own artefacts, checksums, relative paths,
failed and concurrent builds, checkpoints inside a shard, unwritable destinations."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.build import build_anchor_set
from nofree.artifacts import (ADAPTER, ANCHOR_SET, REPORT, artifact_kind, check_replaceable, exclusive,
                              writing)
from nofree.cli import main
from nofree.core import DataError, OptionError
from nofree.testing import TinyImageEncoder, TinyTextEncoder
from tests.test_anchors import FIXTURE_V1, make_pairs


def tiny():
    return TinyImageEncoder(dim=6), TinyTextEncoder(dim=5)


def build(pairs, out, **kw):
    image_encoder, text_encoder = tiny()
    return build_anchor_set(pairs, image_encoder=image_encoder, text_encoder=text_encoder, out=out,
                            progress=False, **kw)


def photo_folder(folder: Path, n: int = 3) -> Path:
    """An image folder with .txt caption sidecars, as a user keeps photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (12, 10), (40 * i, 90, 200)).save(folder / f"x{i}.png")
        (folder / f"x{i}.txt").write_text(f"a photo number {i}\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    """A CLI runner whose encoder specs load the tiny deterministic encoders."""
    import nofree.registry

    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nofree.registry, "load_encoder",
                        lambda spec, modality=None, device=None: tiny()[0 if modality == "image" else 1])
    return CliRunner()


def cli_build(runner, pairs, out, *extra):
    return runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--out", str(out), *extra])


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(lines) == 1, result.output
    return lines[0]


# --- --overwrite ------------------------------------------------------------------------------
def test_overwrite_of_the_input_folder_is_refused_and_photos_stay(runner, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    before = snapshot(photos)
    line = one_line_error(cli_build(runner, photos, photos, "--overwrite"))
    assert str(photos) in line and "input" in line and "--out" in line
    pairs = make_pairs(tmp_path / "data")  # a JSONL file: its folder holds the images
    data_before = snapshot(tmp_path / "data")
    line = one_line_error(cli_build(runner, pairs, tmp_path / "data", "--overwrite"))
    assert "input" in line
    line = one_line_error(cli_build(runner, pairs, tmp_path, "--overwrite"))  # a folder above it
    assert "input" in line
    assert snapshot(photos) == before and snapshot(tmp_path / "data") == data_before


def test_overwrite_of_the_current_directory_or_a_stranger_folder_is_refused(runner, tmp_path,
                                                                            monkeypatch):
    pairs = make_pairs(tmp_path / "data")
    build(pairs, tmp_path / "set")
    monkeypatch.chdir(tmp_path / "set")  # even an anchor set, while it is the current directory
    line = one_line_error(cli_build(runner, pairs, ".", "--overwrite"))
    assert "current directory" in line
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    line = one_line_error(cli_build(runner, pairs, scratch, "--overwrite"))
    assert "is not an anchor set (no nofree manifest.json found)" in line
    assert (scratch / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="home folder"):
        check_replaceable(Path.home(), kind=ANCHOR_SET)
    with pytest.raises(DataError, match="it is /"):
        check_replaceable("/", kind=ANCHOR_SET)


def test_overwrite_replaces_an_anchor_set_atomically(tmp_path, monkeypatch):
    old = build(make_pairs(tmp_path / "a", n=3), tmp_path / "set")
    new_pairs = make_pairs(tmp_path / "b", n=5)

    import nofree.anchors.anchor_set as anchor_set_module

    def crash(folder):
        raise RuntimeError("killed before the swap")

    monkeypatch.setattr(anchor_set_module, "apply_umask", crash)
    with pytest.raises(RuntimeError):  # the new set dies written but not swapped in: old one intact
        build(new_pairs, tmp_path / "set", overwrite=True)
    monkeypatch.undo()
    assert len(AnchorSet.load(tmp_path / "set")) == len(old) == 6
    new = build(new_pairs, tmp_path / "set", overwrite=True)
    assert len(AnchorSet.load(tmp_path / "set")) == len(new) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "set"]  # no temp, old, lock
    (tmp_path / "empty").mkdir()
    assert len(build(new_pairs, tmp_path / "empty", overwrite=True)) == 10  # an empty folder is fine


def test_artifact_kinds_and_the_train_and_eval_checks(tmp_path):
    from nofree.adapters.checkpoint import check_out_dir
    from nofree.eval.report import EvalConfig, run_eval

    build(make_pairs(tmp_path / "data"), tmp_path / "set")
    adapter, report, other = tmp_path / "adapter", tmp_path / "report", tmp_path / "other"
    for folder, name, record in ((adapter, "config.json", {"format": "nofree-adapter", "kind": "lit"}),
                                 (report, "results.json", {"nofree_version": "0", "methods": {}}),
                                 (other, "config.json", {"model_type": "bert"})):
        folder.mkdir()
        (folder / name).write_text(json.dumps(record))
    assert [artifact_kind(f) for f in (tmp_path / "set", adapter, report, other)] == \
        [ANCHOR_SET, ADAPTER, REPORT, None]
    check_out_dir(adapter, resume=False, overwrite=True, inputs=[tmp_path / "data" / "pairs.jsonl"])
    for folder in (other, report, tmp_path / "data"):
        with pytest.raises(DataError, match="refusing to replace"):
            check_out_dir(folder, resume=False, overwrite=True,
                          inputs=[tmp_path / "data" / "pairs.jsonl"])
    config = EvalConfig(pairs=tmp_path / "data" / "pairs.jsonl", anchors=tmp_path / "set")
    with pytest.raises(DataError, match="input"):
        run_eval(config, ["asif"], out_dir=tmp_path / "data", overwrite=True, progress=False)
    with pytest.raises(DataError, match=r"not an eval report \(an adapter checkpoint found\)"):
        run_eval(config, ["asif"], out_dir=adapter, overwrite=True, progress=False)
    assert (adapter / "config.json").exists()


# --- checksums --------------------------------------------------------------------------------
def test_info_reports_a_bit_flip_and_loading_refuses_it(runner, tmp_path):
    build(make_pairs(tmp_path / "data"), tmp_path / "set")
    good = runner.invoke(main, ["anchors", "info", str(tmp_path / "set")])
    assert good.exit_code == 0 and "sha256 verified" in good.output
    file = tmp_path / "set" / "embeddings.safetensors"
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    file.write_bytes(bytes(raw))
    line = one_line_error(runner.invoke(main, ["anchors", "info", str(tmp_path / "set")]))
    assert "embeddings.safetensors" in line and "sha256" in line and "rebuild" in line
    quick = runner.invoke(main, ["anchors", "info", "--quick", str(tmp_path / "set")])
    assert quick.exit_code == 0 and "sizes match" in quick.output
    with pytest.raises(DataError, match="does not match the sha256"):
        AnchorSet.load(tmp_path / "set")


def test_v1_fixture_without_checksums_loads_and_says_so(runner):
    assert "files" not in json.loads((FIXTURE_V1 / "manifest.json").read_text())
    assert len(AnchorSet.load(FIXTURE_V1)) == 6
    result = runner.invoke(main, ["anchors", "info", str(FIXTURE_V1)])
    assert result.exit_code == 0 and "none recorded" in result.output


# --- relative paths and failed builds ---------------------------------------------------------
def test_a_folder_given_relative_to_the_current_directory_builds(runner, tmp_path, monkeypatch):
    photo_folder(tmp_path / "mydata")
    monkeypatch.chdir(tmp_path)
    result = cli_build(runner, "mydata", "set")
    assert result.exit_code == 0, result.output
    built = AnchorSet.load(tmp_path / "set")
    assert built.images[0] == str(tmp_path / "mydata" / "x0.png") and not built.meta["skipped_images"]


def test_a_build_that_encoded_nothing_leaves_nothing_behind(runner, tmp_path, monkeypatch):
    pairs = make_pairs(tmp_path / "data", n=3, corrupt=(0, 1, 2))
    line = one_line_error(cli_build(runner, pairs, tmp_path / "set"))
    assert "none of the 3 images" in line
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")
    assert left == ["data"]  # no set, no set.partial, no lock file
    for i in range(3):  # the images fixed, the same command builds (no stale "skipped" shards)
        Image.new("RGB", (12, 10), (10, 20, 30 * i)).save(tmp_path / "data" / f"img{i}.png")
    assert cli_build(runner, pairs, tmp_path / "set").exit_code == 0

    def broken(spec, modality=None, device=None):
        raise DataError(f"cannot load {spec}")

    import nofree.registry

    monkeypatch.setattr(nofree.registry, "load_encoder", broken)
    result = cli_build(runner, pairs, tmp_path / "other")
    assert "cannot load" in one_line_error(result)
    assert not (tmp_path / "other.partial").exists() and not (tmp_path / "other").exists()


# --- concurrency ------------------------------------------------------------------------------
def test_a_second_build_into_the_same_out_is_refused(tmp_path):
    pairs = make_pairs(tmp_path / "data")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from nofree.artifacts import exclusive
            with exclusive({str(tmp_path / 'set')!r}):
                print("locked", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match=rf"written by another nofree process \(pid {holder.pid}"):
            build(pairs, tmp_path / "set")
        assert not (tmp_path / "set").exists() and not (tmp_path / "set.partial").exists()
    finally:
        holder.communicate("", timeout=60)
    assert not (tmp_path / ".set.lock").exists()
    assert len(build(pairs, tmp_path / "set")) == 14  # the lock is gone with its holder


def test_the_lock_is_per_destination_and_reentrant_after_release(tmp_path):
    with exclusive(tmp_path / "a"):
        with exclusive(tmp_path / "b"):
            with pytest.raises(DataError, match="another nofree process"):
                with exclusive(tmp_path / "a"):
                    pass
    with exclusive(tmp_path / "a"):
        pass


# --- checkpoints inside a shard ---------------------------------------------------------------
def test_an_interrupted_small_build_keeps_its_pieces_and_resumes_exactly(tmp_path, monkeypatch):
    import nofree.anchors.build.shards as shards_module

    pairs = make_pairs(tmp_path / "data", n=7)
    reference = build(pairs, tmp_path / "ref", batch_size=2)  # one shard of 7 pairs, 4 pieces
    real, calls = shards_module._encode_piece, []

    def interrupted(chunk, *args, **kw):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third piece
        return real(chunk, *args, **kw)

    monkeypatch.setattr(shards_module, "_encode_piece", interrupted)
    with pytest.raises(KeyboardInterrupt):  # checkpoints by time would be every hour: Ctrl-C saves
        build(pairs, tmp_path / "set", batch_size=2, checkpoint_s=3600)
    saved = tmp_path / "set.partial" / "part-00000.safetensors"
    assert saved.exists() and not (tmp_path / "set.partial" / "shard-00000.safetensors").exists()
    calls.clear()
    resumed = build(pairs, tmp_path / "set", batch_size=2)
    assert calls == [2, 1], "the saved pieces must not be encoded again"
    assert torch.equal(resumed.image, reference.image) and torch.equal(resumed.text, reference.text)
    assert resumed.captions == reference.captions and resumed.images == reference.images


def test_pieces_are_saved_by_time_before_a_crash(tmp_path, monkeypatch):
    import nofree.anchors.build.shards as shards_module

    pairs = make_pairs(tmp_path / "data", n=7)
    real, calls = shards_module._encode_piece, []

    def crashing(chunk, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError  # no chance to save anything now
        return real(chunk, *args, **kw)

    monkeypatch.setattr(shards_module, "_encode_piece", crashing)
    with pytest.raises(MemoryError):
        build(pairs, tmp_path / "set", batch_size=2, checkpoint_s=0)  # save after every piece
    from safetensors import safe_open

    with safe_open(str(tmp_path / "set.partial" / "part-00000.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["pairs_done"]) == 4
    calls.clear()
    with pytest.raises(MemoryError):  # nothing saved by time: nothing left behind
        build(pairs, tmp_path / "other", batch_size=2, checkpoint_s=3600)
    assert not (tmp_path / "other.partial").exists()


# --- unwritable destinations ------------------------------------------------------------------
@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "no space left"),
                                         (errno.EACCES, "permission denied")])
def test_unwritable_destination_is_one_line(runner, tmp_path, monkeypatch, code, words):
    import safetensors.torch

    pairs = make_pairs(tmp_path / "data")

    def refuse(*args, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    line = one_line_error(cli_build(runner, pairs, tmp_path / "set"))
    assert str(tmp_path / "set") in line and words in line and "(--out)" in line


def test_safetensors_write_errors_are_mapped():
    from safetensors import SafetensorError

    with pytest.raises(DataError, match="cannot write /x/set: no space left"):
        with writing("/x/set"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(runner, tmp_path):
    pairs = make_pairs(tmp_path / "data")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = one_line_error(cli_build(runner, pairs, locked / "set"))
        assert "permission denied" in line
    finally:
        locked.chmod(0o755)


def test_training_checkpoint_write_failure_is_one_line(tmp_path, monkeypatch):
    from nofree.adapters.checkpoint import _save_checkpoint, check_out_dir

    class Adapter:
        def save_pretrained(self, directory, overwrite=False):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DataError, match=f"cannot write {tmp_path / 'run'}: no space left"):
        _save_checkpoint(Adapter(), None, tmp_path / "run", settings={}, epoch=1, step=1, history=[],
                         step_losses=[])

    import tempfile

    def read_only(*args, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(DataError, match="read-only"):  # found before any training
        check_out_dir(tmp_path / "run", resume=False, overwrite=False)


# --- anchors extend and AnchorSet.save ----------------------------------------------------------
def extend(path, pairs, **kw):
    from nofree.anchors.build import extend_anchor_set

    image_encoder, text_encoder = tiny()
    return extend_anchor_set(path, pairs, image_encoder=image_encoder, text_encoder=text_encoder,
                             progress=False, **kw)


def test_extend_refuses_pairs_kept_inside_the_set_and_deletes_nothing(tmp_path):
    build(make_pairs(tmp_path / "data", n=2), tmp_path / "set")
    more = make_pairs(tmp_path / "set" / "more", n=2)  # the user's photos inside the set's folder
    before = snapshot(tmp_path / "set")
    with pytest.raises(DataError, match=r"more.* lies inside the anchor set .*set, which extend "
                                        r"rewrites as a whole .* move the pairs and their images out"):
        extend(tmp_path / "set", more)
    assert snapshot(tmp_path / "set") == before
    assert not (tmp_path / "set.extend-partial").exists()


def test_a_failed_extend_leaves_no_partial_folder(tmp_path, monkeypatch):
    import nofree.anchors.build.shards as shards_module

    build(make_pairs(tmp_path / "data", n=2), tmp_path / "set")
    unreadable = make_pairs(tmp_path / "bad", n=2, corrupt=(0, 1))
    with pytest.raises(DataError, match="none of the 2 images"):
        extend(tmp_path / "set", unreadable)
    assert not (tmp_path / "set.extend-partial").exists()

    def broken(*args, **kw):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(shards_module, "_encode_piece", broken)
    with pytest.raises(RuntimeError):
        extend(tmp_path / "set", make_pairs(tmp_path / "more", n=2))
    assert not (tmp_path / "set.extend-partial").exists()
    assert len(AnchorSet.load(tmp_path / "set")) == 4  # the set itself is untouched


def test_extend_dedupe_skips_the_anchors_the_set_already_has(runner, tmp_path, caplog):
    pairs = make_pairs(tmp_path / "data", n=3)
    build(pairs, tmp_path / "set")
    with pytest.raises(DataError, match="every pair in .* is already in"):
        extend(tmp_path / "set", pairs, dedupe=True)
    assert "0 pair(s) list an image listed before and 6 caption(s) repeat" in caplog.text
    more = make_pairs(tmp_path / "more", n=2)
    lines = pairs.read_text().splitlines()[:1] + more.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"  # one pair the set has, two new ones
    mixed.write_text("\n".join(json.dumps({**json.loads(line), "image": str(folder / json.loads(line)["image"])})
                               for line, folder in zip(lines, [tmp_path / "data"] + [tmp_path / "more"] * 2))
                     + "\n")
    result = runner.invoke(main, ["anchors", "extend", str(tmp_path / "set"), "--pairs", str(mixed),
                                  "--dedupe"])
    assert result.exit_code == 0, result.output
    assert "now 10 anchors" in result.output  # 6 + 2 new pairs of 2 captions
    assert len(extend(tmp_path / "set", mixed)) == 16  # without --dedupe every pair is added


def test_save_with_overwrite_replaces_only_an_anchor_set(tmp_path, monkeypatch):
    anchors = build(make_pairs(tmp_path / "data", n=2), tmp_path / "set")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="it is not an anchor set"):
        anchors.save(scratch, overwrite=True)
    assert (scratch / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path / "set")
    with pytest.raises(DataError, match="current directory"):
        anchors.save(".", overwrite=True)
    monkeypatch.chdir(tmp_path)
    assert len(AnchorSet.load(anchors.save(tmp_path / "set", overwrite=True))) == 4


def test_the_interrupt_message_counts_the_saved_pairs(tmp_path, monkeypatch, caplog):
    import nofree.anchors.build.shards as shards_module

    pairs = make_pairs(tmp_path / "data", n=7)
    real, calls = shards_module._encode_piece, []

    def interrupted(chunk, *args, **kw):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt  # two pieces of 2 pairs done, both saved by the interrupt
        return real(chunk, *args, **kw)

    monkeypatch.setattr(shards_module, "_encode_piece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(pairs, tmp_path / "set", batch_size=2, checkpoint_s=3600)
    assert "interrupted after 4 of 7 pairs" in caplog.text


# --- errors name parameters; the command line writes them as flags ----------------------------
def test_build_errors_name_parameters_and_the_cli_writes_flags(runner, tmp_path):
    from nofree.core import OptionError

    pairs = make_pairs(tmp_path / "data")
    build(pairs, tmp_path / "set")
    with pytest.raises(OptionError) as caught:
        build(pairs, tmp_path / "set")
    assert "pass overwrite=True to replace it, or choose another out" in str(caught.value)
    line = one_line_error(cli_build(runner, pairs, tmp_path / "set"))
    assert "pass --overwrite to replace it, or choose another --out" in line
    with pytest.raises(OptionError, match="strict=True works with engine='local' only"):
        build(pairs, tmp_path / "other", strict=True, engine="ray")
    line = one_line_error(cli_build(runner, pairs, tmp_path / "other", "--strict", "--engine", "ray"))
    assert "--strict works with --engine local only" in line


# --- write-then-rename ------------------------------------------------------------------------
def test_atomic_path_renames_a_complete_file_and_leaves_nothing_when_the_write_fails(tmp_path):
    from nofree.artifacts import atomic_path, rename_aside

    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".file.bin.tmp-")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # replaced only when the block ends
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    assert rename_aside(target, ".corrupt") == tmp_path / "file.bin.corrupt"
    assert not target.exists() and rename_aside(target, ".corrupt") is None  # gone already


# --- waiting for a lock -----------------------------------------------------------------------
def test_a_waiting_lock_takes_its_turn_and_a_bounded_wait_gives_up(tmp_path):
    target = tmp_path / "model"
    held, release = threading.Event(), threading.Event()

    def holder():
        with exclusive(target):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        start = time.monotonic()
        with pytest.raises(OptionError, match=r"another nofree process \(pid \d+.*still held after 0.2 s\); "
                           r"wait for it to finish, or choose another NOFREE_CACHE"):
            with exclusive(target, "NOFREE_CACHE", wait=0.2):
                pass
        assert time.monotonic() - start >= 0.2
        with pytest.raises(OptionError, match="another nofree process"):  # wait=False: at once
            with exclusive(target):
                pass
        threading.Timer(0.2, release.set).start()
        with exclusive(target, wait=True):  # blocks until the holder lets go
            assert release.is_set()
            assert (tmp_path / ".model.lock").read_text() == str(os.getpid())
    finally:
        release.set()
        thread.join(60)
    assert not (tmp_path / ".model.lock").exists()
    with exclusive(target, wait=5):  # free: taken at once
        pass


# --- leftovers of interrupted writes ----------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    from nofree.artifacts import remove_temp_leftovers, temp_path

    dead, alive = _dead_pid(), os.getppid()
    leftover = tmp_path / f".a.bin.tmp-{dead}-0123abcd"
    mine = temp_path(tmp_path / "a.bin")  # this process is still writing it
    others = [mine, tmp_path / f".a.bin.tmp-{alive}-0123abcd", tmp_path / "a.bin",
              tmp_path / ".a.bin.lock", tmp_path / f".a.bin.tmp-{dead}",
              tmp_path / f".a.bin.tmp-{dead}-notahex",
              tmp_path / f"a.bin.tmp-{dead}-0123abcd", tmp_path / f".b.bin.tmp-{dead}-0123abcd"]
    for path in [leftover, *others]:
        path.write_bytes(b"x")
    (tmp_path / f".c.bin.tmp-{dead}-0123abcd").mkdir()  # a folder of that name is not a temp file
    assert remove_temp_leftovers(tmp_path, "a.bin") == [leftover]
    assert all(path.exists() for path in others) and not leftover.exists()
    assert remove_temp_leftovers(tmp_path) == [tmp_path / f".b.bin.tmp-{dead}-0123abcd"]
    assert (tmp_path / f".c.bin.tmp-{dead}-0123abcd").is_dir()


def test_temp_files_in_a_shared_folder_are_removed_by_age_only(tmp_path):
    from nofree.artifacts import remove_temp_leftovers

    dead = _dead_pid()
    young = tmp_path / f".embed-1.safetensors.tmp-{dead}-0123abcd"  # dead writer, but recent
    old = tmp_path / f".embed-2.safetensors.tmp-{os.getpid()}-0123abcd"  # old, whatever its pid
    other = tmp_path / ".embed-3.safetensors.corrupt"
    for path in (young, old, other):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert remove_temp_leftovers(tmp_path, "embed-*.safetensors", older_than=3600) == [old]
    assert young.exists() and other.exists()


# --- one file shipped in pieces ---------------------------------------------------------------
def _parts(folder: Path, pieces=(b"a" * 3000, b"", b"b" * 17)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(pieces):
        paths.append(folder / f"file.part{i}")
        paths[-1].write_bytes(data)
    whole = b"".join(pieces)
    return paths, whole, hashlib.sha256(whole).hexdigest()


def test_assemble_parts_joins_checks_and_cleans_up(tmp_path):
    from nofree.artifacts import assemble_parts

    parts, whole, sha = _parts(tmp_path / "pkg")
    target = tmp_path / "out" / "file.bin"
    target.parent.mkdir()
    stale = target.parent / f".file.bin.tmp-{_dead_pid()}-0123abcd"  # from a killed assembly
    stale.write_bytes(b"half")
    assert assemble_parts(parts, target, sha) == target
    assert target.read_bytes() == whole and sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_checksum_mismatch_leaves_no_partial_target(tmp_path):
    from nofree.artifacts import assemble_parts

    parts, _, sha = _parts(tmp_path / "pkg")
    parts[2].write_bytes(b"B" * 17)  # a damaged part
    target = tmp_path / "out" / "file.bin"
    with pytest.raises(DataError, match=r"^test:thing: the parts .*file.part0.*file.part2 do not join into "
                       r"the expected file \(sha256 [0-9a-f]{12}\.\.\. instead of " + sha[:12] +
                       r"\.\.\.\): a part is damaged or from another release; reinstall it$"):
        assemble_parts(parts, target, sha, what="test:thing", fix="reinstall it")
    assert list(target.parent.iterdir()) == []  # no target, no temporary file
    target.write_bytes(b"the old file")
    with pytest.raises(DataError):
        assemble_parts(parts, target, sha)
    assert target.read_bytes() == b"the old file" and len(list(target.parent.iterdir())) == 1
    with pytest.raises(DataError, match=r"cannot assemble file.bin: part .*absent is missing; reinstall it"):
        assemble_parts([*parts, tmp_path / "absent"], target, sha, fix="reinstall it")
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(OptionError, match=r"cannot write .*NOFREE_CACHE"):
        assemble_parts(_parts(tmp_path / "ok")[0], tmp_path / "a-file" / "x", sha, option="NOFREE_CACHE")
