"""Side-by-side speed of GPT-2 small (random weights, fp32, CPU by default) in one process:

* bare ``transformers`` GPT2LMHeadModel forward,
* tdb_lens ``HookedGPT2`` forward (no hooks),
* tdb_lens ``run_with_cache`` (every default hook cached),
* TransformerLens ``HookedTransformer.run_with_cache`` (every hook cached), built offline from the
  same weights.

All under ``torch.no_grad``, after warm-up, runs interleaved (each repeat runs every variant, in a
rotating order, so load from other processes hits all of them alike); the median of N repeats is
reported, for wall-clock time and for process CPU time.

On CPU every shape runs twice in the same process: with the allocator as the process found it
("default"), then after ``tdb_lens.keep_freed_memory()`` ("keep_freed_memory": glibc keeps freed
memory for reuse instead of page-faulting each call's cache in afresh; what the ``tdb-lens``
command does). All four variants are timed under each setting.

Usage: ``python bench/bench_gpt2.py [--threads 2] [--repeats 15] [--device cpu] [--json PATH]``
(default JSON: ``bench/results/bench_gpt2.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# the offline TransformerLens builder and fast random init live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _gpt2_reference import GPT2_SMALL, make_hf_gpt2, make_tl
from _provenance import provenance
from tdb_lens import HookedGPT2, keep_freed_memory

SHAPES = [(8, 128), (1, 16)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(variants: dict, tokens: torch.Tensor, repeats: int, warmup: int, device: str):
    """Median wall-clock and median process CPU time (all threads) per variant, in seconds."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    with torch.no_grad():
        for _ in range(warmup):
            for fn in variants.values():
                fn(tokens)
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = variants[name](tokens)
                _sync(device)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                del out
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}
    return med(wall), med(cpu)


def _row(label: str, t: dict[str, float]) -> str:
    ms = {k: 1000 * v for k, v in t.items()}
    return (f"| {label} | {ms['transformers']:.1f} ms | {ms['tdb forward']:.1f} ms | {ms['tdb run_with_cache']:.1f} ms "
            f"| {ms['TL run_with_cache']:.1f} ms | {t['tdb forward'] / t['transformers']:.3f} "
            f"| {t['tdb run_with_cache'] / t['transformers']:.3f} | {t['tdb run_with_cache'] / t['TL run_with_cache']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_gpt2.json"),
                    help="write the figures here (default: %(default)s; '' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    hf = make_hf_gpt2(seed=0, **GPT2_SMALL)
    tdb = HookedGPT2.from_hf_model(hf)
    tl = make_tl(hf)
    hf, tdb, tl = (m.to(args.device).eval() for m in (hf, tdb, tl))
    # the caches are dropped right away: what is timed is computing and recording every activation
    variants = {
        "transformers": lambda t: hf(t).logits,
        "tdb forward": lambda t: tdb(t),
        "tdb run_with_cache": lambda t: tdb.run_with_cache(t)[0],
        "TL run_with_cache": lambda t: tl.run_with_cache(t)[0],
    }
    n_tdb = len(tdb.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=args.device))[1])
    n_tl = len(tl.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=args.device))[1])
    print(f"GPT-2 small (124M), random weights, fp32, device={args.device}, torch threads={torch.get_num_threads()}, "
          f"transformers attention={hf.config._attn_implementation}, median of {args.repeats} interleaved runs "
          f"after {args.warmup} warm-up; cached activations: tdb {n_tdb}, TL {n_tl}\n")
    header = ("| batch x pos (timer) | transformers | tdb forward | tdb run_with_cache | TL run_with_cache "
              "| tdb/transformers | cache/transformers | cache/TL-cache |\n|---|---|---|---|---|---|---|---|")
    modes = ["default", "keep_freed_memory"] if args.device == "cpu" else ["default"]
    results: dict = {"threads": torch.get_num_threads(), "repeats": args.repeats, "device": args.device,
                     "cached_activations": {"tdb": n_tdb, "TL": n_tl}, "runs": {}}
    for mode in modes:
        if mode == "keep_freed_memory" and not keep_freed_memory():
            break
        print(f"\nallocator: {mode}\n{header}")
        gen = torch.Generator().manual_seed(0)
        rows = results["runs"][mode] = {}
        for b, p in SHAPES:
            tokens = torch.randint(0, GPT2_SMALL["vocab_size"], (b, p), generator=gen).to(args.device)
            wall, cpu = bench(variants, tokens, args.repeats, args.warmup, args.device)
            print(_row(f"{b}x{p} (wall)", wall), flush=True)
            print(_row(f"{b}x{p} (CPU time)", cpu), flush=True)
            rows[f"{b}x{p}"] = {"wall_s": wall, "cpu_s": cpu, "ratios_wall": _ratios(wall), "ratios_cpu": _ratios(cpu)}
    print("\nCPU time is the process's CPU seconds over all threads: less sensitive than wall-clock to other "
          "processes competing for the cores (it still counts OpenMP spin-waiting).")
    if args.json:
        results["load_avg_at_end"] = os.getloadavg()
        results["provenance"] = provenance("bench_gpt2.py")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def _ratios(t: dict[str, float]) -> dict[str, float]:
    return {"forward/transformers": t["tdb forward"] / t["transformers"],
            "run_with_cache/transformers": t["tdb run_with_cache"] / t["transformers"],
            "run_with_cache/TL run_with_cache": t["tdb run_with_cache"] / t["TL run_with_cache"]}


if __name__ == "__main__":
    main()
