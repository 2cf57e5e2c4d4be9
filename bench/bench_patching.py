"""Activation patching of every head's output at every position: tdb_lens against TransformerLens.

Both libraries get the same random GPT-2 small weights (tdb_lens' ``HookedGPT2.from_config`` with a
seed, copied into a TransformerLens ``HookedTransformer`` in its own weight convention) and the same
random clean / corrupted prompts, in one process, one after the other. The metric is the batch-mean
logit difference between a per-prompt target and distractor at the last position, normalised
(0 = corrupted, 1 = clean). TransformerLens runs ``patching.get_act_patch_attn_head_out_by_pos``
(one forward pass per (layer, position, head)); tdb_lens runs ``patch_heads(site="z", by_pos=True)``.

    python bench/bench_patching.py [--batch 2] [--pos 10] [--threads N] [--tl-sample K] [--json PATH]

``--tl-sample K`` runs TransformerLens on every K-th (layer, pos, head) patch only (its own
``generic_activation_patch`` with an ``index_df``), compares those entries and extrapolates its time
to all patches (TransformerLens' time is linear in the number of patches: one forward pass each).
The default K = 1 runs everything. Results (date, machine, command, wall and CPU times, ratio) go to
``--json`` (default ``bench/results/bench_patching.json``; ``--json ''`` writes nothing). On a shared
machine the CPU-time ratio is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from _provenance import provenance


def tl_copy(ours):
    """A TransformerLens HookedTransformer holding ``ours``' weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = ours.cfg
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head, d_mlp=c.d_mlp,
        d_vocab=c.d_vocab, n_ctx=c.n_ctx, act_fn="gelu_new", normalization_type="LN", eps=c.eps,
        positional_embedding_type="standard", device="cpu", seed=0,
    )
    tl = HookedTransformer(cfg)
    sd = {"embed.W_E": ours.W_E, "pos_embed.W_pos": ours.W_pos, "unembed.W_U": ours.W_U, "unembed.b_U": ours.b_U,
          "ln_final.w": ours.ln_final.weight, "ln_final.b": ours.ln_final.bias}
    for l, b in enumerate(ours.blocks):
        a, m = b.attn, b.mlp
        sd.update({
            f"blocks.{l}.ln1.w": b.ln1.weight, f"blocks.{l}.ln1.b": b.ln1.bias,
            f"blocks.{l}.ln2.w": b.ln2.weight, f"blocks.{l}.ln2.b": b.ln2.bias,
            f"blocks.{l}.attn.W_Q": a.W_Q, f"blocks.{l}.attn.W_K": a.W_K, f"blocks.{l}.attn.W_V": a.W_V,
            f"blocks.{l}.attn.W_O": a.W_O, f"blocks.{l}.attn.b_Q": a.b_Q, f"blocks.{l}.attn.b_K": a.b_K,
            f"blocks.{l}.attn.b_V": a.b_V, f"blocks.{l}.attn.b_O": a.b_O,
            f"blocks.{l}.mlp.W_in": m.W_in, f"blocks.{l}.mlp.b_in": m.b_in,
            f"blocks.{l}.mlp.W_out": m.W_out, f"blocks.{l}.mlp.b_out": m.b_out,
        })
    own = tl.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise RuntimeError(f"{k}: TransformerLens {tuple(own[k].shape)} vs ours {tuple(v.shape)}")
        own[k] = v.detach().clone().contiguous()
    tl.load_state_dict(own)
    tl.eval()
    return tl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pos", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tl-sample", type=int, default=1)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_patching.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformer_lens import patching as tl_patching

    from tdb_lens.attribution.metrics import LogitDiff
    from tdb_lens.attribution.patching import patch_heads
    from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2

    torch.manual_seed(args.seed)
    ours = HookedGPT2.from_config(GPT2Config(), seed=args.seed)  # GPT-2 small shape, random weights
    ours.eval()
    tl = tl_copy(ours)
    g = torch.Generator().manual_seed(args.seed + 1)
    B, P = args.batch, args.pos
    clean = torch.randint(0, 50257, (B, P), generator=g)
    corrupted = torch.randint(0, 50257, (B, P), generator=g)
    target = torch.randint(0, 50257, (B,), generator=g)
    distractor = torch.randint(0, 50257, (B,), generator=g)
    metric = LogitDiff(target, distractor)
    with torch.no_grad():
        l_ours, l_tl = ours(clean), tl(clean)
    print(f"logits: max |tdb_lens - TransformerLens| = {float((l_ours - l_tl).abs().max()):.2e}")
    with torch.no_grad():
        clean_logits, clean_cache = tl.run_with_cache(clean)
        m_clean = float(metric(clean_logits).mean())
        m_corr = float(metric(tl(corrupted)).mean())

    def tl_metric(logits):
        return (metric(logits).mean() - m_corr) / (m_clean - m_corr)

    n = tl.cfg.n_layers * tl.cfg.n_heads * P
    print(f"GPT-2 small (random weights), batch {B}, {P} positions: {n} patches (every head at every position); "
          f"torch threads {torch.get_num_threads()}")
    load_before = os.getloadavg()
    t, c = time.perf_counter(), time.process_time()
    ours_res = patch_heads(ours, clean, corrupted, metric, site="z", by_pos=True, progress=False)
    t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
    print(f"tdb_lens          {t_ours:8.2f} s  (CPU {c_ours:.2f} s)")
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if args.tl_sample == 1:
            tl_res = tl_patching.get_act_patch_attn_head_out_by_pos(tl, corrupted, clean_cache, tl_metric)  # [layer, pos, head]
            ours_flat, tl_flat, n_tl = ours_res.values.permute(0, 2, 1).reshape(-1), tl_res.float().reshape(-1), n
        else:
            df = tl_patching.make_df_from_ranges([tl.cfg.n_layers, P, tl.cfg.n_heads], ["layer", "pos", "head"])
            df = df.iloc[:: args.tl_sample]
            tl_flat = tl_patching.generic_activation_patch(
                tl, corrupted, clean_cache, tl_metric, patch_setter=tl_patching.layer_pos_head_vector_patch_setter,
                activation_name="z", index_df=df).float()
            ours_flat = ours_res.values.permute(0, 2, 1)[tuple(torch.tensor(df[c].values) for c in ("layer", "pos", "head"))]
            n_tl = len(df)
    t_tl_run, c_tl_run = time.perf_counter() - t, time.process_time() - c
    t_tl, c_tl = t_tl_run * n / n_tl, c_tl_run * n / n_tl
    extra = "" if n_tl == n else f" ({n_tl} of {n} patches took {t_tl_run:.2f} s; extrapolated to all)"
    print(f"TransformerLens   {t_tl:8.2f} s{extra}")
    diff = float((ours_flat - tl_flat).abs().max())
    print(f"max |difference| of normalised results over {n_tl} patches: {diff:.2e}  (target <= 1e-4)")
    print(f"speed-up: {t_tl / t_ours:.1f}x wall, {c_tl / c_ours:.1f}x CPU time  (target >= 5x)")
    print("top heads (tdb_lens):", [(str(k), round(v, 4)) for k, v in ours_res.top(5)])
    if args.json:
        _write_json(args.json, {
            "settings": {"batch": B, "pos": P, "patches": n, "tl_patches_run": n_tl, "threads": torch.get_num_threads(),
                         "seed": args.seed},
            "tdb_lens_s": {"wall": t_ours, "cpu": c_ours},
            "transformer_lens_s": {"wall": t_tl, "cpu": c_tl, "extrapolated": n_tl != n},
            "speedup": {"wall": t_tl / t_ours, "cpu": c_tl / c_ours, "target": 5.0},
            "max_abs_difference": diff,
        }, load_before)


def _write_json(path: str, results: dict, load_before: tuple) -> None:
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "command": "python " + " ".join(sys.argv),
        **results,
        "provenance": provenance("bench_patching.py"),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
