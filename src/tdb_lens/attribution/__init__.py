"""Attribution: node identity, metrics, direct effects, act x grad, patching, ablation, steering, circuits.

Modules, each named after what it holds:

* values: `nodes` (the `Node` value type and its per-kind table), `metrics`, `results` (`Labelled`
  heatmaps, position labels), `scores` (`NodeScores`);
* running the model: `inputs` (token inputs, the clean / corrupted pair `PatchRuns`, attached
  SAEs), `gradients` (`run_with_grads`, the one forward-and-backward runner, frozen-model safe);
* gradient analyses: `act_grad` (act x grad and write norms), `direct_effects` (and the logit
  lens), `trace` (trace upstream);
* patching: `patch_core` (the shared core: nodes resolved against a model, hooks writing patches
  into batched rows) with the front-ends `activation_patching`, `attribution_patching` and
  `path_patching`; `patching` (sweeps returning heatmaps);
* interventions: `ablation`, `steering`; `circuits` (edge attribution patching, circuit evaluation).
"""

from .ablation import ablate, compute_means, mean_ablation_hooks, resample_ablation_hooks, zero_ablation_hooks
from .act_grad import ActGrad, act_times_grad
from .activation_patching import activation_patch
from .attribution_patching import attribution_patch
from .circuits import CircuitResult, EdgeScores, edge_attribution_patching, evaluate_circuit
from .direct_effects import DirectEffects, direct_effects, logit_lens
from .gradients import GradRun, run_with_grads
from .inputs import NonFiniteMetricError
from .metrics import CallableMetric, Logit, LogitDiff, LogProb, Metric, Prob
from .nodes import Node, NodeLike, as_node, as_nodes
from .patching import patch_attn_out, patch_heads, patch_mlp_out, patch_neurons, patch_node_list, patch_nodes, patch_resid
from .path_patching import path_patch
from .results import Labelled
from .scores import NodeScores
from .steering import Steering, steer_direction, steer_nodes, steering_hooks
from .trace import Trace, trace_upstream

__all__ = [
    "Node", "NodeLike", "as_node", "as_nodes",
    "Metric", "LogitDiff", "Logit", "LogProb", "Prob", "CallableMetric",
    "Labelled", "NodeScores",
    "DirectEffects", "direct_effects", "logit_lens",
    "ActGrad", "act_times_grad", "Trace", "trace_upstream",
    "activation_patch", "attribution_patch", "patch_nodes", "patch_node_list", "patch_resid", "patch_attn_out",
    "patch_mlp_out", "patch_heads", "patch_neurons", "path_patch",
    "zero_ablation_hooks", "mean_ablation_hooks", "resample_ablation_hooks", "compute_means", "ablate",
    "Steering", "steer_nodes", "steer_direction", "steering_hooks",
    "EdgeScores", "edge_attribution_patching", "CircuitResult", "evaluate_circuit",
    "GradRun", "run_with_grads", "NonFiniteMetricError",
]
