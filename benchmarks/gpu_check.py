"""A short check of MAGIC and the ASIF scan on a CUDA GPU: same answers, and seconds.

    python -m benchmarks.gpu_check [--device cuda] [--tokenizer DIR] [--smoke] [--json PATH]

Not part of ``python -m benchmarks`` (which runs where CI runs, without a GPU). Checks, on the
device: (1) the CLIP scorer's prefix-tree path (torch twin of the tree attention, on the GPU) equals
``encode_text`` computed on the CPU for candidate lists that re-tokenise words; (2) MAGIC with
α = β = 0 equals greedy decoding token for token (batch 1 and 8); (3) seconds per caption of
MAGIC (k = 45, 16 new tokens) beside greedy decoding, GPT-2 small + CLIP ViT-B/32 built from
configs with random weights, float32 and bfloat16, batch 1 and 8; (4) the exact fp32 top-800 of
2,048 queries among 200k and 1M random 512-d anchors, against float64 on 256 rows.
``--tokenizer``: a folder holding a byte-level BPE tokenizer (default: the embedded SmolLM2's,
which needs its package); ``--smoke`` shrinks everything to run on a CPU in a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# candidate lists like MAGIC's: extended last words, punctuation, new words, case twins, empty
TEXTS = [["a dog on", "a dog in", "a dogs", "a dog.", "a dog running", "a doggy", "a do", "a dog,the"],
         ["the red bus", "the red", "the redd", "the red car parked on the street", "the", "the a",
          "THE RED BUS", "the red bus é"]]


def timed(fn, device, repeats):
    """Median seconds of ``fn()`` and its last result, synchronising the device around each run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def scorer_check(device):
    """Max |score difference| of the tree path on ``device`` against plain encode_text on the CPU."""
    import open_clip

    from nofree.decoding.clip_scorer import ClipScorer

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1,
                                                         head_width=16),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2,
                                         layers=2)).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    image = torch.nn.functional.normalize(torch.randn(len(TEXTS), 24), dim=-1)
    with torch.inference_mode():
        text = model.encode_text(tokenizer([t for row in TEXTS for t in row]))
    text = torch.nn.functional.normalize(text, dim=-1).view(len(TEXTS), len(TEXTS[0]), -1)
    reference = model.logit_scale.exp() * torch.einsum("bd,bkd->bk", image, text)
    diffs = {}
    for dtype in (torch.float32, torch.bfloat16):
        scores = ClipScorer(model, tokenizer, device=device, dtype=dtype).score(image, TEXTS)
        diffs[str(dtype).removeprefix("torch.")] = float((scores - reference).abs().max())
    return diffs


def magic_rows(device, tokenizer_dir, new_tokens, repeats):
    import open_clip

    from benchmarks.magic_speed import PROMPT, bf16_copy, gpt2_small
    from nofree.decoding.magic import greedy_search, magic_search
    from nofree.decoding.clip_scorer import ClipScorer
    from nofree.lm.hf import HFLanguageModel

    base = gpt2_small(tokenizer_dir)
    torch.manual_seed(0)
    clip_model = open_clip.create_model("ViT-B-32", pretrained=None)
    rows, same = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cpu_lm = base if dtype == torch.float32 else bf16_copy(base)
        lm = HFLanguageModel(cpu_lm.model, cpu_lm.tokenizer, spec=cpu_lm.spec, eos_id=cpu_lm.eos_id,
                             device=device)
        clip = ClipScorer(clip_model, open_clip.get_tokenizer("ViT-B-32"), device=device, dtype=dtype)
        for batch in (1, 8):
            prompts = lm.tokenize([PROMPT] * batch)
            noise = torch.randn(batch, 512, generator=torch.Generator().manual_seed(batch))
            image = torch.nn.functional.normalize(noise, dim=-1)
            if dtype == torch.float32:
                greedy = greedy_search(lm, prompts, max_new_tokens=8, stop_at_period=False)
                plain = magic_search(lm, clip, image, prompt_ids=prompts, k=45, alpha=0.0, beta=0.0,
                                     max_new_tokens=8, stop_at_period=False)
                same[f"batch {batch}"] = greedy.ids == plain.ids

            def magic():
                clip.prefix_memory.clear()
                return magic_search(lm, clip, image, prompt_ids=prompts, k=45, max_new_tokens=new_tokens,
                                    stop_at_period=False, trace=False)

            def greedy():
                return greedy_search(lm, prompts, max_new_tokens=new_tokens, stop_at_period=False)

            magic(), greedy()  # warm-up: kernels, allocator, tokenizer caches
            greedy_s, _ = timed(greedy, device, repeats)
            magic_s, out = timed(magic, device, repeats)
            rows.append({"dtype": name, "batch": batch, "greedy_s": greedy_s / batch,
                         "magic_s": magic_s / batch, "phases": {key: v / batch for key, v in out.seconds.items()}})
            print(rows[-1], flush=True)
    return rows, same


def topk_rows(device, sizes, repeats):
    from nofree.anchors.search.exact import cosine_topk

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        anchors = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1).to(device)
        query = torch.nn.functional.normalize(torch.randn(2048, 512, generator=g), dim=1).to(device)
        seconds, (values, idx) = timed(lambda: cosine_topk(query, anchors, 800), device, repeats)
        exact = (query[:256].double() @ anchors.double().T).topk(800, dim=1)
        pairs = zip(idx[:256].cpu(), exact.indices.cpu())
        equal = sum(set(a.tolist()) == set(b.tolist()) for a, b in pairs)
        rows.append({"anchors": n, "seconds": seconds, "rows_equal_of_256": equal,
                     "max_value_error": float((values[:256].double() - exact.values).abs().max())})
        print(rows[-1], flush=True)
        del anchors
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", type=Path, default=None, help="byte-level BPE tokenizer folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on a CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    import transformers

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d"), "scorer_max_abs_diff": scorer_check(device)}
    print(result, flush=True)
    result["magic"], result["alpha_beta_0_equals_greedy"] = magic_rows(
        device, args.tokenizer, 2 if args.smoke else 16, 1 if args.smoke else 3)
    sizes = (20_000,) if args.smoke else (200_000, 1_000_000)
    result["topk"] = topk_rows(device, sizes, 1 if args.smoke else 3)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
