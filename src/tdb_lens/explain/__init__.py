"""Explanations of units, as Transformer Debugger shows them: harvest top-activating examples,
have a language model explain them (Bills et al., 2023), simulate and score the explanations,
store them in SQLite and search them semantically.

Modules: `corpus` (token windows), `units` (what a unit is at a hook), `harvest` (streaming,
resumable, mergeable top-k / quantile / random examples), `prompts` (prompt formats),
`backends` (local chat model, OpenAI-compatible endpoints), `explainer`, `simulator`, `scoring`,
`causal` (ablation-based score), `store` (SQLite), `search` (embeddings, clustering), `cli`.
"""

from .corpus import Corpus, CorpusUnavailableError, build_corpus, default_corpus_path, iter_texts
from .harvest import HarvestResult, UnitRecord, harvest, load_harvest

__all__ = [
    "Corpus", "CorpusUnavailableError", "HarvestResult", "UnitRecord", "build_corpus", "default_corpus_path",
    "harvest", "iter_texts", "load_harvest",
]
