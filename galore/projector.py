"""Gradient low-rank projection: the subspace basis, projecting into it, projecting back.

For a weight gradient G (m x n) and rank r, GaLore keeps an orthonormal basis P of the dominant r-dimensional
subspace of G on one side, refreshed every ``update_proj_gap`` steps from an SVD ``G = U S Vh`` computed in fp32:

* side ``"left"``:  P = U[:, :r] (m x r);   low = Pᵀ G (r x n);   back(low) = P low
* side ``"right"``: P = Vh[:r]   (r x n);   low = G Pᵀ (m x r);   back(low) = low P

``proj_type`` chooses the side from the shape: ``"std"`` projects the smaller side (right when m >= n, else left),
``"reverse_std"`` the larger one, ``"left"`` / ``"right"`` always that side. The side is fixed per parameter when
its basis is first made and stored beside the basis, so projecting back never re-guesses it from the low-rank
shape (galore-torch 1.0 re-guesses it, and ``reverse_std`` with r == m < n then fails). N-D parameters (N > 2) are
viewed as (shape[0], prod(shape[1:])).

The basis is stored in the gradient's dtype, as galore-torch does (the SVD itself always runs in fp32).
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_METHODS = ("exact", "randomized")


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """View an N-D (N >= 2) tensor as the 2-D matrix GaLore projects: (shape[0], prod(shape[1:]))."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def projection_side(proj_type: str, shape: tuple[int, int]) -> str:
    """Which side ("left" or "right") ``proj_type`` projects for a matrix of ``shape``."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def projected_shape(side: str, shape: tuple[int, int], rank: int) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if side == "left" else (m, rank)


def basis_shape(side: str, shape: tuple[int, int], rank: int) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if side == "left" else (rank, n)


def _exact_svd(matrix: torch.Tensor):
    return torch.linalg.svd(matrix, full_matrices=False)


def _randomized_svd(matrix: torch.Tensor, rank: int, seed: int, oversample: int = 8, niter: int = 2):
    # torch.svd_lowrank draws its test matrix from the global generator; fork it so the training RNG stream
    # (dropout, data order) is untouched, and seed it from the step so every DDP rank draws the same matrix.
    q = min(rank + oversample, *matrix.shape)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u, s, v.mT


def orthogonal_basis(
    grad: torch.Tensor, rank: int, side: str, svd: str = "exact", seed: int = 0, name: str = "parameter"
) -> torch.Tensor:
    """The rank-``rank`` basis of ``grad``'s dominant subspace on ``side``, in ``grad``'s dtype.

    The SVD runs in fp32. If it fails to converge (or the gradient is not finite), it warns and falls back: exact →
    float64 exact → randomized; randomized → exact. If every method fails it raises ``torch.linalg.LinAlgError``.
    """
    matrix = matrix_view(grad)
    matrix32 = matrix.float() if matrix.dtype != torch.float32 else matrix
    if not torch.isfinite(matrix32).all():
        raise torch.linalg.LinAlgError(f"gradient of {name} is not finite; cannot compute its GaLore basis")
    attempts = ["exact", "exact64", "randomized"] if svd == "exact" else ["randomized", "exact", "exact64"]
    errors = []
    for method in attempts:
        try:
            if method == "exact":
                u, s, vh = _exact_svd(matrix32)
            elif method == "exact64":
                u, s, vh = _exact_svd(matrix32.double())
            else:
                u, s, vh = _randomized_svd(matrix32, rank, seed)
            if not (torch.isfinite(u[:, :rank]).all() and torch.isfinite(vh[:rank]).all()):
                raise torch.linalg.LinAlgError("SVD returned non-finite factors")
        except torch.OutOfMemoryError:
            raise
        except (torch.linalg.LinAlgError, RuntimeError) as err:  # LAPACK/cuSOLVER raise either
            errors.append(f"{method}: {err}")
            continue
        if errors:
            msg = f"GaLore: SVD of {name}'s gradient failed ({'; '.join(errors)}); used the {method} SVD instead"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)
        basis = u[:, :rank] if side == "left" else vh[:rank, :]
        return basis.to(dtype=grad.dtype).contiguous()
    raise torch.linalg.LinAlgError(f"GaLore: every SVD method failed for {name}: {'; '.join(errors)}")


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Project the (N-D viewed as 2-D) gradient into the basis' subspace."""
    matrix = matrix_view(grad)
    basis = basis if basis.dtype == matrix.dtype else basis.to(matrix.dtype)
    return basis.mT @ matrix if side == "left" else matrix @ basis.mT


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Map a low-rank tensor back to the full (2-D) space; the caller reshapes and scales."""
    basis = basis if basis.dtype == low.dtype else basis.to(low.dtype)
    return basis @ low if side == "left" else low @ basis
