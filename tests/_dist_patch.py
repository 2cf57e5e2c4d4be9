"""Run by tests/test_distributed_patching.py under torchrun (or plainly): patching sweeps and IOI
metrics over IOI prompts on a tiny random GPT-2, split over the ranks; rank 0 writes them to
``OUT/sharded.safetensors``."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdb_lens import GPT2Config, HookedGPT2, distributed
from tdb_lens.attribution import Node, activation_patch, attribution_patch, path_patch
from tdb_lens.attribution.sharding import sharded_patch
from tdb_lens.ioi import IOIContext, IOIDataset
from tdb_lens.ioi.discovery import (
    attribution_by_position,
    completeness,
    head_detector_scores,
    head_direct_effects,
    ioi_metric,
    minimality,
    path_patch_to_queries,
)
from tdb_lens.ioi.sharding import (
    ShardedIOIContext,
    sharded_circuit_attribution,
    sharded_circuit_ld,
    sharded_faithfulness,
    sharded_prompt_ld,
)

N_PROMPTS = 10
CIRCUIT = {(0, 1), (1, 2), (1, 3)}


def setup(context=IOIContext):
    model = HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=64), seed=1).eval()
    # attention 10x stronger than at init, so that the ABC corruption moves the metric by 0.018 (at init by 0.0015,
    # where float32 rounding in the 1-process reference alone is 1e-5 of the normalised scores)
    with torch.no_grad():
        for block in model.blocks:
            for w in (block.attn.W_Q, block.attn.W_K, block.attn.W_V, block.attn.W_O):
                w.mul_(10.0)
    ctx = context.from_dataset(model, IOIDataset.generate(model.tokenizer, N_PROMPTS, seed=0))
    nodes = [Node.head(l, h) for l in range(2) for h in range(4)] + [Node.mlp_out(l, pos=p) for l in range(2)
                                                                      for p in range(4)]
    senders = [Node.head(0, h) for h in range(4)]
    return model, ctx, nodes, senders


def pair(ctx):
    return (ctx.clean.tokens, ctx.abc.tokens), {"clean_mask": ctx.clean.attention_mask,
                                                 "corrupted_mask": ctx.abc.attention_mask}


def context_metrics(ctx) -> dict:
    """What the IOI search and report measure through the context's methods (all prompts, a subset)."""
    rows = torch.arange(3, 9)
    ld, est = ctx.circuit_attribution(CIRCUIT, rows)
    return {"ctx_faithfulness": torch.tensor(ctx.faithfulness(CIRCUIT)),
            "ctx_faithfulness_rows": torch.tensor(ctx.faithfulness(CIRCUIT, rows)),
            "ctx_ablate_only": torch.tensor(ctx.ablate_only(CIRCUIT)),
            "ctx_attr_ld_rows": torch.tensor(ld), "ctx_attr_est_rows": est,
            "ctx_completeness": torch.tensor(completeness(ctx, CIRCUIT)),
            "ctx_minimality": torch.tensor(list(minimality(ctx, CIRCUIT).values()))}


def pass_results(ctx) -> tuple[dict, int]:
    """The passes before the search, split over ``ctx.dist``'s ranks: every prompt, 9 prompts (5 + 4 on
    2 ranks), detectors on 5 random sequences (3 + 2) and on 1 (the second rank scores none); and the
    number of sequences this process ran through the model for them (at ``hook_embed``)."""
    seen = [0]

    def count(x, hook):
        seen[0] += x.shape[0]

    with ctx.model.hooks(fwd_hooks=[(ctx.model.hook_name("embed"), count)]):
        res = _passes(ctx)
    return res, seen[0]


def _passes(ctx) -> dict:
    rows = torch.arange(1, 10)
    pp = path_patch_to_queries(ctx, [(0, h) for h in range(4)], [(1, 0), (1, 2)], rows=rows, progress=False)
    det = head_detector_scores(ctx.model, n_seqs=5, seq_len=12, seed=3, dist=ctx.dist)
    one = head_detector_scores(ctx.model, n_seqs=1, seq_len=12, seed=4, dist=ctx.dist)
    return {"pass_direct_effects": head_direct_effects(ctx), "pass_direct_effects_rows": head_direct_effects(ctx, rows),
            **{f"pass_attr_{k}": v for k, v in attribution_by_position(ctx).items()},
            **{f"pass_attr_rows_{k}": v for k, v in attribution_by_position(ctx, rows).items()},
            "pass_path_patching_rows": torch.tensor(list(pp.values())),
            **{f"pass_detector_{k}": v for k, v in det.items()}, "pass_detector_one_seq": one["induction"]}


def main(out: str) -> None:
    d = distributed.init()
    model, ctx, nodes, senders = setup()
    (clean, corrupted), masks = pair(ctx)

    def metric(rows):
        return ioi_metric(ctx.clean[rows])

    res = {
        "act": sharded_patch(activation_patch, model, clean, corrupted, metric, nodes, progress=False, **masks),
        "act_raw": sharded_patch(activation_patch, model, clean, corrupted, metric, nodes, normalise=False,
                                 progress=False, **masks),
        "attr": sharded_patch(attribution_patch, model, clean, corrupted, metric, nodes, **masks),
        "path": sharded_patch(path_patch, model, clean, corrupted, metric, senders, progress=False, **masks),
        "prompt_ld": sharded_prompt_ld(ctx),
        "circuit_prompt_ld": sharded_prompt_ld(ctx, CIRCUIT),
        "circuit_ld": torch.tensor(sharded_circuit_ld(ctx, CIRCUIT)),
        "faithfulness": torch.tensor(sharded_faithfulness(ctx, CIRCUIT)),
    }
    ld, est = sharded_circuit_attribution(ctx, CIRCUIT)
    res["attr_ld"], res["attr_est"] = torch.tensor(ld), est
    sharded_ctx = setup(ShardedIOIContext)[1]
    res.update(context_metrics(sharded_ctx))
    passes, seen = pass_results(sharded_ctx)
    res.update(passes)
    res["pass_rows_seen"] = torch.tensor(d.all_gather_object(seen))
    if d.is_main:
        save_file({k: v.float().contiguous() for k, v in res.items()}, str(Path(out) / "sharded.safetensors"))
    d.log.info("patching done")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
