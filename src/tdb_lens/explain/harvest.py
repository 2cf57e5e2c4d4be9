"""Harvest activating examples of units in one streaming pass, to disk, resumably, mergeably.

For each unit (see `tdb_lens.explain.units`) and each window of a `Corpus`, a window's score is
the unit's largest activation in it. One pass over the windows keeps, in bounded memory:

- **top-k**: the ``k`` windows with the highest score (ties: lower window index first), with the
  unit's activation at every token;
- **a uniform sample of active windows** (score > ``threshold``): each (window, unit) pair gets a
  fixed pseudo-random priority from ``seed``; the ``n_sample`` active windows of lowest priority
  are kept, with their activations. This is a uniform sample without replacement that does not
  depend on batching, order or the number of workers, so merging is exact;
- **random windows**: ``n_random`` windows drawn up front with ``seed`` (the same for every unit),
  with activations, for the "random" half of correlation scoring;
- **statistics**: token count, sum, sum of squares, max, min, active token and window counts.

Every window's score is also written to disk (``wmax/*.safetensors``, 4 bytes per window and
unit), so activation-quantile bin edges are exact: ``quantile_edges[u]`` are the quantiles at
``0, 1/Q, ..., 1`` of unit ``u``'s active window scores, and each sampled window is assigned to the
bin it falls in (a uniform sample fills the quantile bins about equally).

Layout of a harvest directory::

    manifest.json                    hook, units, parameters, corpus fingerprint, model
    corpus.safetensors               the token windows (so the directory is self-contained)
    worker-{i}-of-{n}/state.safetensors   running state + done batches (metadata), replaced atomically
    worker-{i}-of-{n}/wmax/{start}.safetensors  window scores of one batch

A worker processes batches ``b`` with ``b % n_workers == worker``. After each batch (every
``checkpoint_every`` batches) it writes that batch's scores, then its state, each with an atomic
rename: a killed run loses at most the batches since its last checkpoint and ``harvest`` with the
same arguments resumes it. `load_harvest` merges every worker's state found under one or more
directories into a `HarvestResult`. Nothing is pickled: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .corpus import Corpus
from .units import unit_activations, unit_kind, unit_label

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

    def check(self) -> None:
        for name in ("k", "n_sample", "n_quantiles", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {self.n_random}")
        if not self.units:
            raise ValueError("no units to harvest")
        if len(set(self.units)) != len(self.units) or min(self.units) < 0:
            raise ValueError(f"units must be distinct non-negative indices, got {self.units[:10]}...")


class _StopForward(Exception):
    """Raised by the capturing hook: nothing after the hook needs computing."""


# ---- deterministic priorities ----------------------------------------------------------------
def priorities(seed: int, windows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
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


def random_window_ids(n_windows: int, n_random: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n_windows, generator=g)[: min(n_random, n_windows)].sort().values


# ---- the running state -----------------------------------------------------------------------
_STATE_KEYS = ("top_val", "top_win", "top_acts", "samp_key", "samp_val", "samp_acts", "rand_acts", "rand_have",
               "n_tokens", "act_sum", "act_sqsum", "act_max", "act_min", "n_active", "n_active_windows")


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
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in _STATE_KEYS}

    def save(self, path: Path) -> None:
        _atomic_save(self.tensors(), path, {"done": json.dumps(sorted(self.done)), "format": str(FORMAT_VERSION)})

    @classmethod
    def load(cls, path: Path) -> _State:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in _STATE_KEYS}
        return cls(**tensors, done=json.loads(meta.get("done", "[]")))

    # -- updates --------------------------------------------------------------------------------
    def update_top(self, val: torch.Tensor, win: torch.Tensor, acts: torch.Tensor) -> None:
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

    def update_sample(self, key: torch.Tensor, val: torch.Tensor, acts: torch.Tensor) -> None:
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


# ---- running the model -----------------------------------------------------------------------
@torch.no_grad()
def capture(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """The raw activation at ``hook`` for ``tokens``; the forward stops right after the hook."""
    box: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        box["act"] = act.detach()
        raise _StopForward

    with model.hooks(fwd_hooks=[(hook, grab)]):
        try:
            model(tokens.to(model.device), return_type=None)
        except _StopForward:
            pass
    if "act" not in box:
        raise RuntimeError(f"hook {hook!r} did not fire during the forward pass")
    return box["act"]


def n_units_at(model, hook: str, ctx_len: int = 4, reduce: str = "auto") -> int:
    """How many units the hook has (one tiny forward)."""
    toks = torch.zeros(1, ctx_len, dtype=torch.long)
    return int(unit_activations(capture(model, toks, hook), hook, reduce).shape[-1])


def _model_name(model) -> str:
    return str(getattr(model, "name", None) or getattr(getattr(model, "cfg", None), "model_name", None)
               or type(model).__name__)


# ---- the harvest -----------------------------------------------------------------------------
def harvest(
    model,
    corpus: Corpus,
    hook: str,
    out_dir: Union[str, os.PathLike],
    units: Optional[Sequence[int]] = None,
    k: int = 20,
    n_sample: int = 64,
    n_random: int = 20,
    n_quantiles: int = 10,
    threshold: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    reduce: str = "auto",
    worker: int = 0,
    n_workers: int = 1,
    checkpoint_every: int = 1,
    model_name: Optional[str] = None,
    progress: bool = True,
) -> HarvestResult:
    """Harvest ``units`` (default: all) at ``hook`` over ``corpus`` into ``out_dir``; resume if it exists.

    Returns the merged result of every worker found in ``out_dir`` (after this worker finished).
    """
    if hook not in model.hook_dict:
        from ..hooks.names import unknown_name_error

        raise unknown_name_error(hook, model.hook_dict)
    if not (0 <= worker < n_workers):
        raise ValueError(f"worker must be in [0, n_workers={n_workers}), got {worker}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    total_units = n_units_at(model, hook, min(4, corpus.ctx_len), reduce)
    unit_list = list(range(total_units)) if units is None else [int(u) for u in units]
    if unit_list and max(unit_list) >= total_units:
        raise ValueError(f"unit {max(unit_list)} out of range: {hook!r} has {total_units} units")
    cfg = HarvestConfig(hook, unit_list, k, n_sample, n_random, n_quantiles, float(threshold), batch_size, seed, reduce)
    cfg.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT_VERSION, "config": asdict(cfg), "corpus": corpus.describe(),
        "model": model_name or _model_name(model), "unit_kind": unit_kind(hook), "n_units_at_hook": total_units,
    }
    _check_or_write_manifest(out, manifest, corpus)

    wdir = out / f"worker-{worker}-of-{n_workers}"
    (wdir / "wmax").mkdir(parents=True, exist_ok=True)
    rand_ids = random_window_ids(corpus.n_windows, n_random, seed)
    n = len(unit_list)
    state_path = wdir / "state.safetensors"
    state = _State.load(state_path) if state_path.exists() else _State.empty(n, cfg, corpus.ctx_len, len(rand_ids))
    done = set(state.done)
    batches = corpus.batches(batch_size)
    todo = [b for b in range(len(batches)) if b % n_workers == worker and b not in done]
    unit_t = torch.tensor(unit_list, dtype=torch.long)
    sel = None if unit_list == list(range(total_units)) else unit_t
    since = 0
    for b in tqdm(todo, desc=f"harvest {hook}", disable=not progress, unit="batch"):
        start, end = batches[b]
        acts = unit_activations(capture(model, corpus.tokens[start:end], hook), hook, reduce).cpu()
        if sel is not None:
            acts = acts.index_select(-1, sel)
        _update(state, acts, start, unit_t, cfg, rand_ids)
        _atomic_save({"wmax": acts.amax(1).contiguous()}, wdir / "wmax" / f"{start:010d}.safetensors")
        state.done.append(b)
        since += 1
        if since >= checkpoint_every:
            state.save(state_path)
            since = 0
    if since or not state_path.exists():
        state.save(state_path)
    return load_harvest(out)


def _update(state: _State, acts: torch.Tensor, start: int, units: torch.Tensor, cfg: HarvestConfig,
            rand_ids: torch.Tensor) -> None:
    """Fold one batch ``acts [B, C, n]`` (windows ``start..start+B``) into the state."""
    B, C, n = acts.shape
    wins = torch.arange(start, start + B, dtype=torch.long)
    wmax = acts.amax(1)  # [B, n]
    per_unit = acts.permute(2, 0, 1)  # [n, B, C]
    state.update_top(wmax.T.contiguous(), wins[None].expand(n, B), per_unit)
    active = wmax > cfg.threshold
    key = (priorities(cfg.seed, wins, units) << 32) | wins[:, None]
    key = torch.where(active, key, torch.full_like(key, _INF_KEY))
    state.update_sample(key.T.contiguous(), wmax.T.contiguous(), per_unit)
    if len(rand_ids):
        hit = (rand_ids >= start) & (rand_ids < start + B)
        if bool(hit.any()):
            pos = hit.nonzero().flatten()
            state.rand_acts[:, pos] = per_unit[:, rand_ids[pos] - start]
            state.rand_have[pos] = True
    flat = acts.reshape(-1, n)
    state.n_tokens += flat.shape[0]
    state.act_sum += flat.sum(0, dtype=torch.float64)
    state.act_sqsum += flat.square().sum(0, dtype=torch.float64)
    state.act_max = torch.maximum(state.act_max, flat.amax(0))
    state.act_min = torch.minimum(state.act_min, flat.amin(0))
    state.n_active += (flat > cfg.threshold).sum(0)
    state.n_active_windows += active.sum(0)


def _check_or_write_manifest(out: Path, manifest: dict, corpus: Corpus) -> None:
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        for key in ("format", "config", "corpus"):
            if old.get(key) != manifest[key]:
                raise ValueError(
                    f"{out} holds a different harvest ({key} differs: {old.get(key)} vs {manifest[key]}); "
                    "use another directory or delete it to start over"
                )
        return
    _atomic_save({"tokens": corpus.tokens.to(torch.int32)}, out / "corpus.safetensors")
    _atomic_write_text(mpath, json.dumps(manifest, indent=1))


# ---- results ---------------------------------------------------------------------------------
@dataclass
class UnitRecord:
    """Everything harvested about one unit: what the explainer and the scorers read."""

    hook: str
    unit: int
    label: str
    top_windows: list[int]
    top_tokens: torch.Tensor          # [k', C]
    top_acts: torch.Tensor            # [k', C]
    random_windows: list[int]
    random_tokens: torch.Tensor       # [R, C]
    random_acts: torch.Tensor         # [R, C]
    sample_windows: list[int]         # uniform sample of active windows
    sample_tokens: torch.Tensor
    sample_acts: torch.Tensor
    sample_bins: list[int]            # each sample's activation-quantile bin (0 = lowest)
    quantile_edges: list[float]
    stats: dict

    def quantile_examples(self, per_bin: int = 2) -> list[tuple[int, int]]:
        """``(bin, sample index)`` pairs: up to ``per_bin`` examples from each quantile bin, high bins first."""
        out = []
        for q in sorted(set(self.sample_bins), reverse=True):
            idx = [i for i, b in enumerate(self.sample_bins) if b == q][:per_bin]
            out += [(q, i) for i in idx]
        return out


@dataclass
class HarvestResult:
    config: HarvestConfig
    manifest: dict
    tokens: torch.Tensor              # [n_windows, C] the corpus
    units: list[int]
    top_values: torch.Tensor          # [n, k]
    top_windows: torch.Tensor         # [n, k] (-1 where fewer windows exist)
    top_acts: torch.Tensor            # [n, k, C]
    sample_windows: torch.Tensor      # [n, S] (-1 = empty)
    sample_values: torch.Tensor       # [n, S]
    sample_acts: torch.Tensor         # [n, S, C]
    sample_bins: torch.Tensor         # [n, S] quantile bin, -1 = empty
    quantile_edges: torch.Tensor      # [n, Q+1] (NaN for a unit that never fired)
    random_windows: torch.Tensor      # [R]
    random_acts: torch.Tensor         # [n, R, C]
    stats: dict[str, torch.Tensor]    # max, min, mean, std, density, window_density: [n]; n_tokens
    complete: bool
    directories: list[str]
    done_batches: list[int]

    @property
    def hook(self) -> str:
        return self.config.hook

    def index_of(self, unit: int) -> int:
        try:
            return self.units.index(int(unit))
        except ValueError:
            raise KeyError(f"unit {unit} was not harvested at {self.hook!r} (harvested: {self.units[:10]}...)") from None

    def record(self, unit: int) -> UnitRecord:
        i = self.index_of(unit)
        tw = self.top_windows[i]
        keep = tw >= 0
        sw = self.sample_windows[i]
        sk = sw >= 0
        st = {k: (float(v[i]) if v.ndim else float(v)) for k, v in self.stats.items()}
        return UnitRecord(
            hook=self.hook, unit=int(unit), label=unit_label(self.hook, int(unit)),
            top_windows=tw[keep].tolist(), top_tokens=self.tokens[tw[keep]], top_acts=self.top_acts[i][keep],
            random_windows=self.random_windows.tolist(), random_tokens=self.tokens[self.random_windows],
            random_acts=self.random_acts[i], sample_windows=sw[sk].tolist(), sample_tokens=self.tokens[sw[sk]],
            sample_acts=self.sample_acts[i][sk], sample_bins=self.sample_bins[i][sk].tolist(),
            quantile_edges=self.quantile_edges[i].tolist(), stats=st,
        )

    def records(self) -> list[UnitRecord]:
        return [self.record(u) for u in self.units]

    def window_scores(self, units: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``[n_windows, len(units)]`` every window's score (max activation) read back from disk."""
        cols = [self.index_of(u) for u in (units if units is not None else self.units)]
        done = {b * self.config.batch_size for b in self.done_batches}
        return _read_wmax(self.directories, self.tokens.shape[0], torch.tensor(cols, dtype=torch.long), done)

    def summary(self) -> list[dict]:
        return [{"unit": u, "label": unit_label(self.hook, u), **{k: float(v[i]) for k, v in self.stats.items() if v.ndim}}
                for i, u in enumerate(self.units)]


def _worker_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("worker-*-of-*") if (p / "state.safetensors").exists())


def _read_wmax(directories: Sequence[str], n_windows: int, cols: Optional[torch.Tensor],
               done_starts: set) -> torch.Tensor:
    """Window scores from the per-batch files (NaN where no finished batch covers a window).

    Only batches whose start is in ``done_starts`` (finished according to a worker's state)
    count: a file written just before a crash, whose batch no state lists, is ignored.
    """
    out: Optional[torch.Tensor] = None
    files = [f for d in directories for wd in _worker_dirs(Path(d)) for f in sorted((wd / "wmax").glob("*.safetensors"))]
    for f in files:
        start = int(f.stem)
        if start not in done_starts:
            continue
        block = load_file(str(f))["wmax"]
        if cols is not None:
            block = block.index_select(1, cols)
        if out is None:
            out = torch.full((n_windows, block.shape[1]), float("nan"))
        out[start:start + block.shape[0]] = block
    if out is None:
        out = torch.full((n_windows, 0 if cols is None else len(cols)), float("nan"))
    return out


def load_harvest(*directories: Union[str, os.PathLike]) -> HarvestResult:
    """Merge every worker's state under ``directories`` (one harvest split across workers or machines)."""
    if not directories:
        raise ValueError("load_harvest needs at least one directory")
    dirs = [Path(d) for d in directories]
    manifests = []
    for d in dirs:
        mp = d / "manifest.json"
        if not mp.exists():
            raise FileNotFoundError(f"{d} is not a harvest directory (no manifest.json)")
        manifests.append(json.loads(mp.read_text()))
    m0 = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        for key in ("format", "config", "corpus"):
            if m.get(key) != m0.get(key):
                raise ValueError(f"cannot merge {dirs[0]} and {d}: their {key} differ")
    cfg = HarvestConfig(**m0["config"])
    tokens = load_file(str(dirs[0] / "corpus.safetensors"))["tokens"].to(torch.long)
    state: Optional[_State] = None
    batches_per_dir: list[int] = []
    for d in dirs:
        for wd in _worker_dirs(d):
            st = _State.load(wd / "state.safetensors")
            batches_per_dir.append(len(st.done))
            if state is None:
                state = st
            else:
                state.merge(st)
    if state is None:
        raise FileNotFoundError(f"no worker state under {[str(d) for d in dirs]}: nothing harvested yet")
    n_windows = tokens.shape[0]
    n_batches = (n_windows + cfg.batch_size - 1) // cfg.batch_size
    complete = len(state.done) == n_batches
    # exact quantile edges of each unit's active window scores, from the per-batch files,
    # counting only batches some worker finished (a half-written batch is not in any state)
    done_starts = {b * cfg.batch_size for b in state.done}
    n = len(cfg.units)
    scores = _read_wmax([str(d) for d in dirs], n_windows, None, done_starts)
    if scores.shape[1] != n:
        scores = torch.full((n_windows, n), float("nan"))
    scores = torch.where(scores > cfg.threshold, scores, torch.full_like(scores, float("nan")))
    levels = torch.linspace(0, 1, cfg.n_quantiles + 1)
    edges = torch.empty(n, cfg.n_quantiles + 1)
    chunk = max(1, (1 << 23) // max(1, n_windows))
    for s in range(0, n, chunk):
        edges[s:s + chunk] = torch.nanquantile(scores[:, s:s + chunk], levels, dim=0).T
    samp_win = torch.where(state.samp_key >= _INF_KEY, torch.full_like(state.samp_key, -1), state.samp_key & _M32)
    inner = edges[:, 1:-1].contiguous()
    bins = torch.searchsorted(inner, state.samp_val.contiguous(), right=True)
    bins = torch.where(samp_win >= 0, bins, torch.full_like(bins, -1))
    nt = state.n_tokens.clamp(min=1).double()
    mean = state.act_sum / nt
    var = (state.act_sqsum / nt - mean ** 2).clamp(min=0)
    stats = {
        "max": state.act_max, "min": state.act_min, "mean": mean.float(), "std": var.sqrt().float(),
        "density": (state.n_active.double() / nt).float(),
        "window_density": (state.n_active_windows.double() / max(1, _n_done_windows(state.done, cfg.batch_size, n_windows))).float(),
        "n_tokens": state.n_tokens,
    }
    rand_ids = random_window_ids(n_windows, cfg.n_random, cfg.seed)
    have = state.rand_have
    return HarvestResult(
        config=cfg, manifest=m0, tokens=tokens, units=list(cfg.units), top_values=state.top_val,
        top_windows=state.top_win, top_acts=state.top_acts, sample_windows=samp_win, sample_values=state.samp_val,
        sample_acts=state.samp_acts, sample_bins=bins, quantile_edges=edges, random_windows=rand_ids[have],
        random_acts=state.rand_acts[:, have], stats=stats, complete=complete, directories=[str(d) for d in dirs],
        done_batches=list(state.done),
    )


def _n_done_windows(done: Sequence[int], batch_size: int, n_windows: int) -> int:
    return sum(min(batch_size, n_windows - b * batch_size) for b in done)
