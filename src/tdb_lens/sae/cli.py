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
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from .architectures import architecture_class, trainable_architectures
from .config import SAEConfig, TrainConfig
from .sae import SAE
from .training import CHECKPOINTS, LATEST

ACTIVATIONS = "activations.safetensors"


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
    t.add_argument("--architecture", choices=trainable_architectures(), default="topk")
    t.add_argument("--k", type=int, default=32, help="latents kept per token (topk)")
    t.add_argument("--d-sae", type=int, default=None, help="number of latents (default 8 x d_in)")
    t.add_argument("--tokens", type=int, required=True, help="training activations (tokens) in total")
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384), OpenAI's scaling)")
    t.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard)")
    t.add_argument("--l0", type=float, default=1.0, help="L0 coefficient (jumprelu)")
    t.add_argument("--resample-every", type=int, default=None, help="steps between dead-latent resampling (standard)")
    t.add_argument("--dead-after", type=int, default=None, help="activations without firing before a latent counts as dead "
                                                                  "(default min(1e6, tokens / 10))")
    t.add_argument("--harvest-tokens", type=int, default=None,
                   help="compute this many activations once (kept in OUT/activations.safetensors) and train "
                        "--tokens steps' worth over them in epochs, instead of streaming fresh ones")
    t.add_argument("--buffer-size", type=int, default=None, help="activations in the shuffle buffer (default 32 batches)")
    t.add_argument("--layer-norm-inputs", action="store_true", help="OpenAI's TopK input normalisation")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    t.add_argument("--no-resume", action="store_true", help="start afresh (--out must then be new or empty)")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    t.add_argument("--out", required=True, help="output folder: new, empty, or a run of this command to resume")

    e = sub.add_parser("eval", help="evaluate a trained SAE")
    common(e)
    e.add_argument("--sae", required=True, help="SAELens folder or OpenAI .pt file")
    e.add_argument("--hook", default=None, help="hook point (default: the SAE's recorded hook)")
    e.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default --eval-tokens)")
    e.add_argument("--out", default=None, help="folder for metrics.json and latent_density.png")
    return p


class UsageError(Exception):
    """A bad argument or input: `main` prints it as one line and exits with status 2."""


def _at_least(args: argparse.Namespace, name: str, low: int | float, why: str = "") -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
        raise UsageError(f"{name} must be >= {low:g}{why}, got {value}")


def _check_common(args: argparse.Namespace) -> None:
    for name in ("--context-size",):
        _at_least(args, name, 2)
    for name in ("--tokens", "--eval-tokens", "--model-batch-size"):
        _at_least(args, name, 1)
    _at_least(args, "--skip-positions", 0)
    if args.skip_positions >= args.context_size:
        raise UsageError(f"--skip-positions {args.skip_positions} leaves nothing of rows of --context-size "
                         f"{args.context_size} tokens")
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if args.corpus != "fortunes" and not str(args.corpus).startswith("hf:") and not Path(args.corpus).exists():
        raise UsageError(f"--corpus {args.corpus}: no such file or folder ('fortunes', a text file/folder or hf:NAME)")
    if args.corpus == "fortunes":
        from ..corpus import CorpusUnavailableError, default_corpus_path

        try:
            default_corpus_path()
        except CorpusUnavailableError as e:
            raise UsageError(f"--corpus fortunes: {e}") from None


def _check_train(args: argparse.Namespace) -> None:
    """Every range and the output folder, before anything is loaded."""
    _check_common(args)
    _at_least(args, "--batch-size", 1)
    if args.tokens < args.batch_size:
        raise UsageError(f"--tokens {args.tokens} is less than one batch (--batch-size {args.batch_size})")
    _at_least(args, "--d-sae", 1)
    if architecture_class(args.architecture).takes_k:
        _at_least(args, "--k", 1)
        if args.d_sae is not None and args.k > args.d_sae:
            raise UsageError(f"--k {args.k} must be at most --d-sae {args.d_sae}")
    for name in ("--harvest-tokens", "--buffer-size"):
        _at_least(args, name, args.batch_size, " (--batch-size)")
    for name in ("--checkpoint-every", "--resample-every", "--dead-after"):
        _at_least(args, name, 1)
    _at_least(args, "--l1", 0)
    _at_least(args, "--l0", 0)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    _check_out(Path(args.out), resume=not args.no_resume)


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a training run this command wrote (something to resume from)."""
    return any((folder / f).exists() for f in (f"{CHECKPOINTS}/{LATEST}", ACTIVATIONS, "training_log.json"))


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; it must be a folder (new or empty, or a run to resume)")
    if out.is_dir() and any(out.iterdir()):
        if not _is_run(out):
            raise UsageError(f"--out {out} is not empty and holds no training run to resume; pick a new folder")
        if not resume:
            raise UsageError(f"--out {out} holds a training run and --no-resume would overwrite it; "
                             "pick a new folder or delete that one")


def _rows(model: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    from .corpus import corpus_tokens, train_eval_split

    tokens = corpus_tokens(model, args.corpus, args.context_size, seed=args.seed)
    n_eval = max(1, -(-args.eval_tokens // args.context_size))
    if n_eval >= len(tokens):
        raise UsageError(f"the corpus has {len(tokens)} rows of {args.context_size} tokens; --eval-tokens needs {n_eval}")
    return train_eval_split(tokens, n_eval)


def _evaluate(model: Any, sae: SAE, hook: str, rows: torch.Tensor, args: argparse.Namespace,
              out: Optional[Path]) -> dict[str, Any]:
    from .evaluation import evaluate_sae, plot_latent_density, summary

    bs = max(1, args.model_batch_size // 2)
    try:
        m = evaluate_sae(model, sae, rows, hook, batch_size=bs, skip_positions=args.skip_positions,
                         progress=not args.quiet)
    except (KeyError, ValueError) as e:
        raise UsageError(str(e).strip("'\"")) from None
    s = summary(m)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(s, indent=1))
        plot_latent_density(m["latent_density"], out / "latent_density.png", title=f"{hook} ({sae.cfg.d_sae} latents)")
    return s


def _load_model(args: argparse.Namespace) -> Any:
    from .. import load

    torch.manual_seed(args.seed)
    try:
        model = load(args.model).to(args.device)
    except (ValueError, OSError) as e:  # unknown name, missing or corrupt file
        raise UsageError(f"--model {args.model}: {e}") from None
    model.eval()
    return model


def _configs(args: argparse.Namespace, d_in: int, model_digest: str) -> tuple[SAEConfig, TrainConfig]:
    d_sae = args.d_sae or 8 * d_in
    lr = args.lr if args.lr is not None else 2e-4 / (d_sae / 16384) ** 0.5
    try:
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=args.architecture,
                            k=args.k if architecture_class(args.architecture).takes_k else None,
                            normalize_activations="layer_norm" if args.layer_norm_inputs else "none",
                            hook_name=args.hook, model_name=args.model,
                            metadata={"corpus": args.corpus, "context_size": args.context_size,
                                      "skip_positions": args.skip_positions, "model_digest": model_digest})
    except ValueError as e:
        raise UsageError(str(e)) from None
    train_cfg = TrainConfig(total_activations=args.tokens, batch_size=args.batch_size, lr=lr,
                            l1_coefficient=args.l1, l0_coefficient=args.l0, resample_every=args.resample_every,
                            dead_after=args.dead_after or int(min(1_000_000, max(args.tokens // 10, args.batch_size))),
                            checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device)
    return sae_cfg, train_cfg


def _provenance(args: argparse.Namespace) -> dict[str, str]:
    """What the cached activations were computed from (checked before they are reused): the
    settings, and the model's weights digest (`tdb_lens.provenance`), set by `_train`."""
    keys = ("model", "model_digest", "hook", "corpus", "context_size", "skip_positions", "seed")
    return {k: str(getattr(args, k, "")) for k in keys}


def _data(model: Any, train_rows: torch.Tensor, args: argparse.Namespace, out: Path) -> Iterator[torch.Tensor]:
    """The activation stream: fresh from the model, or harvested once into OUT/activations.safetensors."""
    from .activation_store import ActivationStore, CachedActivations

    store = ActivationStore(model, args.hook, train_rows, batch_size=args.batch_size,
                            buffer_size=args.buffer_size or 32 * args.batch_size, model_batch_size=args.model_batch_size,
                            skip_positions=args.skip_positions, device=args.device, seed=args.seed, progress=False)
    if not args.harvest_tokens:
        return store
    cached = out / ACTIVATIONS
    t0 = time.perf_counter()
    if cached.is_file():
        try:
            data = CachedActivations.load(cached, args.batch_size, args.seed, args.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if data.metadata != _provenance(args):
            raise UsageError(f"{cached} was computed for {data.metadata}, not for this run's {_provenance(args)}; "
                             "pick a new --out")
        print(f"using {len(data.activations)} cached activations from {cached}")
        return data
    data = CachedActivations.harvest(store, args.harvest_tokens, args.batch_size, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    data.save(cached, metadata=_provenance(args))
    print(f"harvested {len(data.activations)} activations in {time.perf_counter() - t0:.0f}s")
    return data


def _train(args: argparse.Namespace) -> int:
    from ..provenance import model_identity
    from .activation_store import check_token_vectors
    from .distributed import DistributedSAETrainer, cli_rank_setup

    _check_train(args)
    model = _load_model(args)
    try:
        d_in = check_token_vectors(model, args.hook)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--hook: {str(e).strip(chr(34) + chr(39))}") from None
    args.model_digest = model_identity(model, args.model).digest
    sae_cfg, train_cfg = _configs(args, d_in, args.model_digest)
    train_rows, eval_rows = _rows(model, args)
    out = Path(args.out)
    # under torchrun: this rank's rows, batch and cache folder (tdb_lens.sae.distributed); as is otherwise
    dist, rank_args, train_rows, data_out = cli_rank_setup(args, train_rows, out)
    data = _data(model, train_rows, rank_args, data_out)
    t0 = time.perf_counter()
    try:
        trainer = DistributedSAETrainer(SAE(sae_cfg, device=args.device), train_cfg, data, out_dir=out,
                                        resume=not args.no_resume, progress=not args.quiet, dist=dist)
    except ValueError as e:  # a checkpoint of another SAE
        raise UsageError(str(e)) from None
    trained = trainer.train()
    if not dist.is_main:  # rank 0 reports and evaluates
        return 0
    seconds = time.perf_counter() - t0
    print(f"trained {trainer.step} steps ({trainer.step * args.batch_size} activations) in {seconds:.0f}s; SAE in {out}")
    if not args.no_eval:
        s = _evaluate(model, trained, args.hook, eval_rows, args, out)
        s["train_seconds"] = seconds
        (out / "metrics.json").write_text(json.dumps(s, indent=1))
        print(json.dumps(s, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .errors import SAEFormatError
    from .loading import load_sae

    if args.tokens is not None:
        args.eval_tokens = args.tokens
    _check_common(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; metrics.json and latent_density.png go into a folder")
    try:
        sae = load_sae(args.sae, device=args.device)
    except SAEFormatError as e:
        raise UsageError(f"--sae: {e}") from None
    hook = args.hook or sae.cfg.hook_name
    if not hook:
        raise UsageError("the SAE records no hook name: pass --hook")
    model = _load_model(args)
    _, rows = _rows(model, args)
    s = _evaluate(model, sae, hook, rows, args, out)
    print(json.dumps(s, indent=1))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``tdb-lens sae ...``; a user error is one line on stderr and exit status 2."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _train(args) if args.command == "train" else _eval(args)
    except UsageError as e:
        one_line = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"tdb-lens sae {args.command}: {one_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
