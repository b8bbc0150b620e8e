"""MAGIC steered by a CLIP-like scorer or a LiT (``--scorer SPEC``): no anchor set, the pool ranked
by the scorer itself (CLIPRe), the paper's α, β, clear one-line errors, and offline hub specs
that fail fast in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nofree.captioners import MAGIC_PAPER, MagicCaptioner, RetrievalCaptioner, load_captioner
from nofree.cli import main
from nofree.core import SpecError
from nofree.scoring import ASIF_SCORER, ScorerSpace, load_scorer, normalize_scorer_spec
from nofree.testing import (make_tiny_hf_clip, make_tiny_hf_text, make_tiny_hf_vision, make_tiny_lm_dir,
                            make_tiny_open_clip)
from tests.test_anchors import make_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
POOL = ["a red bus", "photo of a thing", "a dog on grass", "a cat on a sofa", "two cats on a sofa",
        "a man riding a red bus"]


def tiny_lit_world(root: Path, pool: list[str], *, n: int):
    """Tiny HF towers (vision, text folders), a fresh LiT over them (8-d), ``n`` photos with
    captions (``make_pairs``) and ``pool`` written one caption a line."""
    from nofree.adapters.lit import LiT
    from nofree.registry import load_encoder

    vision, text = make_tiny_hf_vision(root / "vision"), make_tiny_hf_text(root / "text")
    torch.manual_seed(0)
    lit = LiT(load_encoder(f"local:{vision}", modality="image"), load_encoder(f"local:{text}", modality="text"),
              embed_dim=8)
    pool_file = root / "pool.txt"
    pool_file.write_text("\n".join(pool) + "\n")
    return vision, text, lit, make_pairs(root / "data", n=n), pool_file


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny CLIPs (transformers, open_clip), a fresh LiT over tiny towers, a tiny LM, photos, a pool."""
    root = tmp_path_factory.mktemp("scorers")
    vision, _, lit, pairs, pool = tiny_lit_world(root, POOL, n=6)
    return {"clip": make_tiny_hf_clip(root / "clip"), "open_clip": make_tiny_open_clip(root / "open_clip"),
            "lit": lit.save_pretrained(root / "lit"), "vision": vision, "lm": make_tiny_lm_dir(root / "lm"),
            "pairs": pairs, "images": sorted(str(p) for p in (root / "data").glob("*.png"))[:3], "pool": pool}


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    return CliRunner()


def _images(models):
    from nofree.data.images import load_image

    return [load_image(p) for p in models["images"]]


def test_scorer_specs_are_normalised_and_bad_ones_named(models, tmp_path):
    clip = models["clip"]
    assert normalize_scorer_spec(" ASIF ") == ASIF_SCORER
    assert normalize_scorer_spec("open_clip:ViT-B-32/laion2b_s34b_b79k") == "open_clip:ViT-B-32@laion2b_s34b_b79k"
    assert normalize_scorer_spec("hf_clip:openai/clip-vit-base-patch32") == "hf-clip:openai/clip-vit-base-patch32"
    assert normalize_scorer_spec(f"local:{clip}") == normalize_scorer_spec(str(clip)) == f"local:{clip.resolve()}"
    assert normalize_scorer_spec(f"local:{models['open_clip']}") == f"local:{models['open_clip'].resolve()}"
    lit = f"lit:{models['lit'].resolve()}"
    assert normalize_scorer_spec(f"lit:{models['lit']}") == normalize_scorer_spec(f"local:{models['lit']}") == lit
    assert normalize_scorer_spec(str(models["lit"])) == lit
    for bad, message in (("nonsense", "not a scorer"), ("embedded:minilm-l6", "not an image–text model"),
                         (f"local:{models['vision']}", "holds a vision model"),
                         (f"local:{models['lm']}", "holds a causal language model"),
                         (f"lit:{tmp_path / 'missing'}", "not a folder"), ("", "empty scorer spec")):
        with pytest.raises(SpecError, match=message):
            normalize_scorer_spec(bad)
    with pytest.raises(SpecError, match="anchor set"):
        load_scorer("asif")


def test_the_pool_is_ranked_by_the_clip_scorer_itself(models, tmp_path):
    """CLIPRe: the pool ranking is the cosine of the CLIP's own towers, the same space the MAGIC
    scorer's logits live in; the retrieval candidate is its argmax; the paper's α, β."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from nofree.cache import EmbeddingCache

    spec = f"local:{models['clip']}"
    captioner = load_captioner("magic", pool=models["pool"], lm=f"local:{models['lm']}", scorer=spec,
                               options={"k": 4, "max_new_tokens": 3})
    assert (captioner.alpha, captioner.beta) == (MAGIC_PAPER["alpha"], MAGIC_PAPER["beta"])
    space = captioner.pipeline
    assert isinstance(space, ScorerSpace) and captioner.pool.pipeline is space and captioner.scorer is space.scorer
    images = _images(models)
    image_emb = space.encode_images(images)
    # the same cosines straight from the saved transformers CLIP
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    processor, tokenizer = CLIPImageProcessor.from_pretrained(models["clip"]), AutoTokenizer.from_pretrained(models["clip"])
    with torch.no_grad():
        image = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text = model.get_text_features(**tokenizer(captioner.pool.pool, padding=True, return_tensors="pt"))
    image, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text))
    direct = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(captioner.pool.scores(image_emb), direct, atol=1e-5, rtol=1e-5)
    logits = space.scorer.score(image_emb, [list(POOL)] * len(images))  # what steers MAGIC
    torch.testing.assert_close(logits, space.scorer.logit_scale * space.similarity(image_emb, space.encode_texts(POOL)),
                               atol=1e-4, rtol=1e-4)
    # the pool is ranked by the scorer's similarities, and the retrieval candidate is what caption
    # retrieval under that scorer returns
    plain = MagicCaptioner.from_scorer(space, lm=captioner.lm, pool=RetrievalCaptioner(space, POOL, rerank=0),
                                       drafts=1, k=4, max_new_tokens=3, with_retrieved=True)
    assert [row[0] for row in plain.pool.ranked(image_emb, 1)] == [POOL[j] for j in direct.argmax(1).tolist()]
    candidates = plain.candidates(image_emb)
    assert [row[-1] for row in candidates] == RetrievalCaptioner(space, POOL).caption_embeddings(image_emb)
    assert len(plain.caption(images)) == len(images)
    # the pool's text embeddings are cached like other embeddings
    cache = EmbeddingCache(tmp_path / "cache")
    load_scorer(spec, cache=cache).encode_texts(POOL)
    again = EmbeddingCache(tmp_path / "cache")
    load_scorer(spec, cache=again).encode_texts(POOL)
    assert cache.misses == len(POOL) and (again.hits, again.misses) == (len(POOL), 0)


def test_lit_scorer_is_its_joint_space(models):
    from nofree.adapters import load_adapter

    space = load_scorer(f"lit:{models['lit']}")
    lit = load_adapter(models["lit"])
    images = _images(models)
    image_emb = space.encode_images(images)
    expected = lit.similarity(lit.encode_image(images), lit.encode_text(POOL))
    torch.testing.assert_close(space.similarity(image_emb, space.encode_texts(POOL)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(space.scorer.score(image_emb, [list(POOL)] * len(images)), lit.logit_scale * expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["clip", "open_clip", "lit"])
def test_cli_caption_magic_with_a_scorer_and_no_anchors(models, runner, kind):
    spec = f"lit:{models['lit']}" if kind == "lit" else f"local:{models[kind]}"
    result = runner.invoke(main, ["caption", "--method", "magic", "--scorer", spec, "--lm", f"local:{models['lm']}",
                                  "--pool", str(models["pool"]), "--k", "4", "--max-tokens", "3", "--drafts", "2",
                                  "--format", "jsonl", *models["images"]])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == models["images"] and all(isinstance(r["caption"], str) for r in rows)


def test_eval_magic_row_with_a_scorer_builds_no_anchors(models, runner, tmp_path, monkeypatch):
    from nofree.eval import report as report_module
    from nofree.eval.report import EvalConfig, run_eval

    spec = f"local:{models['clip']}"
    out = tmp_path / "report"
    config = EvalConfig(pairs=models["pairs"], lm=f"local:{models['lm']}", pool=models["pool"], scorer=spec,
                        magic={"k": 4, "max_new_tokens": 3, "drafts": 2}, meteor=False)
    results = run_eval(config, ["magic"], out_dir=out, progress=False)
    entry = results["methods"]["magic"]
    assert entry["status"] == "ok", entry.get("traceback")
    assert entry["params"]["scorer"] == normalize_scorer_spec(spec) and entry["params"]["beta"] == 2.0
    assert len(entry["captions"]) == results["n_images"] == 2
    assert results["anchors"] is None and not (out / "anchors").exists()
    calls = []
    monkeypatch.setitem(report_module.RUNNERS, "magic",
                        lambda ctx: calls.append(1) or ({}, {"scorer": "asif"}, ["a cat", "a dog"]))
    run_eval(config, ["magic"], out_dir=out, resume=True, progress=False)
    assert calls == []  # the same scorer: kept
    again = run_eval(EvalConfig(**{**config.__dict__, "scorer": None}), ["magic"], out_dir=out, resume=True,
                     progress=False)  # another scorer: run again
    assert calls == [1] and again["methods"]["magic"]["params"]["scorer"] == "asif"
    result = runner.invoke(main, ["eval", "--pairs", str(models["pairs"]), "--method", "asif", "--scorer", spec,
                                  "--report", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "--scorer steers the magic row" in result.output


def one_line_error(result, *needles):
    """A usage or input error: exit 2, one ``Error: `` line holding each of ``needles``, no usage
    text, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Usage:" not in result.output and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_scorer_errors_are_one_line(models, runner, tmp_path):
    image, clip = models["images"][0], f"local:{models['clip']}"
    cases = [
        (["--method", "retrieval", "--scorer", clip], ["--scorer steers MAGIC only", "--method magic"]),
        (["--method", "clipcap", "--scorer", "asif"], ["--scorer steers MAGIC only"]),
        (["--scorer", "asif"], ["--scorer asif", "--anchors DIR"]),
        (["--scorer", "nonsense"], ["--scorer", "'nonsense' is not a scorer", "open_clip:ARCH@TAG"]),
        (["--scorer", "embedded:minilm-l6"], ["--scorer", "not an image–text model"]),
        (["--scorer", clip, "--anchors", str(tmp_path)], ["drop --anchors"]),
        (["--scorer", clip, "--lm", f"local:{models['lm']}", "--pool", str(models["pool"]), "--examples-from",
          "anchors"], ["take the examples from the pool"]),
        (["--method", "magic"], ["--anchors DIR", "--scorer"]),
    ]
    for args, needles in cases:
        one_line_error(runner.invoke(main, ["caption", *args, image]), *needles)


@pytest.mark.parametrize("spec", ["open_clip:ViT-B-32@laion2b_s34b_b79k", "hf-clip:openai/clip-vit-base-patch32"])
def test_documented_hub_scorer_fails_offline_in_one_line(tmp_path, spec):
    """The README's command, offline: the hub message in one line (stderr), no usage text, fast."""
    photos = tmp_path / "photos"
    make_pairs(photos, n=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NOFREE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nofree.cli", "caption", "--method", "magic", "--scorer", spec,
                           "--lm", "hf-lm:gpt2", str(photos)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {spec}"), done.stderr
    assert "internet" in lines[0] or "hub" in lines[0]
