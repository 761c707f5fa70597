"""Lanczos against a dense symmetric matrix of known spectrum and against power iteration on a model."""
import pytest
import torch
from torch import nn

from xsam.diagnostics import cosine, lanczos, top_eigenvalue
from xsam.hessian import power_iteration

from helpers import Quadratic, flat, make_model, unflat


def known_spectrum(eigenvalues, seed=0):
    """A = Q diag(eigenvalues) Q^T with a random orthogonal Q, and its product as an operator."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    A = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T

    def hvp(vectors):
        return [[(A @ v[0].reshape(-1)).reshape(v[0].shape)] for v in vectors]

    return A, q, hvp


def start(n, seed=1):
    return [torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)]


# Top pair 10 / 9.5: power iteration converges like (0.95)^k, Lanczos like a Chebyshev polynomial.
SPECTRUM = [10.0, 9.5, *torch.linspace(-6.0, 8.0, 198).tolist()]


def test_lanczos_finds_the_closed_form_top_pair_with_far_fewer_products_than_power_iteration():
    A, q, hvp = known_spectrum(SPECTRUM)
    tol = 1e-6
    found = lanczos(hvp, start(len(SPECTRUM)), max_iters=200, tol=tol)
    assert found.converged
    assert abs(found.eigenvalue - 10.0) <= 10 * tol * 10.0
    assert abs(cosine(found.vector, [q[:, 0]])) > 1 - 1e-6
    v = found.vector[0]
    true_residual = float((A @ v - found.eigenvalue * v).norm())
    assert true_residual == pytest.approx(found.residual, rel=1e-3, abs=1e-9)  # the recurrence's residual is real
    power = power_iteration(hvp, [start(len(SPECTRUM))], iters=2000, tol=tol)
    assert float(power.eigenvalues[0]) == pytest.approx(found.eigenvalue, rel=10 * tol)
    assert found.products * 5 < power.iterations  # 28 against 230 here


def test_lanczos_picks_magnitude_or_the_largest_algebraic_eigenvalue():
    q = Quadratic()  # largest |lambda| is -7, the largest eigenvalue a near-degenerate 4 / 3.999
    A = q.A

    def hvp(vectors):
        return [unflat(A @ flat(v), q.params) for v in vectors]

    init = unflat(torch.ones(A.shape[0], dtype=torch.float64), q.params)
    magnitude = lanczos(hvp, init, max_iters=50, tol=1e-10)
    algebraic = lanczos(hvp, init, max_iters=50, tol=1e-10, which="algebraic")
    assert magnitude.eigenvalue == pytest.approx(-7.0, rel=1e-9)
    assert algebraic.eigenvalue == pytest.approx(4.0, rel=1e-9)
    assert magnitude.converged and algebraic.converged
    assert magnitude.products <= A.shape[0]  # a 12-dimensional space is exhausted in 12 steps at most
    assert abs(float(flat(magnitude.vector) @ q.eigenvectors[:, 0])) > 1 - 1e-9
    assert all(t.shape == p.shape for t, p in zip(magnitude.vector, q.params))


def test_top_eigenvalue_by_lanczos_agrees_with_power_iteration_on_a_network():
    model = make_model(6, 12, 3, dtype=torch.float32)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    power = top_eigenvalue(model, loss_fn, tol=1e-5, max_iters=2000)
    fast = top_eigenvalue(model, loss_fn, tol=1e-5, max_iters=200, method="lanczos")
    assert power.converged and fast.converged
    assert fast.eigenvalue == pytest.approx(power.eigenvalue, rel=1e-4)
    assert abs(cosine(fast.vector, power.vector)) > 0.999
    assert fast.iterations < power.iterations
    assert all(p.grad is None for p in model.parameters())


def test_lanczos_names_bad_arguments():
    _, _, hvp = known_spectrum([1.0, 2.0])
    with pytest.raises(ValueError, match="which='largest' is invalid"):
        lanczos(hvp, start(2), which="largest")
    with pytest.raises(ValueError, match="max_iters=1 is invalid"):
        lanczos(hvp, start(2), max_iters=1)
    with pytest.raises(ValueError, match="init is zero"):
        lanczos(hvp, [torch.zeros(2, dtype=torch.float64)])
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="which='algebraic' is invalid"):
        top_eigenvalue(model, lambda: model(torch.ones(1, 2)).sum(), which="algebraic")
    with pytest.raises(ValueError, match="method='arnoldi' is invalid"):
        top_eigenvalue(model, lambda: model(torch.ones(1, 2)).sum(), method="arnoldi")
