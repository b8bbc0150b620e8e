"""The Ray engine of `anchors build` on a local Ray: same set as the single-process build,
and a killed worker costs only its own shard (rerun encodes only what is missing)."""
from __future__ import annotations

import functools
import json
import logging
import os

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from nofree.anchors.anchor_set import AnchorSet  # noqa: E402
from nofree.anchors.build import build_anchor_set  # noqa: E402
from nofree.anchors.build.ray import encode_pairs_ray  # noqa: E402
from nofree.core import NofreeError, SpecError  # noqa: E402
from nofree.data.webdataset import scan_webdataset  # noqa: E402
from nofree.testing import TinyImageEncoder, TinyTextEncoder, make_webdataset  # noqa: E402
from tests.crash_helpers import FailingTextEncoder  # noqa: E402

IMAGE = functools.partial(TinyImageEncoder, dim=6)
TEXT = functools.partial(TinyTextEncoder, dim=5)
SHARD = 4


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, no dashboard, offline) for the whole module."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory):
    """18 good samples in 3 shards, and a 4th shard whose only sample is not an image."""
    import io
    import tarfile

    root = tmp_path_factory.mktemp("wds")
    make_webdataset(root, 18, per_shard=6, size=16)
    with tarfile.open(root / "00003.tar", "w") as tar:
        for name, data in (("bad.jpg", b"<html>404</html>"), ("bad.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def build(source, out, engine, **kw):
    return build_anchor_set(source, image_encoder=IMAGE, text_encoder=kw.pop("text", TEXT), out=out,
                            progress=False, shard_size=SHARD, batch_size=3, engine=engine, **kw)


def test_ray_build_equals_single_process_build(local_ray, webdataset, tmp_path):
    local = build(webdataset, tmp_path / "local", "local")
    ray_set = build(webdataset, tmp_path / "ray", "ray", workers=2)
    assert len(ray_set) == len(local) == 18
    assert local.meta["skipped_images"] == ray_set.meta["skipped_images"] == [f"{webdataset}/00003.tar#bad.jpg"]
    torch.testing.assert_close(ray_set.image, local.image)
    torch.testing.assert_close(ray_set.text, local.text)
    assert ray_set.captions == local.captions and ray_set.images == local.images  # same order
    a, b = (AnchorSet.load(tmp_path / name).manifest() for name in ("local", "ray"))
    assert a["sources"] == b["sources"] and a["image_spec"] == b["image_spec"] == IMAGE().spec
    assert not (tmp_path / "ray.partial").exists()


def failing(tmp_path, *, once=False):
    flag = tmp_path / "flag"
    flag.write_text("crash")
    log = tmp_path / "encoded.jsonl"
    return functools.partial(FailingTextEncoder, dim=5, log_file=str(log), flag_file=str(flag),
                             trigger="poison", once=once), flag, log


def encoded_shards(log) -> list[int]:
    """Shard index of every text batch the encoders saw (captions name their pair number)."""
    batches = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return sorted(int(batch[0].split()[-1]) // SHARD for batch in batches)


def poisoned(source, poison=14):
    """The first 18 pairs of ``source`` captioned "pair i"; pair ``poison`` kills its worker."""
    from nofree.core import Pair

    return [Pair(pair.image, (f"{'poison ' if i == poison else ''}pair {i}",))
            for i, pair in enumerate(scan_webdataset(source).pairs[:18])]


def test_killed_worker_then_rerun_encodes_only_missing_shards(local_ray, webdataset, tmp_path):
    pairs = poisoned(webdataset, poison=17)  # pair 17 (the last shard, 4) kills its worker
    text, flag, log = failing(tmp_path)
    work = tmp_path / "set.partial"
    with pytest.raises(NofreeError, match="run the same command again"):
        encode_pairs_ray(pairs, IMAGE, text, work, shard_size=SHARD, batch_size=3, workers=1,
                         max_retries=0, progress=False)
    done = {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.safetensors")}
    assert "shard-00004.safetensors" not in done and len(done) >= 1

    flag.unlink()  # the next run's workers survive
    log.unlink()
    rebuilt = build_anchor_set(pairs, image_encoder=IMAGE, text_encoder=text, out=tmp_path / "set",
                               progress=False, shard_size=SHARD, batch_size=3, engine="ray", workers=2)
    again = encoded_shards(log)
    assert 4 in again and not {int(name[6:11]) for name in done} & set(again), \
        "finished shards must not be encoded again"
    reference = build_anchor_set(pairs, image_encoder=IMAGE, text_encoder=TEXT, out=tmp_path / "ref",
                                 progress=False, shard_size=SHARD, batch_size=3)
    torch.testing.assert_close(rebuilt.image, reference.image)
    torch.testing.assert_close(rebuilt.text, reference.text)
    assert rebuilt.captions == reference.captions


def test_worker_crash_is_retried_within_the_run(local_ray, webdataset, tmp_path):
    pairs = poisoned(webdataset)
    text, flag, log = failing(tmp_path, once=True)  # the first crash removes the flag
    built = build_anchor_set(pairs, image_encoder=IMAGE, text_encoder=text, out=tmp_path / "set",
                             progress=False, shard_size=SHARD, batch_size=3, engine="ray", workers=1)
    assert len(built) == 18 and not flag.exists()
    # shards of 4 pairs are encoded in pieces of <= 3 (batch_size) pairs: 2 each, 1 for the last
    # shard's 2 pairs; only the piece that crashed (in shard 3) is encoded twice
    assert encoded_shards(log) == [0, 0, 1, 1, 2, 2, 3, 3, 3, 4]


def test_loaded_encoders_cannot_be_shipped_to_ray_workers(local_ray, webdataset, tmp_path):
    with pytest.raises(SpecError, match="spec string"):
        build(webdataset, tmp_path / "set", "ray", text=TinyTextEncoder(dim=5))


def test_cli_build_with_ray_engine_and_index(local_ray, webdataset, tmp_path):
    from click.testing import CliRunner

    from nofree.cli import main
    from nofree.testing import make_tiny_hf_text, make_tiny_hf_vision

    specs = [f"local:{make_tiny_hf_vision(tmp_path / 'vision')}", f"local:{make_tiny_hf_text(tmp_path / 'text')}"]
    result = CliRunner().invoke(main, ["anchors", "build", "--pairs", str(webdataset), "--engine", "ray",
                                       "--workers", "1", "--image-encoder", specs[0], "--text-encoder",
                                       specs[1], "--out", str(tmp_path / "set"), "--index", "IVF4,Flat"])
    assert result.exit_code == 0, result.output
    assert "18 anchors" in result.output and "1 unreadable image(s) or sample(s) skipped" in result.output
    assert "index        IVF4,Flat: not built, exact search" in result.output  # 18 anchors: too few
