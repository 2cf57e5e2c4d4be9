"""`ActivationStore`: a model's activations at one hook, streamed in shuffled batches.

The model runs on ``model_batch_size`` token rows at a time, only up to the hook's layer
(``run_with_cache(..., stop_at_layer=layer + 1)``); activations go into a buffer of
``buffer_size`` vectors that is reshuffled whenever half of it has been handed out and refilled, so
memory stays at ``buffer_size x d_in`` and consecutive batches mix many sequences.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from ..hooks import HookedRootModule
from ..hooks.layout import HookLayout
from ..hooks.names import unknown_name_error


def stop_layer_for(model: HookedRootModule, hook_name: str) -> Optional[int]:
    """The ``stop_at_layer`` that still computes ``hook_name`` (None: the whole model is needed),
    from the hook's layout: its layer + 1 inside the blocks, 0 for the embeddings."""
    lay = _layout(model, hook_name)
    if lay.layer is not None:
        return lay.layer + 1
    return 0 if lay.component == "embed" else None


def check_token_vectors(model: HookedRootModule, hook_name: str) -> int:
    """The width ``d`` of ``hook_name`` when it holds one vector per token (layout ``[batch, pos, d]``
    with ``d`` a model axis); otherwise a ValueError saying what the hook holds."""
    lay = _layout(model, hook_name)
    if lay.axes[:2] != ("batch", "pos") or len(lay.axes) != 3 or lay.width is None or lay.width < 2:
        raise ValueError(
            f"hook {hook_name!r} holds [{', '.join(lay.axes)}] activations; an SAE is trained on one vector per "
            "token ([batch, pos, d]): pick a residual, attention-output, MLP or normalised hook, "
            "e.g. blocks.0.hook_resid_post")
    return lay.width


def _layout(model: HookedRootModule, hook_name: str) -> HookLayout:
    if hook_name not in model.hook_dict:
        raise unknown_name_error(hook_name, model.hook_dict)
    lay = model.hook_dict[hook_name].layout
    if lay is None:
        raise ValueError(f"hook {hook_name!r} declares no layout")
    return lay


class ActivationStore:
    """Iterate over ``[batch_size, d_in]`` activation batches from ``tokens [n_seq, ctx]``.

    ``skip_positions`` leading positions of each row are left out (position 0 of a language model's
    residual stream is often an outlier with a huge norm). With ``loop`` the token rows are reused
    (reshuffled) once exhausted; otherwise iteration stops.
    """

    def __init__(
        self,
        model: Any,
        hook_name: str,
        tokens: Int[torch.Tensor, "n_seq ctx"],
        batch_size: int = 4096,
        buffer_size: int = 65536,
        model_batch_size: int = 8,
        skip_positions: int = 1,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        loop: bool = True,
        progress: bool = False,
    ) -> None:
        check_token_vectors(model, hook_name)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [n_seq, ctx], got shape {tuple(tokens.shape)}")
        if skip_positions >= tokens.shape[1]:
            raise ValueError(f"skip_positions={skip_positions} leaves nothing of rows of {tokens.shape[1]} tokens")
        self.model, self.hook_name, self.tokens = model, hook_name, tokens
        self.batch_size, self.buffer_size = batch_size, max(buffer_size, 2 * batch_size)
        self.model_batch_size, self.skip_positions = model_batch_size, skip_positions
        self.device = torch.device(device) if device is not None else model.device
        self.dtype, self.seed, self.loop = dtype, seed, loop
        self.stop_at_layer = stop_layer_for(model, hook_name)
        self.sequences_read = 0  # over all epochs; determines where the stream is
        self._buf: Optional[torch.Tensor] = None
        self._pos = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._progress = progress
        self.activations_per_row = tokens.shape[1] - skip_positions

    # ---- where we are -----------------------------------------------------------------------
    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def _next_rows(self) -> Optional[torch.Tensor]:
        n = len(self.tokens)
        epoch, offset = divmod(self.sequences_read, n)
        if epoch > 0 and not self.loop:
            return None
        order = self._order(epoch)
        idx = order[offset: offset + self.model_batch_size]
        self.sequences_read += len(idx)
        return self.tokens[idx]

    # ---- model ------------------------------------------------------------------------------
    @torch.no_grad()
    def activations_for(self, rows: Int[torch.Tensor, "batch ctx"]) -> Float[torch.Tensor, "n d_in"]:
        """This store's hook activations for token rows, flattened, leading positions skipped."""
        rows = rows.to(self.model.device)
        _, cache = self.model.run_with_cache(rows, names_filter=self.hook_name, stop_at_layer=self.stop_at_layer,
                                             return_type=None if self.stop_at_layer is None else "logits")
        acts = cache[self.hook_name][:, self.skip_positions:]
        return acts.reshape(-1, acts.shape[-1]).to(device=self.device, dtype=self.dtype)

    def _refill(self) -> None:
        keep = self._buf[self._pos:] if self._buf is not None else None
        have = 0 if keep is None else len(keep)
        parts = [] if keep is None else [keep]
        bar = tqdm(total=self.buffer_size - have, desc="activations", leave=False, disable=not self._progress)
        while have < self.buffer_size:
            rows = self._next_rows()
            if rows is None:
                break
            a = self.activations_for(rows)
            parts.append(a)
            have += len(a)
            bar.update(len(a))
        bar.close()
        if not parts:
            self._buf, self._pos = None, 0
            return
        buf = torch.cat(parts)
        self._buf = buf[torch.randperm(len(buf), generator=self._gen).to(buf.device)]
        self._pos = 0

    def next_batch(self) -> Float[torch.Tensor, "batch_size d_in"]:
        remaining = 0 if self._buf is None else len(self._buf) - self._pos
        if remaining < max(self.batch_size, self.buffer_size // 2):
            self._refill()
            remaining = 0 if self._buf is None else len(self._buf)
        if remaining < self.batch_size:
            raise StopIteration
        out = self._buf[self._pos: self._pos + self.batch_size]  # type: ignore[index]
        self._pos += self.batch_size
        return out

    def __iter__(self) -> Iterator[Float[torch.Tensor, "batch_size d_in"]]:
        return self

    def __next__(self) -> Float[torch.Tensor, "batch_size d_in"]:
        return self.next_batch()

    # ---- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the token stream is. The buffer's contents are not saved: a resumed store starts
        from a fresh buffer at this point of the stream."""
        return {"sequences_read": self.sequences_read, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sequences_read = int(state["sequences_read"])
        self._buf, self._pos = None, 0
        self._gen = torch.Generator().manual_seed(self.seed + self.sequences_read)


class CachedActivations:
    """Activations held in memory (harvested once), served in shuffled ``[batch_size, d_in]`` batches,
    epoch after epoch. For training many steps on activations that are slow to compute."""

    def __init__(self, activations: Float[torch.Tensor, "n d_in"], batch_size: int = 4096, seed: int = 0) -> None:
        if activations.ndim != 2 or len(activations) < batch_size:
            raise ValueError(f"need [n >= batch_size={batch_size}, d_in] activations, got {tuple(activations.shape)}")
        self.activations, self.batch_size, self.seed = activations, batch_size, seed
        self.batches_read = 0
        self._epoch: int = -1
        self._order: Optional[torch.Tensor] = None
        self.metadata: dict[str, str] = {}

    @property
    def batches_per_epoch(self) -> int:
        return len(self.activations) // self.batch_size

    def __iter__(self) -> Iterator[Float[torch.Tensor, "batch_size d_in"]]:
        return self

    def __next__(self) -> Float[torch.Tensor, "batch_size d_in"]:
        epoch, i = divmod(self.batches_read, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order, self._epoch = torch.randperm(len(self.activations), generator=g), epoch
        idx = self._order[i * self.batch_size: (i + 1) * self.batch_size]  # type: ignore[index]
        self.batches_read += 1
        return self.activations[idx.to(self.activations.device)]

    def state_dict(self) -> dict[str, Any]:
        return {"batches_read": self.batches_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_read = int(state["batches_read"])

    @classmethod
    def harvest(cls, store: ActivationStore, n: int, batch_size: int, progress: bool = True) -> CachedActivations:
        """Run ``store``'s model on its token rows (in order, no shuffling) until ``n`` activations are held."""
        parts, have = [], 0
        per_call = store.model_batch_size
        bar = tqdm(total=n, desc="harvesting activations", unit="act", disable=not progress)
        for start in range(0, len(store.tokens), per_call):
            a = store.activations_for(store.tokens[start: start + per_call])
            parts.append(a)
            have += len(a)
            bar.update(len(a))
            if have >= n:
                break
        bar.close()
        acts = torch.cat(parts)[:n]
        return cls(acts, batch_size, store.seed)

    def save(self, path: str | os.PathLike, metadata: Optional[dict[str, str]] = None) -> None:
        """Write the activations (and ``metadata``, strings, e.g. what they were computed from) as safetensors."""
        from safetensors.torch import save_file

        save_file({"activations": self.activations.contiguous().cpu()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, batch_size: int, seed: int = 0,
             device: str | torch.device | None = None) -> CachedActivations:
        """Read activations `save` wrote; their metadata is in ``.metadata``. Non-finite values are refused."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            acts, meta = f.get_tensor("activations"), dict(f.metadata() or {})
        if not bool(torch.isfinite(acts).all()):
            raise ValueError(f"{path}: the cached activations hold NaN or Inf values")
        out = cls(acts.to(device or "cpu"), batch_size, seed)
        out.metadata = meta
        return out
