"""A causal score for explanations: does the unit matter where the explanation says it fires?

Correlation scoring checks that an explanation predicts *where a unit activates*. It cannot tell
a unit the model uses from one it ignores, nor an explanation that points at the right tokens
from one that merely co-varies with them. The causal score asks the model itself.

Definition. For each scored window (the unit's top windows and random windows, as in
correlation scoring) the unit is ablated at every position (set to 0, or to its mean over the
corpus with ``ablation="mean"``; a head's ``hook_z`` vector is zeroed) and the effect at each
position ``t`` is ``KL(p_clean(. | x_<=t) || p_ablated(. | x_<=t))``, the change of the model's
next-token distribution there. The causal score is the Pearson correlation, pooled over all
positions of all windows, between the simulator's predictions from the explanation and these
effects. It is high when the explanation singles out the positions where removing the unit
changes what the model predicts.

Two reference numbers come with it: ``oracle``, the same correlation with the unit's true
activations in place of the simulation (how well *any* activation-based explanation could
do; near 0 when the unit's effect does not follow its activation, or when it has no effect),
and ``mean_effect``, the average KL (0 for a unit the model does not use, in which case the
score is 0). ``score / oracle`` reads as the share of the achievable causal agreement.

Limits: ablating at every position at once lets effects travel through attention to later
positions, so ``KL_t`` includes the unit's influence from earlier positions; the score measures
agreement with where the unit *matters*, which is close to, but not the same as, where it
*fires*. For SAE latents the ablation edits the SAE's reconstruction, so it only reaches the
model when the SAE is spliced in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float, Int

from .explainer import windows_of
from .harvest import UnitRecord
from .scoring import SimulationScore, pearson
from .units import resolve_reduction, unit_axis


@dataclass
class CausalScore:
    score: float
    oracle: float
    mean_effect: float
    n_positions: int
    ablation: str


class CausalScorer:
    def __init__(self, model, hook: str, simulator, tokenizer=None, ablation: str = "zero", reduce: str = "auto",
                 n_top: int = 5, n_random: int = 5, batch_size: int = 8) -> None:
        if ablation not in ("zero", "mean"):
            raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
        layout = model.hook_layout(hook)  # a KeyError naming close hooks for a bad name
        self.axis = unit_axis(layout, reduce)
        self.per_head = resolve_reduction(layout, reduce, hook) == "head_norm"  # a head's vector is zeroed
        self.model = model
        self.hook = hook
        self.simulator = simulator
        self.tokenizer = tokenizer or model.tokenizer
        self.ablation = ablation
        self.reduce = reduce
        self.n_top = n_top
        self.n_random = n_random
        self.batch_size = batch_size

    @torch.no_grad()
    def effects(self, tokens: Int[torch.Tensor, "n ctx"], unit: int, value: float = 0.0) -> Float[torch.Tensor, "n ctx"]:
        """``[n, ctx]`` KL(clean || unit ablated) of the next-token distribution at each position."""
        m = self.model
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [n, ctx], got shape {tuple(tokens.shape)}")
        out = []

        def ablate(act, hook):
            act = act.clone()
            act.select(self.axis, unit).fill_(0.0 if self.per_head else value)
            return act

        for s in range(0, tokens.shape[0], self.batch_size):
            t = tokens[s:s + self.batch_size].to(m.device)
            clean = m(t).float().log_softmax(-1)
            abl = m.run_with_hooks(t, fwd_hooks=[(self.hook, ablate)]).float().log_softmax(-1)
            out.append((clean.exp() * (clean - abl)).sum(-1).clamp(min=0).cpu())
        return torch.cat(out)

    def score(self, explanation: str, record: UnitRecord, simulation: Optional[SimulationScore] = None) -> CausalScore:
        if record.hook != self.hook:
            raise ValueError(f"record is for {record.hook!r}, this scorer ablates {self.hook!r}")
        if simulation is not None:
            n_top, n_rand = simulation.n_top, len(simulation.true) - simulation.n_top
            sim, true = simulation.simulated, simulation.true
        else:
            top = windows_of(record, self.tokenizer, "top", self.n_top)
            rnd = windows_of(record, self.tokenizer, "random", self.n_random)
            n_top, n_rand = len(top), len(rnd)
            sim = self.simulator.simulate(explanation, [w[0] for w in top + rnd])
            true = [w[1] for w in top + rnd]
        tokens = torch.cat([record.top_tokens[:n_top], record.random_tokens[:n_rand]])
        value = record.stats.get("mean", 0.0) if self.ablation == "mean" else 0.0
        kl = self.effects(tokens, record.unit, value)
        flat_kl = kl.flatten().tolist()
        flat = lambda rows: [v for r in rows for v in r]
        mean_effect = float(kl.mean()) if kl.numel() else 0.0
        if mean_effect == 0.0:
            return CausalScore(0.0, 0.0, 0.0, len(flat_kl), self.ablation)
        return CausalScore(pearson(flat(sim), flat_kl), pearson([max(0.0, a) for a in flat(true)], flat_kl),
                           mean_effect, len(flat_kl), self.ablation)
