"""`FactoredMatrix`: a low-rank product ``A @ B`` kept factored (OV and QK circuits).

Same interface and layouts as TransformerLens' ``FactoredMatrix``: leading axes broadcast and
index like a tensor's (``model.OV[layer, head]``), ``svd()`` returns ``(U, S, V)`` with
``U @ S.diag() @ V.T == A @ B`` (``.Vh`` is TransformerLens' old name for ``V``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Union

import torch
from jaxtyping import Complex, Float


class FactoredMatrix:
    """``A [..., ldim, mdim] @ B [..., mdim, rdim]`` without forming the ``ldim x rdim`` product unless asked."""

    def __init__(self, A: Float[torch.Tensor, "... ldim mdim"], B: Float[torch.Tensor, "... mdim rdim"]) -> None:
        if A.ndim < 2 or B.ndim < 2 or A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix needs A [..., l, m] and B [..., m, r] with the same inner size m, "
                             f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(f"the leading axes of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast") from None
        self.A = A.broadcast_to(lead + A.shape[-2:])
        self.B = B.broadcast_to(lead + B.shape[-2:])
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.has_leading_dims = len(lead) > 0

    # -- shape ----------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """Leading axes, then ``ldim, rdim`` (the product's shape)."""
        return torch.Size((*self.A.shape[:-1], self.rdim))

    @property
    def ndim(self) -> int:
        """Number of axes of the product."""
        return len(self.shape)

    @property
    def rank(self) -> int:
        """An upper bound on the product's rank: ``min(ldim, mdim, rdim)``."""
        return min(self.ldim, self.mdim, self.rdim)

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(A, B)``."""
        return self.A, self.B

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """A new leading axis at ``k`` (counted among the leading axes)."""
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index the leading axes (``OV[3, 2]`` is layer 3, head 2); an index reaching into the matrix
        axes picks rows of ``A`` / columns of ``B`` and keeps them as axes (an int is a length-1 slice)."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_lead = self.ndim - 2
        real = [i for i in idx if i is not None]
        if len(real) > self.ndim:
            raise IndexError(f"index {idx} is too long for a FactoredMatrix of shape {tuple(self.shape)}")
        if len(real) <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])

        def keep(i: Any) -> Any:
            return slice(i, i + 1 if i != -1 else None) if isinstance(i, int) else i

        lead = idx[:n_lead]
        rows = keep(idx[n_lead])
        cols = keep(idx[n_lead + 1]) if len(real) == self.ndim else slice(None)
        return FactoredMatrix(self.A[lead + (rows,)], self.B[lead + (slice(None), cols)])

    # -- products -------------------------------------------------------------------------------
    @property
    def AB(self) -> Float[torch.Tensor, "... ldim rdim"]:
        """The full product (ldim x rdim: can be large)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[torch.Tensor, "... mdim mdim"]:
        """The reverse product (mdim x mdim), defined when ``ldim == rdim``."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix, this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, still factored: ``B.T @ A.T``."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other: Union[torch.Tensor, FactoredMatrix]) -> Union[FactoredMatrix, torch.Tensor]:
        """``M @ other``: a FactoredMatrix, or a tensor ``[..., ldim]`` for a vector ``other``."""
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if other.ndim < 2:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply a {tuple(self.shape)} FactoredMatrix by {tuple(other.shape)}")
        return FactoredMatrix(self.A, self.B @ other) if self.rdim > self.mdim else FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> Union[FactoredMatrix, torch.Tensor]:
        """``other @ M``: a FactoredMatrix, or a tensor ``[..., rdim]`` for a vector ``other``."""
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by a {tuple(self.shape)} FactoredMatrix")
        if other.ndim < 2:
            return ((other[None] @ self.A) @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B) if self.ldim > self.mdim else FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Union[int, float, torch.Tensor]) -> FactoredMatrix:
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for products")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # -- spectrum -------------------------------------------------------------------------------
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A = Ua Sa Vha and B = Ub Sb Vhb, so A B = Ua (Sa Vha Ub Sb) Vhb: only the small middle
        # matrix needs a fresh decomposition
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = (Sa[..., :, None] * (Vha @ Ub)) * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, (Vhm @ Vhb).transpose(-1, -2)

    def svd(self) -> tuple[Float[torch.Tensor, "... ldim k"], Float[torch.Tensor, "... k"], Float[torch.Tensor, "... rdim k"]]:
        """``(U, S, V)`` with ``U @ S.diag() @ V.transpose(-1, -2) == A @ B`` (TransformerLens' layout),
        from the factors' decompositions (cheap for low rank); cached."""
        return self._svd

    @property
    def U(self) -> Float[torch.Tensor, "... ldim k"]:
        """Left singular vectors as columns."""
        return self.svd()[0]

    @property
    def S(self) -> Float[torch.Tensor, "... k"]:
        """Singular values, largest first."""
        return self.svd()[1]

    @property
    def V(self) -> Float[torch.Tensor, "... rdim k"]:
        """Right singular vectors as columns: ``M == U @ S.diag() @ V.T``."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[torch.Tensor, "... rdim k"]:
        """TransformerLens' historical name: the same as ``V`` (not its transpose)."""
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[torch.Tensor, "... mdim"]:
        """Non-zero eigenvalues of ``A @ B`` equal those of ``B @ A`` (mdim x mdim, cheap)."""
        ba = self.BA
        return torch.linalg.eigvals(ba.float() if ba.dtype in (torch.float16, torch.bfloat16) else ba)

    def norm(self) -> Float[torch.Tensor, "*leading"]:
        """Frobenius norm of the product."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same product as ``(U sqrt(S)) @ (sqrt(S) V.T)``: both factors carry half the spectrum."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-1, -2))

    def collapse_l(self) -> Float[torch.Tensor, "... k rdim"]:
        """``S V.T``: the product without its left orthogonal factor."""
        return self.S[..., :, None] * self.V.transpose(-1, -2)

    def collapse_r(self) -> Float[torch.Tensor, "... ldim k"]:
        """``U S``: the product without its right orthogonal factor."""
        return self.U * self.S[..., None, :]

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k x k`` corner of the product (and of the first ``k`` of each leading axis)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(0, k) for _ in range(corner.ndim))]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner={self.mdim})"
