"""Indirect object identification (Wang et al. 2022): prompts, batches and metrics (`data`, with the
sentence frames in `templates` and the END metrics in `metrics`), circuit discovery (`discovery`),
the whole reproduction as one call (`report.run_ioi`) and the ``tdb-lens ioi`` command (`cli`)."""

from . import data
from .data import *  # noqa: F403  (data.__all__: templates, words, prompts, batches, metrics)
from .discovery import IOICircuit, IOIContext, discover, head_detector_scores, ioi_metric
from .report import IOIReport, run_ioi

__all__ = [*data.__all__, "IOIContext", "IOICircuit", "discover", "head_detector_scores", "ioi_metric",
           "IOIReport", "run_ioi"]
