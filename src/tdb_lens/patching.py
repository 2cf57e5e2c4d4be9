"""TransformerLens' ``patching`` functions: same names, arguments and output layouts, batched.

``get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)`` returns
``[n_layers, pos]`` of ``patching_metric(patched_logits)`` exactly as TransformerLens does (the
metric takes the logits of the corrupted batch with one patch applied and returns a number). The
difference is underneath: patches go through tdb_lens' batched patching hooks
(`tdb_lens.attribution.patch_core.patch_hooks`), ``patches_per_pass`` patched copies of
the corrupted batch per forward pass instead of one forward pass per patch. The metric still sees
each patch's ``[batch, pos, d_vocab]`` logits alone, so any TransformerLens metric works unchanged.

For normalised heatmaps with labels (and attribution patching) use `tdb_lens.attribution.patch_resid`,
`patch_heads` ... directly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from .attribution.nodes import Node
from .attribution.patch_core import patch_hooks as _core_patch_hooks

Metric = Callable[[torch.Tensor], Any]


def _patch_many(model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Metric, nodes: Sequence[Node],
                patches_per_pass: Optional[int], progress: bool) -> torch.Tensor:
    """``metric`` of the corrupted run with each node's clean activation patched in: ``[len(nodes)]``."""
    tokens = torch.as_tensor(corrupted_tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    B = tokens.shape[0]
    per_pass = patches_per_pass or max(1, 256 // B)
    sources: dict[str, torch.Tensor] = {}
    for n in nodes:
        if n.hook_name not in sources:
            src = clean_cache[n.hook_name]
            if src.shape[0] != B:
                raise ValueError(f"clean_cache[{n.hook_name!r}] has batch {src.shape[0]}, the corrupted tokens {B}")
            sources[n.hook_name] = src
    out = torch.empty(len(nodes))
    chunks = [list(range(i, min(i + per_pass, len(nodes)))) for i in range(0, len(nodes), per_pass)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="activation patching", disable=not progress, leave=False):
            groups: dict[str, list[tuple[int, Node]]] = defaultdict(list)
            for j, i in enumerate(chunk):
                groups[nodes[i].hook_name].append((j, nodes[i]))
            hooks = _core_patch_hooks(model, groups, sources, B)
            logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
            for j, i in enumerate(chunk):
                out[i] = float(metric(logits[j * B:(j + 1) * B]))
    return out


def _grid(model: Any, tokens: torch.Tensor, axes: Sequence[str], site: str) -> tuple[list[Node], tuple[int, ...]]:
    cfg = model.cfg
    n_pos = torch.as_tensor(tokens).shape[-1]
    heads = getattr(cfg, "n_key_value_heads", cfg.n_heads) if site in ("k", "v") else cfg.n_heads
    sizes = {"layer": cfg.n_layers, "pos": n_pos, "head": heads, "dest_pos": n_pos, "src_pos": n_pos}
    shape = tuple(sizes[a] for a in axes)
    nodes = []
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist():
        at = dict(zip(axes, idx))
        layer = at["layer"]
        if site in ("resid_pre", "resid_mid"):
            nodes.append(Node.resid(layer, at.get("pos"), site[len("resid_"):]))
        elif site == "attn_out":
            nodes.append(Node.attn_out(layer, at.get("pos")))
        elif site == "mlp_out":
            nodes.append(Node.mlp_out(layer, at.get("pos")))
        else:
            pos = at.get("pos", at.get("dest_pos"))
            nodes.append(Node.head(layer, at["head"], pos, at.get("src_pos"), site=site))
    return nodes, shape


def generic_activation_patch(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: Metric,
    site: str,
    index_axis_names: Sequence[str],
    patches_per_pass: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Patch ``site`` ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v",
    "pattern") at every index of ``index_axis_names`` (from "layer", "pos", "head", "dest_pos",
    "src_pos"): a tensor of that shape holding ``patching_metric(patched_logits)``."""
    nodes, shape = _grid(model, corrupted_tokens, index_axis_names, site)
    return _patch_many(model, corrupted_tokens, clean_cache, patching_metric, nodes, patches_per_pass,
                       progress).reshape(shape)


def _make(site: str, axes: tuple[str, ...], what: str) -> Callable[..., torch.Tensor]:
    def fn(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
           patching_metric: Metric, patches_per_pass: Optional[int] = None, progress: bool = True) -> torch.Tensor:
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, site, axes,
                                        patches_per_pass, progress)

    fn.__doc__ = (f"Patch {what} from ``clean_cache`` into the corrupted run, one at a time: "
                  f"``[{', '.join(axes)}]`` of ``patching_metric(patched_logits)`` (TransformerLens' layout).")
    return fn


get_act_patch_resid_pre = _make("resid_pre", ("layer", "pos"), "the residual stream entering each block at each position")
get_act_patch_resid_mid = _make("resid_mid", ("layer", "pos"), "the residual stream between attention and MLP")
get_act_patch_attn_out = _make("attn_out", ("layer", "pos"), "each attention layer's output at each position")
get_act_patch_mlp_out = _make("mlp_out", ("layer", "pos"), "each MLP layer's output at each position")
get_act_patch_attn_head_out_by_pos = _make("z", ("layer", "pos", "head"), "each head's output (hook_z) at each position")
get_act_patch_attn_head_q_by_pos = _make("q", ("layer", "pos", "head"), "each head's query at each position")
get_act_patch_attn_head_k_by_pos = _make("k", ("layer", "pos", "head"), "each (key/value) head's key at each position")
get_act_patch_attn_head_v_by_pos = _make("v", ("layer", "pos", "head"), "each (key/value) head's value at each position")
get_act_patch_attn_head_pattern_by_pos = _make("pattern", ("layer", "head", "dest_pos"),
                                               "each head's attention pattern row for each destination position")
get_act_patch_attn_head_pattern_dest_src_pos = _make("pattern", ("layer", "head", "dest_pos", "src_pos"),
                                                     "each single attention-pattern entry")
get_act_patch_attn_head_out_all_pos = _make("z", ("layer", "head"), "each head's output (hook_z) at every position")
get_act_patch_attn_head_q_all_pos = _make("q", ("layer", "head"), "each head's query at every position")
get_act_patch_attn_head_k_all_pos = _make("k", ("layer", "head"), "each (key/value) head's key at every position")
get_act_patch_attn_head_v_all_pos = _make("v", ("layer", "head"), "each (key/value) head's value at every position")
get_act_patch_attn_head_pattern_all_pos = _make("pattern", ("layer", "head"), "each head's whole attention pattern")


def _per_query_head(model: Any, t: torch.Tensor, head_axis: int) -> torch.Tensor:
    """k / v results over key/value heads repeated so each query head reads its group's value."""
    rep = model.cfg.n_heads // getattr(model.cfg, "n_key_value_heads", model.cfg.n_heads)
    return t.repeat_interleave(rep, dim=head_axis)


def _every_head_site(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                     metric: Metric, by_pos: bool) -> torch.Tensor:
    """The five per-head patches (output, q, k, v, pattern) stacked, as TransformerLens' ``*_every``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    mode = "by_pos" if by_pos else "all_pos"
    g = globals()
    out, q, k, v, pattern = (g[f"get_act_patch_attn_head_{site}_{mode}"](*args)
                             for site in ("out", "q", "k", "v", "pattern"))
    head_axis = 2 if by_pos else 1
    return torch.stack([out, q, _per_query_head(model, k, head_axis), _per_query_head(model, v, head_axis),
                        pattern.transpose(1, 2) if by_pos else pattern])


def get_act_patch_attn_head_all_pos_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                                          metric: Metric) -> Float[torch.Tensor, "5 layer head"]:
    """Output, query, key, value and pattern of every head, all positions: ``[5, n_layers, n_heads]``."""
    return _every_head_site(model, corrupted_tokens, clean_cache, metric, by_pos=False)


def get_act_patch_attn_head_by_pos_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                                         metric: Metric) -> Float[torch.Tensor, "5 layer pos head"]:
    """Output, query, key, value and pattern of every head at every position: ``[5, n_layers, pos, n_heads]``."""
    return _every_head_site(model, corrupted_tokens, clean_cache, metric, by_pos=True)


def get_act_patch_block_every(model: Any, corrupted_tokens: Int[torch.Tensor, "batch pos"], clean_cache: Any,
                              metric: Metric) -> Float[torch.Tensor, "3 layer pos"]:
    """Residual stream entering each block, attention output and MLP output: ``[3, n_layers, pos]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    return torch.stack([get_act_patch_resid_pre(*args), get_act_patch_attn_out(*args), get_act_patch_mlp_out(*args)])
