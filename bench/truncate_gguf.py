"""Write a copy of a Llama-family GGUF file that keeps only its first N blocks.

The activations at ``blocks.{l}.*`` for ``l < N`` are unchanged (later blocks never touch them), so an
SAE for ``blocks.15.hook_resid_post`` of SmolLM2 can be trained from a 16-block file that is small
enough to carry to another machine. Tensors are copied as stored (still quantised).

    python bench/truncate_gguf.py SRC.gguf DST.gguf 16 [KEEP_IDS.txt]

With KEEP_IDS.txt (whitespace-separated token ids, e.g. every id of a corpus) the other rows of the
token embedding are zeroed, so the file compresses well; activations of text made of those tokens
are unchanged.
"""

from __future__ import annotations

import re
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def truncate(src: str, dst: str, n_blocks: int, keep_ids: set[int] | None = None) -> None:
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = n_blocks if key == f"{arch}.block_count" else f.contents()
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, val, f.types[0], sub_type=sub)
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= n_blocks:
            continue
        data = t.data
        if keep_ids is not None and t.name == "token_embd.weight":
            data = np.array(data)  # rows are token ids, each row whole quantised blocks
            drop = np.ones(data.shape[0], dtype=bool)
            drop[sorted(keep_ids)] = False
            data[drop] = 0
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    keep = set(map(int, open(sys.argv[4]).read().split())) if len(sys.argv) > 4 else None
    truncate(sys.argv[1], sys.argv[2], int(sys.argv[3]), keep)
