"""Scaling out on torch.distributed: harvest and SAE-training throughput with 1 and 2 ranks.

Each configuration is one ``torchrun --standalone --nproc_per_node N`` launch of this file (gloo,
one thread per rank, ``OMP_NUM_THREADS=1``):

- **harvest**: `tdb_lens.explain.sharding.harvest_sharded` of every neuron of
  ``blocks.29.mlp.hook_post`` (1536 units, the last block, so the whole model runs) of
  SmolLM2-135M-Instruct over Debian's fortunes (``--windows`` x ``--ctx`` tokens, batches of
  ``--batch``); timed from a barrier after loading to the merged result on rank 0
  (``harvest_s``: the shards; ``merge_s``: rank 0's merge);
- **SAE training**: `tdb_lens.sae.distributed.DistributedSAETrainer`, TopK (k 32) with 8 x 576
  latents on SmolLM2-sized activations (random, held in memory, so only the training step is
  timed), global batch ``--sae-batch`` split over the ranks, ``--sae-steps`` steps (initialisation included).

Throughput is tokens (activations) per second of wall clock; each rank's process CPU time is
recorded too: on a shared machine the wall clock depends on everyone else's load (the load average
is recorded before and after), the CPU time less so.

    .venv/bin/python bench/bench_distributed.py [--windows 64] [--ctx 64] [--batch 8] [--ranks 1,2]

Writes bench/results/bench_distributed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "bench_distributed.json"
HOOK = "blocks.29.mlp.hook_post"


# ---- one rank (under torchrun) ------------------------------------------------------------------
def _harvest(args, d) -> dict:
    import tdb_lens
    from tdb_lens.corpus import build_corpus, default_corpus_path
    from tdb_lens.explain.provenance import model_identity
    from tdb_lens.explain.sharding import harvest_sharded

    model = tdb_lens.load("smollm2-135m").eval()
    corpus = build_corpus(model, default_corpus_path(), ctx_len=args.ctx, n_windows=args.windows, seed=0)
    ident = model_identity(model, "smollm2-135m")
    out = Path(args.workdir) / "harvest"
    d.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    harvest_sharded(model, corpus, HOOK, out, dist=d, merge=False, progress=False, batch_size=args.batch,
                    identity=ident)
    t1 = time.perf_counter()
    if d.is_main:
        from tdb_lens.explain.sharding import load_sharded

        res = load_sharded(out)
        assert res.complete
    t2, c2 = time.perf_counter(), time.process_time()
    cpu = d.all_gather_object(c2 - c0)
    return {"tokens": corpus.tokens.numel(), "harvest_s": t1 - t0, "merge_s": t2 - t1, "total_s": t2 - t0,
            "tokens_per_s": corpus.tokens.numel() / (t2 - t0), "cpu_s_per_rank": cpu}


def _sae(args, d) -> dict:
    from tdb_lens.sae.activation_store import CachedActivations
    from tdb_lens.sae.config import SAEConfig, TrainConfig
    from tdb_lens.sae.distributed import DistributedSAETrainer
    from tdb_lens.sae.sae import SAE

    local = args.sae_batch // d.world_size
    g = torch.Generator().manual_seed(100 + d.rank)
    acts = torch.randn(local * 8, 576, generator=g)
    data = CachedActivations(acts, batch_size=local, seed=d.rank)
    cfg = TrainConfig(total_activations=args.sae_steps * args.sae_batch, batch_size=args.sae_batch,
                      log_every=10 ** 9, lr_decay_fraction=0.0, seed=0)
    torch.manual_seed(0)
    trainer = DistributedSAETrainer(SAE(SAEConfig(d_in=576, d_sae=8 * 576, architecture="topk", k=32)), cfg, data,
                                    progress=False, dist=d)
    d.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    d.barrier()
    t1, c1 = time.perf_counter(), time.process_time()
    n = args.sae_steps * args.sae_batch
    return {"activations": n, "train_s": t1 - t0, "activations_per_s": n / (t1 - t0),
            "cpu_s_per_rank": d.all_gather_object(c1 - c0)}


def worker(args) -> None:
    from tdb_lens import distributed

    d = distributed.init(threads=1)
    out = {"world_size": d.world_size, "threads_per_rank": torch.get_num_threads(), "backend": d.backend}
    if "harvest" in args.parts:
        out["harvest"] = _harvest(args, d)
    if "sae" in args.parts:
        out["sae"] = _sae(args, d)
    if d.is_main:
        Path(args.result).write_text(json.dumps(out))
    distributed.shutdown()


# ---- the driver ---------------------------------------------------------------------------------
def _launch(args, n: int, workdir: str) -> dict:
    result = Path(workdir) / f"result-{n}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", "--workdir", workdir, "--result", str(result), "--windows", str(args.windows), "--ctx",
           str(args.ctx), "--batch", str(args.batch), "--sae-batch", str(args.sae_batch), "--sae-steps",
           str(args.sae_steps), "--parts", args.parts]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun with {n} ranks failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sae-batch", type=int, default=2048)
    p.add_argument("--sae-steps", type=int, default=10)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--parts", default="harvest,sae")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs = {}
    load_before = os.getloadavg()
    for n in (int(x) for x in args.ranks.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"bench-dist-{n}-") as wd:
            runs[str(n)] = _launch(args, n, wd)
            print(f"{n} rank(s): {json.dumps(runs[str(n)])}", flush=True)
    load_after = os.getloadavg()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_before": load_before, "load_average_after": load_after,
                    "note": "shared machine: other agents' jobs were running (see the load averages)"},
        "command": "python bench/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"hook": HOOK, "windows": args.windows, "ctx": args.ctx, "batch": args.batch,
                     "sae_batch": args.sae_batch, "sae_steps": args.sae_steps, "threads_per_rank": 1},
        "runs": runs,
    }
    if "1" in runs and "2" in runs:
        sc = {}
        if "harvest" in runs["1"]:
            sc["harvest_tokens_per_s_2_over_1"] = runs["2"]["harvest"]["tokens_per_s"] / runs["1"]["harvest"]["tokens_per_s"]
            sc["harvest_cpu_s_1_over_max_rank_2"] = (runs["1"]["harvest"]["cpu_s_per_rank"][0]
                                                     / max(runs["2"]["harvest"]["cpu_s_per_rank"]))
        if "sae" in runs["1"]:
            sc["sae_activations_per_s_2_over_1"] = (runs["2"]["sae"]["activations_per_s"]
                                                    / runs["1"]["sae"]["activations_per_s"])
            sc["sae_cpu_s_1_over_max_rank_2"] = runs["1"]["sae"]["cpu_s_per_rank"][0] / max(runs["2"]["sae"]["cpu_s_per_rank"])
        out["scaling"] = sc
        print(json.dumps(sc, indent=1))
    m = out["machine"]
    out["provenance"] = {"date": out["date"], "command": out["command"],
                         "machine": f"{m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}; "
                                    f"load average before {load_before[0]:.1f}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
