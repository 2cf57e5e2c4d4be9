import pytest
import torch

from tdb_lens.attribution.metrics import CallableMetric, Logit, LogitDiff, LogProb, Prob, per_group


def _logits():
    return torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))


def test_logit_diff_matches_hand_computation():
    lg = _logits()
    m = LogitDiff(torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]]))
    want = torch.stack([lg[0, -1, 1] - (lg[0, -1, 3] + lg[0, -1, 4]) / 2, lg[1, -1, 2] - (lg[1, -1, 5] + lg[1, -1, 6]) / 2])
    assert torch.allclose(m(lg), want)
    # shared token sets and a per-prompt position
    m2 = LogitDiff([1, 2], 3, pos=torch.tensor([2, 4]))
    want2 = torch.stack([(lg[0, 2, 1] + lg[0, 2, 2]) / 2 - lg[0, 2, 3], (lg[1, 4, 1] + lg[1, 4, 2]) / 2 - lg[1, 4, 3]])
    assert torch.allclose(m2(lg), want2)


def test_prob_logprob_logit():
    lg = _logits()
    lp = torch.log_softmax(lg[:, -1], -1)
    assert torch.allclose(LogProb(torch.tensor([3, 4]))(lg), lp[[0, 1], [3, 4]])
    assert torch.allclose(Prob([3, 4])(lg), lp[:, 3].exp() + lp[:, 4].exp())
    assert torch.allclose(Logit(7, pos=1)(lg), lg[:, 1, 7])


def test_repeated_rows_follow_prompts():
    lg = _logits()
    m = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    rep = lg.repeat(3, 1, 1)
    assert torch.allclose(m(rep), m(lg).repeat(3))
    assert torch.allclose(per_group(m, rep, 2), m(lg).mean().repeat(3))
    c = CallableMetric(lambda x: x[:, -1, 0].mean())  # scalar-valued: evaluated per group
    assert torch.allclose(per_group(c, rep, 2), lg[:, -1, 0].mean().repeat(3))


def test_bad_inputs():
    with pytest.raises(ValueError):
        LogitDiff(torch.tensor([1, 2, 3]))(_logits())
    with pytest.raises(ValueError):
        LogitDiff("x")
    with pytest.raises(TypeError):
        CallableMetric(3)
