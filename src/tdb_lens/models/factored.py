"""`FactoredMatrix`: a low-rank product ``A @ B`` kept factored (OV and QK circuits)."""

from __future__ import annotations

import torch


class FactoredMatrix:
    """``A [..., m, r] @ B [..., r, n]`` without forming the ``m x n`` product unless asked."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A {tuple(A.shape)} and B {tuple(B.shape)}")
        self.A, self.B = A, B

    @property
    def AB(self) -> torch.Tensor:
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.A.shape[:-1], self.B.shape[-1]))

    @property
    def rank(self) -> int:
        return min(self.A.shape[-1], self.A.shape[-2], self.B.shape[-1])

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix:
        return FactoredMatrix(other @ self.A, self.B)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, Vh of the product, computed from the factors (cheap for low rank)."""
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(Sa[..., :, None] * Vha @ self.B, full_matrices=False)
        return Ua @ Ub, Sb, Vhb

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Non-zero eigenvalues of ``A @ B`` equal those of ``B @ A`` (r x r, cheap)."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> torch.Tensor:
        """Frobenius norm of the product."""
        return self.S.pow(2).sum(-1).sqrt()

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, rank={self.rank})"
