"""Results stream out as they finish, an interrupt loses nothing finished, and every command
follows one rule for unreadable images (skip, report, go on; --strict stops at the first)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nofree.cache import EmbeddingCache
from nofree.cli import main
from tests.test_cli import build_set, runner, specs  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def anchor_set(runner, tmp_path, specs):  # noqa: F811
    """An anchor set, its image folder (8 images, 12 with copies) and a caption pool."""
    pairs, out, _ = build_set(runner, tmp_path, specs)
    folder = tmp_path / "data"
    for i in range(4):  # more images, so an interrupted run stops well before the end
        shutil.copy(folder / f"img{i}.png", folder / f"copy{i}.png")
    pool = tmp_path / "pool.txt"
    pool.write_text("a red bus\nphoto of a thing\n")
    return out, folder, pool


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.png"))


def _interrupted_run(args: list[str], sig: int, cache: Path, after_rows: int = 1):
    """Run ``nofree ARGS`` with slow image encoders, send ``sig`` once ``after_rows`` rows are
    out, and return (rows parsed from stdout, exit code, stderr)."""
    env = {**os.environ, "NOFREE_CACHE": str(cache), "NOFREE_TEST_DELAY": "0.4",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the child gets the default SIGINT disposition even when this test runs in a background job
    # (where SIGINT is ignored and Python would then install no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "tests.slow_cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = [proc.stdout.readline() for _ in range(after_rows)]
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(lines), f"the run ended before {after_rows} row(s) came out: {proc.stderr}"
    text = "".join(lines) + rest
    assert text.endswith("\n")  # no half-written last row
    return [json.loads(line) for line in text.splitlines()], proc.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_caption_run_keeps_its_finished_rows(anchor_set, tmp_path, sig, code):
    out, folder, pool = anchor_set
    images = _images(folder)
    rows, returncode, err = _interrupted_run(
        ["caption", "--method", "retrieval", "--anchors", str(out), "--pool", str(pool), "--format", "jsonl",
         "--batch-size", "1", *images], sig, tmp_path / "cache")
    assert returncode == code, err
    assert 1 <= len(rows) < len(images)
    assert [row["image"] for row in rows] == images[:len(rows)]
    assert all(row["caption"] in ("a red bus", "photo of a thing") for row in rows)
    assert "Traceback" not in err and "interrupted" in err


def test_an_interrupted_classify_run_keeps_rows_and_embeddings(anchor_set, tmp_path, specs):  # noqa: F811
    out, folder, _ = anchor_set
    images = _images(folder)
    cache = tmp_path / "cache"
    rows, returncode, err = _interrupted_run(
        ["classify", "--anchors", str(out), "--k", "4", "--label", "bus", "--label", "cat", "--format", "jsonl",
         "--batch-size", "1", *images], signal.SIGINT, cache, after_rows=2)
    assert returncode == 130 and "Traceback" not in err, err
    assert 2 <= len(rows) < len(images) and all(len(row["top"]) == 2 for row in rows)

    class Refuses:  # the image encoder's spec, refusing to encode: everything must be cached
        spec, modality, embed_dim = specs[0], "image", 0

        def encode(self, batch, **_):
            raise AssertionError(f"encoded again: {batch}")

    finished = [row["image"] for row in rows]
    assert len(EmbeddingCache(cache).encode(Refuses(), finished)) == len(finished)


def _corrupt(folder: Path) -> str:
    bad = folder / "img5.png"
    bad.write_bytes(b"not an image at all")
    return str(bad)


def test_classify_and_retrieve_skip_an_unreadable_image_and_report_it(runner, anchor_set, caplog):  # noqa: F811
    """The report is one logging warning (stderr in a real run; caplog here, in process)."""
    out, folder, pool = anchor_set
    bad = _corrupt(folder)
    images = _images(folder)
    result = runner.invoke(main, ["classify", "--anchors", str(out), "--k", "4", "--label", "bus", "--label",
                                  "cat", "--format", "jsonl", "--batch-size", "3", str(folder)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image"] for row in rows] == images
    (failed,) = [row for row in rows if "error" in row]
    assert failed["image"] == bad and failed["top"] is None and "img5.png" in failed["error"]
    assert all(len(row["top"]) == 2 for row in rows if row is not failed)
    assert "skipped 1 unreadable image(s): " + bad in caplog.text
    caplog.clear()

    table = runner.invoke(main, ["classify", "--anchors", str(out), "--k", "4", "--label", "bus", str(folder)])
    assert table.exit_code == 0 and "img5.png" not in table.stdout and "img5.png" in caplog.text
    caplog.clear()

    result = runner.invoke(main, ["retrieve", "--anchors", str(out), "--k", "4", "--query", "a red bus",
                                  "--top", "20", "--format", "jsonl", str(folder)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["results"]
    assert len(hits) == len(images) - 1 and bad not in [hit["image"] for hit in hits]
    assert caplog.text.count("skipped 1 unreadable image(s)") == 1
    caplog.clear()

    result = runner.invoke(main, ["retrieve", "--anchors", str(out), "--k", "4", "--image-query", images[0],
                                  "--image-query", bad, "--format", "jsonl", str(pool)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows[0]["results"]) == 2 and rows[1]["results"] is None and "img5.png" in rows[1]["error"]
    caplog.clear()

    result = runner.invoke(main, ["caption", "--method", "retrieval", "--anchors", str(out), "--pool", str(pool),
                                  "--format", "jsonl", str(folder)])
    assert result.exit_code == 0 and caplog.text.count("skipped 1 unreadable image(s)") == 1


@pytest.mark.parametrize("command", [
    ["classify", "--label", "bus"],
    ["retrieve", "--query", "a red bus"],
    ["caption", "--method", "retrieval"],
])
def test_strict_stops_at_the_first_unreadable_image_with_one_line(runner, anchor_set, command):  # noqa: F811
    out, folder, pool = anchor_set
    _corrupt(folder)
    extra = ["--pool", str(pool)] if command[0] == "caption" else ["--k", "4"]
    result = runner.invoke(main, [*command, "--anchors", str(out), *extra, "--strict", "--format", "jsonl",
                                  str(folder)])
    assert result.exit_code not in (0, None)
    message = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(message) == 1 and "img5.png" in message[0], result.stderr
    assert "Traceback" not in result.output
    # the rows finished before the bad image are out (classify and caption stream them)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all("error" not in row for row in rows)


@pytest.mark.parametrize("fmt", ["jsonl", "table"])
def test_rows_finished_before_an_interrupt_are_printed(capsys, fmt):
    from nofree.cli_output import stream_rows

    closed = []

    def rows():
        try:
            yield {"image": "a.png", "caption": "a cat"}
            yield {"image": "b.png", "caption": None, "error": "unreadable"}
            yield {"image": "c.png", "caption": "a dog"}
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    with pytest.raises(KeyboardInterrupt):
        stream_rows(rows(), fmt, ["image", "caption"])
    out = capsys.readouterr().out.splitlines()
    assert closed == [True]
    if fmt == "jsonl":
        assert [json.loads(line)["image"] for line in out] == ["a.png", "b.png", "c.png"]
    else:  # header + the finished rows; the unreadable one is reported on stderr, not here
        assert len(out) == 3 and out[1].split() == ["a.png", "a", "cat"] and "c.png" in out[2]


def test_anchors_build_reports_skipped_images_once_and_strict_stops(runner, tmp_path, specs, caplog):  # noqa: F811
    from tests.test_anchors import make_pairs

    pairs = make_pairs(tmp_path / "data", n=6, corrupt=(2, 4))
    build = ["anchors", "build", "--pairs", str(pairs), "--image-encoder", specs[0], "--text-encoder", specs[1]]
    result = runner.invoke(main, [*build, "--out", str(tmp_path / "set")])
    assert result.exit_code == 0 and "2 unreadable image(s) or sample(s) skipped" in result.output
    reports = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(reports) == 1 and "img2.png" in reports[0] and "img4.png" in reports[0]

    result = runner.invoke(main, [*build, "--out", str(tmp_path / "strict"), "--strict", "--batch-size", "1"])
    assert result.exit_code not in (0, None) and "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(message) == 1 and "img2.png" in message[0]
    assert not (tmp_path / "strict").exists()
