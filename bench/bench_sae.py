"""SAE benchmark: tdb_lens against sae_lens, side by side in one process, on the same weights.

1. Training throughput (activations per second): a TopK SAE trained on the same activation batches
   by tdb_lens's `SAETrainer.train_step` and by sae_lens's ``TopKTrainingSAE.training_forward_pass``
   plus Adam (both with the AuxK loss active on the same dead latents).
2. ``run_with_cache`` with an SAE attached (error term on), tdb_lens's ``HookedGPT2`` against
   sae_lens's ``HookedSAETransformer`` built from the same random GPT-2 weights; each library's
   overhead over its own plain forward, and the cross-library ratio.

    .venv/bin/python bench/bench_sae.py [--threads N] [--quick]

Prints a table and writes bench/results/bench_sae.json (or --out). Times are medians of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

warnings.filterwarnings("ignore")


def paired(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median seconds per call of each function, the functions alternating call by call so that
    changes in machine load hit them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in ts.items()}


# ------------------------------------------------------------------------------------ models
def build_models(cfg_kw: dict, seed: int = 0):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2

    cfg = GPT2Config(**cfg_kw)
    ours = HookedGPT2.from_config(cfg, seed=seed).eval()
    # convert_gpt2_weights reads a transformers GPT2LMHeadModel's attributes; ours keeps the same layout
    hf_like = SimpleNamespace(
        transformer=SimpleNamespace(
            wte=ours.wte, wpe=ours.wpe, ln_f=ours.ln_final,
            h=[SimpleNamespace(ln_1=b.ln1, attn=b.attn, ln_2=b.ln2, mlp=b.mlp) for b in ours.blocks],
        ),
        lm_head=SimpleNamespace(weight=ours.wte.weight),
    )
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, act_fn="gelu_new", normalization_type="LN",
        eps=cfg.eps, positional_embedding_type="standard", default_prepend_bos=False, device="cpu",
    )
    theirs = HookedSAETransformer(tl_cfg)
    sd = {k: v.detach().clone() for k, v in convert_gpt2_weights(hf_like, tl_cfg).items()}
    theirs.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                       fold_value_biases=False, refactor_factored_attn_matrices=False)
    theirs.eval()
    return ours, theirs


def build_saes(d_in: int, d_sae: int, k: int, hook: str, seed: int = 0):
    from sae_lens import SAE as LensSAE
    from sae_lens import TopKSAEConfig

    from tdb_lens.sae import SAE, SAEConfig

    torch.manual_seed(seed)
    ours = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, hook_name=hook))
    with torch.no_grad():
        ours.W_enc.normal_(0, d_in ** -0.5)
        ours.b_enc.normal_(0, 0.01)
    c = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    c.metadata.hook_name = hook
    theirs = LensSAE.from_dict(c.to_dict())
    theirs.load_state_dict({n: getattr(ours, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
    return ours, theirs


# ----------------------------------------------------------------------------------- training
def bench_training(d_in: int, d_sae: int, k: int, batch: int, steps: int) -> dict:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from tdb_lens.sae import SAE, SAEConfig, TrainConfig
    from tdb_lens.sae.activation_store import CachedActivations
    from tdb_lens.sae.training import SAETrainer

    g = torch.Generator().manual_seed(0)
    X = torch.randn(batch * 8, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in ** 0.5)
    batches = [X[i * batch:(i + 1) * batch] for i in range(8)]
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 4] = True  # a quarter of the latents dead: AuxK active in both

    torch.manual_seed(0)
    ours = SAETrainer(SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)),
                      TrainConfig(total_activations=batch * 10 ** 6, batch_size=batch, dead_after=1, normalize_scale=False),
                      CachedActivations(X, batch), progress=False)
    ours.since_fired[:] = 0
    i = [0]

    def ours_step():
        ours.since_fired[dead] = 10  # keep the same latents dead
        ours.train_step(batches[i[0] % 8])
        i[0] += 1

    torch.manual_seed(0)
    lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    opt = torch.optim.Adam(lens.parameters(), lr=4e-4)
    j = [0]

    def lens_step():
        out = lens.training_forward_pass(TrainStepInput(sae_in=batches[j[0] % 8], coefficients={},
                                                        dead_neuron_mask=dead, n_training_steps=j[0],
                                                        is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        j[0] += 1

    t = paired({"ours": ours_step, "lens": lens_step}, steps)
    t_ours, t_lens = t["ours"], t["lens"]
    return {"batch": batch, "d_in": d_in, "d_sae": d_sae, "k": k,
            "tdb_lens_acts_per_s": batch / t_ours, "sae_lens_acts_per_s": batch / t_lens,
            "speedup_tdb_over_sae_lens": t_lens / t_ours}


# -------------------------------------------------------------------------------- run_with_cache
def bench_run_with_cache(model_kw: dict, d_sae: int, k: int, hook: str, batch: int, ctx: int, reps: int) -> dict:
    ours, theirs = build_models(model_kw)
    sae_ours, sae_theirs = build_saes(model_kw["d_model"], d_sae, k, hook)
    tokens = torch.randint(0, model_kw["d_vocab"], (batch, ctx), generator=torch.Generator().manual_seed(1))
    latents = f"{hook}.hook_sae_acts_post"
    res: dict = {}
    with torch.no_grad():
        diff = float((ours(tokens) - theirs(tokens)).abs().max())
        res["max_logit_diff_between_models"] = diff
        res["plain_forward_s"] = paired({"tdb_lens": lambda: ours(tokens), "sae_lens": lambda: theirs(tokens)}, reps)
        res["cache_no_sae_all_hooks_s"] = paired({"tdb_lens": lambda: ours.run_with_cache(tokens),
                                                  "sae_lens": lambda: theirs.run_with_cache(tokens)}, reps)
        ours.add_sae(sae_ours, hook, use_error_term=True)
        theirs.add_sae(sae_theirs, use_error_term=True)
        a = ours.run_with_cache(tokens, names_filter=latents)[1][latents]
        b = theirs.run_with_cache(tokens, names_filter=latents)[1][latents]
        res["max_latent_diff"] = float((a - b).abs().max())
        res["sae_forward_s"] = paired({"tdb_lens": lambda: ours(tokens), "sae_lens": lambda: theirs(tokens)}, reps)
        res["sae_cache_latents_s"] = paired({
            "tdb_lens": lambda: ours.run_with_cache(tokens, names_filter=latents),
            "sae_lens": lambda: theirs.run_with_cache(tokens, names_filter=latents)}, reps)
        res["sae_cache_all_hooks_s"] = paired({"tdb_lens": lambda: ours.run_with_cache(tokens),
                                               "sae_lens": lambda: theirs.run_with_cache(tokens)}, reps)
        ours.reset_saes()
        theirs.reset_saes()
    for key in ("sae_forward_s", "sae_cache_latents_s", "sae_cache_all_hooks_s"):
        r = res[key]
        res[key.replace("_s", "_overhead_vs_plain")] = {lib: r[lib] / res["plain_forward_s"][lib] for lib in r}
        res[key.replace("_s", "_ratio_tdb_over_sae_lens")] = r["tdb_lens"] / r["sae_lens"]
    res.update({"batch": batch, "ctx": ctx, "model": model_kw, "d_sae": d_sae, "k": k, "hook": hook})
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "bench_sae.json"),
                    help="results file (default bench/results/bench_sae.json, which the README quotes)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    model_kw = dict(n_layers=4 if q else 6, n_heads=6, d_model=384, d_mlp=1536, d_vocab=8192, n_ctx=256)
    train = bench_training(d_in=384, d_sae=3072, k=32, batch=1024 if q else 4096, steps=5 if q else 10)
    rwc = bench_run_with_cache(model_kw, d_sae=3072, k=32, hook="blocks.2.hook_resid_post",
                               batch=4 if q else 8, ctx=128, reps=3 if q else 5)
    out = {"torch_threads": torch.get_num_threads(), "training": train, "run_with_cache": rwc}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"torch threads: {out['torch_threads']}")
    print(f"training (TopK d_in={train['d_in']} d_sae={train['d_sae']} k={train['k']} batch={train['batch']}, AuxK on):")
    print(f"  tdb_lens {train['tdb_lens_acts_per_s']:10.0f} act/s   sae_lens {train['sae_lens_acts_per_s']:10.0f} act/s"
          f"   tdb_lens/sae_lens speed {train['speedup_tdb_over_sae_lens']:.2f}x")
    print(f"run_with_cache ({rwc['batch']}x{rwc['ctx']} tokens, GPT-2 {model_kw['n_layers']}L d{model_kw['d_model']}, "
          f"SAE at {rwc['hook']}; logits differ by {rwc['max_logit_diff_between_models']:.1e}, "
          f"latents by {rwc['max_latent_diff']:.1e}):")
    print(f"  {'':28s}{'tdb_lens s':>12s}{'sae_lens s':>12s}{'tdb/sae_lens':>14s}")
    for key in ("plain_forward_s", "cache_no_sae_all_hooks_s", "sae_forward_s", "sae_cache_latents_s", "sae_cache_all_hooks_s"):
        r = rwc[key]
        print(f"  {key:28s}{r['tdb_lens']:12.4f}{r['sae_lens']:12.4f}{r['tdb_lens'] / r['sae_lens']:14.2f}")
    for key in ("sae_forward_overhead_vs_plain", "sae_cache_latents_overhead_vs_plain"):
        r = rwc[key]
        print(f"  {key:36s} tdb_lens {r['tdb_lens']:.2f}x  sae_lens {r['sae_lens']:.2f}x")


if __name__ == "__main__":
    main()
