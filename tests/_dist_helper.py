"""Run by tests/test_distributed.py under torchrun: what `tdb_lens.distributed.init` sets up, and
its collectives, written to ``OUT/rank-R.json``."""

import json
import sys
from pathlib import Path

import torch

from tdb_lens import distributed


def main(out: str) -> None:
    d = distributed.init()
    again = distributed.init()
    local = torch.arange(len(d.shard(7)), dtype=torch.float64) + 10 * d.rank
    gathered = d.all_gather_rows(local)
    summed = d.all_reduce(torch.tensor([d.rank + 1.0, 2.0]))
    biggest = d.all_reduce(torch.tensor([float(d.rank)]), op="max")
    seed = d.broadcast_object({"seed": 1234} if d.is_main else None)
    objects = d.all_gather_object({"r": d.rank})
    d.log.info("hello from the helper")
    d.barrier()
    Path(out, f"rank-{d.rank}.json").write_text(json.dumps({
        "rank": d.rank, "world": d.world_size, "local_rank": d.local_rank, "backend": d.backend,
        "device": str(d.device), "threads": d.threads, "torch_threads": torch.get_num_threads(),
        "same_object": again is d, "shard": [d.shard(7).start, d.shard(7).stop], "gathered": gathered.tolist(),
        "summed": summed.tolist(), "max": biggest.tolist(), "seed": seed, "objects": objects, "progress": d.progress(),
    }))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
