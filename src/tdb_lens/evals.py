"""TransformerLens' ``evals.ioi_eval`` over tdb_lens' IOI data (`tdb_lens.ioi`).

``ioi_eval(model)`` returns ``{"Logit Difference": ..., "Accuracy": ...}`` as TransformerLens does:
the mean over prompts of ``logit(IO) - logit(S)`` at the last prompt position, and how often it is
positive. Without ``dataset`` the prompts come from `tdb_lens.ioi.IOIDataset.generate` (the IOI
paper's 15 templates in both name orders, deterministic for ``seed``), not from TransformerLens'
own generator, so the numbers are comparable between models run here but not to TransformerLens'
default dataset. A TransformerLens-style ``dataset`` (items ``{"prompt", "IO", "S"}`` of token
tensors, the prompt ending in the IO answer) gives TransformerLens' numbers exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from tqdm.auto import tqdm


def _answer_positions(samples: list[Mapping[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """TransformerLens' reading of a sample: the first token where IO and S differ, the logit read
    one position before it."""
    pos, io_ids, s_ids = [], [], []
    for sample in samples:
        prompt, io, s = (torch.as_tensor(sample[k]).reshape(-1) for k in ("prompt", "IO", "S"))
        n = min(io.shape[0], s.shape[0])
        differ = (io[:n] != s[:n]).nonzero().flatten()
        if differ.numel() == 0:
            raise ValueError(f"IO {io.tolist()} and S {s.tolist()} have no differing token")
        i = int(differ[0])
        pos.append(prompt.shape[0] - io.shape[0] + i - 1)
        io_ids.append(int(io[i]))
        s_ids.append(int(s[i]))
    return pos, io_ids, s_ids


def _tl_style(model: Any, dataset: Iterable[Mapping[str, Any]], batch_size: int) -> tuple[torch.Tensor, int]:
    samples = list(dataset)
    diffs = []
    for i in tqdm(range(0, len(samples), batch_size), desc="ioi_eval", leave=False):
        chunk = samples[i:i + batch_size]
        prompts = [torch.as_tensor(c["prompt"]).reshape(-1) for c in chunk]
        tokens = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
        mask = torch.zeros_like(tokens)
        for r, p in enumerate(prompts):
            mask[r, :p.shape[0]] = 1
        pos, io, s = _answer_positions(chunk)
        with torch.no_grad():
            logits = model(tokens.to(model.device), attention_mask=mask.to(model.device))
        rows = torch.arange(len(chunk))
        at = logits[rows, torch.tensor(pos)].float().cpu()
        diffs.append(at[rows, torch.tensor(io)] - at[rows, torch.tensor(s)])
    return torch.cat(diffs), len(samples)


def _ioi_data(model: Any, num_samples: int, symmetric: bool, seed: int) -> tuple[torch.Tensor, int]:
    from .ioi import IOIDataset

    data = IOIDataset.generate(model, num_samples, seed=seed)
    sets = [data, data.flipped()] if symmetric else [data]
    diffs = []
    for d in sets:
        batch = d.to_batch(model)
        with torch.no_grad():
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
        rows = torch.arange(len(batch), device=logits.device)
        at = logits[rows, batch.end].float()
        diffs.append((at[rows, batch.io_token] - at[rows, batch.s_token]).cpu())
    out = torch.cat(diffs)
    return out, out.shape[0]


def ioi_eval(
    model: Any,
    dataset: Optional[Iterable[Mapping[str, Any]]] = None,
    batch_size: int = 8,
    num_samples: int = 1000,
    tokenizer: Any = None,
    symmetric: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """IOI logit difference and accuracy: ``{"Logit Difference": float, "Accuracy": float}``.

    ``dataset``: TransformerLens-style items (see the module docstring); None generates
    ``num_samples`` prompts with `tdb_lens.ioi` (``symmetric`` adds each prompt in the other name
    order). ``tokenizer`` is accepted for TransformerLens' signature; the model's own is used.
    """
    if dataset is not None:
        diffs, n = _tl_style(model, dataset, batch_size)
    else:
        diffs, n = _ioi_data(model, num_samples, symmetric, seed)
    if n == 0:
        raise ValueError("ioi_eval got an empty dataset")
    return {"Logit Difference": float(diffs.sum()) / n, "Accuracy": float((diffs > 0).sum()) / n}
