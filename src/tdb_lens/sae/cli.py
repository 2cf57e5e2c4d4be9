"""``tdb-lens sae train`` / ``tdb-lens sae eval``: train an SAE on a model's activations, or evaluate one.

    tdb-lens sae train --model smollm2-135m --hook blocks.15.hook_resid_post --corpus fortunes \\
        --k 32 --d-sae 4608 --tokens 2000000 --out runs/smollm2-l15
    tdb-lens sae eval --model smollm2-135m --sae runs/smollm2-l15 --tokens 16384

``train`` writes the SAE (an SAELens folder: cfg.json + sae_weights.safetensors), checkpoints (and
resumes from them when run again with the same --out), training_log.json, metrics.json and
latent_density.png. ``eval`` prints the metrics as JSON and writes them with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdb-lens sae", description="train or evaluate sparse autoencoders")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default="smollm2-135m", help="model name or path for tdb_lens.load (default smollm2-135m)")
        q.add_argument("--corpus", default="fortunes", help="'fortunes' (Debian's fortune files), a text file/folder, or hf:NAME")
        q.add_argument("--context-size", type=int, default=128, help="tokens per row (default 128)")
        q.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for evaluation (default 16384)")
        q.add_argument("--skip-positions", type=int, default=1,
                       help="leading positions of each row left out (position 0 is an outlier; default 1)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--model-batch-size", type=int, default=16, help="rows per model forward (default 16)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="train an SAE")
    common(t)
    t.add_argument("--hook", required=True, help="hook point, e.g. blocks.15.hook_resid_post")
    t.add_argument("--architecture", choices=["topk", "standard"], default="topk")
    t.add_argument("--k", type=int, default=32, help="latents kept per token (topk)")
    t.add_argument("--d-sae", type=int, default=None, help="number of latents (default 8 x d_in)")
    t.add_argument("--tokens", type=int, required=True, help="training activations (tokens) in total")
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384), OpenAI's scaling)")
    t.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard)")
    t.add_argument("--resample-every", type=int, default=None, help="steps between dead-latent resampling (standard)")
    t.add_argument("--dead-after", type=int, default=None, help="activations without firing before a latent counts as dead "
                                                                  "(default min(1e6, tokens / 10))")
    t.add_argument("--harvest-tokens", type=int, default=None,
                   help="compute this many activations once (kept in OUT/activations.safetensors) and train "
                        "--tokens steps' worth over them in epochs, instead of streaming fresh ones")
    t.add_argument("--buffer-size", type=int, default=None, help="activations in the shuffle buffer (default 32 batches)")
    t.add_argument("--layer-norm-inputs", action="store_true", help="OpenAI's TopK input normalisation")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    t.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    t.add_argument("--out", required=True, help="output folder")

    e = sub.add_parser("eval", help="evaluate a trained SAE")
    common(e)
    e.add_argument("--sae", required=True, help="SAELens folder or OpenAI .pt file")
    e.add_argument("--hook", default=None, help="hook point (default: the SAE's recorded hook)")
    e.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default --eval-tokens)")
    e.add_argument("--out", default=None, help="folder for metrics.json and latent_density.png")
    return p


def _rows(model, args):
    from .corpus import corpus_tokens, train_eval_split

    tokens = corpus_tokens(model, args.corpus, args.context_size, seed=args.seed)
    n_eval = max(1, -(-args.eval_tokens // args.context_size))
    if n_eval >= len(tokens):
        raise SystemExit(f"the corpus has {len(tokens)} rows of {args.context_size} tokens; --eval-tokens needs {n_eval}")
    return train_eval_split(tokens, n_eval)


def _evaluate(model, sae, hook, rows, args, out: Optional[Path]) -> dict:
    from .evaluation import evaluate_sae, plot_latent_density, summary

    bs = max(1, args.model_batch_size // 2)
    m = evaluate_sae(model, sae, rows, hook, batch_size=bs, skip_positions=args.skip_positions, progress=not args.quiet)
    s = summary(m)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(s, indent=1))
        plot_latent_density(m["latent_density"], out / "latent_density.png", title=f"{hook} ({sae.cfg.d_sae} latents)")
    return s


def _train(args) -> int:
    from .. import load
    from .activation_store import ActivationStore
    from .config import SAEConfig, TrainConfig
    from .training import SAETrainer

    torch.manual_seed(args.seed)
    model = load(args.model).to(args.device)
    model.eval()
    if args.hook not in model.hook_dict:
        from ..hooks.names import unknown_name_error

        raise SystemExit(str(unknown_name_error(args.hook, model.hook_dict)))
    train_rows, eval_rows = _rows(model, args)
    with torch.no_grad():
        from .activation_store import stop_layer_for

        _, cache = model.run_with_cache(train_rows[:1].to(model.device), names_filter=args.hook,
                                        stop_at_layer=stop_layer_for(args.hook))
    d_in = cache[args.hook].shape[-1]
    d_sae = args.d_sae or 8 * d_in
    lr = args.lr if args.lr is not None else 2e-4 / (d_sae / 16384) ** 0.5
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=args.architecture,
                        k=args.k if args.architecture == "topk" else None,
                        normalize_activations="layer_norm" if args.layer_norm_inputs else "none",
                        hook_name=args.hook, model_name=args.model,
                        metadata={"corpus": args.corpus, "context_size": args.context_size,
                                  "skip_positions": args.skip_positions})
    train_cfg = TrainConfig(total_activations=args.tokens, batch_size=args.batch_size, lr=lr,
                            l1_coefficient=args.l1, resample_every=args.resample_every,
                            dead_after=args.dead_after or int(min(1_000_000, max(args.tokens // 10, args.batch_size))),
                            checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device)
    store = ActivationStore(model, args.hook, train_rows, batch_size=args.batch_size,
                            buffer_size=args.buffer_size or 32 * args.batch_size, model_batch_size=args.model_batch_size,
                            skip_positions=args.skip_positions, device=args.device, seed=args.seed,
                            progress=False)
    out = Path(args.out)
    data = store
    if args.harvest_tokens:
        from .activation_store import CachedActivations

        cached = out / "activations.safetensors"
        t0 = time.perf_counter()
        if cached.is_file():
            data = CachedActivations.load(cached, args.batch_size, args.seed, args.device)
            print(f"using {len(data.activations)} cached activations from {cached}")
        else:
            data = CachedActivations.harvest(store, args.harvest_tokens, args.batch_size, progress=not args.quiet)
            out.mkdir(parents=True, exist_ok=True)
            data.save(cached)
            print(f"harvested {len(data.activations)} activations in {time.perf_counter() - t0:.0f}s")
    from .sae import SAE

    sae = SAE(sae_cfg, device=args.device)
    t0 = time.perf_counter()
    trainer = SAETrainer(sae, train_cfg, data, out_dir=out, resume=not args.no_resume, progress=not args.quiet)
    trained = trainer.train()
    seconds = time.perf_counter() - t0
    print(f"trained {trainer.step} steps ({trainer.step * args.batch_size} activations) in {seconds:.0f}s; SAE in {out}")
    if not args.no_eval:
        s = _evaluate(model, trained, args.hook, eval_rows, args, out)
        s["train_seconds"] = seconds
        (out / "metrics.json").write_text(json.dumps(s, indent=1))
        print(json.dumps(s, indent=1))
    return 0


def _eval(args) -> int:
    from .. import load
    from .loading import load_sae

    model = load(args.model).to(args.device)
    model.eval()
    sae = load_sae(args.sae, device=args.device)
    hook = args.hook or sae.cfg.hook_name
    if not hook:
        raise SystemExit("the SAE records no hook name: pass --hook")
    if args.tokens:
        args.eval_tokens = args.tokens
    _, rows = _rows(model, args)
    s = _evaluate(model, sae, hook, rows, args, Path(args.out) if args.out else None)
    print(json.dumps(s, indent=1))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "train":
        return _train(args)
    return _eval(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
