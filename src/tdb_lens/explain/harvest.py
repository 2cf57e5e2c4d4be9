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
- **the tail**: the ``n_tail`` largest token activations over every harvested token (not windows),
  with their global token index (ties: lower index first), so that extreme quantiles of the unit's
  activation distribution are exact (`tdb_lens.explain.quantiles`: the rule and the fallback);
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..corpus import Corpus
from ..provenance import ModelIdentity, model_identity, model_name_of, splice_digest
from .harvest_state import (
    _INF_KEY,
    _M32,
    FORMAT_VERSION,
    HarvestConfig,
    _atomic_save,
    _atomic_write_text,
    _State,
    priorities,
    random_window_ids,
)
from .quantiles import ActivationQuantile, unit_quantile
from .units import UnitSite, unit_activations

__all__ = ["FORMAT_VERSION", "HarvestConfig", "HarvestResult", "UnitRecord", "capture", "harvest", "load_harvest",
           "n_units_at", "priorities", "random_window_ids", "_INF_KEY"]


class _StopForward(Exception):
    """Raised by the capturing hook: nothing after the hook needs computing."""


# ---- running the model -----------------------------------------------------------------------
@torch.no_grad()
def capture(model, tokens: Int[torch.Tensor, "batch pos"], hook: str) -> torch.Tensor:
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
    """How many units the hook has (from its layout's sizes, else one tiny forward)."""
    lay = model.hook_layout(hook)
    from .units import resolve_reduction

    axis = lay.axes[2] if resolve_reduction(lay, reduce, hook) == "head_norm" else lay.axes[-1]
    size = lay.size(axis)
    if size is not None:
        return int(size)
    toks = torch.zeros(1, ctx_len, dtype=torch.long)
    return int(unit_activations(capture(model, toks, hook), lay, reduce).shape[-1])


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
    identity: Optional[ModelIdentity] = None,
    n_tail: int = 256,
) -> HarvestResult:
    """Harvest ``units`` (default: all) at ``hook`` over ``corpus`` into ``out_dir``; resume if it exists.

    The directory records the model's identity (``identity``, default: ``model_name`` or the model's
    own name plus the digest of its weights, `tdb_lens.explain.provenance`); a directory holding a
    harvest of another model, hook, corpus or settings is refused. Returns the merged result of
    every worker found in ``out_dir`` (after this worker finished).
    """
    if not (0 <= worker < n_workers):
        raise ValueError(f"worker must be in [0, n_workers={n_workers}), got {worker}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    layout = model.hook_layout(hook)
    total_units = n_units_at(model, hook, min(4, corpus.ctx_len), reduce)
    unit_list = list(range(total_units)) if units is None else [int(u) for u in units]
    if unit_list and max(unit_list) >= total_units:
        raise ValueError(f"unit {max(unit_list)} out of range: {hook!r} has {total_units} units")
    cfg = HarvestConfig(hook, unit_list, k, n_sample, n_random, n_quantiles, float(threshold), batch_size, seed, reduce,
                        n_tail)
    cfg.check()
    ident = identity or model_identity(model, model_name or model_name_of(model))
    site = UnitSite.of(model, hook)
    manifest = {
        "format": FORMAT_VERSION, "config": asdict(cfg), "corpus": corpus.describe(), "model": ident.name,
        "model_digest": ident.digest, "splice_digest": splice_digest(model),
        "unit_kind": site.kind, "unit_site": site.as_dict(), "n_units_at_hook": total_units,
    }
    out = Path(out_dir)
    _check_or_write_manifest(out, manifest, corpus)
    wdir = out / f"worker-{worker}-of-{n_workers}"
    (wdir / "wmax").mkdir(parents=True, exist_ok=True)
    rand_ids = random_window_ids(corpus.n_windows, n_random, seed)
    state_path = wdir / "state.safetensors"
    state = _State.load(state_path) if state_path.exists() else _State.empty(len(unit_list), cfg, corpus.ctx_len,
                                                                             len(rand_ids))
    batches = corpus.batches(batch_size)
    todo = [b for b in range(len(batches)) if b % n_workers == worker and b not in set(state.done)]
    unit_t = torch.tensor(unit_list, dtype=torch.long)
    sel = None if unit_list == list(range(total_units)) else unit_t
    since = 0
    for b in tqdm(todo, desc=f"harvest {hook}", disable=not progress, unit="batch"):
        start, end = batches[b]
        acts = unit_activations(capture(model, corpus.tokens[start:end], hook), layout, reduce).cpu()
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


def _update(state: _State, acts: Float[torch.Tensor, "batch ctx unit"], start: int, units: Int[torch.Tensor, " unit"],
            cfg: HarvestConfig, rand_ids: Int[torch.Tensor, " n_random"]) -> None:
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
    state.update_tail(flat.T, torch.arange(start * C, (start + B) * C, dtype=torch.long))
    state.n_tokens += flat.shape[0]
    state.act_sum += flat.sum(0, dtype=torch.float64)
    state.act_sqsum += flat.square().sum(0, dtype=torch.float64)
    state.act_max = torch.maximum(state.act_max, flat.amax(0))
    state.act_min = torch.minimum(state.act_min, flat.amin(0))
    state.n_active += (flat > cfg.threshold).sum(0)
    state.n_active_windows += active.sum(0)


def _config_of(manifest: dict) -> dict:
    """A manifest's harvest config; harvests made before the tail existed kept none (``n_tail`` 0)."""
    cfg = manifest.get("config")
    return {**cfg, "n_tail": cfg.get("n_tail", 0)} if isinstance(cfg, dict) else {}


def _check_or_write_manifest(out: Path, manifest: dict, corpus: Corpus) -> None:
    """Write the manifest of a new harvest, or check that ``out`` holds this same harvest (model
    included); raise a ValueError saying how to proceed otherwise."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"harvest directory {out} is a file; give a directory")
    mpath = out / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{mpath} is not a harvest manifest ({e}); use another directory or delete {out}") from None
        if (old.get("model"), old.get("model_digest")) != (manifest["model"], manifest["model_digest"]):
            was = f"{old.get('model')!r} (weights {str(old.get('model_digest') or 'not recorded')[:12]})"
            now = f"{manifest['model']!r} (weights {manifest['model_digest'][:12]})"
            raise ValueError(f"{out} holds a harvest of model {was}, not of {now}: harvest this model into "
                             f"another directory, or delete {out} to start over")
        if old.get("splice_digest") != manifest["splice_digest"]:
            raise ValueError(f"{out} holds a harvest made with other modules spliced into the model (SAEs: digest "
                             f"{old.get('splice_digest') or 'none'!s:.12} vs {manifest['splice_digest'] or 'none'!s:.12}): "
                             f"harvest into another directory, or delete {out} to start over")
        if manifest["config"]["n_tail"] and "n_tail" not in (old.get("config") or {}):
            raise ValueError(f"{out} holds a harvest made without a per-token tail (by an older tdb_lens): pass "
                             f"n_tail=0 (tdb-lens explain --tail 0) to reuse it, or delete {out} to harvest again with one")
        for key in ("format", "config", "corpus"):
            if (_config_of(old) if key == "config" else old.get(key)) != manifest[key]:
                raise ValueError(
                    f"{out} holds a different harvest ({key} differs: {old.get(key)} vs {manifest[key]}); "
                    "use another directory or delete it to start over"
                )
        return
    partial = {"manifest.json.tmp", "corpus.safetensors", "corpus.safetensors.tmp"}  # a run killed while starting
    if out.exists() and any(p.name not in partial for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no harvest manifest; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
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
    kind: str = "dim"                 # neuron, head, sae_latent or dim (`tdb_lens.explain.units.unit_kind`)

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
    tail_values: torch.Tensor         # [n, T] the T largest token activations, descending (-inf = empty)
    tail_tokens: torch.Tensor         # [n, T] their global token index: window * ctx_len + pos (-1 = empty)

    @property
    def hook(self) -> str:
        return self.config.hook

    @property
    def site(self) -> UnitSite:
        return UnitSite.from_dict(self.manifest.get("unit_site"), self.hook)

    @property
    def model(self) -> ModelIdentity:
        """The model this harvest was made with (digest "" in harvests of older versions)."""
        return ModelIdentity(str(self.manifest.get("model", "")), str(self.manifest.get("model_digest") or ""))

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
            hook=self.hook, unit=int(unit), label=self.site.label(int(unit)), kind=self.site.kind,
            top_windows=tw[keep].tolist(), top_tokens=self.tokens[tw[keep]], top_acts=self.top_acts[i][keep],
            random_windows=self.random_windows.tolist(), random_tokens=self.tokens[self.random_windows],
            random_acts=self.random_acts[i], sample_windows=sw[sk].tolist(), sample_tokens=self.tokens[sw[sk]],
            sample_acts=self.sample_acts[i][sk], sample_bins=self.sample_bins[i][sk].tolist(),
            quantile_edges=self.quantile_edges[i].tolist(), stats=st,
        )

    def quantile(self, unit: int, q: float) -> ActivationQuantile:
        """The ``q`` quantile of ``unit``'s activation over every harvested token: exact from the tail
        when it covers ``q``, else from the random windows' tokens (`tdb_lens.explain.quantiles`)."""
        return unit_quantile(self, unit, q)

    def records(self) -> list[UnitRecord]:
        return [self.record(u) for u in self.units]

    def window_scores(self, units: Optional[Sequence[int]] = None) -> Float[torch.Tensor, "n_windows unit"]:
        """``[n_windows, len(units)]`` every window's score (max activation) read back from disk."""
        cols = [self.index_of(u) for u in (units if units is not None else self.units)]
        done = {b * self.config.batch_size for b in self.done_batches}
        return _read_wmax(self.directories, self.tokens.shape[0], torch.tensor(cols, dtype=torch.long), done)

    def summary(self) -> list[dict]:
        site = self.site
        return [{"unit": u, "label": site.label(u), **{k: float(v[i]) for k, v in self.stats.items() if v.ndim}}
                for i, u in enumerate(self.units)]


def _worker_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("worker-*-of-*") if (p / "state.safetensors").exists())


def _read_wmax(directories: Sequence[str], n_windows: int, cols: Optional[Int[torch.Tensor, " col"]],
               done_starts: set) -> Float[torch.Tensor, "n_windows col"]:
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
        for key in ("format", "config", "corpus", "model", "model_digest", "splice_digest"):
            a, b = (_config_of(m0), _config_of(m)) if key == "config" else (m0.get(key), m.get(key))
            if a != b:
                raise ValueError(f"cannot merge {dirs[0]} and {d}: their {key} differ ({a} vs {b})")
    cfg = HarvestConfig(**_config_of(m0))
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
        "window_density": (state.n_active_windows.double()
                           / max(1, _n_done_windows(state.done, cfg.batch_size, n_windows))).float(),
        "n_tokens": state.n_tokens,
    }
    rand_ids = random_window_ids(n_windows, cfg.n_random, cfg.seed)
    have = state.rand_have
    return HarvestResult(
        config=cfg, manifest=m0, tokens=tokens, units=list(cfg.units), top_values=state.top_val,
        top_windows=state.top_win, top_acts=state.top_acts, sample_windows=samp_win, sample_values=state.samp_val,
        sample_acts=state.samp_acts, sample_bins=bins, quantile_edges=edges, random_windows=rand_ids[have],
        random_acts=state.rand_acts[:, have], stats=stats, complete=complete, directories=[str(d) for d in dirs],
        done_batches=list(state.done), tail_values=state.tail_val, tail_tokens=state.tail_idx,
    )


def _n_done_windows(done: Sequence[int], batch_size: int, n_windows: int) -> int:
    return sum(min(batch_size, n_windows - b * batch_size) for b in done)
