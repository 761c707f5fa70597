"""HVPs and power iteration on a quadratic whose Hessian A is known exactly."""
import pytest
import torch

from xsam.hessian import exact_hvp, finite_difference_hvp, power_iteration, random_vectors

from helpers import Quadratic, flat, unflat


def random_vector(q, seed):
    return unflat(torch.randn(q.A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
                  q.params)


def test_exact_hvp_equals_A_v_and_leaves_grad_alone():
    q = Quadratic()
    v = random_vector(q, 1)
    hvp, loss = exact_hvp(q.loss, q.params)
    (hv,) = hvp([v])
    torch.testing.assert_close(flat(hv), q.A @ flat(v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, q.loss().detach())
    assert all(p.grad is None for p in q.params)


def test_exact_hvp_gives_zero_rows_for_unused_parameters():
    q = Quadratic()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    hvp, _ = exact_hvp(q.loss, q.params + [unused])
    (hv,) = hvp([random_vector(q, 2) + [torch.ones(3, dtype=torch.float64)]])
    assert torch.equal(hv[-1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-7), (torch.float32, 2e-3)])
def test_finite_difference_hvp_matches_A_v_and_restores_exactly(dtype, rtol):
    q = Quadratic(dtype=dtype)
    before = [p.detach().clone() for p in q.params]
    marker = [torch.full_like(p, 123.0) for p in q.params]
    for p, m in zip(q.params, marker):
        p.grad = m
    v = [t.to(dtype) for t in random_vector(q, 3)]
    (hv,) = finite_difference_hvp(q.closure, q.params)([v])
    exact = q.A @ flat(v)
    assert (flat(hv) - exact).norm() <= rtol * exact.norm()
    assert all(torch.equal(p, b) for p, b in zip(q.params, before))  # bit-exact restore
    assert all(p.grad is m for p, m in zip(q.params, marker))  # caller's .grad reinstated


def test_finite_difference_restores_weights_when_the_closure_raises():
    q = Quadratic()
    before = [p.detach().clone() for p in q.params]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return q.closure()

    with pytest.raises(RuntimeError, match="boom"):
        finite_difference_hvp(failing, q.params)([random_vector(q, 4)])
    assert all(torch.equal(p, b) for p, b in zip(q.params, before))


def test_power_iteration_finds_largest_magnitude_eigenpair_with_its_sign():
    q = Quadratic()
    hvp, _ = exact_hvp(q.loss, q.params)
    start = random_vector(q, 5)
    start_copy = flat(start)
    result = power_iteration(hvp, [start], iters=100)
    top = q.eigenvectors[:, 0]  # eigenvalue -7
    assert result.eigenvalues.shape == (1,)
    torch.testing.assert_close(result.eigenvalues[0], torch.tensor(-7.0, dtype=torch.float64), rtol=1e-10, atol=0)
    assert abs(abs(flat(result.vectors[0]) @ top) - 1) < 1e-10
    # The one-pass residual sqrt(<u,u> - lambda <v,u>) has a floor near sqrt(eps) * |lambda|.
    assert result.residuals[0] < 1e-6
    assert result.iterations == 100
    assert torch.equal(flat(start), start_copy)  # the warm start is not modified


def test_power_iteration_stops_early_with_tolerance():
    q = Quadratic()
    hvp, _ = exact_hvp(q.loss, q.params)
    result = power_iteration(hvp, [random_vector(q, 6)], iters=500, tol=1e-7)
    assert result.iterations < 500
    assert result.residuals[0] / 7.0 < 1e-7
    torch.testing.assert_close(result.eigenvalues[0], torch.tensor(-7.0, dtype=torch.float64), rtol=1e-7, atol=0)


def test_block_power_iteration_finds_top_subspace_with_near_degenerate_pair():
    q = Quadratic()
    hvp, _ = exact_hvp(q.loss, q.params)
    start = random_vectors(q.params, 3, torch.Generator().manual_seed(7))
    result = power_iteration(hvp, start, iters=200)
    V = torch.stack([flat(v) for v in result.vectors], dim=1)
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)  # eps=1e-12 in v / (||v|| + eps)
    U = q.eigenvectors[:, :3]  # eigenvalues -7, 4, 3.999
    # Same subspace: the projection of V onto span(U) keeps all of V.
    torch.testing.assert_close(torch.linalg.svdvals(U.T @ V), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    lam = result.eigenvalues
    torch.testing.assert_close(lam[0], torch.tensor(-7.0, dtype=torch.float64), rtol=1e-10, atol=0)
    # Inside the near-degenerate eigenspace the Ritz values lie in [3.999, 4] and sum to 7.999.
    assert 3.999 - 1e-9 <= lam[1] <= 4 + 1e-9 and 3.999 - 1e-9 <= lam[2] <= 4 + 1e-9
    torch.testing.assert_close(lam[1] + lam[2], torch.tensor(7.999, dtype=torch.float64), rtol=1e-9, atol=0)


def test_power_iteration_rejects_bad_arguments():
    q = Quadratic()
    hvp, _ = exact_hvp(q.loss, q.params)
    with pytest.raises(ValueError, match="iters=0"):
        power_iteration(hvp, [random_vector(q, 0)], iters=0)
    with pytest.raises(ValueError, match="tol=-1"):
        power_iteration(hvp, [random_vector(q, 0)], tol=-1)
