"""`Node`: one name for every unit an analysis can point at.

A node is a small frozen value: it hashes, compares, prints and parses. Each node knows the hook
point its activation lives at (``node.hook_name``) and how to pick that activation out of a
tensor recorded there (``node.select(act)`` / ``act[node.act_index()]``). Cache lookups, attributions,
ablations, steering and explanations all take and return nodes.

String forms (``pos`` is optional everywhere; without ``@pos`` a node means every position):

=====================================  ==========================================================
``L3.N1024@5``                         MLP neuron 1024 of layer 3 at position 5 (``mlp.hook_post``)
``L9.H9@-1``                           head 9 of layer 9, query position -1 (its ``attn.hook_z``)
``L9.H9.q@-1`` (``.k .v .result``)     that head's query (key, value, per-head output) vector
``L3.H1@5>2``                          head 1 of layer 3, query 5 attending to key 2 (``hook_pattern``)
``L3.H1.scores@5>2``                   the same pair's pre-softmax score
``L3.R@5`` / ``L3.R.mid@5`` / ``.post``  residual stream before block 3 / between attn and MLP / after
``L3.ATTN@5`` / ``L3.MLP@5``           the attention / MLP output of block 3
``E@5`` / ``P@5``                      the token / position embedding
``blocks.3.hook_resid_post:F123@5``    SAE latent 123 of the SAE spliced at that hook
``blocks.3.hook_resid_post:ERR@5``     that SAE's error term
=====================================  ==========================================================

For ``.k``/``.v`` on a model with grouped-query attention the head number is the key/value head
(the index into ``hook_k``'s head axis), as the activation itself has only those heads.
``Node.parse(str(node)) == node`` for every node.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

NEURON, HEAD, RESID, ATTN, MLP, EMBED, POS_EMBED, SAE_LATENT, SAE_ERROR = (
    "neuron", "head", "resid", "attn", "mlp", "embed", "pos_embed", "sae_latent", "sae_error",
)
KINDS = (NEURON, HEAD, RESID, ATTN, MLP, EMBED, POS_EMBED, SAE_LATENT, SAE_ERROR)

# head sites: the hook (inside ``blocks.{l}.attn``) and whether the activation is [b, head, q, k]
HEAD_SITES = {
    "z": "hook_z", "q": "hook_q", "k": "hook_k", "v": "hook_v", "result": "hook_result",
    "rot_q": "hook_rot_q", "rot_k": "hook_rot_k", "pattern": "hook_pattern", "scores": "hook_attn_scores",
}
PAIR_SITES = ("pattern", "scores")
RESID_SITES = ("pre", "mid", "post")

_POS = r"(?:@(?P<pos>-?\d+)(?:>(?P<key>-?\d+))?)?"
_RE_LAYER = re.compile(r"^L(?P<layer>\d+)\.(?P<body>[^@]+)" + _POS + r"$")
_RE_EMBED = re.compile(r"^(?P<which>[EP])" + _POS + r"$")
_RE_SAE = re.compile(r"^(?P<site>[^:@]+):(?:F(?P<latent>\d+)|(?P<err>ERR))" + _POS + r"$")
_RE_HEAD = re.compile(r"^H(?P<head>\d+)(?:\.(?P<site>[a-z_]+))?$")
_RE_NEURON = re.compile(r"^N(?P<neuron>\d+)$")
_RE_RESID = re.compile(r"^R(?:\.(?P<site>pre|mid|post))?$")


@dataclass(frozen=True)
class Node:
    """One unit: a neuron, a head (at a query position, optionally a key position), a residual
    position, an attention / MLP output, an embedding, an SAE latent or an SAE error term.

    Build with the constructors (`Node.neuron`, `Node.head`, ...) or `Node.parse`. Fields:
    ``kind`` (one of `KINDS`); ``layer`` (None for embeddings and SAE nodes); ``index`` (neuron,
    head or latent number); ``pos`` (query / token position, None = all, negative counts from the
    end); ``key_pos`` (heads, with site pattern/scores); ``site`` (a head's or residual's sub-site,
    or the hook an SAE is spliced at).
    """

    kind: str
    layer: Optional[int] = None
    index: Optional[int] = None
    pos: Optional[int] = None
    key_pos: Optional[int] = None
    site: Optional[str] = None

    # -- validation ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        k = self.kind
        if k not in KINDS:
            raise ValueError(f"node kind must be one of {KINDS}, got {k!r}")
        for f in ("layer", "index", "pos", "key_pos"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"Node.{f} must be an int or None, got {type(v).__name__} {v!r}")
        needs_layer = k in (NEURON, HEAD, RESID, ATTN, MLP)
        if needs_layer and (self.layer is None or self.layer < 0):
            raise ValueError(f"a {k} node needs a layer >= 0, got {self.layer!r}")
        if not needs_layer and self.layer is not None:
            raise ValueError(f"a {k} node has no layer, got layer={self.layer!r}")
        needs_index = k in (NEURON, HEAD, SAE_LATENT)
        if needs_index and (self.index is None or self.index < 0):
            raise ValueError(f"a {k} node needs an index >= 0 (neuron, head or latent number), got {self.index!r}")
        if not needs_index and self.index is not None:
            raise ValueError(f"a {k} node has no index, got index={self.index!r}")
        if k == HEAD:
            if self.site not in HEAD_SITES:
                raise ValueError(f"head site must be one of {tuple(HEAD_SITES)}, got {self.site!r}")
            if self.key_pos is not None and self.site not in PAIR_SITES:
                raise ValueError(f"a key position needs head site 'pattern' or 'scores', got {self.site!r}")
            if self.key_pos is not None and self.pos is None:
                raise ValueError("a key position needs a query position too (e.g. 'L3.H1@5>2')")
        elif self.key_pos is not None:
            raise ValueError(f"only head nodes have a key position, got key_pos={self.key_pos!r} on a {k} node")
        if k == RESID and self.site not in RESID_SITES:
            raise ValueError(f"residual site must be one of {RESID_SITES}, got {self.site!r}")
        if k in (SAE_LATENT, SAE_ERROR):
            if not isinstance(self.site, str) or not self.site or ":" in self.site or "@" in self.site:
                raise ValueError(f"an SAE node needs site = the hook name the SAE is spliced at, got {self.site!r}")
        if k in (NEURON, ATTN, MLP, EMBED, POS_EMBED) and self.site is not None:
            raise ValueError(f"a {k} node has no site, got site={self.site!r}")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def neuron(cls, layer: int, neuron: int, pos: Optional[int] = None) -> Node:
        return cls(NEURON, layer=layer, index=neuron, pos=pos)

    @classmethod
    def head(cls, layer: int, head: int, pos: Optional[int] = None, key_pos: Optional[int] = None,
             site: Optional[str] = None) -> Node:
        """A head at query ``pos``; ``site`` defaults to "z" (its output), or "pattern" with ``key_pos``."""
        if site is None:
            site = "pattern" if key_pos is not None else "z"
        return cls(HEAD, layer=layer, index=head, pos=pos, key_pos=key_pos, site=site)

    @classmethod
    def resid(cls, layer: int, pos: Optional[int] = None, site: str = "pre") -> Node:
        return cls(RESID, layer=layer, pos=pos, site=site)

    @classmethod
    def attn_out(cls, layer: int, pos: Optional[int] = None) -> Node:
        return cls(ATTN, layer=layer, pos=pos)

    @classmethod
    def mlp_out(cls, layer: int, pos: Optional[int] = None) -> Node:
        return cls(MLP, layer=layer, pos=pos)

    @classmethod
    def embed(cls, pos: Optional[int] = None) -> Node:
        return cls(EMBED, pos=pos)

    @classmethod
    def pos_embed(cls, pos: Optional[int] = None) -> Node:
        return cls(POS_EMBED, pos=pos)

    @classmethod
    def sae_latent(cls, hook_name: str, latent: int, pos: Optional[int] = None) -> Node:
        return cls(SAE_LATENT, index=latent, pos=pos, site=hook_name)

    @classmethod
    def sae_error(cls, hook_name: str, pos: Optional[int] = None) -> Node:
        return cls(SAE_ERROR, pos=pos, site=hook_name)

    # -- string form --------------------------------------------------------------------------
    def _pos_str(self) -> str:
        if self.pos is None:
            return ""
        return f"@{self.pos}" + ("" if self.key_pos is None else f">{self.key_pos}")

    def __str__(self) -> str:
        k, p = self.kind, self._pos_str()
        if k == NEURON:
            return f"L{self.layer}.N{self.index}{p}"
        if k == HEAD:
            default = "pattern" if self.key_pos is not None else "z"
            sub = "" if self.site == default else f".{self.site}"
            return f"L{self.layer}.H{self.index}{sub}{p}"
        if k == RESID:
            return f"L{self.layer}.R{'' if self.site == 'pre' else '.' + str(self.site)}{p}"
        if k == ATTN:
            return f"L{self.layer}.ATTN{p}"
        if k == MLP:
            return f"L{self.layer}.MLP{p}"
        if k == EMBED:
            return f"E{p}"
        if k == POS_EMBED:
            return f"P{p}"
        if k == SAE_LATENT:
            return f"{self.site}:F{self.index}{p}"
        return f"{self.site}:ERR{p}"

    def __repr__(self) -> str:
        return f"Node({str(self)!r})"

    @classmethod
    def parse(cls, text: Union[str, Node]) -> Node:
        """The node a string names (see the module docstring); a `Node` passes through."""
        if isinstance(text, Node):
            return text
        if not isinstance(text, str):
            raise TypeError(f"Node.parse takes a string such as 'L3.N1024@5', got {type(text).__name__}")
        s = text.strip()

        def _p(m: re.Match) -> tuple[Optional[int], Optional[int]]:
            pos = m.group("pos")
            key = m.group("key")
            return (None if pos is None else int(pos)), (None if key is None else int(key))

        m = _RE_SAE.match(s)
        if m:
            pos, key = _p(m)
            if key is not None:
                raise ValueError(f"cannot parse node {text!r}: SAE nodes have no key position ('>k')")
            if m.group("err"):
                return cls.sae_error(m.group("site"), pos)
            return cls.sae_latent(m.group("site"), int(m.group("latent")), pos)
        m = _RE_EMBED.match(s)
        if m:
            pos, key = _p(m)
            if key is not None:
                raise ValueError(f"cannot parse node {text!r}: embeddings have no key position ('>k')")
            return cls.embed(pos) if m.group("which") == "E" else cls.pos_embed(pos)
        m = _RE_LAYER.match(s)
        if m:
            layer, body = int(m.group("layer")), m.group("body")
            pos, key = _p(m)
            hm = _RE_HEAD.match(body)
            if hm:
                site = hm.group("site")
                if site is not None and site not in HEAD_SITES:
                    raise ValueError(f"cannot parse node {text!r}: head site {site!r} is not one of {tuple(HEAD_SITES)}")
                return cls.head(layer, int(hm.group("head")), pos, key, site)
            if key is None:
                nm = _RE_NEURON.match(body)
                if nm:
                    return cls.neuron(layer, int(nm.group("neuron")), pos)
                rm = _RE_RESID.match(body)
                if rm:
                    return cls.resid(layer, pos, rm.group("site") or "pre")
                if body == "ATTN":
                    return cls.attn_out(layer, pos)
                if body == "MLP":
                    return cls.mlp_out(layer, pos)
        raise ValueError(
            f"cannot parse node {text!r}; expected e.g. 'L3.N1024@5', 'L9.H9@-1', 'L3.H1@5>2', 'L3.H1.q@5', "
            "'L3.R@5', 'L3.R.mid@5', 'L3.ATTN@5', 'L3.MLP@5', 'E@5', 'P@5', "
            "'blocks.3.hook_resid_post:F123@5', 'blocks.3.hook_resid_post:ERR@5'"
        )

    # -- where the activation lives -----------------------------------------------------------
    @property
    def hook_name(self) -> str:
        """The hook point whose activation this node indexes."""
        k, l = self.kind, self.layer
        if k == NEURON:
            return f"blocks.{l}.mlp.hook_post"
        if k == HEAD:
            return f"blocks.{l}.attn.{HEAD_SITES[self.site]}"  # type: ignore[index]
        if k == RESID:
            return f"blocks.{l}.hook_resid_{self.site}"
        if k == ATTN:
            return f"blocks.{l}.hook_attn_out"
        if k == MLP:
            return f"blocks.{l}.hook_mlp_out"
        if k == EMBED:
            return "hook_embed"
        if k == POS_EMBED:
            return "hook_pos_embed"
        if k == SAE_LATENT:
            return f"{self.site}.hook_sae_acts_post"
        return f"{self.site}.hook_sae_error"

    @property
    def is_pair(self) -> bool:
        """True for head nodes indexing ``[batch, head, q, k]`` (pattern / scores)."""
        return self.kind == HEAD and self.site in PAIR_SITES

    @property
    def is_scalar(self) -> bool:
        """True when one position's activation is a number (neuron, latent, attention pair)."""
        return self.kind in (NEURON, SAE_LATENT) or (self.is_pair and self.key_pos is not None)

    def act_index(self, has_batch_dim: bool = True) -> tuple:
        """Index tuple into the hook's activation: ``act[node.act_index()]`` reads (or assigns) it.

        Positions that are None select every position (the axis is kept).
        """
        p = slice(None) if self.pos is None else self.pos
        if self.is_pair:
            kp = slice(None) if self.key_pos is None else self.key_pos
            idx: tuple = (self.index, p, kp)
        elif self.kind in (NEURON, HEAD, SAE_LATENT):
            idx = (p, self.index)
        else:
            idx = (p,)
        return ((slice(None),) + idx) if has_batch_dim else idx

    def select(self, act: torch.Tensor, has_batch_dim: bool = True) -> torch.Tensor:
        """This node's slice of an activation recorded at ``hook_name``."""
        return act[self.act_index(has_batch_dim)]

    def value(self, cache) -> torch.Tensor:
        """This node's activation from an `ActivationCache` (or a dict of hook name -> tensor)."""
        if isinstance(cache, dict):
            if self.hook_name not in cache:
                raise KeyError(f"{self}: activation {self.hook_name!r} is not in the cache")
            return self.select(cache[self.hook_name])
        return self.select(cache[self.hook_name], getattr(cache, "has_batch_dim", True))

    # -- variations ---------------------------------------------------------------------------
    def at(self, pos: Optional[int], key_pos: Optional[int] = None) -> Node:
        """The same unit at another position (key position only for pattern / scores heads)."""
        return replace(self, pos=pos, key_pos=key_pos if self.is_pair else None)

    def with_site(self, site: str) -> Node:
        """A head's other site (``"q"``, ``"pattern"`` ...) or a residual's (``"mid"``)."""
        key = self.key_pos if site in PAIR_SITES else None
        return replace(self, site=site, key_pos=key)

    @property
    def unit(self) -> Node:
        """The node without positions (the neuron / head / latent itself)."""
        return replace(self, pos=None, key_pos=None)

    def sort_key(self) -> tuple:
        """Orders nodes by depth: embeddings, then layer by layer (attention before MLP), then SAEs."""
        layer_rank = -1 if self.layer is None else self.layer
        kind_rank = {EMBED: 0, POS_EMBED: 1, RESID: 2, HEAD: 3, ATTN: 4, NEURON: 5, MLP: 6}.get(self.kind, 7)
        if self.kind == RESID:
            kind_rank = {"pre": 2, "mid": 4.5, "post": 8}[self.site]  # type: ignore[index]
        if self.kind in (SAE_LATENT, SAE_ERROR):
            m = re.match(r"blocks\.(\d+)\.", self.site or "")
            layer_rank = int(m.group(1)) if m else 10**6
        return (layer_rank, kind_rank, self.site or "", -1 if self.index is None else self.index,
                -(10**9) if self.pos is None else self.pos, -(10**9) if self.key_pos is None else self.key_pos)


NodeLike = Union[Node, str]


def as_node(x: NodeLike) -> Node:
    """A `Node` from a node or its string form."""
    return Node.parse(x)


def as_nodes(xs: Union[NodeLike, Iterable[NodeLike]]) -> list[Node]:
    """A list of nodes from one node / string or an iterable of them."""
    if isinstance(xs, (Node, str)):
        return [as_node(xs)]
    return [as_node(x) for x in xs]


# short module-level constructors
neuron = Node.neuron
head = Node.head
resid = Node.resid
attn_out = Node.attn_out
mlp_out = Node.mlp_out
embed = Node.embed
pos_embed = Node.pos_embed
sae_latent = Node.sae_latent
sae_error = Node.sae_error

__all__ = [
    "Node", "NodeLike", "as_node", "as_nodes", "KINDS", "HEAD_SITES", "RESID_SITES",
    "neuron", "head", "resid", "attn_out", "mlp_out", "embed", "pos_embed", "sae_latent", "sae_error",
]
