"""Loading GPT-2 checkpoints written by ``transformers``: plain and sharded safetensors, every kind
of broken checkpoint, the offline hub error, and peak memory while loading GPT-2-small's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _gpt2_reference import GPT2_SMALL, make_hf_gpt2, max_diff
from tdb_lens import CheckpointError, HookedGPT2

TOKENS = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(8))


@lru_cache(maxsize=1)
def hf_and_logits():
    hf = make_hf_gpt2(seed=31)
    with torch.no_grad():
        return hf, hf(TOKENS).logits


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A directory as ``save_pretrained`` writes it: config.json + model.safetensors."""
    hf, _ = hf_and_logits()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    return tmp_path


@torch.no_grad()
def test_save_pretrained_checkpoint_loads_with_identical_logits(checkpoint):
    hf, ref = hf_and_logits()
    model = HookedGPT2.from_pretrained(checkpoint)
    assert max_diff(model(TOKENS), ref) < 1e-5
    assert torch.equal(model(TOKENS), HookedGPT2.from_hf_model(hf)(TOKENS))
    assert model.cfg.n_layers == 3 and model.cfg.d_vocab == 1000 and model.cfg.n_ctx == 64
    # dtype on the way in
    half = HookedGPT2.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert max_diff(half(TOKENS).float(), ref) < 0.1


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path):
    hf, ref = hf_and_logits()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "model.safetensors.index.json").exists()
    model = HookedGPT2.from_pretrained(tmp_path)
    assert max_diff(model(TOKENS), ref) < 1e-5
    # a shard named by the index but missing on disk
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="shards missing"):
        HookedGPT2.from_pretrained(tmp_path)


def _rewrite(checkpoint: Path, edit) -> None:
    state = load_file(checkpoint / "model.safetensors")
    edit(state)
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_missing_key(checkpoint):
    _rewrite(checkpoint, lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.1\.mlp\.c_fc\.weight"):
        HookedGPT2.from_pretrained(checkpoint)


def test_unexpected_key(checkpoint):
    _rewrite(checkpoint, lambda s: s.__setitem__("transformer.h.0.attn.rotary.inv_freq", torch.zeros(4)))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*transformer\.h\.0\.attn\.rotary\.inv_freq"):
        HookedGPT2.from_pretrained(checkpoint)


def test_wrong_shape(checkpoint):
    _rewrite(checkpoint, lambda s: s.__setitem__("transformer.wpe.weight", torch.zeros(32, 64)))
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight: shape \(32, 64\), expected \(64, 64\)"):
        HookedGPT2.from_pretrained(checkpoint)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, bad):
    def poison(state):
        state["transformer.h.2.mlp.c_proj.weight"][7, 3] = bad

    _rewrite(checkpoint, poison)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.h\.2\.mlp\.c_proj\.weight' holds 1 NaN or infinite "
                                              r"values \(of 16384\); refusing to load it"):  # fmt: skip
        HookedGPT2.from_pretrained(checkpoint)


def test_values_that_overflow_the_requested_dtype_are_refused(checkpoint):
    _rewrite(checkpoint, lambda s: s["transformer.wte.weight"].__setitem__((0, 0), 1e6))
    assert HookedGPT2.from_pretrained(checkpoint).W_E[0, 0] == 1e6
    with pytest.raises(CheckpointError, match=r"'transformer\.wte\.weight' holds 1 NaN or infinite values after "
                                              r"conversion to torch\.float16"):  # fmt: skip
        HookedGPT2.from_pretrained(checkpoint, dtype=torch.float16)


def test_config_json_errors_name_the_entry(checkpoint):
    cfg = checkpoint / "config.json"
    config = json.loads(cfg.read_text())
    del config["n_head"]
    cfg.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json has no 'n_head'"):
        HookedGPT2.from_pretrained(checkpoint)
    config["n_head"] = 0
    cfg.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2Config\.n_heads is 0; expected a positive integer"):
        HookedGPT2.from_pretrained(checkpoint)
    config["n_head"], config["layer_norm_epsilon"] = 4, float("nan")
    cfg.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2Config\.eps is nan; expected a finite number > 0"):
        HookedGPT2.from_pretrained(checkpoint)


def test_truncated_safetensors(checkpoint):
    f = checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        HookedGPT2.from_pretrained(checkpoint)


@pytest.mark.parametrize("corruption", ["header_length", "header_json", "garbage"])
def test_corrupt_safetensors(checkpoint, corruption):
    f = checkpoint / "model.safetensors"
    data = bytearray(f.read_bytes())
    if corruption == "header_length":
        data[:8] = (2**62).to_bytes(8, "little")
    elif corruption == "header_json":
        data[8:40] = b"\xff" * 32
    else:
        data = bytearray(b"this is not a safetensors file at all")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        HookedGPT2.from_pretrained(checkpoint)


def test_missing_or_bad_config(checkpoint, tmp_path_factory):
    cfg = checkpoint / "config.json"
    text = cfg.read_text()
    cfg.unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedGPT2.from_pretrained(checkpoint)
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HookedGPT2.from_pretrained(checkpoint)
    cfg.write_text(text)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HookedGPT2.from_pretrained(checkpoint)
    with pytest.raises(CheckpointError, match="is a file"):
        HookedGPT2.from_pretrained(cfg)


def test_offline_hub_name_gives_a_clear_not_cached_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_HUB_CACHE", None)
    code = textwrap.dedent("""
        from tdb_lens import CheckpointError, HookedGPT2
        try:
            HookedGPT2.from_pretrained("gpt2")
        except CheckpointError as e:
            print("CheckpointError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    msg = out.stdout
    assert "CheckpointError:" in msg, msg
    assert "openai-community/gpt2" in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg


MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import psutil, torch
    from tdb_lens import HookedGPT2
    from tdb_lens.tokenizer import gpt2_tokenizer

    gpt2_tokenizer()  # the tokenizer's tables are not weights: load them before the baseline
    HookedGPT2.from_config(n_layers=1, d_model=8, n_heads=2, d_mlp=16, n_ctx=8)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, stop = [base], [False]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    th = threading.Thread(target=sample)
    th.start()
    model = HookedGPT2.from_pretrained(sys.argv[1])
    loaded = max(peak[0], proc.memory_info().rss)
    with torch.no_grad():  # touch every weight: safetensors pages come in lazily
        for p in model.parameters():
            p.sum()
        model(torch.tensor([[1, 2, 3]]))
    stop[0] = True
    th.join()
    final = max(peak[0], proc.memory_info().rss)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(size=size, load_growth=loaded - base, peak_growth=final - base)))
""")


def test_peak_memory_while_loading_gpt2_small_size(tmp_path):
    hf = make_hf_gpt2(seed=0, **GPT2_SMALL)
    hf.save_pretrained(tmp_path)
    del hf
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = r["peak_growth"] / r["size"]
    print(f"\nGPT-2-small-size load: weights {r['size'] / 2**20:.0f} MiB; RSS growth during from_pretrained "
          f"{r['load_growth'] / 2**20:.0f} MiB; peak growth incl. touching every weight {r['peak_growth'] / 2**20:.0f} MiB "
          f"= {ratio:.2f}x the model")
    assert r["size"] > 450 * 2**20
    assert ratio < 1.6


@torch.no_grad()
def test_gpt2_tokenizer_attached_only_when_the_vocabulary_is_gpt2s(checkpoint):
    """A checkpoint whose vocabulary is not GPT-2's 50257 ids gets no tokenizer (GPT-2's would map text
    to ids the model does not have, or to the wrong rows); text input then says why."""
    from tdb_lens.tokenizer import Tokenizer, gpt2_tokenizer

    hf, ref = hf_and_logits()
    assert hf.config.vocab_size == 1000
    for model in (HookedGPT2.from_pretrained(checkpoint), HookedGPT2.from_hf_model(hf),
                  HookedGPT2.from_config(n_layers=1, d_model=8, n_heads=2, d_mlp=16, n_ctx=8, d_vocab=1000)):
        assert model.tokenizer is None
        for use_text in (lambda m: m("Hello world"), lambda m: m.to_tokens("Hello world"),
                         lambda m: m.generate("Hello", max_new_tokens=2), lambda m: m.to_string([1, 2])):
            with pytest.raises(ValueError, match=r"no tokenizer \(its vocabulary has 1000 tokens, GPT-2's tokenizer "
                                                 r"50257, so none was attached\): pass token ids, or set model.tokenizer"):
                use_text(model)
    # token ids still work, with the same logits
    assert max_diff(HookedGPT2.from_pretrained(checkpoint)(TOKENS), ref) < 1e-5

    # an explicit tokenizer is attached whatever the vocabulary
    class Toy(Tokenizer):
        bos_token_id = eos_token_id = pad_token_id = 999
        vocab_size = 1000

        def encode(self, text):
            return [ord(c) % 999 for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    toy = Toy()
    model = HookedGPT2.from_pretrained(checkpoint, tokenizer=toy)
    assert model.tokenizer is toy and model.to_tokens("ab").tolist() == [[999, 97, 98]]
    assert HookedGPT2.from_hf_model(hf, tokenizer=toy).tokenizer is toy

    # GPT-2's vocabulary: GPT-2's tokenizer is attached, and encodes as transformers' GPT-2 tokenizer does
    from _gpt2_reference import hf_tokenizer

    big = make_hf_gpt2(seed=1, vocab_size=50257)
    for model in (HookedGPT2.from_hf_model(big), HookedGPT2.from_config(n_layers=1, d_model=8, n_heads=2, d_mlp=16, n_ctx=8)):
        assert model.tokenizer is gpt2_tokenizer()
        text = "Hello world, it's 2024!"
        assert model.to_tokens(text, prepend_bos=False)[0].tolist() == hf_tokenizer().encode(text)
