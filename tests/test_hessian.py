"""HVPs, power iteration and Lanczos against closed forms (a quadratic whose Hessian A is known, a dense matrix of
known spectrum), and finite differences of a model with dropout against exact products with the same mask."""
import warnings

import pytest
import torch
from torch import nn

from xsam import XSAM
from xsam.diagnostics import cosine, lanczos, top_eigenvalue
from xsam.hessian import (RandomState, exact_hvp, finite_difference_hvp, forward_difference_hvp, power_iteration,
                          random_vectors)

from helpers import Quadratic, closure_of, flat, make_model, raising_on_call, unflat


def random_vector(params, seed):
    """A float64 standard-normal vector drawn flat from ``seed``, cut like ``params``."""
    n = sum(p.numel() for p in params)
    return unflat(torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), params)


def test_exact_hvp_equals_A_v_with_zero_rows_for_unused_parameters_and_leaves_grad_alone():
    q = Quadratic()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    v = random_vector(q.params, 1)
    hvp, loss = exact_hvp(q.loss, q.params + [unused])
    (hv,) = hvp([v + [torch.ones(3, dtype=torch.float64)]])
    torch.testing.assert_close(flat(hv[:-1]), q.A @ flat(v), rtol=1e-12, atol=1e-12)
    assert torch.equal(hv[-1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(loss, q.loss().detach())
    assert all(p.grad is None for p in q.params)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-7), (torch.float32, 2e-3)])
def test_finite_difference_hvp_matches_A_v_and_restores_exactly(dtype, rtol):
    """Also when the closure raises."""
    q = Quadratic(dtype=dtype)
    before = [p.detach().clone() for p in q.params]
    marker = [torch.full_like(p, 123.0) for p in q.params]
    for p, m in zip(q.params, marker):
        p.grad = m
    v = [t.to(dtype) for t in random_vector(q.params, 3)]
    (hv,) = finite_difference_hvp(q.closure, q.params)([v])
    exact = q.A @ flat(v)
    assert (flat(hv) - exact).norm() <= rtol * exact.norm()
    assert all(torch.equal(p, b) for p, b in zip(q.params, before))  # bit-exact restore
    assert all(p.grad is m for p, m in zip(q.params, marker))  # caller's .grad reinstated
    with pytest.raises(RuntimeError, match="boom"):
        finite_difference_hvp(raising_on_call(2, q.closure), q.params)([v])
    assert all(torch.equal(p, b) for p, b in zip(q.params, before))
    assert all(p.grad is m for p, m in zip(q.params, marker))


def test_power_iteration_finds_largest_magnitude_eigenpair_with_its_sign():
    q = Quadratic()
    hvp, _ = exact_hvp(q.loss, q.params)
    start = random_vector(q.params, 5)
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
    early = power_iteration(hvp, [random_vector(q.params, 6)], iters=500, tol=1e-7)  # stops early with a tolerance
    assert early.iterations < 500
    assert early.residuals[0] / 7.0 < 1e-7
    torch.testing.assert_close(early.eigenvalues[0], torch.tensor(-7.0, dtype=torch.float64), rtol=1e-7, atol=0)


def test_block_power_iteration_finds_top_subspace_with_near_degenerate_pair():
    q = Quadratic()
    hvp, _ = exact_hvp(q.loss, q.params)
    start = random_vectors(q.params, 3, torch.Generator().manual_seed(7))
    result = power_iteration(hvp, start, iters=200)
    V = torch.stack([flat(v) for v in result.vectors], dim=1)
    # atol: eps=1e-12 in v / (||v|| + eps)
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    U = q.eigenvectors[:, :3]  # eigenvalues -7, 4, 3.999
    # Same subspace: the projection of V onto span(U) keeps all of V.
    torch.testing.assert_close(torch.linalg.svdvals(U.T @ V), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    lam = result.eigenvalues
    torch.testing.assert_close(lam[0], torch.tensor(-7.0, dtype=torch.float64), rtol=1e-10, atol=0)
    # Inside the near-degenerate eigenspace the Ritz values lie in [3.999, 4] and sum to 7.999.
    assert 3.999 - 1e-9 <= lam[1] <= 4 + 1e-9 and 3.999 - 1e-9 <= lam[2] <= 4 + 1e-9
    torch.testing.assert_close(lam[1] + lam[2], torch.tensor(7.999, dtype=torch.float64), rtol=1e-9, atol=0)


# ----- Lanczos ------------------------------------------------------------------------------------------
# Top pair 10 / 9.5: power iteration converges like (0.95)^k, Lanczos like a Chebyshev polynomial.
SPECTRUM = [10.0, 9.5, *torch.linspace(-6.0, 8.0, 198).tolist()]


def test_lanczos_finds_the_closed_form_top_pair_with_far_fewer_products_than_power_iteration():
    n, tol = len(SPECTRUM), 1e-6
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = q @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ q.T

    def hvp(vectors):
        return [[A @ v[0]] for v in vectors]

    init = [torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    found = lanczos(hvp, init, max_iters=200, tol=tol)
    assert found.converged
    assert abs(found.eigenvalue - 10.0) <= 10 * tol * 10.0
    assert abs(cosine(found.vector, [q[:, 0]])) > 1 - 1e-6
    v = found.vector[0]
    true_residual = float((A @ v - found.eigenvalue * v).norm())
    assert true_residual == pytest.approx(found.residual, rel=1e-3, abs=1e-9)  # the recurrence's residual is real
    power = power_iteration(hvp, [init], iters=2000, tol=tol)
    assert float(power.eigenvalues[0]) == pytest.approx(found.eigenvalue, rel=10 * tol)
    assert found.products * 5 < power.iterations  # 28 against 230 here


def test_lanczos_picks_magnitude_or_the_largest_algebraic_eigenvalue():
    q = Quadratic()  # largest |lambda| is -7, the largest eigenvalue a near-degenerate 4 / 3.999
    hvp, _ = exact_hvp(q.loss, q.params)
    init = [torch.ones_like(p) for p in q.params]
    magnitude = lanczos(hvp, init, max_iters=50, tol=1e-10)
    algebraic = lanczos(hvp, init, max_iters=50, tol=1e-10, which="algebraic")
    assert magnitude.eigenvalue == pytest.approx(-7.0, rel=1e-9)
    assert algebraic.eigenvalue == pytest.approx(4.0, rel=1e-9)
    assert magnitude.converged and algebraic.converged
    assert magnitude.products <= q.A.shape[0]  # a 12-dimensional space is exhausted in 12 steps at most
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


@pytest.mark.parametrize("call, match", [
    (lambda hvp, v: power_iteration(hvp, [v], iters=0), "iters=0"),
    (lambda hvp, v: power_iteration(hvp, [v], tol=-1), "tol=-1"),
    (lambda hvp, v: lanczos(hvp, v, which="largest"), "which='largest' is invalid"),
    (lambda hvp, v: lanczos(hvp, v, max_iters=1), "max_iters=1 is invalid"),
    (lambda hvp, v: lanczos(hvp, [torch.zeros_like(t) for t in v]), "init is zero"),
    (lambda *_: top_eigenvalue(nn.Linear(2, 1), lambda: None, which="algebraic"), "which='algebraic' is invalid"),
    (lambda *_: top_eigenvalue(nn.Linear(2, 1), lambda: None, method="arnoldi"), "method='arnoldi' is invalid"),
])
def test_power_iteration_and_lanczos_name_bad_arguments(call, match):
    q = Quadratic()
    with pytest.raises(ValueError, match=match):
        call(exact_hvp(q.loss, q.params)[0], random_vector(q.params, 0))


# ----- dropout in train mode: every closure call of the products replays the same random numbers -------
class DropoutNet:
    """A float64 MLP with dropout in train mode on a fixed batch: each forward pass draws a new mask."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(5, 1)).double()
        self.params = list(self.net.parameters())
        self.x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        self.y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
        self.closure = closure_of(self.loss)

    def loss(self) -> torch.Tensor:
        return (self.net(self.x) - self.y).square().mean()

    def exact_product(self, v, seed):
        """The oracle: the double-backward product of the loss with the mask that ``seed`` draws."""
        torch.manual_seed(seed)
        hvp, _ = exact_hvp(self.loss, self.params)
        return flat(hvp([v])[0])

    def hessian(self, seed):
        basis = torch.eye(sum(p.numel() for p in self.params), dtype=torch.float64)
        return torch.stack([self.exact_product(unflat(e, self.params), seed) for e in basis])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_difference_products_see_the_mask_of_an_exact_product_built_at_the_same_generator_state():
    """Central differences start from the generator's state of their call; forward differences replay the
    state the base gradient's closure call started from."""
    model = DropoutNet()
    v = random_vector(model.params, 3)
    exact = model.exact_product(v, seed=11)
    assert relative_error(model.exact_product(v, seed=12), exact) > 0.1  # the mask matters
    torch.manual_seed(11)
    state = torch.get_rng_state()
    (fd,) = finite_difference_hvp(model.closure, model.params)([v])
    assert relative_error(flat(fd), exact) < 1e-6
    assert torch.equal(torch.get_rng_state(), state)  # the products leave the generator as they found it
    randomness = RandomState.capture()  # seed 11's state again
    model.closure()  # the base gradient, from the generator state captured just before
    base = [p.grad.clone() for p in model.params]
    for p in model.params:
        p.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (fd,) = forward_difference_hvp(model.closure, model.params, base, randomness=randomness)([v])
    assert relative_error(flat(fd), exact) < 1e-4  # forward differences: O(h) with h ~ sqrt(eps)


def test_forward_differences_without_the_base_gradients_randomness_warn_when_the_closure_draws_random_numbers():
    model = DropoutNet()
    v = random_vector(model.params, 3)
    model.closure()
    base = [p.grad.clone() for p in model.params]
    with pytest.warns(UserWarning, match="the closure draws random numbers.*randomness=RandomState.capture"):
        forward_difference_hvp(model.closure, model.params, base)([v])
    model.net.eval()  # no dropout: nothing to replay, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward_difference_hvp(model.closure, model.params, base)([v])


@pytest.mark.parametrize("hvp", ["finite_difference", "forward_difference"])
def test_xsam_eigenvalue_with_dropout_in_train_mode_is_the_one_of_the_first_pass_mask(hvp):
    """No model= (the HVPs run in train mode): the refresh sees the mask of the step's first pass."""
    model = DropoutNet()
    eigenvalues = torch.linalg.eigvalsh(model.hessian(seed=5))
    top = eigenvalues[eigenvalues.abs().argmax()]
    opt = XSAM(model.params, torch.optim.SGD, lr=0.0, hvp=hvp, power_iters=150, eig_interval=1)
    torch.manual_seed(5)
    opt.step(model.closure)
    torch.testing.assert_close(torch.tensor(opt.diagnostics()["eigenvalue"], dtype=torch.float64), top,
                               rtol=1e-4, atol=0)
    after_step = torch.get_rng_state()
    torch.manual_seed(5)
    model.closure(), model.closure()  # the step's two passes alone
    assert torch.equal(after_step, torch.get_rng_state())  # the refresh drew no random numbers of its own
