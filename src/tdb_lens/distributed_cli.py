"""The ``tdb-lens`` commands under torchrun: ``torchrun --nproc_per_node N -m tdb_lens <command> ...``.

`tdb_lens.cli.main` asks `run_under_torchrun` first; in a plain process it returns None and the
command runs as always. Under torchrun (`tdb_lens.distributed.init`: gloo or NCCL, one device and
thread count per rank):

- ``explain``: every rank loads the model and harvests its shard of the corpus
  (`tdb_lens.explain.sharding.harvest_sharded`, into ``<harvest dir>.shards/rank-R-of-N``); rank 0
  consolidates the shards into the harvest directory the 1-process command uses and runs the
  ordinary command, which finds the harvest complete and goes on to explain, score and store (the
  explainer runs on rank 0). A rerun after a failure resumes every rank's shard.
- ``sae train``: the command itself splits rows and the global batch over the ranks and trains with
  DDP (`tdb_lens.sae.distributed`); rank 0 writes the SAE and evaluates it.
- ``ioi``: the command measures with `tdb_lens.ioi.sharding.ShardedIOIContext` (the circuit search
  and the final faithfulness, completeness and minimality split the prompts over the ranks); rank 0
  prints and writes the report.
- any other command (``sae eval``, ``hooks``, ``debug``) runs in one process: under torchrun
  with more than one rank it is refused with a one-line message (exit 2) instead of running N copies.

Progress bars show on rank 0 only; log lines name the rank (``[rank 1/2] ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from .distributed import Dist, env_world, init

__all__ = ["run_under_torchrun"]


def run_under_torchrun(cmd: str, rest: list[str]) -> Optional[int]:
    """The exit status of ``cmd`` run across torchrun's ranks, or None when it runs as usual (a plain
    process, or a command that splits its work itself)."""
    if env_world() is None:
        return None
    d = init()
    if cmd == "explain":
        return _explain(rest, d)
    if (cmd == "sae" and rest[:1] == ["train"]) or cmd == "ioi":
        return None
    if d.world_size == 1:
        return None
    what = f"{cmd} {rest[0]}" if cmd == "sae" and rest else cmd
    if d.is_main:
        print(f"tdb-lens {what}: error: runs in one process; under torchrun only `explain` (the harvest), `sae train` "
              f"and `ioi` split their work over ranks (this job has {d.world_size}): run it without torchrun", file=sys.stderr)
    return 2


def _explain(rest: list[str], d: Dist) -> int:
    from .explain.cli import build_parser, config_from_args
    from .explain.cli import main as explain_main

    args = build_parser().parse_args(rest)
    if args.search or args.list:
        return explain_main(rest) if d.is_main else 0
    try:
        config = config_from_args(args)
        config.check()
        model = _load(config.model)
        _harvest_shards(model, config, d)
    except (ValueError, KeyError, FileNotFoundError, ImportError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        d.log.error(f"tdb-lens explain: error: {msg}")
        return 2
    d.barrier()
    if not d.is_main:
        return 0
    from .cli import UsageError

    try:
        return explain_main(rest, model=model)
    except UsageError as e:
        print(f"tdb-lens explain: error: {e}", file=sys.stderr)
        return 2


def _load(name: str) -> Any:
    from .loading import load

    return load(name).eval()


def _harvest_shards(model: Any, config: Any, d: Dist) -> None:
    """This rank's shard of the harvest the 1-process command would make; rank 0 consolidates them
    into that command's harvest directory (left alone when it already holds a harvest)."""
    from .corpus import build_corpus, default_corpus_path
    from .explain.harvest import n_units_at
    from .explain.pipeline import _attach_sae, _harvest_dir, parse_units
    from .explain.provenance import model_identity
    from .explain.sharding import consolidate, harvest_sharded

    attached = _attach_sae(model, config)
    try:
        model.hook_layout(config.hook)
        ident = model_identity(model, config.model)
        units = parse_units(config.units, n_units_at(model, config.hook), config.seed)
        source = default_corpus_path() if config.corpus == "fortunes" else config.corpus
        corpus = build_corpus(model, source, ctx_len=config.ctx_len, n_windows=config.n_windows, seed=config.seed)
        hdir = Path(_harvest_dir(config, ident, corpus.fingerprint, units))
        if (hdir / "manifest.json").exists():
            return  # a harvest is there already (the 1-process command resumes or reuses it)
        shards = hdir.with_name(hdir.name + ".shards")
        if d.is_main:
            d.log.info(f"harvesting {len(units)} units at {config.hook} over {corpus.n_windows} windows on "
                       f"{d.world_size} ranks into {shards}")
        harvest_sharded(model, corpus, config.hook, shards, dist=d, merge=False, units=units, k=config.k,
                        batch_size=config.batch_size, seed=config.seed, identity=ident, progress=config.progress)
        if d.is_main:
            consolidate(shards, hdir)
    finally:
        if attached is not None:
            from .sae import remove_sae

            remove_sae(model, attached)
