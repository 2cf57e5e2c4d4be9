"""The debugger: Transformer Debugger's look -> click -> ablate or trace -> look again loop, offline,
on any hooked model, from Python / Jupyter (`Investigation`) and in the browser (``tdb-lens debug``).

Modules: `columns` (the node table's columns from one forward and one backward pass), `tables`
(node, logit and token tables), `investigation` (the `Investigation` object), `units` (unit pages,
search, harvest quantiles), `explaining` (explain and score a unit, the configured explainer), `views`
(self-contained HTML), `app` (the FastAPI web app), `cli` (``tdb-lens debug``).
"""

from ..html import labelled_html
from .app import BackgroundServer, create_app
from .columns import COLUMNS, KINDS, DebuggerError, compute_columns
from .explaining import ExplainResult
from .investigation import Intervention, Investigation
from .tables import LogitTable, NodeRow, NodeTable
from .units import SearchResults, UnitPage
from .views import AttentionView, LogitLensView, logit_lens_view, token_heatmap_html

__all__ = [
    "COLUMNS", "KINDS", "AttentionView", "BackgroundServer", "DebuggerError", "ExplainResult", "Intervention", "Investigation",
    "LogitLensView", "LogitTable", "NodeRow", "NodeTable", "SearchResults", "UnitPage", "compute_columns",
    "create_app", "labelled_html", "logit_lens_view", "token_heatmap_html",
]
