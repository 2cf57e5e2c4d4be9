"""The running state of a harvest (`tdb_lens.explain.harvest`): top-k windows, a uniform sample
of active windows, random windows, the per-token tail (the ``n_tail`` largest token activations)
and statistics per unit, saved to safetensors and merged exactly.

Nothing is pickled: tensors go to safetensors, the rest (done batches) to JSON metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
_INF_KEY = 1 << 62
_M32 = 0xFFFFFFFF


@dataclass
class HarvestConfig:
    hook: str
    units: list[int]
    k: int = 20
    n_sample: int = 64
    n_random: int = 20
    n_quantiles: int = 10
    threshold: float = 0.0
    batch_size: int = 32
    seed: int = 0
    reduce: str = "auto"
    n_tail: int = 256  # largest token activations kept per unit (0: none), for exact extreme quantiles

    def check(self) -> None:
        for name in ("k", "n_sample", "n_quantiles", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_random", "n_tail"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.units:
            raise ValueError("no units to harvest")
        if len(set(self.units)) != len(self.units) or min(self.units) < 0:
            raise ValueError(f"units must be distinct non-negative indices, got {self.units[:10]}...")


# ---- deterministic priorities ----------------------------------------------------------------
def priorities(seed: int, windows: Int[torch.Tensor, " window"], units: Int[torch.Tensor, " unit"]
               ) -> Int[torch.Tensor, "window unit"]:
    """``[len(windows), len(units)]`` pseudo-random int64 in ``[0, 2**31)``; a pure function of its inputs."""
    w = (windows.to(torch.int64)[:, None] & 0x3FFFFFFF) * 0x9E3779B1 & _M32
    u = (units.to(torch.int64)[None, :] & 0x3FFFFFFF) * 0x85EBCA6B & _M32
    x = (w ^ u ^ ((seed * 0xC2B2AE35 + 0x27D4EB2F) & _M32)) & _M32
    for _ in range(3):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & _M32
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & _M32
    return x & 0x7FFFFFFF


def random_window_ids(n_windows: int, n_random: int, seed: int) -> Int[torch.Tensor, " n_random"]:
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n_windows, generator=g)[: min(n_random, n_windows)].sort().values


# ---- the running state -----------------------------------------------------------------------
_STATE_KEYS = ("top_val", "top_win", "top_acts", "samp_key", "samp_val", "samp_acts", "rand_acts", "rand_have",
               "n_tokens", "act_sum", "act_sqsum", "act_max", "act_min", "n_active", "n_active_windows")
_TAIL_KEYS = ("tail_val", "tail_idx")  # absent in states of harvests made before the tail existed


@dataclass
class _State:
    top_val: torch.Tensor      # [n, k] window scores, -inf = empty
    top_win: torch.Tensor      # [n, k] window ids, -1 = empty
    top_acts: torch.Tensor     # [n, k, C]
    samp_key: torch.Tensor     # [n, S] priority << 32 | window, _INF_KEY = empty
    samp_val: torch.Tensor     # [n, S]
    samp_acts: torch.Tensor    # [n, S, C]
    rand_acts: torch.Tensor    # [n, R, C]
    rand_have: torch.Tensor    # [R] bool
    n_tokens: torch.Tensor     # [] int64
    act_sum: torch.Tensor      # [n] float64
    act_sqsum: torch.Tensor    # [n] float64
    act_max: torch.Tensor      # [n]
    act_min: torch.Tensor      # [n]
    n_active: torch.Tensor     # [n] int64 tokens above threshold
    n_active_windows: torch.Tensor  # [n] int64
    tail_val: torch.Tensor     # [n, T] the T largest token activations, descending; -inf = empty
    tail_idx: torch.Tensor     # [n, T] their global token index (window * ctx + pos); -1 = empty
    done: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int, cfg: HarvestConfig, ctx: int, n_rand: int) -> _State:
        f = torch.float32
        return cls(
            top_val=torch.full((n, cfg.k), float("-inf")), top_win=torch.full((n, cfg.k), -1, dtype=torch.long),
            top_acts=torch.zeros(n, cfg.k, ctx, dtype=f),
            samp_key=torch.full((n, cfg.n_sample), _INF_KEY, dtype=torch.long), samp_val=torch.zeros(n, cfg.n_sample),
            samp_acts=torch.zeros(n, cfg.n_sample, ctx, dtype=f),
            rand_acts=torch.zeros(n, n_rand, ctx, dtype=f), rand_have=torch.zeros(n_rand, dtype=torch.bool),
            n_tokens=torch.zeros((), dtype=torch.long), act_sum=torch.zeros(n, dtype=torch.float64),
            act_sqsum=torch.zeros(n, dtype=torch.float64), act_max=torch.full((n,), float("-inf")),
            act_min=torch.full((n,), float("inf")), n_active=torch.zeros(n, dtype=torch.long),
            n_active_windows=torch.zeros(n, dtype=torch.long),
            tail_val=torch.full((n, cfg.n_tail), float("-inf")), tail_idx=torch.full((n, cfg.n_tail), -1, dtype=torch.long),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in _STATE_KEYS + _TAIL_KEYS}

    def save(self, path: Path) -> None:
        _atomic_save(self.tensors(), path, {"done": json.dumps(sorted(self.done)), "format": str(FORMAT_VERSION)})

    @classmethod
    def load(cls, path: Path) -> _State:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in _STATE_KEYS}
            have = set(f.keys())
            n = tensors["top_val"].shape[0]
            tail = {k: f.get_tensor(k) if k in have else torch.empty(n, 0, dtype=dt)
                    for k, dt in zip(_TAIL_KEYS, (torch.float32, torch.long))}
        return cls(**tensors, **tail, done=json.loads(meta.get("done", "[]")))

    # -- updates --------------------------------------------------------------------------------
    def update_top(self, val: Float[torch.Tensor, "unit m"], win: Int[torch.Tensor, "unit m"],
                   acts: Float[torch.Tensor, "unit m ctx"]) -> None:
        """Merge candidates ``val/win [n, m]``, ``acts [n, m, C]`` into the top-k."""
        k = self.top_val.shape[1]
        cv = torch.cat([self.top_val, val], 1)
        cw = torch.cat([self.top_win, win], 1)
        # order: score descending, then window id ascending (empty slots, id -1, sort last by score)
        o1 = torch.argsort(torch.where(cw < 0, torch.iinfo(torch.long).max, cw), dim=1, stable=True)
        o2 = torch.argsort(cv.gather(1, o1), dim=1, descending=True, stable=True)
        idx = o1.gather(1, o2)[:, :k]
        self.top_val = cv.gather(1, idx)
        self.top_win = cw.gather(1, idx)
        ca = torch.cat([self.top_acts, acts], 1)
        self.top_acts = ca.gather(1, idx[:, :, None].expand(-1, -1, ca.shape[2]))

    def update_tail(self, val: Float[torch.Tensor, "unit token"], idx: Int[torch.Tensor, " token"]) -> None:
        """Fold one batch's token activations ``val [n, m]`` (global token indices ``idx``) into the tail.

        Only tokens that can enter are merged: those at least the tail's current T-th value and at
        least the batch's own T-th value (ties at either threshold included, so the merge decides
        them). NaN activations never enter."""
        n, T = self.tail_val.shape
        if T == 0 or val.shape[1] == 0:
            return
        val = val.contiguous()
        thr = self.tail_val[:, -1:]  # -inf while the tail fills
        cand = val >= thr
        if val.shape[1] > T and int(cand.sum(1).max()) > T:
            real = torch.where(val.isnan(), float("-inf"), val)  # top-k ranks NaN first; the tail never keeps it
            top = torch.topk(real, T, dim=1, sorted=False)
            kth = top.values.amin(1, keepdim=True)
            # no ties at any unit's cut (nor NaN stand-ins in a top-k reaching -inf): the top-k is every entrant
            if bool((kth > float("-inf")).all()) and bool(((val >= kth).sum(1) == T).all()):
                self.merge_tail(top.values, idx[top.indices])
                return
            thr = torch.maximum(thr, kth)
            cand = val >= thr
        counts = cand.sum(1)
        width = int(counts.max())
        if width == 0:
            return
        rows, cols = cand.nonzero(as_tuple=True)  # row-major: each unit's candidates in token order
        slot = torch.arange(rows.shape[0]) - (counts.cumsum(0) - counts)[rows]
        bv = torch.full((n, width), float("-inf"), dtype=val.dtype)
        bi = torch.full((n, width), -1, dtype=torch.long)
        bv[rows, slot] = val[rows, cols]
        bi[rows, slot] = idx[cols]
        self.merge_tail(bv, bi)

    def merge_tail(self, val: Float[torch.Tensor, "unit m"], idx: Int[torch.Tensor, "unit m"]) -> None:
        """Merge candidates into the tail; order: value descending, then token index ascending (empty
        slots last), so the kept set does not depend on batching, order or the number of workers.
        (A top-k decides units without equal values among the kept or at the cut; the others are
        sorted by both keys.)"""
        T = self.tail_val.shape[1]
        if T == 0:
            return
        cv = torch.cat([self.tail_val, val], 1)
        ci = torch.cat([self.tail_idx, idx], 1)
        top = torch.topk(cv, min(T + 1, cv.shape[1]), dim=1)  # one past the cut shows a tie at the cut
        v, keep = top.values, top.indices[:, :T].contiguous()
        rows = (v[:, 1:] == v[:, :-1]).any(1).nonzero().flatten()
        if rows.numel():
            rv, ri = cv[rows], ci[rows]
            o1 = torch.argsort(torch.where(ri < 0, torch.iinfo(torch.long).max, ri), dim=1, stable=True)
            o2 = torch.argsort(rv.gather(1, o1), dim=1, descending=True, stable=True)
            keep[rows] = o1.gather(1, o2)[:, :T]
        self.tail_val = cv.gather(1, keep)
        self.tail_idx = ci.gather(1, keep)

    def update_sample(self, key: Int[torch.Tensor, "unit m"], val: Float[torch.Tensor, "unit m"],
                      acts: Float[torch.Tensor, "unit m ctx"]) -> None:
        S = self.samp_key.shape[1]
        ck = torch.cat([self.samp_key, key], 1)
        idx = torch.argsort(ck, dim=1, stable=True)[:, :S]
        self.samp_key = ck.gather(1, idx)
        self.samp_val = torch.cat([self.samp_val, val], 1).gather(1, idx)
        ca = torch.cat([self.samp_acts, acts], 1)
        self.samp_acts = ca.gather(1, idx[:, :, None].expand(-1, -1, ca.shape[2]))

    def merge(self, other: _State) -> None:
        overlap = set(self.done) & set(other.done)
        if overlap:
            raise ValueError(f"cannot merge harvests that both processed batches {sorted(overlap)[:5]}")
        self.update_top(other.top_val, other.top_win, other.top_acts)
        self.update_sample(other.samp_key, other.samp_val, other.samp_acts)
        if self.tail_val.shape[1] != other.tail_val.shape[1]:
            raise ValueError(f"cannot merge harvests keeping tails of {self.tail_val.shape[1]} and "
                             f"{other.tail_val.shape[1]} token activations per unit")
        self.merge_tail(other.tail_val, other.tail_idx)
        have = other.rand_have
        self.rand_acts[:, have] = other.rand_acts[:, have]
        self.rand_have = self.rand_have | have
        self.n_tokens = self.n_tokens + other.n_tokens
        self.act_sum += other.act_sum
        self.act_sqsum += other.act_sqsum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.act_min = torch.minimum(self.act_min, other.act_min)
        self.n_active += other.n_active
        self.n_active_windows += other.n_active_windows
        self.done = sorted(set(self.done) | set(other.done))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
