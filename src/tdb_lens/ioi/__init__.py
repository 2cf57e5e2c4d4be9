"""Indirect object identification (Wang et al. 2022): prompts, batches and metrics (`data`),
circuit discovery (`discovery`), the whole reproduction as one call (`report.run_ioi`) and the
``tdb-lens ioi`` command (`cli`)."""

from .data import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    N_TEMPLATES,
    NAMES,
    OBJECTS,
    ORDERS,
    PLACES,
    TEMPLATES,
    IOIBatch,
    IOIDataset,
    IOIPrompt,
    accuracy,
    io_probability,
    logit_diff,
    per_template_groups,
    single_token_words,
    tokenize_prompts,
)
from .discovery import IOICircuit, IOIContext, discover, head_detector_scores, ioi_metric
from .report import IOIReport, run_ioi

__all__ = [
    "ABBA_TEMPLATES",
    "BABA_TEMPLATES",
    "N_TEMPLATES",
    "NAMES",
    "OBJECTS",
    "ORDERS",
    "PLACES",
    "TEMPLATES",
    "IOIBatch",
    "IOIDataset",
    "IOIPrompt",
    "accuracy",
    "io_probability",
    "logit_diff",
    "per_template_groups",
    "single_token_words",
    "tokenize_prompts",
    "IOIContext",
    "IOICircuit",
    "discover",
    "head_detector_scores",
    "ioi_metric",
    "IOIReport",
    "run_ioi",
]
