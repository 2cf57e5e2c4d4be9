"""The ``tdb-lens`` commands under torchrun: ``torchrun --nproc_per_node N -m tdb_lens <command> ...``.

`tdb_lens.cli.main` asks `run_under_torchrun` first; in a plain process it returns None and the
command runs as always. Under torchrun (`tdb_lens.distributed.init`: gloo or NCCL, one device and
thread count per rank):

- ``explain``: every rank runs the ordinary command up to its harvest, which is replaced by the
  sharded one (`tdb_lens.explain.sharding.harvest_sharded`, into ``<harvest dir>.shards/rank-R-of-N``);
  rank 0 consolidates the shards into the harvest directory the 1-process command uses and goes on
  to explain, score and store; the other ranks stop after their shard. A rerun after a failure
  resumes every rank's shard.
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

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

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


class _OtherRankDone(Exception):
    """Raised on ranks other than 0 once their part of ``explain`` (the harvest shard) is done."""


def _explain(rest: list[str], d: Dist) -> int:
    """Every rank runs the ordinary command with the pipeline's harvest replaced by the sharded one;
    after the harvest, ranks other than 0 stop and rank 0 goes on (explain, score, store)."""
    from .explain import pipeline
    from .explain.cli import build_parser
    from .explain.cli import main as explain_main

    args = build_parser().parse_args(rest)
    if args.search or args.list:
        return explain_main(rest) if d.is_main else 0
    original = pipeline.harvest
    pipeline.harvest = functools.partial(_harvest_on_ranks, d, original)
    try:
        return explain_main(rest)
    except _OtherRankDone:
        return 0
    finally:
        pipeline.harvest = original


def _harvest_on_ranks(d: Dist, original: Callable[..., Any], model: Any, corpus: Any, hook: str,
                      out_dir: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """In place of `tdb_lens.explain.harvest.harvest` under torchrun: each rank harvests its shard into
    ``<out_dir>.shards/rank-R-of-N``, rank 0 consolidates them into ``out_dir`` (the directory the
    1-process command uses) and returns it; the other ranks stop. A harvest already in ``out_dir``
    (say, from a 1-process run) is left to rank 0 alone."""
    from .explain.sharding import consolidate, harvest_sharded

    out = Path(out_dir)
    if (out / "manifest.json").exists():
        if d.is_main:
            return original(model, corpus, hook, out_dir, **kwargs)
        raise _OtherRankDone
    shards = out.with_name(out.name + ".shards")
    progress = bool(kwargs.pop("progress", True))
    if d.is_main:
        d.log.info(f"harvesting on {d.world_size} ranks into {shards}")
    harvest_sharded(model, corpus, hook, shards, dist=d, merge=False, progress=progress, **kwargs)
    result = consolidate(shards, out) if d.is_main else None
    d.barrier()
    if not d.is_main:
        raise _OtherRankDone
    return result
