"""GPT-2 small's real weights: TransformerLens' published loss and sensible predictions.

Runs only where ``openai-community/gpt2`` is already in the Hugging Face cache (nothing is
downloaded); elsewhere every test is skipped with the reason.
As of 2026-12-04 they have never run on any machine this project was built or tested on (none has
GPT-2's weights), so a wrong detail in them would only show where the weights are.
"""

from __future__ import annotations

import pytest
import torch

from tdb_lens import HookedGPT2

REPO = "openai-community/gpt2"
# TransformerLens' acceptance test (tests/acceptance/test_hooked_transformer.py) runs
# `model("Hello world!", return_type="loss")` (BOS prepended) and stores this loss for gpt2-small.
TL_TEXT = "Hello world!"
TL_LOSS = 5.331855773925781
SKIP_REASON = ("GPT-2 small weights are not in the Hugging Face cache (hub unreachable); these tests have never "
               "run on this project's machines, see the README")


def _cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return all(isinstance(try_to_load_from_cache(REPO, f), str) for f in ("config.json", "model.safetensors"))


pytestmark = [
    pytest.mark.gpt2_weights,
    pytest.mark.skipif(not _cached(), reason=SKIP_REASON),
]


@pytest.fixture(scope="module")
def gpt2():
    return HookedGPT2.from_pretrained("gpt2")


@torch.no_grad()
def test_hello_world_loss_matches_transformer_lens(gpt2):
    tokens = gpt2.to_tokens(TL_TEXT)
    assert tokens[0, 0].item() == 50256 and tokens.shape == (1, 4)
    assert abs(gpt2(TL_TEXT, return_type="loss").item() - TL_LOSS) < 1e-3
    processed = HookedGPT2.from_pretrained(
        "gpt2", fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    assert abs(processed(TL_TEXT, return_type="loss").item() - TL_LOSS) < 1e-3


@torch.no_grad()
def test_logits_equal_transformers(gpt2):
    from huggingface_hub import snapshot_download
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(snapshot_download(REPO, local_files_only=True)).eval()
    tokens = gpt2.to_tokens(["The quick brown fox jumps over the lazy dog", "Hello world!"])
    mask = (torch.arange(tokens.shape[1])[None] < torch.tensor([[10], [4]])).long()
    ours = gpt2(tokens, attention_mask=mask)
    ref = hf(tokens, attention_mask=mask).logits
    real = mask.bool()
    assert float((ours[real] - ref[real]).abs().max()) < 1e-3


@torch.no_grad()
def test_sensible_top_predictions(gpt2):
    def top(text: str, k: int) -> list[str]:
        return [gpt2.tokenizer.decode([i]) for i in gpt2(text)[0, -1].topk(k).indices.tolist()]

    assert top("1, 2, 3, 4, 5,", 1) == [" 6"]
    assert " Paris" in top("The Eiffel Tower is in the city of", 10)
    assert " Thursday" in gpt2.generate("Monday, Tuesday, Wednesday,", max_new_tokens=2, stop_at_eos=False)
