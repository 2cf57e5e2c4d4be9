"""`NodeScores`: one number per node per prompt, for every node type, looked up by `Node`.

Layouts (batch first; ``L`` layers, ``P`` positions):

* ``neuron``  ``[batch, L, P, d_mlp]``      * ``head``  ``[batch, L, P, n_heads]``
* ``attn`` / ``mlp`` ``[batch, L, P]``; ``resid`` ``[batch, L+1, P]`` (``resid_pre``; row ``L`` is the
  final residual, node ``L{L-1}.R.post``)
* ``embed`` / ``pos_embed`` ``[batch, P]``  * ``pair`` ``[batch, L, n_heads, P_q, P_k]`` (optional)
* ``sae[hook]`` ``[batch, P, d_sae]`` and ``sae_error[hook]`` ``[batch, P]``

A node without a position sums over positions (and, for pairs, over the missing key position).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from jaxtyping import Float

from ..html import labelled_html
from .nodes import Node, NodeLike, as_node
from .results import Labelled, node_grid, pos_labels


@dataclass
class NodeScores:
    neuron: Optional[torch.Tensor] = None
    head: Optional[torch.Tensor] = None
    attn: Optional[torch.Tensor] = None
    mlp: Optional[torch.Tensor] = None
    resid: Optional[torch.Tensor] = None
    embed: Optional[torch.Tensor] = None
    pos_embed: Optional[torch.Tensor] = None
    pair: Optional[torch.Tensor] = None
    sae: dict[str, torch.Tensor] = field(default_factory=dict)
    sae_error: dict[str, torch.Tensor] = field(default_factory=dict)
    title: str = ""

    # -- display ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        fams = [f"{f}{list(t.shape)}" for f in ("head", "neuron", "attn", "mlp", "resid", "embed", "pos_embed", "pair")
                if (t := getattr(self, f)) is not None]
        fams += [f"sae[{s}]{list(t.shape)}" for s, t in self.sae.items()]
        top = ", ".join(f"{n}: {v:+.3g}" for n, v in self.top(3)) if fams else ""
        return f"{type(self).__name__}({self.title!r}; {', '.join(fams) or 'empty'}" + (f"; top {top})" if top else ")")

    def _repr_html_(self) -> str:
        if self.head is None:
            return f"<pre>{html.escape(repr(self))}</pre>"
        return labelled_html(self.heads_grid())

    # -- lookup -------------------------------------------------------------------------------
    def field(self, name: str) -> Float[torch.Tensor, " batch *rest"]:
        """The values of family ``name`` (``"head"``, ``"attn"`` ...); a KeyError when these scores hold none."""
        t = getattr(self, name)
        if t is None:
            raise KeyError(f"these scores ({self.title or 'untitled'}) hold no {name} values")
        return t

    def _need(self, name: str, node: Node) -> torch.Tensor:
        t = getattr(self, name)
        if t is None:
            raise KeyError(f"{node}: these scores hold no {name} values")
        return t

    def get(self, node: NodeLike) -> Float[torch.Tensor, " batch"]:
        """This node's score per prompt ``[batch]`` (summed over positions when it has none)."""
        n = as_node(node)
        P = slice(None) if n.pos is None else n.pos
        k = n.kind
        if k == "neuron":
            v = self._need("neuron", n)[:, n.layer, P, n.index]
        elif k == "head" and n.site == "z":
            v = self._need("head", n)[:, n.layer, P, n.index]
        elif k == "head" and n.site == "pattern":
            K = slice(None) if n.key_pos is None else n.key_pos
            v = self._need("pair", n)[:, n.layer, n.index, P, K]
        elif k in ("attn", "mlp"):
            v = self._need(k, n)[:, n.layer, P]
        elif k == "resid" and n.site == "pre":
            v = self._need("resid", n)[:, n.layer, P]
        elif k == "resid" and n.site == "post" and self.resid is not None and n.layer == self.resid.shape[1] - 2:
            v = self.resid[:, n.layer + 1, P]
        elif k in ("embed", "pos_embed"):
            v = self._need(k, n)[:, P]
        elif k == "sae_latent":
            if n.site not in self.sae:
                raise KeyError(f"{n}: no SAE at {n.site!r} in these scores (have {list(self.sae)})")
            v = self.sae[n.site][:, P, n.index]
        elif k == "sae_error":
            if n.site not in self.sae_error:
                raise KeyError(f"{n}: no SAE at {n.site!r} in these scores (have {list(self.sae_error)})")
            v = self.sae_error[n.site][:, P]
        else:
            raise KeyError(f"{n}: scores are kept for neurons, heads (z / pattern), attn, mlp, resid_pre, "
                           f"embeddings and SAE nodes, not for this node")
        return v.reshape(v.shape[0], -1).sum(-1)

    def __getitem__(self, node: NodeLike) -> Float[torch.Tensor, " batch"]:
        return self.get(node)

    # -- enumeration --------------------------------------------------------------------------
    def families(self) -> Iterator[tuple[str, torch.Tensor, Callable[[tuple], Node]]]:
        """``(name, values [batch, ...], index -> Node)`` for every family present."""
        if self.embed is not None:
            yield "embed", self.embed, lambda i: Node.embed(i[0])
        if self.pos_embed is not None:
            yield "pos_embed", self.pos_embed, lambda i: Node.pos_embed(i[0])
        if self.resid is not None:
            last = self.resid.shape[1] - 1  # the final residual is resid_post of the last layer
            yield "resid", self.resid, lambda i: (Node.resid(i[0], i[1]) if i[0] < last
                                                  else Node.resid(last - 1, i[1], "post"))
        if self.head is not None:
            yield "head", self.head, lambda i: Node.head(i[0], i[2], i[1])
        if self.pair is not None:
            yield "pair", self.pair, lambda i: Node.head(i[0], i[1], i[2], i[3])
        if self.attn is not None:
            yield "attn", self.attn, lambda i: Node.attn_out(i[0], i[1])
        if self.neuron is not None:
            yield "neuron", self.neuron, lambda i: Node.neuron(i[0], i[2], i[1])
        if self.mlp is not None:
            yield "mlp", self.mlp, lambda i: Node.mlp_out(i[0], i[1])
        for site, t in self.sae.items():
            yield f"sae:{site}", t, (lambda s: lambda i: Node.sae_latent(s, i[1], i[0]))(site)
        for site, t in self.sae_error.items():
            yield f"sae_error:{site}", t, (lambda s: lambda i: Node.sae_error(s, i[0]))(site)

    def top(self, k: int = 20, kinds: Optional[Sequence[str]] = None, by_abs: bool = True,
            prompt: Optional[int] = None) -> list[tuple[Node, float]]:
        """The ``k`` largest nodes over the families named in ``kinds`` (all by default), by
        the batch mean (or one ``prompt``'s value). ``kinds`` e.g. ``("neuron", "head")``; by
        default every family except ``resid`` (residual positions overlap every other node)."""
        cands: list[tuple[float, Node]] = []
        for name, t, make in self.families():
            base = name.split(":")[0]
            if kinds is None and base == "resid":
                continue
            if kinds is not None and base not in kinds and name not in kinds:
                continue
            v = t.float().mean(0) if prompt is None else t[prompt].float()
            key = v.abs() if by_abs else v
            flat = key.reshape(-1)
            kk = min(k, flat.numel())
            if kk == 0:
                continue
            for i in flat.topk(kk).indices.tolist():
                idx = tuple(int(x) for x in np.unravel_index(i, tuple(v.shape)))
                cands.append((float(v.reshape(-1)[i]), make(idx)))
        cands.sort(key=lambda c: -abs(c[0]) if by_abs else -c[0])
        return [(n, val) for val, n in cands[:k]]

    def to_dict(self, kinds: Optional[Sequence[str]] = None) -> dict[Node, float]:
        """``{node: batch-mean value}`` for every node (can be large: filter with ``kinds``)."""
        out: dict[Node, float] = {}
        for name, t, make in self.families():
            if kinds is not None and name.split(":")[0] not in kinds:
                continue
            v = t.float().mean(0)
            for i, x in enumerate(v.reshape(-1).tolist()):
                out[make(tuple(int(y) for y in np.unravel_index(i, tuple(v.shape))))] = x
        return out

    # -- labelled views -----------------------------------------------------------------------
    def heads_grid(self, pos: Optional[int] = None) -> Labelled:
        """``[layer, head]`` batch means (summed over positions unless ``pos``)."""
        h = self.field("head").float().mean(0)  # [L, P, H]
        v = h.sum(1) if pos is None else h[:, pos]
        L, H = v.shape
        nodes = [Node.head(l, i, pos) for l in range(L) for i in range(H)]
        return Labelled(v, ("layer", "head"), ([str(l) for l in range(L)], [str(i) for i in range(H)]),
                        title=f"{self.title} by head", nodes=node_grid(nodes, (L, H)))

    def heads_by_pos(self, str_tokens: Optional[Sequence[str]] = None) -> Labelled:
        """``[layer*head, pos]`` batch means."""
        h = self.field("head").float().mean(0)  # [L, P, H]
        L, P, H = h.shape
        v = h.permute(0, 2, 1).reshape(L * H, P)
        nodes = [Node.head(l, i, p) for l in range(L) for i in range(H) for p in range(P)]
        return Labelled(v, ("head", "pos"), ([f"L{l}.H{i}" for l in range(L) for i in range(H)], pos_labels(P, str_tokens)),
                        title=f"{self.title} by head and position", nodes=node_grid(nodes, (L * H, P)))

    def neurons_grid(self, layer: int) -> Labelled:
        """``[pos, neuron]`` batch means for one layer."""
        v = self.field("neuron")[:, layer].float().mean(0)
        P, N = v.shape
        nodes = [Node.neuron(layer, n, p) for p in range(P) for n in range(N)]
        return Labelled(v, ("pos", "neuron"), (pos_labels(P), [str(n) for n in range(N)]),
                        title=f"{self.title} L{layer} neurons", nodes=node_grid(nodes, (P, N)))

    def layers_grid(self) -> Labelled:
        """``[layer, (attn, mlp)]`` batch means summed over positions."""
        a = self.field("attn").float().mean(0).sum(-1)
        m = self.field("mlp").float().mean(0).sum(-1)
        L = a.shape[0]
        nodes = [n for l in range(L) for n in (Node.attn_out(l), Node.mlp_out(l))]
        return Labelled(torch.stack([a, m], -1), ("layer", "component"), ([str(l) for l in range(L)], ["attn", "mlp"]),
                        title=f"{self.title} by layer", nodes=node_grid(nodes, (L, 2)))

    def layers_by_pos(self, str_tokens: Optional[Sequence[str]] = None) -> Labelled:
        """``[layer x (attn, mlp), pos]`` batch means."""
        a = self.field("attn").float().mean(0)  # [L, P]
        m = self.field("mlp").float().mean(0)
        L, P = a.shape
        v = torch.stack([a, m], 1).reshape(2 * L, P)
        nodes = [f(l, p) for l in range(L) for f in (Node.attn_out, Node.mlp_out) for p in range(P)]
        rows = [f"L{l}.{c}" for l in range(L) for c in ("ATTN", "MLP")]
        return Labelled(v, ("component", "pos"), (rows, pos_labels(P, str_tokens)),
                        title=f"{self.title} by layer and position", nodes=node_grid(nodes, (2 * L, P)))

