"""The example notebooks run top to bottom, headless, in their small (smoke) configuration.

Each notebook reads ``NOFREE_NOTEBOOK_SMOKE=1`` (few photos, tiny budgets, a random tiny LM) and
``NOFREE_NOTEBOOK_WORKDIR`` (where it writes anchor sets and adapters), and ends with a cell
tagged ``results`` that prints its numbers as JSON; the test checks them. The three notebooks
share one temporary embedding cache, so images and captions are encoded once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))

pytestmark = [pytest.mark.slow, pytest.mark.embedded]


def test_examples_has_the_three_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_asif_anchors", "02_training_free_captioning",
                                          "03_frozen_vs_trained"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook-cache")


def run_notebook(path: Path, tmp_path: Path, cache: Path, monkeypatch) -> dict:
    """Execute ``path`` in smoke mode in a fresh kernel; return its ``results`` JSON."""
    from jupyter_client.kernelspec import KernelSpecManager

    # the kernel must be this interpreter (the venv), not whatever `python` is on PATH
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in ("python", "python3", sys.executable), spec.argv
    for name, value in {"NOFREE_NOTEBOOK_SMOKE": "1", "NOFREE_NOTEBOOK_WORKDIR": str(tmp_path / "work"),
                        "NOFREE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    before = sorted(EXAMPLES.iterdir())
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) if a cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    tagged = [c for c in nb.cells if "results" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'results'"
    text = "".join(o.get("text", "") for o in tagged[0].outputs if o.get("output_type") == "stream")
    results = json.loads(text)
    assert results["smoke"] is True and results["notebook"] == path.stem
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no plot"
    assert sorted(EXAMPLES.iterdir()) == before, "a notebook wrote into examples/"
    assert (tmp_path / "work" / "anchors" / "manifest.json").is_file()  # its outputs went to the work dir
    return results


def _unit(x: float) -> bool:
    return 0.0 <= x <= 1.0


def test_asif_anchors_notebook(tmp_path, shared_cache, monkeypatch):
    r = run_notebook(EXAMPLES / "01_asif_anchors.ipynb", tmp_path, shared_cache, monkeypatch)
    assert r["n_anchors"] == 100 and r["n_val_photos"] == 10          # 20 train photos x 5 captions
    assert _unit(r["zero_shot_hit@1"])
    for direction in ("t2i", "i2t"):
        assert _unit(r["retrieval"][direction]["R@1"]) and r["retrieval"][direction]["R@10"] >= r["retrieval"][direction]["R@1"]
    assert list(r["curve"]) == ["25", "50", "100"]
    assert all(_unit(v) for point in r["curve"].values() for v in point.values())
    # real encoders composed by 100 anchors beat chance (1/10) at text->image retrieval
    assert r["retrieval"]["t2i"]["R@1"] > 1 / 10
    assert r["cv_best"]["p"] in (1.0, 8.0) and len(r["val_settings"]) == 5
    # the pipeline defaults are plain ASIF + CSLS plus the label bridge of the real image encoder
    bridged, plain = (r["val_settings"][name]["t2i R@1"] for name in
                      ("AsifPipeline defaults (the above + the label bridge)",
                       "the above + CSLS (plain ASIF: label_weight=0)"))
    assert bridged == r["retrieval"]["t2i"]["R@1"] and bridged != plain


def test_training_free_captioning_notebook(tmp_path, shared_cache, monkeypatch):
    r = run_notebook(EXAMPLES / "02_training_free_captioning.ipynb", tmp_path, shared_cache, monkeypatch)
    assert r["n_val_photos"] == 10 and r["n_magic_photos"] == 2 and r["lm"].startswith("local:")
    assert set(r["all_photos"]) == {"retrieval", "greedy, 0 examples", "greedy, 1 examples",
                                    "greedy, 1 anchor examples", "defaults: 8 drafts, CIDEr-D consensus",
                                    "8 drafts + the retrieval caption, CIDEr-D consensus"}
    # every photo kept exactly one of its 9 candidates (8 drafts, then the retrieval caption)
    assert len(r["defaults_kept_candidate"]) == 9 and sum(r["defaults_kept_candidate"]) == 10
    assert len(r["magic_grid_cider"]) == 4
    assert all(v >= 0 for v in r["magic_grid_cider"].values())
    assert all(s["CIDEr"] >= 0 and _unit(s["BLEU-4"]) for s in r["subset"].values())
    # retrieval picks real COCO captions: it cannot score zero against 5 human references
    assert r["all_photos"]["retrieval"]["ROUGE-L"] > 0


def test_frozen_vs_trained_notebook(tmp_path, shared_cache, monkeypatch):
    r = run_notebook(EXAMPLES / "03_frozen_vs_trained.ipynb", tmp_path, shared_cache, monkeypatch)
    assert len(r["matching"]) == 2 and all(_unit(v) for s in r["matching"].values() for v in s.values())
    assert set(r["curve_mean_r1"]) == {"ASIF", "LiT"} and list(r["curve_mean_r1"]["LiT"]) == ["25", "100"]
    trained = {"ClipCap", "Flamingo-style", "SmallCap-style"}
    assert set(r["captioning"]) == {"retrieval", "MAGIC", *trained}
    assert set(r["captioning_all"]) == {"retrieval", *trained}
    versus = r["cider_vs_retrieval"]
    assert set(versus) == {"MAGIC", *trained}
    for name, c in versus.items():
        assert c["interval"][0] <= c["delta"] <= c["interval"][1]
        assert c["delta"] == pytest.approx(r["captioning"][name]["CIDEr"] - r["captioning"]["retrieval"]["CIDEr"])
    assert r["cost"]["retrieval"]["trainable"] == 0 and r["cost"]["MAGIC"]["trainable"] == 0
    assert all(r["cost"][name]["trainable"] > 0 for name in trained)
