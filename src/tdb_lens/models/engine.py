"""`HookedTransformer`: the engine both families share (tokenising, forward, loss, generation).

A family module subclasses it and provides ``embed(tokens, ctx)``, ``unembed(resid)``, the
``blocks`` (`components.Block`), ``ln_final``, ``W_E``/``W_U`` and a config with ``n_layers``,
``n_heads``, ``d_model``, ``d_head``, ``d_vocab``, ``n_ctx``. Nothing here knows which family it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from ..hooks import HookedRootModule, HookPoint
from ..hooks.layout import layout
from ..tokenizer import Tokenizer
from .components import Blocks, ForwardContext, KVCache, Norm
from .optional_hooks import OptionalHooksMixin
from .sae_host import SAEHostMixin
from .sampling import check_generate_args, next_token

TextOrTokens = Union[str, Sequence[str], torch.Tensor, Sequence[int]]


class HookedTransformer(SAEHostMixin, OptionalHooksMixin, HookedRootModule):
    """The shared engine; ``set_use_attn_result``, ``set_use_split_qkv_input``, ``set_use_attn_in``,
    ``set_use_hook_mlp_in`` and ``set_use_unembed_hooks`` (`optional_hooks`) add opt-in hook points."""

    tokenizer: Optional[Tokenizer]
    blocks: Blocks
    ln_final: Norm

    def __init__(self, cfg: Any, tokenizer: Optional[Tokenizer] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.hook_embed = HookPoint(layout("embed", "embed", "batch", "pos", "d_model"))

    def axis_sizes(self) -> dict[str, int]:
        c = self.cfg
        kv = getattr(c, "n_key_value_heads", c.n_heads)
        return {"d_model": c.d_model, "head": c.n_heads, "kv_head": kv, "d_head": c.d_head, "d_mlp": c.d_mlp,
                "d_vocab": c.d_vocab, "qkv_head": c.n_heads + 2 * kv, "singleton": 1}

    # ---- family-specific --------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError

    def unembed(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        raise NotImplementedError

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        raise NotImplementedError

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        raise NotImplementedError

    # ---- basics -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            why = getattr(self, "_no_tokenizer_reason", None)
            raise ValueError("this model has no tokenizer" + (f" ({why})" if why else "")
                             + ": pass token ids, or set model.tokenizer")
        return self.tokenizer

    # ---- tokenising -------------------------------------------------------------------------
    def to_tokens_and_mask(
        self,
        input: Union[str, Sequence[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: str = "right",
    ) -> tuple[Int[torch.Tensor, "batch pos"], Optional[Int[torch.Tensor, "batch pos"]]]:
        """Tokenise text (a string or a list); pad to a rectangle. The mask is None when nothing is padded."""
        tok = self._tok()
        if prepend_bos is None:
            prepend_bos = tok.default_prepend_bos
        if not isinstance(input, (str, list, tuple)):
            raise TypeError(f"to_tokens expects a string or a list of strings, got {type(input).__name__}")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            raise ValueError("to_tokens got an empty list of strings")
        seqs = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"to_tokens expects strings, got {type(t).__name__}")
            ids = tok.encode(t)
            if prepend_bos:
                if tok.bos_token_id is None:
                    raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
                ids = [tok.bos_token_id] + ids
            seqs.append(ids)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        n = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), n), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if padding_side == "right" else slice(n - len(s), n)
            tokens[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        dev = self.device
        return tokens.to(dev), (None if bool(mask.all()) else mask.to(dev))

    def to_tokens(
        self, input: Union[str, Sequence[str]], prepend_bos: Optional[bool] = None, padding_side: str = "right"
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids ``[batch, pos]``. ``prepend_bos`` defaults to the tokenizer's convention
        (GPT-2: True, as TransformerLens; SmolLM2: False, as its Hugging Face tokenizer)."""
        return self.to_tokens_and_mask(input, prepend_bos, padding_side)[0]

    def to_str_tokens(self, input: TextOrTokens, prepend_bos: Optional[bool] = None):
        """Each token as text: a list for one sequence, a list of lists for a batch."""
        tok = self._tok()
        if isinstance(input, str):
            return [tok.id_to_token(i) for i in self.to_tokens(input, prepend_bos)[0].tolist()]
        if isinstance(input, torch.Tensor):
            if input.ndim == 2 and input.shape[0] != 1:  # [1, n] is one sequence (flat), as TransformerLens
                return [[tok.id_to_token(i) for i in row] for row in input.tolist()]
            return [tok.id_to_token(i) for i in input.reshape(-1).tolist()]
        if input and isinstance(input[0], str):
            return [self.to_str_tokens(str(s), prepend_bos) for s in input]
        return [tok.id_to_token(int(i)) for i in input]

    def to_string(self, tokens: Union[torch.Tensor, Sequence[int]]) -> Union[str, list[str]]:
        tok = self._tok()
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return [tok.decode(row) for row in tokens.tolist()]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return tok.decode(list(tokens))

    def to_single_token(self, token: Union[str, int]) -> int:
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < self.cfg.d_vocab:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.cfg.d_vocab})")
            return token
        if not isinstance(token, str):
            raise TypeError(f"to_single_token expects a string or a token id, got {type(token).__name__}")
        ids = self._tok().encode(token)
        if len(ids) != 1:
            raise ValueError(f"{token!r} is {len(ids)} tokens {ids}, expected exactly one")
        return ids[0]

    def get_token_position(
        self, single_token: Union[str, int], input: TextOrTokens, mode: str = "first", prepend_bos: Optional[bool] = None
    ) -> int:
        """Index of ``single_token`` in ``input`` (a string or 1-D tokens); ``mode`` 'first' or 'last'."""
        tid = self.to_single_token(single_token)
        toks = self.to_tokens(input, prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input).reshape(-1)
        hits = (toks == tid).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"token {single_token!r} (id {tid}) does not occur in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        return hits[0] if mode == "first" else hits[-1]

    # ---- forward ----------------------------------------------------------------------------
    def prepare_input(
        self,
        input: TextOrTokens,
        attention_mask: Optional[torch.Tensor] = None,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> tuple[Int[torch.Tensor, "batch pos"], Optional[Int[torch.Tensor, "batch pos"]]]:
        """``(tokens [batch, pos], mask or None)`` from text, a list of texts or token ids.

        Everything that runs the model (forward, attribution, patching) starts here, so every
        input is checked the same way. The mask is None when every position is real.
        """
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tokens, mask = self.to_tokens_and_mask(input, prepend_bos, padding_side or "right")
            if attention_mask is not None:
                mask = self._check_mask(attention_mask, tokens)
        else:
            if isinstance(input, (list, tuple)) and len(input) == 0:
                raise ValueError("the input is empty: pass text, a list of texts or token ids [batch, pos]")
            tokens = torch.as_tensor(input, device=self.device)
            if tokens.ndim == 1:
                tokens = tokens[None]
            if tokens.ndim != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
                raise ValueError(f"tokens must be integer ids [batch, pos], got dtype {tokens.dtype} "
                                 f"shape {tuple(tokens.shape)}")
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
                raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}), "
                                 f"got range [{int(tokens.min())}, {int(tokens.max())}]")
            mask = None if attention_mask is None else self._check_mask(attention_mask, tokens)
        if mask is not None and bool(mask.all()):
            mask = None
        return tokens, mask

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(attention_mask, device=tokens.device)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) as integers or booleans, "
                             f"got dtype {mask.dtype} with values {sorted(set(mask.flatten().tolist()))[:5]}")
        return mask.long()

    def make_context(self, batch: int, n_pos: int, attention_mask, kv_cache: Optional[KVCache], device) -> ForwardContext:
        """Positions and masks for one forward of ``batch`` x ``n_pos`` tokens (after ``kv_cache``'s)."""
        past = kv_cache.length if kv_cache is not None else 0
        if past + n_pos > self.cfg.n_ctx:
            raise ValueError(f"sequence too long: {past + n_pos} positions, the model's context is {self.cfg.n_ctx}")
        full_mask = None
        if attention_mask is not None or (kv_cache is not None and kv_cache.attention_mask is not None):
            cur = attention_mask if attention_mask is not None else torch.ones(batch, n_pos, dtype=torch.long, device=device)
            prev = kv_cache.attention_mask if kv_cache is not None else None
            if prev is None and past:
                prev = torch.ones(batch, past, dtype=torch.long, device=device)
            full_mask = cur if prev is None else torch.cat([prev, cur.to(prev.dtype)], dim=1)
            if kv_cache is not None:
                kv_cache.attention_mask = full_mask
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
            full_mask = full_mask.bool()
        else:
            positions = torch.arange(past, past + n_pos, device=device)[None].expand(batch, n_pos)
        return ForwardContext(positions=positions, key_mask=full_mask, kv_cache=kv_cache)

    def run_blocks(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        ctx: ForwardContext,
        start: int = 0,
        stop: Optional[int] = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Blocks ``start .. stop-1`` on the residual stream entering block ``start`` (hooks fire)."""
        n = self.cfg.n_layers
        start = start + n if start < 0 else start
        stop = n if stop is None else (stop + n if stop < 0 else stop)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"blocks {start}..{stop} are not a range of this model's {n} layers")
        for block in self.blocks[start:stop]:
            resid = block(resid, ctx)
        return resid

    def final_norm(
        self, resid: Float[torch.Tensor, "... d_model"], scale: Optional[Float[torch.Tensor, "... 1"]] = None
    ) -> Float[torch.Tensor, "... d_model"]:
        """The final norm; with ``scale`` it is applied with that scale fixed (linear in ``resid``)."""
        if scale is None:
            return self.ln_final(resid)
        return self.ln_final.with_scale(resid, scale)

    def logits_from_resid(
        self, resid: Float[torch.Tensor, "... d_model"], norm_scale: Optional[Float[torch.Tensor, "... 1"]] = None
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits from the final residual stream: final norm (its scale fixed to ``norm_scale`` when
        given), then the family's unembedding, exactly as ``forward`` computes them (through
        ``unembed.hook_in`` / ``hook_out`` when `set_use_unembed_hooks` is on)."""
        return self.unembed_hooked(self.final_norm(resid, norm_scale))

    def forward(
        self,
        input: TextOrTokens,
        return_type: Optional[str] = "logits",
        attention_mask: Optional[torch.Tensor] = None,
        stop_at_layer: Optional[int] = None,
        past_kv_cache: Optional[KVCache] = None,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        loss_per_token: bool = False,
        start_at_layer: Optional[int] = None,
        tokens: Optional[torch.Tensor] = None,
    ):
        """Run the model.

        ``return_type``: "logits" [batch, pos, vocab], "loss" (mean next-token loss over real
        tokens), "both", or None. ``stop_at_layer=l`` returns the residual stream entering block
        ``l`` (blocks ``0..l-1`` run). ``start_at_layer=l`` takes ``input`` as the residual stream
        entering block ``l`` [batch, pos, d_model] (pass ``tokens`` too for a loss). Padded
        positions (``attention_mask == 0``) are never attended to, so each sequence of a
        right-padded batch computes exactly what it computes alone.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if start_at_layer is None:
            tokens, mask = self.prepare_input(input, attention_mask, prepend_bos, padding_side)
            ctx = self.make_context(tokens.shape[0], tokens.shape[1], mask, past_kv_cache, tokens.device)
            resid = self.embed(tokens, ctx)
            start = 0
        else:
            resid = torch.as_tensor(input)
            if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model or not resid.is_floating_point():
                raise ValueError(f"with start_at_layer the input is the residual stream [batch, pos, "
                                 f"d_model={self.cfg.d_model}], got {tuple(resid.shape)} {resid.dtype}")
            mask = None if attention_mask is None else self._check_mask(attention_mask, resid[..., 0].long())
            ctx = self.make_context(resid.shape[0], resid.shape[1], mask, past_kv_cache, resid.device)
            start = start_at_layer
            if return_type in ("loss", "both") and tokens is None:
                raise ValueError("a loss from start_at_layer needs the tokens: pass tokens=...")
        resid = self.run_blocks(resid, ctx, start, stop_at_layer)
        if stop_at_layer is not None:
            return resid
        if return_type is None:
            self.ln_final(resid)  # the final norm's hooks fire (and are cached) as in a full run
            return None
        logits = self.logits_from_resid(resid)
        if return_type == "logits":
            return logits
        loss = self.loss_fn(logits, tokens, mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @staticmethod
    def loss_fn(logits, tokens, attention_mask=None, per_token: bool = False):
        """Next-token cross-entropy; padded targets are left out of the mean."""
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
        if per_token:
            return nll
        if attention_mask is None:
            return nll.mean()
        m = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
        return (nll * m).sum() / m.sum()

    # ---- weights ----------------------------------------------------------------------------
    def tokens_to_residual_directions(
        self, tokens: Union[int, str, Int[torch.Tensor, ...]]
    ) -> Float[torch.Tensor, "... d_model"]:
        """Residual direction whose dot product with the final normalised residual is the token's
        logit (minus the constant norm-bias term): final-norm weight times the unembedding column.

        Shapes as TransformerLens: one token (an int, a string, a one-element tensor) gives
        ``[d_model]``; a tensor of token ids ``[...]`` gives ``[..., d_model]``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
            tokens = int(tokens.item())
        if isinstance(tokens, torch.Tensor):
            cols = self.W_U[:, tokens.to(self.W_U.device)].movedim(0, -1)
        else:
            cols = self.W_U[:, tokens]
        w = self.ln_final.weight
        return cols * w if w is not None else cols

    @property
    def mod_dict(self) -> dict[str, torch.nn.Module]:
        """Every submodule by name (TransformerLens' ``mod_dict``)."""
        return dict(self.named_modules())

    @classmethod
    def from_pretrained(cls, model_name: str, **kwargs: Any) -> HookedTransformer:
        """TransformerLens' entry point: the family for ``model_name``, with TransformerLens' default
        weight processing (see `tdb_lens.compat.from_pretrained`). Family classes override it."""
        from ..compat import from_pretrained

        return from_pretrained(model_name, **kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str, **kwargs: Any) -> HookedTransformer:
        """`from_pretrained` without weight processing (the logits equal Hugging Face's)."""
        from ..compat import from_pretrained_no_processing

        return from_pretrained_no_processing(model_name, **kwargs)

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                         refactor_factored_attn_matrices: bool = False, fold_value_biases: bool = True) -> HookedTransformer:
        """TransformerLens' ``model.process_weights_()``: its weight simplifications applied in place by this
        model's family (`tdb_lens.models.processing`); the defaults are TransformerLens'. Returns the model."""
        if refactor_factored_attn_matrices:
            raise NotImplementedError("refactor_factored_attn_matrices is not implemented; pass False")
        from .processing import process_weights_

        return process_weights_(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases)

    def _stack_blocks(self, sub: str, attr: str) -> torch.Tensor:
        return torch.stack([getattr(getattr(b, sub), attr) for b in self.blocks])

    W_Q = property(lambda self: self._stack_blocks("attn", "W_Q"), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: self._stack_blocks("attn", "W_K"), doc="[n_layers, n_kv_heads, d_model, d_head]")
    W_V = property(lambda self: self._stack_blocks("attn", "W_V"), doc="[n_layers, n_kv_heads, d_model, d_head]")
    W_O = property(lambda self: self._stack_blocks("attn", "W_O"), doc="[n_layers, n_heads, d_head, d_model]")
    b_Q = property(lambda self: self._stack_blocks("attn", "b_Q"))
    b_K = property(lambda self: self._stack_blocks("attn", "b_K"))
    b_V = property(lambda self: self._stack_blocks("attn", "b_V"))
    b_O = property(lambda self: self._stack_blocks("attn", "b_O"))
    W_in = property(lambda self: self._stack_blocks("mlp", "W_in"), doc="[n_layers, d_model, d_mlp]")
    W_out = property(lambda self: self._stack_blocks("mlp", "W_out"), doc="[n_layers, d_mlp, d_model]")
    b_in = property(lambda self: self._stack_blocks("mlp", "b_in"))
    b_out = property(lambda self: self._stack_blocks("mlp", "b_out"))

    @property
    def OV(self):
        from .factored import FactoredMatrix

        return FactoredMatrix(self._stack_blocks("attn", "W_V_per_query_head"), self.W_O)

    @property
    def QK(self):
        from .factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self._stack_blocks("attn", "W_K_per_query_head").transpose(-1, -2))

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input: TextOrTokens,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop_tokens: Optional[Sequence[int]] = None,
        stop_at_eos: bool = True,
        use_past_kv_cache: bool = True,
        prepend_bos: Optional[bool] = None,
        return_type: str = "auto",
        fwd_hooks: Sequence = (),
        seed: Optional[int] = None,
        verbose: bool = False,
    ):
        """Continue text or tokens. Greedy unless ``do_sample``; stops at EOS / ``stop_tokens``.

        Hooks registered on the model (or passed as ``fwd_hooks``) are active at every step; with
        the KV cache each step's hooks see only the new position. ``return_type``: "auto"/"input"
        (text for text input, else tokens), "str" or "tokens". Every setting is checked before the
        first forward (`sampling.check_generate_args`).
        """
        check_generate_args(max_new_tokens, do_sample, temperature, top_k, top_p, return_type)
        from_text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
        if from_text:
            tokens, mask = self.to_tokens_and_mask(input, prepend_bos, padding_side="left")  # type: ignore[arg-type]
        else:
            tokens, mask = self.prepare_input(input, None, prepend_bos, None)
        if mask is None:
            mask = torch.ones_like(tokens)
        stops = set(stop_tokens or [])
        if stop_at_eos and self.tokenizer is not None:
            if self.tokenizer.eos_token_id is not None:
                stops.add(self.tokenizer.eos_token_id)
            stops.update(getattr(self.tokenizer, "eot_token_ids", []))
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        batch = tokens.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        cache = KVCache.empty(self.cfg.n_layers) if use_past_kv_cache else None
        out = tokens
        step_in, step_mask = tokens, mask
        with self.hooks(fwd_hooks):
            for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
                if cache is not None:
                    logits = self(step_in, attention_mask=step_mask, past_kv_cache=cache)
                else:
                    logits = self(out, attention_mask=mask)
                nxt = self._sample(logits[:, -1].float(), do_sample, temperature, top_k, top_p, gen)
                pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                out = torch.cat([out, nxt[:, None]], dim=1)
                new_mask = (~finished).long()[:, None]
                mask = torch.cat([mask, new_mask], dim=1)
                step_in, step_mask = nxt[:, None], new_mask
                finished |= torch.tensor([int(t) in stops for t in nxt.tolist()], device=finished.device)
                if bool(finished.all()):
                    break
        if return_type == "tokens" or (return_type in ("auto", "input") and not from_text):
            return out
        # as TransformerLens: the BOS that to_tokens prepended to text input is not part of the answer
        # (a BOS the caller wrote into the text, or passed as a token id, is kept)
        skip = 0
        if from_text:
            bos_added = self._tok().default_prepend_bos if prepend_bos is None else prepend_bos
            skip = 1 if bos_added else 0
        texts = [self.to_string(row[m.bool()][skip:]) for row, m in zip(out, mask)]
        return texts[0] if isinstance(input, str) else texts

    @staticmethod
    def _sample(logits, do_sample, temperature, top_k, top_p, gen) -> torch.Tensor:
        return next_token(logits, do_sample, temperature, top_k, top_p, gen)
