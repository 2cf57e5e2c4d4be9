"""The IOI reproduction as one call: baseline, circuit, faithfulness, a JSON report and heatmaps.

`run_ioi` is what ``tdb-lens ioi`` runs; the notebook and the tests call it directly.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..attribution import Labelled
from ..models.engine import HookedTransformer
from .data import IOIDataset, accuracy, io_probability, logit_diff, per_template_groups
from .discovery import IOICircuit, IOIContext, discover, head_str


@dataclass
class IOIReport:
    """What `run_ioi` found; ``json`` is what ``report.json`` holds."""

    json: dict
    circuit: IOICircuit
    context: IOIContext

    def __repr__(self) -> str:
        j = self.json
        return (f"IOIReport({j.get('model')}, {j.get('n_prompts')} prompts: logit diff {j.get('logit_diff', float('nan')):.3f}, "
                f"{j.get('n_heads')} heads, faithfulness {j.get('faithfulness', float('nan')):.3f})")

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(format_report(self.json)) + "</pre>"

    def head_labels(self) -> tuple[list[str], list[str]]:
        cfg = self.context.model.cfg
        return [str(l) for l in range(cfg.n_layers)], [str(h) for h in range(cfg.n_heads)]

    def heatmap(self, score: str, title: str) -> Labelled:
        """A ``[layer, head]`` score of the circuit search as a labelled heatmap."""
        return Labelled(self.circuit.scores[score], ("layer", "head"), self.head_labels(), title=title)

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``report.json``, ``head_patching.png``, ``direct_effects.png`` and ``detectors.png`` in ``out``."""
        import matplotlib

        if not matplotlib.get_backend().lower().startswith(("agg", "module://")):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "report.json"]
        tmp = out / "report.json.tmp"
        tmp.write_text(json.dumps(self.json, indent=2))
        os.replace(tmp, paths[0])  # never a half-written report
        ld = self.json["logit_diff"]
        figs = {
            "head_patching.png": [
                self.heatmap("attr_end", f"attr. patching at END (LD {ld:.2f})"),
                self.heatmap("attr_s2", "... at S2"),
                self.heatmap("attr_s1_plus_1", "... at S1+1"),
            ],
            "direct_effects.png": [self.heatmap("direct_effect", "Direct effect on logit(IO) - logit(S) at END")],
            "detectors.png": [self.heatmap(f"detector_{k}", f"{k} score (repeated random tokens)")
                              for k in ("induction", "duplicate", "previous")],
        }
        for name, panels in figs.items():
            H = self.context.n_heads
            fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.45 * H * len(panels), 0.25 * self.context.n_layers + 1.5))
            for ax, p in zip(axes if len(panels) > 1 else [axes], panels):
                p.plot(ax=ax, annotate=False)
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            paths.append(out / name)
        return paths


def _per_template(dataset: IOIDataset, ld: torch.Tensor, acc: torch.Tensor) -> list[dict]:
    rows = []
    for (order, t), idx in per_template_groups(dataset).items():
        rows.append({"order": order, "template": t, "text": dataset[idx[0]].template_string, "n": len(idx),
                     "logit_diff": float(ld[idx].mean()), "accuracy": float(acc[idx].mean())})
    return rows


def run_ioi(
    model: HookedTransformer,
    n_prompts: int = 100,
    seed: int = 0,
    model_name: Optional[str] = None,
    max_heads: int = 40,
    target_faithfulness: float = 0.85,
    with_minimality: bool = True,
    progress: bool = True,
    context: type[IOIContext] = IOIContext,
) -> IOIReport:
    """Baseline, circuit discovery and faithfulness on ``n_prompts`` IOI prompts (seeded).
    ``context``: the `IOIContext` class to measure with (`tdb_lens.ioi.sharding.ShardedIOIContext`
    splits the prompts over torchrun's ranks)."""
    t0 = time.perf_counter()
    # eight phases: one here, seven announced by `discover`
    bar = tqdm(total=8, desc="IOI", disable=not progress)
    started = [False]

    def phase(name: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(name[:48])

    phase("prompts, ABC corruption, means and baseline")
    dataset = IOIDataset.generate(model.tokenizer, n_prompts, seed=seed)
    ctx = context.from_dataset(model, dataset)  # the prompts, their ABC corruption and its means
    batch = ctx.clean
    with torch.no_grad():
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
    ld = logit_diff(logits, batch, per_prompt=True).cpu()
    acc = accuracy(logits, batch, per_prompt=True).float().cpu()
    prob = io_probability(logits, batch, per_prompt=True).cpu()
    del logits
    circuit = discover(ctx, max_heads=max_heads, target_faithfulness=target_faithfulness,
                       with_minimality=with_minimality, progress=phase, progress_bars=progress)
    bar.update(1)
    bar.close()
    per_template = _per_template(dataset, ld, acc)
    report = {
        "model": model_name or getattr(model.cfg, "name", None) or type(model).__name__,
        "n_prompts": n_prompts,
        "seed": seed,
        "logit_diff": float(ld.mean()),
        "accuracy": float(acc.mean()),
        "io_probability": float(prob.mean()),
        "n_heads_total": model.cfg.n_layers * model.cfg.n_heads,
        "n_heads": len(circuit.heads),
        "circuit": circuit.as_json(),
        "faithfulness": circuit.faithfulness,
        "circuit_logit_diff": circuit.circuit_ld,
        "circuit_ablated_logit_diff": circuit.ablated_circuit_ld,
        "completeness": circuit.completeness,
        "minimality": circuit.minimality,
        "per_template": per_template,
        "weak_templates": [f"{r['order']} {r['template']}: LD {r['logit_diff']:.2f}, acc {r['accuracy']:.2f}"
                           for r in per_template if r["logit_diff"] < 2 or r["accuracy"] < 0.9],
        "heads": [{"class": k, "head": h, **v} for k, h, v in circuit.table()],
        "path_patching": {head_str(h): v for h, v in circuit.path_patching.items()},
        "search_log": circuit.log,
        "seconds": time.perf_counter() - t0,
    }
    return IOIReport(report, circuit, ctx)


def format_report(r: dict) -> str:
    """The human-readable summary ``tdb-lens ioi`` prints."""
    lines = [f"IOI on {r['model']}: {r['n_prompts']} prompts (seed {r['seed']})",
             f"  baseline: logit diff {r['logit_diff']:.3f}, accuracy {r['accuracy']:.1%}, "
             f"IO probability {r['io_probability']:.3f}"]
    if r["weak_templates"]:
        lines.append("  templates below LD 2 or accuracy 90%: " + "; ".join(r["weak_templates"]))
    lines += ["", f"  {'class':<20} {'head':>6} {'direct':>8} {'attr@END':>9} {'attr@S2':>8} {'attr@S1+1':>10} "
                  f"{'knockout':>9} {'induct':>7} {'dup':>6} {'prev':>6} {'path':>7}"]
    for row in r["heads"]:
        def g(k: str, w: int, d: int = 2, row: dict = row) -> str:
            return f"{row[k]:>{w}.{d}f}" if k in row else " " * w

        lines.append(f"  {row['class']:<20} {row['head']:>6} {g('direct_effect', 8)} {g('attr_end', 9)} {g('attr_s2', 8)} "
                     f"{g('attr_s1_plus_1', 10)} {g('knockout_estimate', 9)} {g('detector_induction', 7)} "
                     f"{g('detector_duplicate', 6)} {g('detector_previous', 6)} {g('path_patching', 7)}")
    lines += ["",
              f"  circuit: {r['n_heads']} of {r['n_heads_total']} heads; logit diff {r['circuit_logit_diff']:.3f} "
              f"with every other head mean-ablated (per-template ABC means)",
              f"  faithfulness: {r['faithfulness']:.3f}",
              f"  the circuit's heads alone mean-ablated: logit diff {r['circuit_ablated_logit_diff']:.3f}"]
    if r["completeness"] is not None:
        lines.append(f"  completeness gap (0 = complete): {r['completeness']:.3f}")
    if r["minimality"]:
        low = sorted(r["minimality"].items(), key=lambda kv: kv[1])[:3]
        lines.append("  least needed heads (minimality): " + ", ".join(f"{h} {v:.3f}" for h, v in low))
    lines.append(f"  {r['seconds']:.0f} s")
    return "\n".join(lines)
