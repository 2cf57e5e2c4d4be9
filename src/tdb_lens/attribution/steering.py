"""Steering as hooks: clamp, add to or scale neurons, SAE latents or a direction at chosen positions.

The builders return ``[(hook_name, fn), ...]`` for ``run_with_hooks`` / ``hooks()`` and for
``model.generate(..., fwd_hooks=...)`` (as Transluce's Monitor steers sets of neurons while the
model writes). Positions are absolute token positions: each hook tracks where the current call
starts, so with the KV cache (one new position per step) position 12 is still position 12. A call
covering several positions starts a new sequence at position 0; ``Steering.reset()`` starts one
explicitly (needed only between runs whose first call has a single position).

* nodes (neurons ``L3.N7``, latents ``blocks.3.hook_resid_post:F12``; any node in general):
  ``clamp`` sets the value, ``add`` adds to it, ``scale`` multiplies it. A node's own position
  restricts it to that position; ``positions`` restricts all of them.
* a direction at a hook (``steer_direction``): ``add`` adds ``value * direction``; ``clamp`` sets the
  component along the direction to ``value``; ``scale`` multiplies that component by ``value``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from jaxtyping import Float

from .nodes import Node, NodeLike, as_nodes

MODES = ("clamp", "add", "scale")
Positions = Optional[Union[int, Sequence[int]]]


class _Tracker:
    """Absolute position of the first entry of each call at one hook."""

    def __init__(self) -> None:
        self.next = 0

    def start(self, n: int) -> int:
        if n > 1:
            self.next = 0
        s = self.next
        self.next = s + n
        return s


class Steering:
    """A set of steering hooks sharing position trackers; ``hooks`` is the ``fwd_hooks`` list."""

    def __init__(self) -> None:
        self.hooks: list = []
        self._trackers: list[_Tracker] = []

    def reset(self) -> None:
        for t in self._trackers:
            t.next = 0

    def __iter__(self):
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def __add__(self, other):
        return list(self.hooks) + list(other)

    def __radd__(self, other):
        return list(other) + list(self.hooks)

    def _tracker(self) -> _Tracker:
        t = _Tracker()
        self._trackers.append(t)
        return t


def _positions_mask(start: int, n: int, positions: Positions, device) -> Optional[torch.Tensor]:
    """Bool ``[n]`` of the call's entries at the wanted absolute positions (None = all)."""
    if positions is None:
        return None
    pos = [positions] if isinstance(positions, int) else list(positions)
    if any(p < 0 for p in pos):
        raise ValueError(f"steering positions are absolute token positions (>= 0), got {pos}")
    absolute = torch.arange(start, start + n, device=device)
    return torch.isin(absolute, torch.tensor(pos, device=device))


def _apply(x: torch.Tensor, mode: str, value) -> torch.Tensor:
    if mode == "clamp":
        return torch.zeros_like(x) + value
    if mode == "add":
        return x + value
    return x * value


def steer_nodes(nodes: Union[NodeLike, Sequence[NodeLike]], mode: str = "clamp",
                value: Union[float, Sequence[float], Float[torch.Tensor, " *n_nodes"]] = 0.0,
                positions: Positions = None, steering: Optional[Steering] = None) -> Steering:
    """Clamp / add / scale the activations of ``nodes`` (scalar nodes: neurons, latents, pattern
    entries; for vector nodes the whole vector). ``value``: one number or one per node."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ns = as_nodes(nodes)
    vals = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if vals.numel() == 1:
        vals = vals.repeat(len(ns))
    if vals.numel() != len(ns):
        raise ValueError(f"{vals.numel()} values for {len(ns)} nodes: give one value or one per node")
    st = steering if steering is not None else Steering()
    by: dict[str, list[tuple[Node, float]]] = defaultdict(list)
    for n, v in zip(ns, vals.tolist()):
        by[n.hook_name].append((n, v))
    for name, items in by.items():
        tracker = st._tracker()

        def hook(act, hook, items=items, tracker=tracker):
            lay = hook.layout
            n_pos = act.shape[lay.pos_axis]
            start = tracker.start(n_pos)
            want = _positions_mask(start, n_pos, positions, act.device)
            act = act.clone()
            for node, v in items:
                if node.pos is not None:
                    if node.pos >= 0:
                        p = node.pos
                    elif n_pos > 1 or start == 0:  # negative: from the end of a full-sequence call
                        p = start + n_pos + node.pos
                    else:
                        continue
                    if not (start <= p < start + n_pos) or (want is not None and not bool(want[p - start])):
                        continue
                    idx = node.at(p - start, node.key_pos).act_index(layout=lay)
                    act[idx] = _apply(act[idx], mode, v)
                elif want is None:
                    idx = node.act_index(layout=lay)
                    act[idx] = _apply(act[idx], mode, v)
                else:
                    sel = act[node.act_index(layout=lay)]  # a view; its axis 1 is the (query) position
                    sel[:, want] = _apply(sel[:, want], mode, v)
            return act

        st.hooks.append((name, hook))
    return st


def steer_direction(hook_name: str, direction: Float[torch.Tensor, " d"], mode: str = "add", value: float = 1.0,
                    positions: Positions = None, steering: Optional[Steering] = None) -> Steering:
    """Steer along ``direction`` ``[d]`` at ``hook_name`` (an activation ``[batch, pos, d]``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    direction = torch.as_tensor(direction)
    if direction.ndim != 1:
        raise ValueError(f"direction must be a vector [d], got shape {tuple(direction.shape)}")
    st = steering if steering is not None else Steering()
    tracker = st._tracker()
    unit = direction / direction.norm().clamp(min=1e-12)

    def hook(act, hook):
        if act.shape[-1] != direction.shape[0]:
            raise ValueError(f"direction has {direction.shape[0]} entries but {hook_name} has width {act.shape[-1]}")
        n_pos = act.shape[1]
        start = tracker.start(n_pos)
        want = _positions_mask(start, n_pos, positions, act.device)
        d, u = direction.to(act.device, act.dtype), unit.to(act.device, act.dtype)
        if mode == "add":
            delta = (value * d).expand_as(act)
        else:
            comp = act @ u
            target = torch.full_like(comp, value) if mode == "clamp" else comp * value
            delta = (target - comp)[..., None] * u
        if want is not None:
            delta = delta * want.to(act.dtype)[None, :, None]
        return act + delta

    st.hooks.append((hook_name, hook))
    return st


def steering_hooks(targets: Union[Sequence[NodeLike], NodeLike, Float[torch.Tensor, " d"]], mode: str = "add",
                   value: Any = 1.0, positions: Positions = None,
                   hook_name: Optional[str] = None) -> Steering:
    """One entry point: ``targets`` is nodes (see `steer_nodes`) or a direction tensor (then
    ``hook_name`` says where, see `steer_direction`)."""
    if isinstance(targets, torch.Tensor):
        if hook_name is None:
            raise ValueError("steering along a direction needs hook_name=, e.g. 'blocks.3.hook_resid_post'")
        return steer_direction(hook_name, targets, mode, value, positions)
    return steer_nodes(targets, mode, value, positions)
