"""Run by tests/test_distributed_harvest.py, under torchrun or in a plain process: a sharded harvest
of a tiny random GPT-2 over a text file, at each hook in HOOKS, into ``OUT/<hook>``.

Environment: ``DIE_RANK`` and ``DIE_AFTER``: that rank kills itself (SIGKILL) in its forward number
DIE_AFTER + 1, i.e. after DIE_AFTER complete batches (with ``DIE_ONCE`` only in torchrun's first
attempt, ``TORCHELASTIC_RESTART_COUNT`` 0). Each run appends its forward count to
``OUT/forwards-rank-R.txt``.
"""

import os
import signal
import sys
from pathlib import Path

from tdb_lens import GPT2Config, HookedGPT2, distributed
from tdb_lens.corpus import build_corpus
from tdb_lens.explain.sharding import harvest_sharded

HOOKS = ("blocks.0.mlp.hook_post", "hook_embed")
SETTINGS = {"k": 5, "n_sample": 6, "n_random": 5, "n_quantiles": 4, "batch_size": 8, "seed": 3, "model_name": "tiny"}


def tiny_model() -> HookedGPT2:
    return HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=64), seed=0).eval()


def tiny_corpus(model, text_file: str):
    return build_corpus(model, text_file, ctx_len=12, n_windows=64, seed=0)


def main(out: str, text_file: str) -> None:
    d = distributed.init()
    model = tiny_model()
    corpus = tiny_corpus(model, text_file)
    calls = [0]
    die_rank, die_after = int(os.environ.get("DIE_RANK", -1)), int(os.environ.get("DIE_AFTER", -1))
    if os.environ.get("DIE_ONCE") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        die_rank = -1

    def count(module, args):
        calls[0] += 1
        if d.rank == die_rank and calls[0] == die_after + 1:
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(count)
    for hook in HOOKS:
        res = harvest_sharded(model, corpus, hook, Path(out) / hook, progress=False, **SETTINGS)
        if d.is_main:
            assert res is not None and res.complete
        else:
            assert res is None
    with open(Path(out) / f"forwards-rank-{d.rank}.txt", "a") as f:
        f.write(f"{calls[0]}\n")
    d.log.info("harvest done")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
