"""FactoredMatrix against transformer_lens' FactoredMatrix (same factors, every operation) and
against the dense product it stands for."""

from __future__ import annotations

import warnings

import pytest
import torch

from tdb_lens import FactoredMatrix

warnings.filterwarnings("ignore", module="transformer_lens")
from transformer_lens import FactoredMatrix as TLFactoredMatrix  # noqa: E402

G = torch.Generator().manual_seed(0)
A = torch.randn(3, 4, 16, 6, generator=G, dtype=torch.float64)
B = torch.randn(3, 4, 6, 12, generator=G, dtype=torch.float64)


def close(a, b, tol=1e-9):
    a = a.AB if isinstance(a, (FactoredMatrix, TLFactoredMatrix)) else a
    b = b.AB if isinstance(b, (FactoredMatrix, TLFactoredMatrix)) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max() < tol


@pytest.mark.parametrize("idx", [(1,), (1, 2), (0, -1), (2, 3, 5), (1, 2, slice(0, 5)), (1, 2, slice(2, 9), 4), (-1, 0, -1, -1)])
def test_indexing_matches_transformer_lens(idx):
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    close(ours[idx], theirs[idx])
    assert ours[idx].shape == theirs[idx].shape


def test_svd_layout_and_spectrum():
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    U, S, V = ours.svd()
    tU, tS, tV = theirs.svd()
    assert U.shape == tU.shape and S.shape == tS.shape and V.shape == tV.shape
    close(S, tS)
    close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), A @ B)  # TL's convention: M = U S V^T
    assert torch.equal(ours.Vh, ours.V) and torch.equal(ours.U, U) and torch.equal(ours.S, S)
    dense = torch.linalg.svdvals(A @ B)[..., :6]
    close(S, dense)
    close(ours.norm(), theirs.norm())
    close(ours.norm(), torch.linalg.matrix_norm(A @ B))
    close(ours.make_even(), A @ B)
    close(ours.U @ ours.collapse_l(), A @ B)
    close(ours.collapse_r() @ ours.V.transpose(-1, -2), A @ B)


def test_products_and_shapes_match_transformer_lens():
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    assert ours.shape == theirs.shape and ours.ndim == theirs.ndim == 4
    v, w = torch.randn(12, generator=G, dtype=torch.float64), torch.randn(16, generator=G, dtype=torch.float64)
    M, N = torch.randn(12, 5, generator=G, dtype=torch.float64), torch.randn(7, 16, generator=G, dtype=torch.float64)
    close(ours @ v, theirs @ v)
    close(w @ ours, w @ theirs)
    close(ours @ M, theirs @ M)
    close(N @ ours, N @ theirs)
    Bt, At = B.transpose(-1, -2), A.transpose(-1, -2)
    close(ours @ FactoredMatrix(Bt, At), theirs @ TLFactoredMatrix(Bt, At))
    close(ours * 2.5, theirs * 2.5)
    close(ours.T, theirs.T)
    close(ours.get_corner(2), theirs.get_corner(2))
    sq = FactoredMatrix(A, A.transpose(-1, -2))
    close(sq.eigenvalues.abs().sort(-1).values, TLFactoredMatrix(A, A.transpose(-1, -2)).eigenvalues.abs().sort(-1).values)
    close(ours.unsqueeze(0), theirs.unsqueeze(0))
    with pytest.raises((ValueError, TypeError), match="inner|mdim"):  # the library's check, or the type checker's
        FactoredMatrix(A, A)
    with pytest.raises(IndexError, match="too long"):
        ours[0, 0, 0, 0, 0]


def test_model_ov_qk_are_per_head_factored_matrices():
    from tdb_lens import GPT2Config, HookedGPT2

    model = HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50), seed=0)
    ov = model.OV[1, 2]
    attn = model.blocks[1].attn
    close(ov.AB.double(), (attn.W_V[2] @ attn.W_O[2]).double(), 1e-6)
    close(model.QK[0, 3].AB.double(), (model.blocks[0].attn.W_Q[3] @ model.blocks[0].attn.W_K[3].T).double(), 1e-6)
    assert model.OV.shape == (2, 4, 32, 32) and model.OV[1].shape == (4, 32, 32)
    assert repr(ov) == "FactoredMatrix(shape=(32, 32), inner=8)"
