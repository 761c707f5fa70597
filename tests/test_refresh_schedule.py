"""The adaptive refresh schedule (``eig_interval_max``): the interval doubles while successive
refreshes agree and falls back when v moves, decided a refresh late; resumes bit-exactly."""
import pytest
import torch

import xsam

from helpers import closure_of

EIGENVALUES = [10.0, 2.0, 1.0, 0.5, 0.2, 0.1]  # a wide gap: five power iterations converge


def rotation(angle: float, n: int) -> torch.Tensor:
    """Rotates the plane of the first two coordinates by ``angle``."""
    r = torch.eye(n, dtype=torch.float64)
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    r[0, 0], r[0, 1], r[1, 0], r[1, 1] = c, -s, s, c
    return r


class MovingQuadratic:
    """0.5 w^T A w with A = Q D Q^T; from step ``switch`` on, Q is turned by 60 degrees."""

    def __init__(self, switch: int | None = None):
        gen = torch.Generator().manual_seed(0)
        n = len(EIGENVALUES)
        self.q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        self.d = torch.diag(torch.tensor(EIGENVALUES, dtype=torch.float64))
        self.switch = switch
        self.w = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
        self.step = 0

    def q_now(self) -> torch.Tensor:
        moved = self.switch is not None and self.step >= self.switch
        return self.q @ rotation(torch.pi / 3, len(EIGENVALUES)) if moved else self.q

    def loss(self) -> torch.Tensor:
        q = self.q_now()
        return 0.5 * self.w @ (q @ self.d @ q.T) @ self.w


def run(problem: MovingQuadratic, opt, steps: range) -> list[int]:
    refreshed = []
    for step in steps:
        problem.step = step
        if opt.refresh_due:
            refreshed.append(step)
        opt.step(closure_of(problem.loss), loss_fn=problem.loss)
    return refreshed


def make(problem: MovingQuadratic, eig_interval=2, eig_interval_max=8):
    return xsam.XSAM([problem.w], torch.optim.SGD, lr=0.01, rho=0.01, hvp="exact", eig_interval=eig_interval,
                     eig_interval_max=eig_interval_max)


@pytest.mark.parametrize("switch, steps, refreshes", [
    # Refresh 0 has no predecessor; refresh 1 (step 2) agrees with it, which lengthens the interval
    # from refresh 2 on (a refresh late): 2, 2, 4, 8, 8, ... up to the maximum.
    (None, 40, [0, 2, 4, 8, 16, 24, 32]),
    # The refresh at 16 sees the turned Hessian (v moves: no agreement); the schedule reads that
    # at the next refresh (24), which returns to every 2 steps, then doubles again.
    (12, 48, [0, 2, 4, 8, 16, 24, 26, 30, 38, 46]),
])
def test_the_interval_doubles_while_refreshes_agree_and_falls_back_when_v_moves(switch, steps, refreshes):
    problem = MovingQuadratic(switch=switch)
    opt = make(problem)
    assert run(problem, opt, range(steps)) == refreshes
    top = problem.q_now()[:, 0]  # and v follows the Hessian of the last steps
    (v,) = opt.eigenvector()
    assert abs(float(v @ top) / float(v.norm())) > 1 - 1e-6


def test_a_fixed_schedule_without_a_maximum():
    problem = MovingQuadratic(switch=12)
    opt = make(problem, eig_interval=3, eig_interval_max=None)
    assert run(problem, opt, range(20)) == list(range(0, 20, 3))


def test_an_adaptive_schedule_resumes_bit_exactly():
    whole = MovingQuadratic(switch=12)
    opt = make(whole)
    expected = run(whole, opt, range(40))

    first = MovingQuadratic(switch=12)
    opt = make(first)
    before = run(first, opt, range(20))
    saved = opt.state_dict()
    resumed = MovingQuadratic(switch=12)
    resumed.w.data.copy_(first.w.data)
    opt = make(resumed)
    opt.load_state_dict(saved)
    assert before + run(resumed, opt, range(20, 40)) == expected
    assert torch.equal(resumed.w, whole.w)
