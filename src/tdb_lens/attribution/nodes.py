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
from typing import Any, Optional, Union

import torch
from jaxtyping import Shaped

from ..hooks.layout import POSITION_AXES, UNIT_AXES, HookLayout
from ..hooks.names import block_of, get_act_name, spliced_hook_name

NEURON, HEAD, RESID, ATTN, MLP, EMBED, POS_EMBED, SAE_LATENT, SAE_ERROR = (
    "neuron", "head", "resid", "attn", "mlp", "embed", "pos_embed", "sae_latent", "sae_error",
)
KINDS = (NEURON, HEAD, RESID, ATTN, MLP, EMBED, POS_EMBED, SAE_LATENT, SAE_ERROR)

_VEC = ("batch", "pos", "d_model")
_HEADS = ("batch", "pos", "head", "d_head")
_KV_HEADS = ("batch", "pos", "kv_head", "d_head")
_PAIRS = ("batch", "head", "query_pos", "key_pos")


@dataclass(frozen=True)
class SiteSpec:
    """One hook site a node can live at: its TransformerLens short name and its activation's axes
    (the same axes the model's hook point declares in its `HookLayout`)."""

    hook_site: str
    axes: tuple[str, ...]


# a head node's sub-site -> where its activation lives
HEAD_SITE_SPECS = {
    "z": SiteSpec("z", _HEADS), "q": SiteSpec("q", _HEADS), "k": SiteSpec("k", _KV_HEADS),
    "v": SiteSpec("v", _KV_HEADS), "result": SiteSpec("result", ("batch", "pos", "head", "d_model")),
    "rot_q": SiteSpec("rot_q", _HEADS), "rot_k": SiteSpec("rot_k", _KV_HEADS),
    "pattern": SiteSpec("pattern", _PAIRS), "scores": SiteSpec("attn_scores", _PAIRS),
}
# head sites: the hook inside ``blocks.{l}.attn``
HEAD_SITES = {k: f"hook_{v.hook_site}" for k, v in HEAD_SITE_SPECS.items()}
PAIR_SITES = ("pattern", "scores")
RESID_SITES = ("pre", "mid", "post")


@dataclass(frozen=True)
class KindSpec:
    """What a node kind is made of and where it lives: whether it has a layer and a unit index,
    its sub-sites (``sites``: sub-site -> `SiteSpec`; None for kinds that take no site and live at
    ``fixed``; ``host``: the site is the hook an SAE is spliced at), its string ``text`` (a format
    over ``layer``, ``index``, ``sub`` and ``site``) and its depth rank among a layer's nodes."""

    needs_layer: bool
    needs_index: bool
    text: str
    rank: float
    fixed: Optional[SiteSpec] = None
    sites: Optional[dict[str, SiteSpec]] = None
    host: bool = False


KIND_SPECS: dict[str, KindSpec] = {
    NEURON: KindSpec(True, True, "L{layer}.N{index}", 5.0, fixed=SiteSpec("post", ("batch", "pos", "d_mlp"))),
    HEAD: KindSpec(True, True, "L{layer}.H{index}{sub}", 3.0, sites=HEAD_SITE_SPECS),
    RESID: KindSpec(True, False, "L{layer}.R{sub}", 2.0,
                    sites={s: SiteSpec(f"resid_{s}", _VEC) for s in RESID_SITES}),
    ATTN: KindSpec(True, False, "L{layer}.ATTN", 4.0, fixed=SiteSpec("attn_out", _VEC)),
    MLP: KindSpec(True, False, "L{layer}.MLP", 6.0, fixed=SiteSpec("mlp_out", _VEC)),
    EMBED: KindSpec(False, False, "E", 0.0, fixed=SiteSpec("embed", _VEC)),
    POS_EMBED: KindSpec(False, False, "P", 1.0, fixed=SiteSpec("pos_embed", _VEC)),
    SAE_LATENT: KindSpec(False, True, "{site}:F{index}", 7.0, fixed=SiteSpec("sae_acts_post", ("batch", "pos", "d_sae")),
                         host=True),
    SAE_ERROR: KindSpec(False, False, "{site}:ERR", 7.0, fixed=SiteSpec("sae_error", _VEC), host=True),
}
# residual sub-sites sit between the kinds of their layer: pre before the heads, mid between
# attention and MLP, post after everything
_RESID_RANK = {"pre": 2.0, "mid": 4.5, "post": 8.0}

_POS = r"(?:@(?P<pos>-?\d+)(?:>(?P<key>-?\d+))?)?"
_RE_LAYER = re.compile(r"^L(?P<layer>\d+)\.(?P<body>[^@]+)" + _POS + r"$")
_RE_EMBED = re.compile(r"^(?P<which>[EP])" + _POS + r"$")
_RE_SAE = re.compile(r"^(?P<site>[^:@]+):(?:F(?P<latent>\d+)|(?P<err>ERR))" + _POS + r"$")
_RE_HEAD = re.compile(r"^H(?P<head>\d+)(?:\.(?P<site>[a-z_]+))?$")
_RE_NEURON = re.compile(r"^N(?P<neuron>\d+)$")
_RE_RESID = re.compile(r"^R(?:\.(?P<site>pre|mid|post))?$")


def _index_for(axes: tuple[str, ...], pos: Any, key_pos: Any, unit: Optional[int]) -> tuple:
    """Index tuple into an activation with ``axes``: positions on the (query) position axis, the
    key position on ``key_pos``, the unit on the first unit axis; trailing full slices dropped."""
    idx: list[Any] = []
    unit_done = unit is None
    for a in axes:
        if a in POSITION_AXES:
            idx.append(pos)
        elif a == "key_pos":
            idx.append(key_pos)
        elif not unit_done and a in UNIT_AXES:
            idx.append(unit)
            unit_done = True
        else:
            idx.append(slice(None))
    while idx and isinstance(idx[-1], slice) and idx[-1] == slice(None):
        idx.pop()
    return tuple(idx)


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
    @property
    def spec(self) -> KindSpec:
        """This node's `KindSpec` (what it is made of, where it lives)."""
        return KIND_SPECS[self.kind]

    def __post_init__(self) -> None:
        k = self.kind
        if k not in KINDS:
            raise ValueError(f"node kind must be one of {KINDS}, got {k!r}")
        for f in ("layer", "index", "pos", "key_pos"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"Node.{f} must be an int or None, got {type(v).__name__} {v!r}")
        spec = KIND_SPECS[k]
        if spec.needs_layer and (self.layer is None or self.layer < 0):
            raise ValueError(f"a {k} node needs a layer >= 0, got {self.layer!r}")
        if not spec.needs_layer and self.layer is not None:
            raise ValueError(f"a {k} node has no layer, got layer={self.layer!r}")
        if spec.needs_index and (self.index is None or self.index < 0):
            raise ValueError(f"a {k} node needs an index >= 0 (neuron, head or latent number), got {self.index!r}")
        if not spec.needs_index and self.index is not None:
            raise ValueError(f"a {k} node has no index, got index={self.index!r}")
        self._check_site(spec)
        if self.key_pos is not None:
            if k != HEAD:
                raise ValueError(f"only head nodes have a key position, got key_pos={self.key_pos!r} on a {k} node")
            if self.site not in PAIR_SITES:
                raise ValueError(f"a key position needs head site 'pattern' or 'scores', got {self.site!r}")
            if self.pos is None:
                raise ValueError("a key position needs a query position too (e.g. 'L3.H1@5>2')")

    def _check_site(self, spec: KindSpec) -> None:
        k, site = self.kind, self.site
        if spec.host:
            if not isinstance(site, str) or not site or ":" in site or "@" in site:
                raise ValueError(f"an SAE node needs site = the hook name the SAE is spliced at, got {site!r}")
        elif spec.sites is not None:
            if site not in spec.sites:
                raise ValueError(f"{k} site must be one of {tuple(spec.sites)}, got {site!r}")
        elif site is not None:
            raise ValueError(f"a {k} node has no site, got site={site!r}")

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
        sub = ""
        if self.kind == HEAD:
            default = "pattern" if self.key_pos is not None else "z"
            sub = "" if self.site == default else f".{self.site}"
        elif self.kind == RESID:
            sub = "" if self.site == "pre" else f".{self.site}"
        return self.spec.text.format(layer=self.layer, index=self.index, sub=sub, site=self.site) + self._pos_str()

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
    def site_spec(self) -> SiteSpec:
        """The hook site this node's activation lives at and that activation's axes."""
        spec = self.spec
        return spec.fixed if spec.fixed is not None else spec.sites[self.site]  # type: ignore[index]

    @property
    def hook_site(self) -> str:
        """TransformerLens' short name of the hook site (``"z"``, ``"post"``, ``"resid_mid"`` ...)."""
        return self.site_spec.hook_site

    @property
    def host(self) -> Optional[str]:
        """The hook an SAE node's SAE is spliced at (None for other nodes)."""
        return self.site if self.spec.host else None

    @property
    def hook_name(self) -> str:
        """The hook point whose activation this node indexes."""
        if self.spec.host:
            return spliced_hook_name(self.site, self.hook_site)  # type: ignore[arg-type]
        return get_act_name(self.hook_site, self.layer)

    def hook_layout(self, model: Any) -> HookLayout:
        """The layout of this node's hook point in ``model`` (a KeyError naming the node if absent)."""
        name = self.hook_name
        if name not in model.hook_dict:
            raise KeyError(f"{self}: hook {name!r} is not in the model" + (" (attach the SAE first?)" if self.host else ""))
        return model.hook_layout(name)

    @property
    def axes(self) -> tuple[str, ...]:
        """The axes of the activation this node indexes (as the model's `HookLayout` names them)."""
        return self.site_spec.axes

    @property
    def pos_axis(self) -> int:
        """The axis of that activation holding this node's (query) position."""
        return next(i for i, a in enumerate(self.axes) if a in POSITION_AXES)

    @property
    def unit_axis(self) -> Optional[int]:
        """The axis of that activation holding this node's unit (head, neuron, latent); None for vectors."""
        if self.index is None:
            return None
        return next(i for i, a in enumerate(self.axes) if a in UNIT_AXES)

    @property
    def is_pair(self) -> bool:
        """True for head nodes indexing ``[batch, head, q, k]`` (pattern / scores)."""
        return "key_pos" in self.axes

    @property
    def is_scalar(self) -> bool:
        """True when one position's activation is a number (neuron, latent, attention pair)."""
        return self.kind in (NEURON, SAE_LATENT) or (self.is_pair and self.key_pos is not None)

    def act_index(self, has_batch_dim: bool = True, layout: Optional[HookLayout] = None) -> tuple:
        """Index tuple into the hook's activation: ``act[node.act_index()]`` reads (or assigns) it.

        The tuple follows the activation's axes (``layout.axes`` when given, else `axes`):
        positions that are None select every position (the axis is kept).
        """
        axes = self.axes if layout is None else layout.axes
        if not has_batch_dim and axes and axes[0] == "batch":
            axes = axes[1:]
        p = slice(None) if self.pos is None else self.pos
        kp = slice(None) if self.key_pos is None else self.key_pos
        return _index_for(axes, p, kp, self.index)

    def select(self, act: Shaped[torch.Tensor, "*act"], has_batch_dim: bool = True) -> Shaped[torch.Tensor, "*sel"]:
        """This node's slice of an activation recorded at ``hook_name``."""
        return act[self.act_index(has_batch_dim)]

    def value(self, cache: Any) -> Shaped[torch.Tensor, "*sel"]:
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
        kind_rank = _RESID_RANK[self.site] if self.kind == RESID else self.spec.rank  # type: ignore[index]
        if self.host is not None:
            block = block_of(self.host)
            layer_rank = 10**6 if block is None else block
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
    "Node", "NodeLike", "as_node", "as_nodes", "KINDS", "KIND_SPECS", "KindSpec", "SiteSpec", "HEAD_SITES",
    "HEAD_SITE_SPECS", "RESID_SITES",
    "neuron", "head", "resid", "attn_out", "mlp_out", "embed", "pos_embed", "sae_latent", "sae_error",
]
