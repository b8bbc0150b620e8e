"""Portable, shareable artefacts: no absolute paths in anchor sets or adapter folders,
``hf-hub:ORG/NAME[@REV]`` wherever such a folder is taken (offline, from a cache laid out as
huggingface_hub writes it), and ``nofree push`` (dry run, and the upload calls against a fake
``HfApi``; the network itself is never reached here)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from nofree.anchors.anchor_set import AnchorSet
from nofree.cli import main
from nofree.core import DataError, SpecError
from tests.test_anchors import make_pairs
from tests.test_train_cli import backbones  # noqa: F401  (fixture: tiny local:... specs)

pytestmark = pytest.mark.usefixtures("one_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
POOL = ["a red bus", "photo number 3", "a dog on grass", "a cat on a sofa"]


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "nofree-cache"))
    return CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _build(runner, backbones, pairs: Path, out: Path):
    _ok(runner.invoke(main, ["anchors", "build", "--pairs", str(pairs), "--image-encoder", backbones["image"],
                             "--text-encoder", backbones["text"], "--out", str(out)]))
    return out


def _no_absolute_paths(folder: Path, *roots: Path) -> None:
    """No file under ``folder`` holds the bytes of any of ``roots`` (absolute folders)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for file in files:
        data = file.read_bytes()
        for root in roots:
            for form in {str(root), os.path.realpath(root)}:
                assert form.encode() not in data, (file, form)


# --- relative paths ---------------------------------------------------------------------------
def test_a_set_moved_with_its_photos_keeps_working(runner, tmp_path, backbones):
    project = tmp_path / "project"
    pairs = make_pairs(project / "photos", n=6, corrupt=(5,))
    out = _build(runner, backbones, pairs, project / "set")
    _no_absolute_paths(out, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["image_root"] == "../photos"
    assert manifest["sources"][0]["pairs"] == "../photos/pairs.jsonl"
    assert manifest["skipped_images"] == ["../photos/img5.png"]

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    os.rename(project, moved)      # the set and its photo folder move together
    anchors = AnchorSet.load(moved / "set")
    assert anchors.images and all(Path(p).is_file() and Path(p).parent == moved / "photos" for p in anchors.images)
    assert anchors.meta["sources"][0]["pairs"] == str(moved / "photos" / "pairs.jsonl")

    info = _ok(runner.invoke(main, ["anchors", "info", str(moved / "set")])).output
    assert "image root   ../photos" in info and "source       ../photos/pairs.jsonl" in info
    assert json.loads(_ok(runner.invoke(main, ["anchors", "info", str(moved / "set"), "--format", "json"]))
                      .output)["format_version"] == 2
    photos = sorted(str(p) for p in (moved / "photos").glob("img[0-4].png"))
    classify = _ok(runner.invoke(main, ["classify", "--anchors", str(moved / "set"), "--label", "red bus",
                                        "--label", "photo", "--probabilities", "--format", "json", *photos[:2]]))
    assert [row["image"] for row in json.loads(classify.stdout)] == photos[:2]
    retrieve = _ok(runner.invoke(main, ["retrieve", "--anchors", str(moved / "set"), "--query", "a red bus",
                                        "--format", "json", str(moved / "photos" / "pairs.jsonl")]))
    assert json.loads(retrieve.stdout)[0]["results"]
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(POOL) + "\n")
    caption = _ok(runner.invoke(main, ["caption", "--method", "retrieval", "--anchors", str(moved / "set"),
                                       "--pool", str(pool), "--format", "json", photos[0]]))
    assert json.loads(caption.stdout)[0]["caption"] in POOL
    # the moved set's anchors are the moved photos: extending with the same pairs adds none
    extended = runner.invoke(main, ["anchors", "extend", str(moved / "set"), "--pairs",
                                    str(moved / "photos" / "pairs.jsonl"), "--limit", "5", "--dedupe"])
    assert extended.exit_code == 2 and "is already in" in extended.output


def test_images_inside_the_set_move_with_it(tmp_path):
    from nofree.testing import TinyImageEncoder, TinyTextEncoder

    set_dir = tmp_path / "set"
    images = tuple(str(set_dir / "photos" / f"{i}.png") for i in range(3)) + ("s3://bucket/key.jpg",)
    torch.manual_seed(0)
    anchors = AnchorSet(torch.nn.functional.normalize(torch.randn(4, 4), dim=1),
                        torch.nn.functional.normalize(torch.randn(4, 3), dim=1), ("a", "b", "c", "d"),
                        TinyImageEncoder(dim=4).spec, TinyTextEncoder(dim=3).spec, images,
                        {"sources": [{"pairs": "<in-memory pairs>", "n_pairs": 4}]})
    anchors.save(set_dir)
    assert json.loads((set_dir / "manifest.json").read_text())["image_root"] == "photos"
    os.rename(set_dir, tmp_path / "moved")
    loaded = AnchorSet.load(tmp_path / "moved")
    assert loaded.images == tuple(str(tmp_path / "moved" / "photos" / f"{i}.png") for i in range(3)) + \
        ("s3://bucket/key.jpg",)
    assert loaded.meta["sources"][0]["pairs"] == "<in-memory pairs>"   # a label, not a path
    _no_absolute_paths(tmp_path / "moved", tmp_path)


def test_adapter_folders_hold_no_absolute_paths(tmp_path, backbones, monkeypatch):
    from nofree.adapters.smallcap import SmallCap
    from nofree.adapters.train import train_lit
    from nofree.registry import load_encoder, load_lm

    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "nofree-cache"))
    pairs = make_pairs(tmp_path / "photos", n=6)
    train_lit(pairs, out=tmp_path / "lit", image_encoder=backbones["image"], text_encoder=backbones["text"], epochs=1,
              batch_size=4, progress=False)
    image = load_encoder(backbones["image"], modality="image")
    smallcap = SmallCap(image, load_lm(backbones["lm"]), examples=2, num_latents=4, heads=2, dim_head=8,
                        xattn_every=1)
    runner = CliRunner()
    anchors = AnchorSet.load(_build(runner, backbones, pairs, tmp_path / "anchors"))
    smallcap.attach_retrieval(anchors, POOL)
    smallcap.save_pretrained(tmp_path / "smallcap")
    assert (tmp_path / "lit" / "training" / "state.json").is_file()
    assert (tmp_path / "smallcap" / "anchors" / "manifest.json").is_file()
    for folder in ("lit", "smallcap"):
        _no_absolute_paths(tmp_path / folder, tmp_path)


def test_committed_v2_fixture_keeps_loading():
    fixture = Path(__file__).parent / "fixtures" / "anchors-v2"
    anchors = AnchorSet.load(fixture)
    assert anchors.meta["format_version"] == 2 and len(anchors) == 6
    photos = fixture.parent.resolve() / "photos"
    assert anchors.images[:5] == tuple(str(photos / f"img{i}.jpg") for i in (0, 0, 1, 2, 3))
    assert anchors.images[5] == "https://example.com/img4.jpg"
    assert anchors.meta["sources"][0]["pairs"] == str(fixture.parent.resolve() / "pairs.jsonl")
    assert anchors.meta["skipped_images"] == [str(photos / "broken.jpg")]
    torch.testing.assert_close(anchors.image.norm(dim=1), torch.ones(6))


# --- hf-hub: from a local cache -----------------------------------------------------------------
def cache_repo(cache: Path, repo_id: str, folder: Path, *, commit: str = COMMIT, branch: str = "main") -> None:
    """Lay ``folder`` into ``cache`` as huggingface_hub does: ``blobs/`` by content, ``snapshots/<commit>/``
    of relative links to them, ``refs/<branch>`` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)


@pytest.fixture()
def hub(tmp_path, backbones, monkeypatch):
    """An anchor set, a LiT, a ClipCap and a SmallCap in a hub cache; HF_HUB_OFFLINE=1."""
    from nofree.adapters.clipcap import ClipCap
    from nofree.adapters.lit import LiT
    from nofree.adapters.smallcap import SmallCap
    from nofree.registry import load_encoder, load_lm

    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "nofree-cache"))
    runner = CliRunner()
    pairs = make_pairs(tmp_path / "photos", n=6)
    local = tmp_path / "local"
    anchors = _build(runner, backbones, pairs, local / "anchors")
    image, text = load_encoder(backbones["image"], modality="image"), load_encoder(backbones["text"], modality="text")
    lm = load_lm(backbones["lm"])
    torch.manual_seed(0)
    LiT(image, text, embed_dim=8).save_pretrained(local / "lit")
    ClipCap(image, lm, prefix_length=2).save_pretrained(local / "clipcap")
    smallcap = SmallCap(image, lm, examples=2, num_latents=4, heads=2, dim_head=8, xattn_every=1)
    smallcap.attach_retrieval(AnchorSet.load(anchors), POOL)
    smallcap.save_pretrained(local / "smallcap")
    cache = tmp_path / "hf-cache"
    for name in ("anchors", "lit", "clipcap", "smallcap"):
        cache_repo(cache, f"org/{name}", local / name)
    cache_repo(cache, "org/anchors", local / "anchors", commit="f" * 40, branch="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photos = sorted(str(p) for p in (tmp_path / "photos").glob("*.png"))[:2]
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(POOL) + "\n")
    return SimpleNamespace(cache=cache, photos=photos, pool=pool, runner=runner)


def test_hub_refs_load_from_the_cache_offline(hub):
    from nofree.adapters import load_adapter
    from nofree.adapters.smallcap import SmallCapCaptioner
    from nofree.hub import resolve_dir

    snapshot = hub.cache / "models--org--anchors" / "snapshots" / COMMIT
    assert resolve_dir("hf-hub:org/anchors") == snapshot
    assert resolve_dir(f"hf-hub:org/anchors@{'f' * 40}").name == "f" * 40
    assert resolve_dir("hf-hub:org/anchors@v1").name == "f" * 40
    anchors = AnchorSet.load("hf-hub:org/anchors")
    assert len(anchors) == 12 and anchors.meta["format_version"] == 2
    assert load_adapter("hf-hub:org/lit").kind == "lit"
    captioner = SmallCapCaptioner.from_pretrained("hf-hub:org/smallcap", max_tokens=3)
    assert len(captioner.caption(hub.photos[:1])) == 1

    run = lambda *args: _ok(hub.runner.invoke(main, list(args)))  # noqa: E731
    assert "anchors      12" in run("anchors", "info", "hf-hub:org/anchors").output
    rows = json.loads(run("classify", "--anchors", "hf-hub:org/anchors@v1", "--label", "red", "--label",
                          "bus", "--format", "json", *hub.photos).stdout)
    assert [row["image"] for row in rows] == hub.photos
    assert json.loads(run("classify", "--lit", "hf-hub:org/lit", "--label", "red", "--label", "bus",
                          "--format", "json", hub.photos[0]).stdout)[0]["top"]
    assert json.loads(run("retrieve", "--anchors", "hf-hub:org/anchors", "--query", "a red bus", "--format",
                          "json", str(Path(hub.photos[0]).parent)).stdout)[0]["results"]
    for extra in (["--anchors", "hf-hub:org/anchors"], ["--lit", "hf-hub:org/lit"]):
        caption = json.loads(run("caption", "--method", "retrieval", *extra, "--pool", str(hub.pool),
                                 "--format", "json", hub.photos[0]).stdout)
        assert caption[0]["caption"] in POOL
    for method in ("clipcap", "smallcap"):
        rows = json.loads(run("caption", "--method", method, "--adapter", f"hf-hub:org/{method}",
                              "--max-tokens", "3", "--format", "json", *hub.photos).stdout)
        assert len(rows) == 2 and all(isinstance(row["caption"], str) for row in rows)


def test_hub_refs_fail_in_one_line(hub):
    missing = hub.runner.invoke(main, ["classify", "--anchors", "hf-hub:org/absent", "--label", "x",
                                       hub.photos[0]])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "HF_HUB_OFFLINE=1" in missing.output and "not in" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    revision = hub.runner.invoke(main, ["anchors", "info", "hf-hub:org/anchors@nope"])
    assert revision.exit_code == 2 and "HF_HUB_OFFLINE" in revision.output
    bad = hub.runner.invoke(main, ["caption", "--method", "clipcap", "--adapter", "hf-hub:not a/repo@x",
                                   hub.photos[0]])
    assert bad.exit_code == 2 and "hf-hub:ORG/NAME" in bad.output
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        AnchorSet.load("hf-hub:org/absent")
    with pytest.raises(SpecError):
        AnchorSet.load("hf-hub:org/a/b")


# --- nofree push ------------------------------------------------------------------------------
class FakeHfApi:
    """Records HfApi's calls; ``upload_folder`` reads the staged folder while it exists."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", kw, files))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc")


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return FakeHfApi


def test_push_dry_run_shows_files_and_card(runner, tmp_path, backbones):
    from nofree.adapters.train import train_lit

    out = _build(runner, backbones, make_pairs(tmp_path / "photos", n=6), tmp_path / "set")
    before = sorted(p.name for p in out.iterdir())
    result = _ok(runner.invoke(main, ["push", str(out), "org/coco-mini", "--dry-run"]))
    text = result.output
    assert "dry run: would upload anchor set" in text and "https://huggingface.co/org/coco-mini" in text
    for name in ("manifest.json", "embeddings.safetensors", "captions.jsonl", "README.md  ("):
        assert name in text
    assert "library_name: nofree" in text and backbones["image"] in text and "| anchors | 12 |" in text
    assert "hf-hub:org/coco-mini" in text and "No quality measurement" in text
    assert sorted(p.name for p in out.iterdir()) == before       # no card written into the folder

    train_lit(tmp_path / "photos" / "pairs.jsonl", out=tmp_path / "lit", image_encoder=backbones["image"],
              text_encoder=backbones["text"], epochs=2, batch_size=4, progress=False)
    text = _ok(runner.invoke(main, ["push", str(tmp_path / "lit"), "org/lit", "--dry-run"])).output
    assert "lit adapter" in text and "Measured at the last epoch (2)" in text and "train_loss" in text
    assert "training/state.json" in text and "optimizer.safetensors" not in text
    assert "trainable parameters" in text
    with_state = _ok(runner.invoke(main, ["push", str(tmp_path / "lit"), "org/lit", "--dry-run",
                                          "--include-training-state"])).output
    assert "training/optimizer.safetensors" in with_state


def test_push_uploads_folder_and_card_in_one_commit(runner, tmp_path, backbones, fake_hub):
    out = _build(runner, backbones, make_pairs(tmp_path / "photos", n=4), tmp_path / "set")
    result = _ok(runner.invoke(main, ["push", str(out), "org/name", "--private", "--branch", "v2",
                                      "--message", "first"]))
    assert "pushed anchor set" in result.output and "commit/abc" in result.output
    (create, repo, kw), (branch, _, bkw), (upload, ukw, files) = fake_hub.calls
    assert create == "create_repo" and repo == "org/name" and kw["exist_ok"] and kw["private"]
    assert kw["repo_type"] == "model"
    assert branch == "create_branch" and bkw["branch"] == "v2" and bkw["exist_ok"]
    assert upload == "upload_folder" and ukw["repo_id"] == "org/name" and ukw["revision"] == "v2"
    assert ukw["commit_message"] == "first" and ukw["repo_type"] == "model"
    assert set(files) == {"manifest.json", "embeddings.safetensors", "captions.jsonl", "README.md"}
    for name in ("manifest.json", "embeddings.safetensors", "captions.jsonl"):
        assert files[name] == (out / name).read_bytes()
    assert b"# org/name" in files["README.md"] and not (out / "README.md").exists()

    fake_hub.calls.clear()
    _ok(runner.invoke(main, ["push", str(out), "hf-hub:org/name"]))
    assert [call[0] for call in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][2]["private"] is False and fake_hub.calls[1][1]["revision"] is None


def test_push_refuses_what_it_should_not_upload(runner, tmp_path, monkeypatch, fake_hub):
    import shutil

    v1 = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "fixtures" / "anchors-v1", v1)
    refused = runner.invoke(main, ["push", str(v1), "org/name", "--dry-run"])
    assert refused.exit_code == 2 and "format v1" in refused.output and "absolute paths" in refused.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    wrong = runner.invoke(main, ["push", str(other), "org/name", "--dry-run"])
    assert wrong.exit_code == 2 and "neither an anchor set" in wrong.output
    bad_name = runner.invoke(main, ["push", str(v1), "just-a-name", "--dry-run"])
    assert bad_name.exit_code == 2 and "ORG/NAME" in bad_name.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fixture = Path(__file__).parent / "fixtures" / "anchors-v2"
    offline = runner.invoke(main, ["push", str(fixture), "org/name"])
    assert offline.exit_code == 2 and "HF_HUB_OFFLINE=1" in offline.output and not fake_hub.calls
