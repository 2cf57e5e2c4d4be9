"""IOI in GPT-2 small: the paper's (Wang et al. 2022) and the literature's facts.

Runs only where ``openai-community/gpt2`` is already in the Hugging Face cache (the hub is not
reachable on the machines this project is built on); elsewhere every test is skipped with the
reason. Facts checked: name movers 9.9, 9.6, 10.0 among the top direct effects; negative name
movers 10.7 and 11.10 among the most negative; S-inhibition heads 7.3, 7.9, 8.6, 8.10 found by
path patching into the name movers' queries; induction heads 5.5 and 6.9; 4.11 the strongest
previous-token head; mean logit difference 3.5521 on the 8 prompts of TransformerLens' / ARENA's
IOI demo; the paper's 26-head circuit keeps about 87% of the logit difference.
"""

from __future__ import annotations

import pytest
import torch

from tdb_lens import HookedGPT2
from tdb_lens.ioi import IOIDataset
from tdb_lens.ioi.discovery import IOIContext, head_detector_scores, head_direct_effects, parse_head, path_patch_to_queries
from test_gpt2_real_weights import SKIP_REASON, _cached

pytestmark = [
    pytest.mark.gpt2_weights,
    pytest.mark.slow,
    pytest.mark.skipif(not _cached(), reason=SKIP_REASON),
]

# The paper's circuit (Wang et al. 2022, figure 2), 26 heads.
PAPER_CIRCUIT = {
    "name_mover": ["9.9", "9.6", "10.0"],
    "backup_name_mover": ["10.10", "10.6", "10.2", "10.1", "11.2", "9.7", "9.0", "11.9"],
    "negative_name_mover": ["10.7", "11.10"],
    "s_inhibition": ["7.3", "7.9", "8.6", "8.10"],
    "induction": ["5.5", "5.8", "5.9", "6.9"],
    "duplicate_token": ["0.1", "0.10", "3.0"],
    "previous_token": ["2.2", "4.11"],
}

# TransformerLens' Exploratory Analysis Demo / ARENA: four sentences, each with either name as S.
DEMO_FORMATS = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
DEMO_NAMES = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
DEMO_LOGIT_DIFF = 3.5521


@pytest.fixture(scope="module")
def gpt2():
    return HookedGPT2.from_pretrained("gpt2").eval()


@pytest.fixture(scope="module")
def ctx(gpt2):
    return IOIContext.from_dataset(gpt2, IOIDataset.generate(gpt2.tokenizer, 100, seed=0))


@torch.no_grad()
def test_demo_logit_difference(gpt2):
    prompts, answers = [], []
    for fmt, (a, b) in zip(DEMO_FORMATS, DEMO_NAMES):
        prompts += [fmt.format(b), fmt.format(a)]  # S = b (answer a), then S = a (answer b)
        answers += [(a, b), (b, a)]
    tokens = gpt2.to_tokens(prompts)  # BOS prepended; every prompt has the same length
    logits = gpt2(tokens)[:, -1]
    ids = torch.tensor([[gpt2.to_single_token(x) for x in pair] for pair in answers])
    ld = logits.gather(1, ids[:, :1]) - logits.gather(1, ids[:, 1:])
    assert float(ld.mean()) == pytest.approx(DEMO_LOGIT_DIFF, abs=0.01)


def _rank(scores: torch.Tensor) -> list[str]:
    H = scores.shape[1]
    return [f"{i // H}.{i % H}" for i in scores.flatten().argsort(descending=True).tolist()]


def test_name_movers_and_negative_name_movers(ctx):
    ranked = _rank(head_direct_effects(ctx))
    assert {"9.9", "9.6", "10.0"} <= set(ranked[:5]), ranked[:5]
    assert {"10.7", "11.10"} <= set(ranked[-3:]), ranked[-3:]


def test_s_inhibition_heads_by_path_patching(ctx):
    senders = [(l, h) for l in range(5, 9) for h in range(12)]
    pp = path_patch_to_queries(ctx, senders, [(9, 9), (9, 6), (10, 0)], rows=torch.arange(50))
    strongest = sorted(pp, key=lambda h: pp[h])[:6]  # most negative: their clean output helps most
    found = {f"{l}.{h}" for l, h in strongest}
    assert {"7.3", "7.9", "8.6", "8.10"} <= found, sorted(pp.items(), key=lambda kv: kv[1])[:8]


def test_induction_and_previous_token_heads(gpt2):
    det = head_detector_scores(gpt2, n_seqs=16, seq_len=40, seed=0)
    assert {"5.5", "6.9"} <= set(_rank(det["induction"])[:6])
    assert _rank(det["previous"])[0] == "4.11"


def test_paper_circuit_faithfulness(ctx):
    heads = {parse_head(h) for hs in PAPER_CIRCUIT.values() for h in hs}
    assert len(heads) == 26
    f = ctx.faithfulness(heads)
    assert f == pytest.approx(0.87, abs=0.1), f
