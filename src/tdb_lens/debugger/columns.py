"""The node table's four columns for every node, from one forward and one backward pass.

Columns (as Transformer Debugger defines them):

* ``activation``: a neuron's post-activation, an attention pair's post-softmax weight, an SAE
  latent's activation (token embeddings have none: NaN);
* ``write_magnitude``: the size of what the node writes to the residual stream (neuron
  ``|post| * ||W_out[n]||``, pair ``pattern[q, k] * ||v_k W_O[h]||``, latent ``|a| * ||W_dec[f]||``,
  embedding its norm);
* ``direct_effect``: that write dotted with the gradient of the objective at the residual stream the
  objective reads (the final residual for the logit metric, with the final norm's scale frozen; the
  traced node's input residual in a trace); nodes that write after that point get 0;
* ``total_effect``: act x grad, the estimated total effect through every path.

Node kinds: ``head`` (one node per layer x head x query x key, key <= query), ``neuron``, ``sae``
(latents of every attached SAE) and ``embed`` (token, and on GPT-2 position, embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Float, Int

from ..attribution import Node, run_with_grads
from ..sae.attach import attached_saes

COLUMNS = ("activation", "write_magnitude", "direct_effect", "total_effect")
KINDS = ("head", "neuron", "sae", "embed")
SIDES = ("q", "k", "v")


class DebuggerError(ValueError):
    """A request the debugger cannot answer (unknown node, bad prompt, bad target): a 4xx in the app."""


@dataclass
class Family:
    """One family of nodes: per column a tensor ``[batch, *shape]``; ``make(index) -> Node``.
    Entries that are not nodes (attention pairs whose key comes after the query) are NaN."""

    name: str
    values: dict[str, torch.Tensor]
    make: Callable[[tuple[int, ...]], Node]
    nan_free: bool = False  # True when no column holds a NaN (selection can skip the NaN pass)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values["total_effect"].shape[1:])


@dataclass
class Columns:
    """Every family's columns for each row of the batch, plus the objective per row and the logits."""

    families: list[Family]
    objective: torch.Tensor
    logits: torch.Tensor
    acts: dict[str, torch.Tensor] = field(default_factory=dict)


def _resid_order(model, name: str) -> float:
    """Where a residual-stream hook sits in the forward: resid_pre(l) = 2l, resid_mid(l) = 2l+1,
    resid_post(l) = 2l+2 (the final residual is 2 n_layers)."""
    lay = model.hook_layout(name)
    step = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2}.get(lay.site)
    if step is None or lay.layer is None:
        return float("nan")
    return 2 * lay.layer + step


def read_point(model, node: Optional[Node]) -> Optional[str]:
    """The residual hook a traced node reads (None: no residual read point, direct effects are NaN);
    the final residual for the logit objective (``node`` None)."""
    if node is None:
        return model.hook_name("resid_post", model.cfg.n_layers - 1)
    if node.kind == "head":
        return model.hook_name("resid_pre", node.layer)
    if node.kind == "neuron":
        return model.hook_name("resid_mid", node.layer)
    if node.kind in ("sae_latent", "sae_error"):
        host = model.hook_layout(node.hook_name).host
        return host if host is not None and not math.isnan(_resid_order(model, host)) else None
    return None


def sae_hook(model, host: str, site: str = "sae_acts_post") -> str:
    """The SAE hook point ``site`` of the SAE spliced at ``host``."""
    found = model.find_hooks(site=site, host=host)
    if not found:
        raise DebuggerError(f"no SAE hook {site!r} spliced at {host!r}")
    return found[0]


def record_names(model, kinds: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(names to record, names to differentiate)`` for the requested node kinds."""
    keep, grad = [], []
    if "embed" in kinds:
        for n in model.find_hooks(component="embed"):
            keep.append(n)
            grad.append(n)
    for l in range(model.cfg.n_layers):
        if "head" in kinds:
            pat, v = model.hook_name("pattern", l), model.hook_name("v", l)
            keep += [pat, v]
            grad.append(pat)
        if "neuron" in kinds:
            post = model.hook_name("post", l)
            keep.append(post)
            grad.append(post)
    if "sae" in kinds:
        for site in attached_saes(model):
            n = sae_hook(model, site)
            keep.append(n)
            grad.append(n)
    return keep, grad


def _dot_or_nan(x: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.full(x.shape[:-1], float("nan")) if g is None else (x.float() * g.float()).sum(-1)


def _live_dot(g: torch.Tensor, W: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``g @ W.T`` ``[b, P, n]`` computed only at the positions where the gradient is not zero
    (the logit objective reads one position: the others are exactly zero)."""
    out = torch.zeros(g.shape[0], g.shape[1], W.shape[0])
    out[:, live] = g[:, live].float() @ W.T
    return out


_WEIGHT_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(kind: str, W: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(W)`` remembered while ``W``'s storage and version counter are unchanged (weights rarely
    change between requests; an in-place edit bumps the version and recomputes)."""
    key = (kind, W.data_ptr(), W._version, tuple(W.shape))
    hit = _WEIGHT_CACHE.get(key)
    if hit is None:
        if len(_WEIGHT_CACHE) > 1024:
            _WEIGHT_CACHE.clear()
        hit = _WEIGHT_CACHE[key] = fn(W.detach().float())
    return hit


def _empty(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {c: torch.empty(shape) for c in COLUMNS}


def _head_family(model, acts, grads, g: Optional[torch.Tensor], upstream: Callable[[float], bool],
                 live: Optional[torch.Tensor]) -> Family:
    L = model.cfg.n_layers
    first = acts[model.hook_name("pattern", 0)]
    b, H, Q, K = first.shape
    out = _empty((b, L, H, Q, K))
    for l in range(L):
        attn = model.blocks[l].attn
        pat = acts[model.hook_name("pattern", l)].float()  # [b, H, Q, K]
        v = acts[model.hook_name("v", l)].float().repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)
        W_O = attn.W_O
        gram = _cached("gram", W_O, lambda w: w @ w.transpose(1, 2))  # [H, d_head, d_head]
        vnorm = torch.einsum("bkhd,hde,bkhe->bhk", v, gram, v).clamp(min=0).sqrt()  # ||v_k W_O[h]||
        out["activation"][:, l] = pat
        torch.mul(pat, vnorm[:, :, None, :], out=out["write_magnitude"][:, l])
        de = out["direct_effect"][:, l]
        if g is None or live is None:
            de.fill_(float("nan"))
        else:
            de.zero_()
            if upstream(2 * l + 1):
                gW = torch.einsum("bqm,hdm->bhqd", g[:, live].float(), W_O.detach().float())
                de[:, :, live] = pat[:, :, live] * torch.einsum("bhqd,bkhd->bhqk", gW, v)
        torch.mul(pat, grads[model.hook_name("pattern", l)].float(), out=out["total_effect"][:, l])
    future = ~torch.ones(Q, K, dtype=torch.bool).tril()  # key after query: not a node
    for t in out.values():
        t.masked_fill_(future, float("nan"))
    return Family("head", out, lambda i: Node.head(i[0], i[1], i[2], i[3]))


def _neuron_family(model, acts, grads, g: Optional[torch.Tensor], upstream: Callable[[float], bool],
                   live: Optional[torch.Tensor]) -> Family:
    L = model.cfg.n_layers
    b, P, N = acts[model.hook_name("post", 0)].shape
    out = _empty((b, L, P, N))
    for l in range(L):
        W_out = model.blocks[l].mlp.W_out.detach().float()  # [N, d_model]
        post = acts[model.hook_name("post", l)].float()
        out["activation"][:, l] = post
        torch.mul(post.abs(), _cached("row_norm", W_out, lambda w: w.norm(dim=-1)), out=out["write_magnitude"][:, l])
        de = out["direct_effect"][:, l]
        if g is None or live is None:
            de.fill_(float("nan"))
        elif upstream(2 * l + 2):
            torch.mul(post, _live_dot(g, W_out, live), out=de)
        else:
            de.zero_()
        torch.mul(post, grads[model.hook_name("post", l)].float(), out=out["total_effect"][:, l])
    return Family("neuron", out, lambda i: Node.neuron(i[0], i[2], i[1]), nan_free=g is not None and live is not None)


def _sae_families(model, acts, grads, g: Optional[torch.Tensor], upstream: Callable[[float], bool],
                  live: Optional[torch.Tensor]) -> list[Family]:
    out = []
    for site, sae in attached_saes(model).items():
        name = sae_hook(model, site)
        a = acts[name].float()  # [b, P, F]
        W_dec = sae.W_dec.detach().float()
        where = _resid_order(model, site) + 0.5  # the latents replace the host's content after it is read
        if g is None or live is None or W_dec.shape[-1] != model.cfg.d_model or math.isnan(where):
            de = torch.full_like(a, float("nan"))
        else:
            de = a * _live_dot(g, W_dec, live) if upstream(where) else torch.zeros_like(a)
        values = {"activation": a, "write_magnitude": a.abs() * W_dec.norm(dim=-1), "direct_effect": de,
                  "total_effect": a * grads[name].float()}
        out.append(Family(f"sae:{site}", values, (lambda s: lambda i: Node.sae_latent(s, i[1], i[0]))(site)))
    return out


def _embed_families(model, acts, grads, g: Optional[torch.Tensor]) -> list[Family]:
    out = []
    for name in model.find_hooks(component="embed"):
        x = acts[name].float()  # [b, P, d]
        site = model.hook_layout(name).site
        make = (lambda i: Node.embed(i[0])) if site == "embed" else (lambda i: Node.pos_embed(i[0]))
        values = {"activation": torch.full(x.shape[:-1], float("nan")), "write_magnitude": x.norm(dim=-1),
                  "direct_effect": _dot_or_nan(x, g), "total_effect": (x * grads[name].float()).sum(-1)}
        out.append(Family("embed" if site == "embed" else "pos_embed", values, make))
    return out


def compute_columns(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    objective: Callable[[torch.Tensor, dict], torch.Tensor],
    kinds: Sequence[str] = KINDS,
    fwd_hooks: Sequence = (),
    read: Optional[str] = None,
    freeze_final_scale: bool = True,
    extra_names: Sequence[str] = (),
) -> Columns:
    """Every column for every node of ``kinds``: one forward and one backward of ``objective``.

    ``read``: the residual hook whose gradient gives the direct effects (default the final residual).
    ``extra_names``: more activations to record (e.g. the traced node's hook).
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise DebuggerError(f"unknown node kinds {bad}; expected some of {KINDS}")
    read = read if read is not None else read_point(model, None)
    keep, grad = record_names(model, kinds)
    names = list(dict.fromkeys(keep + list(extra_names) + ([read] if read else [])))
    grad_names = grad + ([read] if read else [])
    logits_box: list[torch.Tensor] = []

    def obj(logits, acts):
        logits_box.append(logits.detach())
        value = objective(logits, acts)
        if not value.requires_grad:
            raise DebuggerError("the objective does not depend on any recorded activation (nothing to trace)")
        return value

    values, acts, grads = run_with_grads(model, tokens, obj, names, None, fwd_hooks=fwd_hooks,
                                         grad_names=grad_names, freeze_final_scale=freeze_final_scale)
    g = grads[read] if read else None
    limit = _resid_order(model, read) if read else float("nan")
    upstream = lambda where: bool(where <= limit)
    fams: list[Family] = []
    with torch.no_grad():
        live = None if g is None else (g != 0).any(-1).any(0)  # positions the objective's gradient reaches
        if "embed" in kinds:
            fams += _embed_families(model, acts, grads, g)
        if "head" in kinds:
            fams.append(_head_family(model, acts, grads, g, upstream, live))
        if "neuron" in kinds:
            fams.append(_neuron_family(model, acts, grads, g, upstream, live))
        if "sae" in kinds:
            fams += _sae_families(model, acts, grads, g, upstream, live)
    return Columns(fams, values.detach().float().reshape(-1), logits_box[-1].float(), acts)


def family_values(fam: Family, column: str, row: int) -> Float[torch.Tensor, " n"]:
    """One column of one batch row, flattened (NaN where an entry is not a node or has no value)."""
    return fam.values[column][row].reshape(-1)
