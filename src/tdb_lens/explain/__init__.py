"""Explanations of units, as Transformer Debugger shows them: harvest top-activating examples,
have a language model explain them (Bills et al., 2023), simulate and score the explanations,
store them in SQLite and search them semantically.

Modules: `corpus` (token windows), `units` (what a unit is at a hook), `harvest` (streaming,
resumable, mergeable top-k / quantile / random examples), `prompts` (prompt formats),
`backends` (local chat model, OpenAI-compatible endpoints), `explainer`, `simulator`, `scoring`,
`causal` (ablation-based score), `store` (SQLite), `search` (embeddings, clustering),
`quantiles` (a unit's activation quantiles, exact from the
harvest's per-token tail where it covers them), `provenance` (model identity), `endpoint` (the
OpenAI-compatible client), `pipeline`
(`run_explain`, what ``tdb-lens explain`` runs), `cli`.
"""

from ..provenance import ModelIdentity, model_identity
from .backends import BackendError, LocalChatBackend, OpenAIChatBackend, backend_from_spec
from .causal import CausalScore, CausalScorer
from .corpus import Corpus, CorpusUnavailableError, build_corpus, default_corpus_path, iter_texts
from .explainer import Explanation, LLMExplainer, TopTokensExplainer
from .harvest import HarvestResult, UnitRecord, harvest, load_harvest
from .pipeline import ExplainConfig, ExplainReport, run_explain
from .quantiles import ActivationQuantile, unit_quantile
from .scoring import correlation_score, detection_score, fuzzing_score, pearson, score_all
from .search import MiniLMEmbedder, cluster, prompt_clusters, prompt_units, search
from .simulator import AllAtOnceSimulator, JSONSimulator, LikelihoodSimulator, simulator_for
from .store import ExplanationStore, StoreBusyError, format_table

__all__ = [
    "ActivationQuantile", "unit_quantile",
    "AllAtOnceSimulator", "BackendError", "CausalScore", "CausalScorer", "Corpus", "CorpusUnavailableError",
    "ExplainConfig", "ExplainReport", "Explanation", "ExplanationStore", "HarvestResult", "JSONSimulator",
    "LLMExplainer", "LikelihoodSimulator", "LocalChatBackend", "MiniLMEmbedder", "ModelIdentity",
    "OpenAIChatBackend", "StoreBusyError", "TopTokensExplainer", "UnitRecord", "backend_from_spec", "build_corpus",
    "cluster", "correlation_score", "default_corpus_path", "detection_score", "format_table", "fuzzing_score",
    "harvest", "iter_texts", "load_harvest", "model_identity", "pearson", "prompt_clusters", "prompt_units",
    "run_explain", "score_all", "search", "simulator_for",
]
