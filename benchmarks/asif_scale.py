"""ASIF at a million anchors: relative representations + zero-shot argmax, time and memory.

    python -m benchmarks.asif_scale [--anchors 1000000 200000] [--queries 10000] [--classes 1000]
                                    [--ref-queries N] [--precision auto] [--smoke] [--json PATH]

Workload (Norelli et al., 2022, at the paper's scale): N synthetic anchor pairs (768-d image side,
384-d text side), 10k query images, 1,000 class prompts, k=800, p=8. The timed work is the
relative representations of the images (image side) and of the prompts (text side), their
similarity and the argmax. The embeddings are seeded and clustered, not uniform: 1,000 latent
concepts, image and text views of each pair share the concept and a per-pair jitter, plus a
common direction (real embedding spaces are anisotropic) and isotropic noise, so the top-k
boundary is crowded the way real data is.

Variants, each in a fresh subprocess (peak memory = RSS sampled every 5 ms during the timed part;
timing after a warm-up on a small slice; "CPU s" is the process's user+system time, a steadier
measure than wall time when other work shares the cores):

* ``nofree``: ``ASIF(k=800, p=8).fit(anchors)``, then transform both sides, similarity, argmax;
* ``fp32-topk``: a straightforward chunked float32 torch version (exact top-k per chunk, merged),
  the same power/normalise, scipy sparse similarity, argmax; also the exactness reference;
* ``fp32-matmul``: only the float32 similarity matmuls of both sides (a lower bound for any
  float32 method; no top-k at all).

Exactness: nofree's top-k index sets must equal the reference's row by row; a differing row is
reported as a tie when every swapped anchor's float64 cosine is within 1e-6 of the row's k-th
value (float32 rounding decides such rows either way). With ``--ref-queries`` below the number of
queries the references run on that many queries and their time is scaled up (marked ``*``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

DIM_IMAGE, DIM_TEXT, N_CONCEPTS, LATENT = 768, 384, 1000, 64
VARIANTS = ("nofree", "fp32-topk", "fp32-matmul")


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- synthetic data ---------------------------------------------------------------------------

def _views(concepts: Tensor, noise_seed: int, jitter: float, dims=(DIM_IMAGE, DIM_TEXT), chunk=65536):
    """Image and text views ``(n, 768)``, ``(n, 384)`` of latent concept ids ``concepts (n,)``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N_CONCEPTS, LATENT, generator=g)
    proj = [torch.randn(LATENT, d, generator=g) / math.sqrt(LATENT) for d in dims]
    means = [torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) for d in dims]
    n = concepts.shape[0]
    out = [torch.empty(n, d) for d in dims]
    g = torch.Generator().manual_seed(noise_seed)
    for i in range(0, n, chunk):
        lat = z[concepts[i:i + chunk]]
        lat = lat + jitter * torch.randn(lat.shape, generator=g)
        for o, p, m, d in zip(out, proj, means, dims):
            x = torch.nn.functional.normalize(lat @ p, dim=1) * 0.75 + 0.5 * m
            x += 0.45 / math.sqrt(d) * torch.randn(x.shape, generator=g)
            o[i:i + chunk] = torch.nn.functional.normalize(x, dim=1)
    return out


def synthetic(n_anchors: int, n_queries: int, n_classes: int):
    """Anchors (image, text), query images, class prompts (text), query labels; all seeded."""
    g = torch.Generator().manual_seed(1)
    image, text = _views(torch.randint(0, N_CONCEPTS, (n_anchors,), generator=g), 11, 0.6)
    labels = torch.randint(0, n_classes, (n_queries,), generator=g)
    queries, _ = _views(labels, 12, 0.6)
    _, prompts = _views(torch.arange(n_classes), 13, 0.0)
    return image, text, queries, prompts, labels


# --- the variants -------------------------------------------------------------------------------

def run_nofree(image, text, queries, prompts, k, p, precision, anchor_chunk):
    from nofree.anchors.asif import ASIF

    t0 = time.perf_counter()
    asif = ASIF.paper(k=k, p=p, precision=precision, anchor_chunk=anchor_chunk).fit((image, text))
    t1 = time.perf_counter()
    rho_i = asif.transform(queries, modality="image")
    t2 = time.perf_counter()
    rho_t = asif.transform(prompts, modality="text")
    t3 = time.perf_counter()
    pred = asif.similarity(rho_i, rho_t).argmax(dim=1)
    t4 = time.perf_counter()
    phases = {"fit": t1 - t0, "image": t2 - t1, "text": t3 - t2, "similarity": t4 - t3}
    return pred, rho_i.indices, rho_t.indices, phases, t4 - t1


def fp32_topk(query, anchors, k, chunk=65536, qchunk=1024):
    """Straightforward exact top-k: float32 matmul per anchor chunk, topk, merge with the best."""
    vals, idx = [], []
    for q0 in range(0, query.shape[0], qchunk):
        q = query[q0:q0 + qchunk]
        best_v = best_i = None
        for a0 in range(0, anchors.shape[0], chunk):
            s = q @ anchors[a0:a0 + chunk].T
            ids = torch.arange(a0, a0 + s.shape[1]).expand_as(s)
            if best_v is not None:
                s, ids = torch.cat([best_v, s], 1), torch.cat([best_i, ids], 1)
            best_v, pos = s.topk(min(k, s.shape[1]), dim=1)
            best_i = ids.gather(1, pos)
        vals.append(best_v)
        idx.append(best_i)
    return torch.cat(vals), torch.cat(idx)


def run_fp32_topk(image, text, queries, prompts, k, p):
    import numpy as np
    import scipy.sparse

    def rho(x, anchors):
        v, i = fp32_topk(x, anchors, k)
        v = v / v.abs().amax(1, keepdim=True)
        v = torch.nn.functional.normalize(v.sign() * v.abs().pow(p), dim=1)
        ptr = np.arange(0, v.numel() + 1, k)
        return scipy.sparse.csr_matrix((v.reshape(-1).numpy(), i.reshape(-1).numpy(), ptr),
                                       shape=(x.shape[0], anchors.shape[0])), i

    t1 = time.perf_counter()
    rho_i, idx_i = rho(queries, image)
    t2 = time.perf_counter()
    rho_t, idx_t = rho(prompts, text)
    t3 = time.perf_counter()
    pred = torch.from_numpy((rho_i @ rho_t.T).toarray()).argmax(dim=1)
    t4 = time.perf_counter()
    return pred, idx_i, idx_t, {"image": t2 - t1, "text": t3 - t2, "similarity": t4 - t3}, t4 - t1


def run_fp32_matmul(image, text, queries, prompts, chunk=65536, qchunk=1024):
    t1 = time.perf_counter()
    for x, anchors in ((queries, image), (prompts, text)):
        for q0 in range(0, x.shape[0], qchunk):
            for a0 in range(0, anchors.shape[0], chunk):
                x[q0:q0 + qchunk] @ anchors[a0:a0 + chunk].T
    return time.perf_counter() - t1


class PeakRss:
    """Max resident set size (bytes) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.before = self._proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args) -> None:
    """One variant at one size, in this (fresh) process; writes ``<out>/<variant>-<n>.json``."""
    out = Path(args.out)
    n, k, p = args.n, min(args.k, args.n), args.p
    image, text, queries, prompts, labels = synthetic(n, args.queries, args.classes)
    anchors_gb = (image.numel() + text.numel()) * 4 / 1e9
    if args.variant != "nofree" and args.ref_queries < args.queries:
        queries, labels = queries[:args.ref_queries], labels[:args.ref_queries]
    # warm-up on a small slice (kernels, thread pools, lazy imports)
    m = min(n // 4, 20000)
    warm = (image[:m], text[:m], queries[:32], prompts[:32])
    if args.variant == "nofree":
        run_nofree(*warm, min(k, m), p, args.precision, args.anchor_chunk)
    elif args.variant == "fp32-topk":
        run_fp32_topk(*warm, min(k, m), p)
    else:
        run_fp32_matmul(*warm)
    load_before = load_avg()
    result = {"variant": args.variant, "n_anchors": n, "n_queries": int(queries.shape[0]),
              "n_classes": args.classes, "k": k, "p": p, "anchors_gb": round(anchors_gb, 3),
              "threads": torch.get_num_threads(), "load_before": load_before}
    cpu0 = _cpu_seconds()
    with PeakRss() as mem:
        if args.variant == "nofree":
            pred, idx_i, idx_t, phases, seconds = run_nofree(image, text, queries, prompts, k, p,
                                                             args.precision, args.anchor_chunk)
        elif args.variant == "fp32-topk":
            pred, idx_i, idx_t, phases, seconds = run_fp32_topk(image, text, queries, prompts, k, p)
        else:
            pred, phases, seconds = None, {}, run_fp32_matmul(image, text, queries, prompts)
    result.update(seconds=seconds, cpu_seconds=_cpu_seconds() - cpu0, phases=phases, load_after=load_avg(),
                  rss_before_gb=mem.before / 1e9, peak_rss_gb=mem.peak / 1e9,
                  maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    if pred is not None:
        result["zero_shot_acc"] = float((pred == labels).float().mean())
    if args.variant == "nofree":
        torch.save({"image": idx_i[:args.ref_queries], "text": idx_t}, out / f"nofree-{n}.pt")
    elif args.variant == "fp32-topk" and (out / f"nofree-{n}.pt").exists():
        ours = torch.load(out / f"nofree-{n}.pt", weights_only=True)
        result["exactness"] = {
            "image": compare(ours["image"][:idx_i.shape[0]], idx_i, queries, image),
            "text": compare(ours["text"], idx_t, prompts, text)}
    (out / f"{args.variant}-{n}.json").write_text(json.dumps(result))


def compare(ours: Tensor, ref: Tensor, query: Tensor, anchors: Tensor, tol: float = 1e-6) -> dict:
    """Rows whose top-k index sets agree, differ only by float32 ties, or really differ."""
    equal = tie = wrong = 0
    for r in range(ref.shape[0]):
        a, b = set(ours[r].tolist()), set(ref[r].tolist())
        if a == b:
            equal += 1
            continue
        q = query[r].double()
        kth = (anchors[ref[r]].double() @ q).min()
        swapped = torch.tensor(sorted(a ^ b))
        if bool(((anchors[swapped].double() @ q) - kth).abs().max() <= tol):
            tie += 1
        else:
            wrong += 1
    return {"rows": int(ref.shape[0]), "equal": equal, "float32_ties": tie, "wrong": wrong}


# --- the driver ---------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", type=int, nargs="+", default=[1_000_000, 200_000])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ref-queries", type=int, default=None,
                        help="queries for the float32 references (default: all up to 200k anchors, "
                             "1000 above; their time is scaled to --queries)")
    parser.add_argument("--k", type=int, default=800)
    parser.add_argument("--p", type=float, default=8.0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--anchor-chunk", type=int, default=None,
                        help="anchor rows per scan chunk (default: nofree's choice for the precision)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.variant = args.worker
        worker(args)
        return {}
    if args.smoke:
        args.anchors, args.queries, args.classes, args.k = [6000], 200, 40, 100
        args.precision, args.anchor_chunk = "bf16", 2048
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.anchors:
            ref_q = args.ref_queries or (args.queries if n <= 200_000 else min(args.queries, 1000))
            for variant in ("nofree", "fp32-topk", "fp32-matmul"):
                if variant not in args.variants:
                    continue
                cmd = [sys.executable, "-m", "benchmarks.asif_scale", "--worker", variant, "--n", str(n),
                       "--queries", str(args.queries), "--classes", str(args.classes),
                       "--ref-queries", str(ref_q), "--k", str(args.k), "--p", str(args.p),
                       "--precision", args.precision, "--out", tmp]
                if args.anchor_chunk:
                    cmd += ["--anchor-chunk", str(args.anchor_chunk)]
                print(f"[{time.strftime('%H:%M:%S')}] {variant} at {n:,} anchors (load {load_avg()})",
                      file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
                res = json.loads((Path(tmp) / f"{variant}-{n}.json").read_text())
                if res["n_queries"] < args.queries:
                    res["scaled_from_queries"] = res["n_queries"]
                    res["seconds"] *= args.queries / res["n_queries"]
                    res["cpu_seconds"] *= args.queries / res["n_queries"]
                results.append(res)
    from nofree.anchors.search.int8_gemm import Int8Products
    from nofree.kernels.bindings import available

    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "native_scan_helpers": available(),
                       "int8_vnni_kernel": Int8Products.available()},
           "workload": {"queries": args.queries, "classes": args.classes, "k": args.k, "p": args.p,
                        "precision": args.precision},
           "runs": results}
    print(markdown(out))
    machine = out["machine"]
    print("native kernels (nofree.kernels):",
          "built and used" if machine["native_scan_helpers"] else "unavailable, torch versions used",
          end="; ")
    print("int8 kernel with fused selection (AVX-512 VNNI):",
          "yes" if machine["int8_vnni_kernel"] else "no (torch._int_mm)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def markdown(out: dict) -> str:
    rows = ["| anchors | variant | wall s | CPU s | image / text / sim s | peak RSS GB | over anchors GB "
            "| top-k vs fp32 (image; text) | zero-shot acc | load |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    exact = {r["n_anchors"]: r.get("exactness") for r in out["runs"] if r["variant"] == "fp32-topk"}
    for r in out["runs"]:
        ph = r.get("phases") or {}
        split = " / ".join(f"{ph[x]:.1f}" for x in ("image", "text", "similarity")) if ph else "-"
        star = f" (*{r['scaled_from_queries']} q)" if "scaled_from_queries" in r else ""
        ex = "-"
        if r["variant"] == "nofree" and exact.get(r["n_anchors"]):
            e = exact[r["n_anchors"]]
            ex = "; ".join(f"{v['equal']}/{v['rows']} equal, {v['float32_ties']} ties, {v['wrong']} wrong"
                           for v in (e["image"], e["text"]))
        acc = f"{r['zero_shot_acc']:.3f}" if "zero_shot_acc" in r else "-"
        rows.append(f"| {r['n_anchors']:,} | {r['variant']} | {r['seconds']:.1f}{star} "
                    f"| {r['cpu_seconds']:.1f} | {split} "
                    f"| {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - r['anchors_gb']:.2f} | {ex} | {acc} "
                    f"| {r['load_before']} |")
    return "\n".join(rows)


NOTES = """Workload (Norelli et al., 2022, at the paper's scale): synthetic clustered unit vectors,
768-d image / 384-d text anchors, 10,000 query images, 1,000 class prompts, k = 800, p = 8, each
variant in a fresh process (peak RSS sampled every 5 ms); `*`: timed on fewer queries and scaled.
nofree finds candidates in low precision (bf16, or int8 from 150k anchors with nofree's own
AVX-512 VNNI kernel, 500k without) and re-scores them in fp32 with a certificate that the fp32
top-k is among them, so its top-k equals the fp32 computation's (differing rows are float32 ties,
checked in float64).

The same code on a GPU (H200, `ASIF(device="cuda")`, a separate run): 1.44 s at 1M anchors,
0.38 s at 200k. The issue's CPU targets (≤ 10 s at 200k, ≤ 30 s at 1M) were set assuming bare
fp32 matmuls of ~41 s at 1M; on this 2-core Zen 4 fp32 runs at ~105 G multiply-adds/s (bf16
~200, oneDNN's int8 ~260, nofree's fused int8 kernel ~420), so the bare fp32 matmuls take
118–207 s: compare the variants with those (the issue's targets are 0.73× of them at 1M and
1.22× at 200k). At 1M the int8 products take ~18 s of nofree's ~31 s; most of the rest is the
candidates the int8 error band lets through."""


if __name__ == "__main__":
    main()
