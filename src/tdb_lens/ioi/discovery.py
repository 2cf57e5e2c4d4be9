"""Find the IOI circuit in any supported model, as Wang et al. (2022) did for GPT-2 small.

Everything here composes the tools of :mod:`tdb_lens.attribution` over the IOI prompts:

1. baseline: logit difference IO - S at END (:func:`tdb_lens.ioi.logit_diff`);
2. direct effects of every head at END (:func:`~tdb_lens.attribution.direct_effects`): the most
   positive are name movers, the most negative negative name movers;
3. attribution patching of every head at END, S2 and S1+1 against the ABC corruption (one
   forward and one backward pass), and the same gradient against the per-template ABC means
   (summed over positions: an estimate of each head's mean-ablation knock-out effect);
4. path patching (:func:`~tdb_lens.attribution.path_patch`) from the heads that matter at END
   but write little directly into the name movers' queries: S-inhibition heads;
5. head detectors on repeated random tokens (induction, duplicate-token, previous-token
   scores); heads that matter at S2 and score as induction / duplicate-token heads, and heads that
   matter at S1+1 and score as previous-token heads, join those classes;
6. the circuit: the classes above, completed greedily by the knock-out estimate until the
   paper's faithfulness (every other head mean-ablated, means per template over the ABC prompts,
   :func:`~tdb_lens.attribution.circuits.circuit_hooks`) reaches the target, then pruned of heads
   it does not need; completeness and minimality as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from jaxtyping import Float

from ..attribution import GradRun, LogitDiff, Node, compute_means, path_patch, run_with_grads
from ..attribution import direct_effects as _direct_effects
from ..attribution.circuits import circuit_hooks
from ..attribution.sharding import mean_over_rows
from ..distributed import Dist
from ..hooks import HookPoint
from ..models.engine import HookedTransformer
from .data import IOIBatch, IOIDataset, per_template_groups
from .detectors import head_detector_scores

Head = tuple[int, int]
HeadScores = Float[torch.Tensor, "layer head"]
CLASSES = ("name_mover", "negative_name_mover", "s_inhibition", "induction", "duplicate_token", "previous_token", "other")


def head_str(h: Head) -> str:
    """``(9, 6)`` -> ``"9.6"`` (the IOI paper's way of writing a head)."""
    return f"{h[0]}.{h[1]}"


def parse_head(s: str) -> Head:
    """``"9.6"`` -> ``(9, 6)``."""
    try:
        l, h = s.split(".")
        return int(l), int(h)
    except ValueError:
        raise ValueError(f"a head is written 'layer.head', e.g. '9.6', got {s!r}") from None


def ioi_metric(batch: IOIBatch) -> LogitDiff:
    """The logit difference IO - S at each prompt's END as an attribution metric."""
    return LogitDiff(batch.io_token.cpu(), batch.s_token.cpu(), pos=batch.end.cpu())


def end_logit_diff(model: HookedTransformer, resid: Float[torch.Tensor, "batch pos d_model"],
                   batch: IOIBatch) -> Float[torch.Tensor, " batch"]:
    """logit(IO) - logit(S) per prompt from the final residual stream, normalising and
    unembedding (the engine's ``logits_from_resid``) only each prompt's END row."""
    end = resid[torch.arange(len(batch.end)), batch.end][:, None]
    logits = model.logits_from_resid(end)[:, 0]
    return logits.gather(1, batch.io_token[:, None])[:, 0] - logits.gather(1, batch.s_token[:, None])[:, 0]


@dataclass
class IOIContext:
    """A model, clean IOI prompts, their ABC corruption and the per-template ABC means of every head."""

    model: HookedTransformer
    clean: IOIBatch
    abc: IOIBatch
    group_ids: torch.Tensor  # [batch] template group of each prompt
    means: dict[str, torch.Tensor]  # z hook -> [n_groups, pos, head, d_head]
    clean_ld: torch.Tensor  # [batch]

    def __repr__(self) -> str:
        return (f"IOIContext({len(self.clean_ld)} prompts, {len(self.means)} head sites with per-template ABC means, "
                f"clean logit diff {self.clean_ld.float().mean():.3f})")

    @classmethod
    def from_dataset(cls, model: HookedTransformer, dataset: IOIDataset, abc_seed: Optional[int] = None) -> IOIContext:
        """Tokenize ``dataset`` and its ABC corruption; group the prompts by template."""
        abc = dataset.abc(abc_seed)
        groups = per_template_groups(dataset)
        ids = torch.empty(len(dataset), dtype=torch.long)
        for g, idx in enumerate(groups.values()):
            ids[idx] = g
        return cls.build(model, dataset.to_batch(model), abc.to_batch(model), ids)

    @classmethod
    def build(cls, model: HookedTransformer, clean: IOIBatch, abc: IOIBatch, group_ids) -> IOIContext:
        ids = torch.as_tensor(group_ids).long().cpu()
        if clean.tokens.shape != abc.tokens.shape:
            raise ValueError(f"clean tokens {tuple(clean.tokens.shape)} and ABC tokens {tuple(abc.tokens.shape)} differ: "
                             "the ABC prompts must come from the same templates, in the same order")
        if ids.shape != (clean.tokens.shape[0],):
            raise ValueError(f"group_ids needs one group per prompt ({clean.tokens.shape[0]}), got shape {tuple(ids.shape)}")
        names = [model.hook_name("z", l) for l in range(model.cfg.n_layers)]
        means = compute_means(model, abc.tokens, names, attention_mask=abc.attention_mask, groups=ids)
        ctx = cls(model, clean, abc, ids, means, torch.empty(0))
        ctx.clean_ld = ctx.run_ld()
        return ctx

    @property
    def dist(self) -> Dist:
        """The ranks passes over the prompts split them over: none here (`ShardedIOIContext`: torchrun's)."""
        return Dist()

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.model.cfg.n_heads

    def all_heads(self) -> list[Head]:
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    # -- running ---------------------------------------------------------------------------------
    def run_ld(self, fwd_hooks: Sequence = (), rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logit difference per prompt ``[batch]`` under ``fwd_hooks``; only the END rows are
        normalised and unembedded (the same numbers as the full logits, less work; hooks on the
        final norm see those rows only, ``[batch, 1, d_model]``)."""
        m = self.model
        b = self.clean if rows is None else self.clean[rows]
        with torch.no_grad(), m.hooks(fwd_hooks=list(fwd_hooks)):
            resid = m(b.tokens, attention_mask=b.attention_mask, stop_at_layer=self.n_layers)
            return end_logit_diff(m, resid, b)

    def mean_z(self, layer: int, groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The per-template ABC mean of ``blocks.{layer}.attn.hook_z`` for each prompt of a run
        whose rows belong to ``groups``: shaped, placed and typed like ``like`` ``[b, p, h, d]``."""
        means = self.means[self.model.hook_name("z", layer)]
        return means[groups.to(means.device)].narrow(1, 0, like.shape[1]).to(like)

    def ablation_hooks(self, keep: set[Head], rows: Optional[torch.Tensor] = None) -> list:
        """The paper's ablation: every head outside ``keep`` replaced by its per-template ABC mean."""
        nodes = [Node.head(l, h) for l, h in sorted(keep)]
        groups = self.group_ids if rows is None else self.group_ids[rows]
        return circuit_hooks(self.model, self.means, nodes, ("head",), target_groups=groups)

    def circuit_ld(self, keep: set[Head], rows: Optional[torch.Tensor] = None) -> float:
        """Mean logit difference with everything outside ``keep`` mean-ablated."""
        return float(self.run_ld(self.ablation_hooks(keep, rows), rows).mean())

    def faithfulness(self, circuit: set[Head], rows: Optional[torch.Tensor] = None) -> float:
        """metric(circuit) / metric(model), each the mean over the prompts (the paper's F(C)/F(M))."""
        base = self.clean_ld if rows is None else self.clean_ld[rows]
        return self.circuit_ld(circuit, rows) / float(base.mean())

    def ablate_only(self, heads: set[Head]) -> float:
        """Mean logit difference with just ``heads`` mean-ablated."""
        return self.circuit_ld(set(self.all_heads()) - set(heads))

    def circuit_attribution(self, keep: set[Head], rows: Optional[torch.Tensor] = None) -> tuple[float, HeadScores]:
        """Attribution patching around the circuit: with everything outside ``keep`` mean-ablated,
        ``grad(LD) . (z_computed - mean)`` per head (summed over positions, mean over prompts).

        For a head outside the circuit it estimates how much restoring it raises the logit
        difference; for a head inside, how much mean-ablating it lowers it. Returns the circuit's
        mean logit difference (the same forward pass) and the ``[layer, head]`` estimates."""
        m, b = self.model, self.clean
        rows = torch.arange(len(b.end)) if rows is None else rows
        groups = self.group_ids[rows]
        keep_mask = torch.zeros(self.n_layers, self.n_heads, dtype=torch.bool)
        for l, h in keep:
            keep_mask[l, h] = True
        delta: dict[str, torch.Tensor] = {}  # z hook -> z as computed minus its mean

        def ablate(l: int, name: str) -> Callable:
            def hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
                mean = self.mean_z(l, groups, z)
                delta[name] = z.detach() - mean
                k = keep_mask[l].to(z.device)[None, None, :, None]
                # what the rest of the model sees; its gradient (also at the ablated slots) is dLD/dz
                return torch.where(k, z, mean)

            return hook

        sub = b[rows]
        names = [m.hook_name("z", l) for l in range(self.n_layers)]
        # the gradient is of the batch mean, so the sums below are mean effects per prompt
        grun = run_with_grads(m, sub.tokens, lambda resid, acts: end_logit_diff(m, resid, sub).mean(), names,
                              sub.attention_mask, fwd_hooks=[(n, ablate(l, n)) for l, n in enumerate(names)],
                              stop_at_layer=self.n_layers)
        mask = sub.attention_mask[:, :, None].to(grun.grads[names[0]].dtype)
        est = torch.stack([((grun.grads[n] * delta[n]).sum(-1) * mask).sum((0, 1)).cpu() for n in names])
        return float(grun.values), est


# ------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------
def _prompt_mean(ctx: IOIContext, part: Callable[[torch.Tensor], torch.Tensor], rows: Optional[torch.Tensor],
                 shape: tuple[int, ...], dist: Optional[Dist]) -> torch.Tensor:
    """The mean over ``rows`` (default: all) of ``part(r)``, a mean over prompts ``r``, split over ``dist``'s ranks."""
    every = torch.arange(len(ctx.clean.end)) if rows is None else rows
    return mean_over_rows(part, every, shape, ctx.dist if dist is None else dist)


def head_direct_effects(ctx: IOIContext, rows: Optional[torch.Tensor] = None, dist: Optional[Dist] = None) -> HeadScores:
    """Mean direct effect of each head on IO - S at END (final norm scale frozen) ``[layer, head]``
    over the prompts ``rows`` (default: all), split over the ranks of ``dist`` (default ``ctx.dist``)."""
    def part(r: torch.Tensor) -> torch.Tensor:
        b = ctx.clean[r]
        de = _direct_effects(ctx.model, b.tokens, ioi_metric(b), attention_mask=b.attention_mask, include_saes=False)
        return de.head[torch.arange(len(b.end)), :, b.end.cpu()].float().mean(0).detach().cpu()  # type: ignore[index]

    return _prompt_mean(ctx, part, rows, (ctx.n_layers, ctx.n_heads), dist)


_POSITION_KEYS = ("end", "s2", "s1_plus_1", "knockout")


def attribution_by_position(ctx: IOIContext, rows: Optional[torch.Tensor] = None,
                            dist: Optional[Dist] = None) -> dict[str, HeadScores]:
    """Attribution patching of each head, grad(LD) . (z_clean - z_ref), per ``[layer, head]``, mean
    over the prompts ``rows`` (default: all), split over the ranks of ``dist`` (default ``ctx.dist``).

    Keys ``end``, ``s2``, ``s1_plus_1``: the ABC prompts as the reference, at that position;
    ``knockout``: the per-template ABC means as the reference, summed over positions (estimates how
    much the logit difference drops when the head is mean-ablated)."""
    m, names = ctx.model, [ctx.model.hook_name("z", l) for l in range(ctx.n_layers)]

    def part(r: torch.Tensor) -> torch.Tensor:
        b, a, metric = ctx.clean[r], ctx.abc[r], ioi_metric(ctx.clean[r])
        # the gradient is of the batch mean, so sums over prompts below are means per prompt
        grun = run_with_grads(m, b.tokens, lambda logits, acts: metric(logits).mean(), names, b.attention_mask)
        with torch.no_grad():
            _, abc_cache = m.run_with_cache(a.tokens, attention_mask=a.attention_mask, names_filter=names)
        return _position_scores(ctx, b, ctx.group_ids[r], grun, names, abc_cache)

    out = _prompt_mean(ctx, part, rows, (len(_POSITION_KEYS), ctx.n_layers, ctx.n_heads), dist)
    return {k: out[i].clone() for i, k in enumerate(_POSITION_KEYS)}


def _position_scores(ctx: IOIContext, b: IOIBatch, groups: torch.Tensor, grun: GradRun, names: list[str],
                     abc_cache: Any) -> torch.Tensor:
    """grad . (z - reference) per head ``[key, layer, head]`` (keys `_POSITION_KEYS`): at END, S2 and
    S1+1 against the ABC run, summed over positions against the per-template means (``groups``)."""
    idx = torch.arange(b.tokens.shape[0])
    mask = b.attention_mask[:, :, None].to(grun.grads[names[0]].dtype)
    out = torch.zeros(len(_POSITION_KEYS), ctx.n_layers, ctx.n_heads)
    for l, name in enumerate(names):
        contrib = -grun.change(name, abc_cache[name]).sum(-1)  # (z - z_abc) . grad  [b, p, h]
        for k, pos in enumerate((b.end, b.s2_pos, b.s1_plus_1)):
            out[k, l] = contrib[idx, pos].sum(0).cpu()
        mean = ctx.mean_z(l, groups, grun.acts[name])
        out[3, l] = (-grun.change(name, mean).sum(-1) * mask).sum((0, 1)).cpu()
    return out


def path_patch_to_queries(ctx: IOIContext, senders: Sequence[Head], receivers: Sequence[Head],
                          rows: Optional[torch.Tensor] = None, progress: bool = True,
                          dist: Optional[Dist] = None) -> dict[Head, float]:
    """Change in mean logit difference when each sender's output is its ABC value along the path
    into the receivers' queries only (the IOI paper's appendix: other heads frozen to their clean
    values, MLPs recomputed). Negative: the sender's clean output helps through those queries. Mean
    over the prompts ``rows`` (default: all), split over ``dist``'s ranks (default ``ctx.dist``)."""
    senders = [h for h in senders if any(r[0] > h[0] for r in receivers)]
    if not senders or not receivers:
        return {}
    show = (ctx.dist if dist is None else dist).progress(progress)

    def part(r: torch.Tensor) -> torch.Tensor:
        b, a = ctx.clean[r], ctx.abc[r]
        return path_patch(ctx.model, b.tokens, a.tokens, ioi_metric(b), [Node.head(l, h) for l, h in senders],
                          receivers=[Node.head(l, h, site="q") for l, h in receivers], direction="noise",
                          normalise=False, clean_mask=b.attention_mask, corrupted_mask=a.attention_mask,
                          progress=show)

    values = _prompt_mean(ctx, part, rows, (len(senders),), dist)
    base = float((ctx.clean_ld if rows is None else ctx.clean_ld[rows]).mean())
    return {h: float(v) - base for h, v in zip(senders, values)}


# ------------------------------------------------------------------------------------------------
# the circuit
# ------------------------------------------------------------------------------------------------
@dataclass
class IOICircuit:
    """The heads found per class, the scores they were chosen by, and how well they do."""

    classes: dict[str, list[Head]]
    scores: dict[str, HeadScores]
    path_patching: dict[Head, float]
    model_ld: float
    circuit_ld: float
    faithfulness: float
    ablated_circuit_ld: float  # the model with only the circuit's heads mean-ablated
    completeness: Optional[float] = None
    minimality: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def heads(self) -> set[Head]:
        return {h for hs in self.classes.values() for h in hs}

    def __repr__(self) -> str:
        classes = "; ".join(f"{c}: {' '.join(f'{l}.{h}' for l, h in hs)}" for c, hs in self.classes.items() if hs)
        return (f"IOICircuit({len(self.heads)} heads, faithfulness {self.faithfulness:.3f}, "
                f"logit diff {self.circuit_ld:.3f} of {self.model_ld:.3f}; {classes})")

    def class_of(self, head: Head) -> Optional[str]:
        return next((k for k, hs in self.classes.items() if head in hs), None)

    def as_json(self) -> dict[str, list[str]]:
        return {k: [head_str(h) for h in v] for k, v in self.classes.items()}

    def table(self) -> list[tuple[str, str, dict[str, float]]]:
        """``(class, "L.H", {score name: value})`` for every head of the circuit, class by class."""
        keys = ("direct_effect", "attr_end", "attr_s2", "attr_s1_plus_1", "knockout_estimate",
                "detector_induction", "detector_duplicate", "detector_previous")
        rows = []
        for k, hs in self.classes.items():
            for h in hs:
                vals = {s: float(self.scores[s][h]) for s in keys if s in self.scores}
                if h in self.path_patching:
                    vals["path_patching"] = self.path_patching[h]
                rows.append((k, head_str(h), vals))
        return rows


def _ranked(scores: HeadScores, exclude: Collection[Head] = (), min_value: float = float("-inf")) -> list[Head]:
    """Heads by descending score, above ``min_value``, without ``exclude``."""
    H = scores.shape[1]
    flat = scores.flatten()
    out = []
    for i in flat.argsort(descending=True).tolist():
        h = (i // H, i % H)
        if float(flat[i]) > min_value and h not in exclude:
            out.append(h)
    return out


_DETECTOR = {"induction": "induction", "duplicate_token": "duplicate", "previous_token": "previous"}


def _detector_class(det: dict[str, HeadScores], h: Head, threshold: float, among: Sequence[str]) -> Optional[str]:
    """The class among ``among`` whose detector scores ``h`` highest, if that score is above ``threshold``."""
    best = max(among, key=lambda k: float(det[_DETECTOR[k]][h]))
    return best if float(det[_DETECTOR[best]][h]) > threshold else None


def discover(
    ctx: IOIContext,
    max_heads: int = 40,
    target_faithfulness: float = 0.85,
    n_name_movers: int = 4,
    n_negative: int = 2,
    n_s_inhibition: int = 4,
    n_path_candidates: int = 8,
    n_induction: int = 4,
    n_previous: int = 3,
    detector_threshold: float = 0.5,
    search_prompts: int = 50,
    add_per_step: int = 3,
    prune_trials: int = 8,
    with_minimality: bool = True,
    progress: Callable[[str], None] = lambda s: None,
    progress_bars: bool = True,
) -> IOICircuit:
    """Classify heads as the IOI paper does, then complete and prune the circuit (module doc).

    The search (completion and pruning) measures faithfulness on the first ``search_prompts``
    prompts; the reported faithfulness, completeness and minimality use all of them."""
    B = ctx.clean.tokens.shape[0]
    search = torch.arange(min(search_prompts, B))
    log: list[str] = []
    progress("direct effects")
    de = head_direct_effects(ctx)
    progress("attribution patching")
    attr = attribution_by_position(ctx)
    knock = attr["knockout"]
    progress("head detectors")
    det = head_detector_scores(ctx.model, dist=ctx.dist)
    model_ld = float(ctx.clean_ld.mean())
    small = 0.01 * abs(model_ld)

    classes: dict[str, list[Head]] = {k: [] for k in CLASSES}
    classes["name_mover"] = _ranked(de, min_value=small)[:n_name_movers]
    classes["negative_name_mover"] = _ranked(-de, min_value=small)[:n_negative]
    chosen = set(classes["name_mover"]) | set(classes["negative_name_mover"])

    # S-inhibition: heads that matter at END but not directly, path-patched into the name movers' queries
    indirect = attr["end"] - de
    cand = [h for h in _ranked(indirect, chosen, small)
            if classes["name_mover"] and h[0] < max(l for l, _ in classes["name_mover"])][:n_path_candidates]
    progress(f"path patching {len(cand)} heads into the name movers' queries")
    pp = path_patch_to_queries(ctx, cand, classes["name_mover"], rows=search, progress=progress_bars)
    for h, v in pp.items():
        log.append(f"path patching {head_str(h)} -> name-mover queries: {v:+.3f}")
    classes["s_inhibition"] = sorted((h for h in pp if pp[h] < -small), key=lambda h: pp[h])[:n_s_inhibition]
    chosen |= set(classes["s_inhibition"])

    _add_detected_classes(classes, chosen, attr, det, small, detector_threshold, n_induction, n_previous)
    progress("completing the circuit")
    _complete_and_prune(ctx, classes, chosen, search, log, target_faithfulness, max_heads, add_per_step, prune_trials,
                        progress)
    # heads the completion added that a detector recognises join that detector's class
    for h in list(classes["other"]):
        k = _detector_class(det, h, detector_threshold, ("induction", "duplicate_token", "previous_token"))
        if k is not None:
            classes["other"].remove(h)
            classes[k].append(h)
            log.append(f"{head_str(h)} (added by the completion) is a {k} head by its detector score")

    progress("faithfulness, completeness and minimality on every prompt")
    circuit_ld = ctx.circuit_ld(chosen)
    scores = {"direct_effect": de, "attr_end": attr["end"], "attr_s2": attr["s2"], "attr_s1_plus_1": attr["s1_plus_1"],
              "knockout_estimate": knock, **{f"detector_{k}": v for k, v in det.items()}}
    out = IOICircuit(classes, scores, pp, model_ld, circuit_ld, circuit_ld / model_ld, ctx.ablate_only(chosen), log=log)
    if with_minimality:
        out.completeness = completeness(ctx, chosen)
        out.minimality = minimality(ctx, chosen, circuit_ld)
    return out


def _add_detected_classes(classes: dict[str, list[Head]], chosen: set[Head], attr: dict[str, HeadScores],
                          det: dict[str, HeadScores], small: float, threshold: float, n_induction: int,
                          n_previous: int) -> None:
    """Induction / duplicate-token heads matter at S2, previous-token heads at S1+1 (either sign:
    patching one position of a nonlinear circuit can move the metric both ways); the detectors
    say which. Adds them to ``classes`` and ``chosen``."""
    for h in _ranked(attr["s2"].abs(), chosen, small):
        k = _detector_class(det, h, threshold, ("induction", "duplicate_token"))
        if k is not None and len(classes[k]) < n_induction:
            classes[k].append(h)
    chosen |= set(classes["induction"]) | set(classes["duplicate_token"])
    for h in _ranked(attr["s1_plus_1"].abs(), chosen, small):
        if _detector_class(det, h, threshold, ("previous_token",)) and len(classes["previous_token"]) < n_previous:
            classes["previous_token"].append(h)
    chosen |= set(classes["previous_token"])


def _complete_and_prune(ctx: IOIContext, classes: dict[str, list[Head]], chosen: set[Head], search: torch.Tensor,
                        log: list[str], target_faithfulness: float, max_heads: int, add_per_step: int,
                        prune_trials: int, progress: Callable[[str], None]) -> None:
    """Complete: attribution patching around the circuit ranks the heads whose restoration should
    help most; add the best few, re-linearise, until the faithfulness reaches the target. Then
    prune: try the heads the circuit is estimated to need least, keeping the faithfulness in
    [target, 2 - target] and no further from 1 than it was. Updates ``classes`` and ``chosen``."""
    base = float(ctx.clean_ld[search].mean())
    ld_c, est = ctx.circuit_attribution(chosen, search)
    f = ld_c / base
    log.append(f"classified heads: {len(chosen)}, faithfulness {f:.3f} (search prompts)")
    while f < target_faithfulness and len(chosen) < max_heads:
        add = _ranked(est, chosen, 0.0)[: min(add_per_step, max_heads - len(chosen))]
        if not add:
            break
        chosen |= set(add)
        classes["other"] += add
        ld_c, est = ctx.circuit_attribution(chosen, search)
        f = ld_c / base
        log.append(f"+{', '.join(head_str(h) for h in add)} -> {len(chosen)} heads, faithfulness {f:.3f}")

    progress("pruning")
    hi = 2 - target_faithfulness
    trials = sorted(chosen, key=lambda h: abs(float(est[h])))[:prune_trials]
    for h in trials:
        if len(chosen) <= 1:
            break
        f2 = ctx.faithfulness(chosen - {h}, search)
        if target_faithfulness <= f2 <= hi and abs(f2 - 1) <= abs(f - 1) + 0.02:
            chosen.discard(h)
            f = f2
            log.append(f"-{head_str(h)} -> {len(chosen)} heads, faithfulness {f:.3f}")
    for k in classes:
        classes[k] = [h for h in classes[k] if h in chosen]


def completeness(ctx: IOIContext, circuit: set[Head], n_samples: int = 4, seed: int = 0) -> float:
    """Mean ``|F(C \\ K) - F(M \\ K)| / F(M)`` over random subsets K of the circuit (each head in K
    with probability 1/2): the paper's completeness, sampled; 0 = complete."""
    g = torch.Generator().manual_seed(seed)
    heads = sorted(circuit)
    full = set(ctx.all_heads())
    base = float(ctx.clean_ld.mean())
    gaps = []
    for _ in range(n_samples):
        K = {h for h, k in zip(heads, (torch.rand(len(heads), generator=g) < 0.5).tolist()) if k}
        gaps.append(abs(ctx.circuit_ld(circuit - K) - ctx.circuit_ld(full - K)) / abs(base))
    return sum(gaps) / len(gaps)


def minimality(ctx: IOIContext, circuit: set[Head], circuit_ld: Optional[float] = None) -> dict[str, float]:
    """For each head v of the circuit, ``|F(C) - F(C \\ {v})| / |F(C)|`` (the paper's minimality
    with K empty): how much the circuit needs v."""
    f = ctx.circuit_ld(circuit) if circuit_ld is None else circuit_ld
    return {head_str(h): abs(f - ctx.circuit_ld(circuit - {h})) / abs(f) for h in sorted(circuit)}
