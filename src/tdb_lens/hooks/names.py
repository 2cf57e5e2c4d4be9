"""Hook-name helpers: TransformerLens' ``get_act_name`` aliases and close-match errors."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

# alias -> (sub-module inside a block, or None for block level / model level)
_BLOCK_ALIASES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn_in": "hook_attn_in",
    "mlp_in": "hook_mlp_in",
    "q_input": "hook_q_input",
    "k_input": "hook_k_input",
    "v_input": "hook_v_input",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "attn": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
}
_LN_ALIASES = {"scale": "hook_scale", "normalized": "hook_normalized"}
_MODEL_ALIASES = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}
# TransformerLens' other spellings of the same activations
_NAME_ALIASES = {"key": "k", "query": "q", "value": "v", "attn_logits": "attn_scores", "mlp_pre": "pre",
                 "mlp_post": "post"}
# TransformerLens' compact shorthand: name, layer, optional layer type ("k6", "scale4ln1", "k1a")
_SHORTHAND = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")
_LAYER_TYPES = {"a": "attn", "m": "mlp", "b": "", "block": "", "attn": "attn", "mlp": "mlp", "ln1": "ln1", "ln2": "ln2",
                "ln_final": "ln_final"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Expand a short activation name to its full hook name.

    ``get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"``;
    ``get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale"``;
    ``get_act_name("scale")`` is the final LayerNorm's scale. Full names pass through unchanged.
    TransformerLens' shorthands work too: ``"k1a"`` is ``"blocks.1.attn.hook_k"``, ``"scale4ln1"``
    ``"blocks.4.ln1.hook_scale"``, ``"pre5"`` ``"blocks.5.mlp.hook_pre"``; so do its aliases
    ``key``/``query``/``value``/``attn_logits``/``mlp_pre``/``mlp_post``.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    short = _SHORTHAND.fullmatch(name) if layer is None else None
    if short is not None:
        name, layer, layer_type = short.group(1), int(short.group(2)), (short.group(3) or None)
    name = _NAME_ALIASES.get(name, name)
    if name in _MODEL_ALIASES and layer is None:
        return _MODEL_ALIASES[name]
    if name in _LN_ALIASES:
        if layer is None:
            return f"ln_final.{_LN_ALIASES[name]}"
        lt = _LAYER_TYPES.get(layer_type or "", layer_type)
        if lt not in ("ln1", "ln2"):
            raise ValueError(f"LayerNorm activation {name!r} in a block needs layer_type 'ln1' or 'ln2', got {layer_type!r}")
        return f"blocks.{layer}.{lt}.{_LN_ALIASES[name]}"
    if name in _BLOCK_ALIASES:
        if layer is None:
            raise ValueError(f"activation {name!r} lives in a block: pass its layer, e.g. get_act_name({name!r}, 0)")
        return f"blocks.{layer}.{_BLOCK_ALIASES[name]}"
    if layer is not None:
        return f"blocks.{layer}.{name}"
    return name


def unknown_name_error(name: str, valid: Iterable[str], what: str = "hook") -> KeyError:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return KeyError(f"unknown {what} name {name!r}.{hint} ({len(valid)} {what} points exist; see model.hook_dict)")


def spliced_hook_name(host: str, site: str) -> str:
    """The name of hook site ``site`` (e.g. ``"sae_acts_post"``) of a module spliced at hook point ``host``."""
    return f"{host}.hook_{site}"


def block_of(name: str) -> int | None:
    """The block a hook name lies in (``"blocks.3.hook_resid_post" -> 3``), None outside the blocks.

    For code that has only a name and no model (e.g. ordering SAE nodes by their host); with a
    model at hand read ``model.hook_layout(name).layer`` instead.
    """
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None
