"""Hyper-parameter checks: numpy scalars taken like Python numbers, values with no finite step refused,
process_group's type checked at construction, every bad argument a clear error. Every refusal leaves the weights
and the state as they were."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from xsam import SAM, XSAM, EigenSAM
from xsam.optim.validation import FLOAT32_MAX

from helpers import Quadratic, flat, free_port, gloo_group, through_torch_save

PYTHON = dict(rho=0.05, alpha=0.5, eig_interval=2, power_iters=3, eig_tol=1e-3, seed=7, eps=1e-10,
              max_grad_norm=2.0)
NUMPY = dict(rho=np.float32(0.05), alpha=np.float64(0.5), eig_interval=np.int64(2), power_iters=np.int32(3),
             eig_tol=np.float16(1e-3), seed=np.uint64(7), eps=np.float32(1e-10), max_grad_norm=np.int8(2))


def step(q, opt):
    opt.step(q.closure) if isinstance(opt, SAM) else opt.step(q.closure, loss_fn=q.loss)


def run(cls, settings, steps=3):
    q = Quadratic()
    opt = cls(q.params, torch.optim.SGD, lr=0.1, momentum=0.9, **settings)
    for _ in range(steps):
        step(q, opt)
    return q, opt


@pytest.mark.parametrize("cls, keys", [
    (XSAM, tuple(PYTHON)), (EigenSAM, tuple(PYTHON)),
    (SAM, ("rho", "eps", "max_grad_norm")),
])
def test_numpy_scalars_give_the_steps_of_the_same_python_numbers_and_a_loadable_checkpoint(cls, keys):
    # The oracle: the same values as Python numbers (np.float32(0.05) is not 0.05, so they are converted first).
    q, opt = run(cls, {k: NUMPY[k] for k in keys})
    oracle_q, oracle = run(cls, {k: NUMPY[k].item() for k in keys})
    assert torch.equal(flat(q.params), flat(oracle_q.params))
    # A numpy value a scheduler sets between steps, too.
    opt.param_groups[0]["rho"] = np.float64(0.125)
    oracle.param_groups[0]["rho"] = 0.125
    step(q, opt)
    step(oracle_q, oracle)
    assert torch.equal(flat(q.params), flat(oracle_q.params))
    for group in opt.param_groups:
        assert all(type(group[k]) is float for k in ("rho", "alpha") if k in group)
    state = through_torch_save(opt.state_dict())  # numpy scalars in param_groups would fail weights_only=True
    assert state["param_groups"] == oracle.state_dict()["param_groups"]


@pytest.mark.parametrize("cls, kwargs, name", [
    (XSAM, {"rho": -0.1}, "rho"), (XSAM, {"alpha": 2.5}, "alpha"), (XSAM, {"alpha": -1}, "alpha"),
    (XSAM, {"eig_interval": 0}, "eig_interval"), (XSAM, {"power_iters": 0}, "power_iters"),
    (XSAM, {"correction": "flip"}, "correction"), (XSAM, {"hvp": "jvp"}, "hvp"), (XSAM, {"backend": "cuda"}, "backend"),
    (XSAM, {"eig_tol": 0}, "eig_tol"), (XSAM, {"base_optimizer": "SGD"}, "base_optimizer"),
    (XSAM, {"eig_interval": 5, "eig_interval_max": 4}, "eig_interval_max=4 is below eig_interval=5"),
    (XSAM, {"eig_interval_max": 0}, "eig_interval_max"),
    (XSAM, {"eig_interval_max": 10, "hvp": "streaming"}, "no effect with hvp='streaming'"),
    (XSAM, dict(rho=math.inf), "rho=inf"), (XSAM, dict(eps=math.inf), "eps=inf"), (XSAM, dict(eps=0.0), "eps=0.0"),
    (SAM, dict(eps=0.0), "eps=0"), (XSAM, dict(hvp_eval_mode="yes"), "hvp_eval_mode='yes'"),
    (XSAM, dict(seed=2 ** 70), "seed="), (XSAM, dict(max_grad_norm=0.0), "max_grad_norm=0.0"),
    (SAM, {"base_optimizer": torch.optim.LBFGS}, "LBFGS"),
    (XSAM, {"base_optimizer": torch.optim.Adam, "eps": 1e-6}, "eps=1e-06 is ambiguous"),
    (SAM, {"alpha": 0.2}, "alpha=0.2 is not an argument of SAM nor of its base optimizer SGD. "
                          "It is an argument of XSAM"),
    (EigenSAM, {"alpha": -0.1}, "alpha"), (EigenSAM, {"rho": -1.0}, "rho"),
    (EigenSAM, {"eig_interval": 0}, "eig_interval"),
    (EigenSAM, {"hvp": "jvp"}, r"^(?!.*streaming)hvp='jvp' is not .*'finite_difference'"),  # offers no streaming
    (EigenSAM, {"adaptive": True}, "It is an argument of (XSAM and SAM|SAM and XSAM), not of EigenSAM"),
    (EigenSAM, {"correction": "signed"}, "argument of XSAM, not of EigenSAM"),
    # bools and numbers of the wrong kind, numpy's included
    (XSAM, {"rho": True}, "rho="), (XSAM, {"alpha": np.True_}, "alpha="), (XSAM, {"eps": True}, "eps="),
    (XSAM, {"eig_interval": True}, "eig_interval="), (XSAM, {"eig_interval": np.float64(2.0)}, "eig_interval="),
    (XSAM, {"power_iters": np.True_}, "power_iters="), (XSAM, {"seed": False}, "seed="),
    (XSAM, {"seed": np.False_}, "seed="), (XSAM, {"seed": np.int64(-1)}, "seed="),
])
def test_bad_arguments_are_clear_errors(cls, kwargs, name):
    q = Quadratic()
    before = flat(q.params)
    kwargs = dict(kwargs)
    base = kwargs.pop("base_optimizer", torch.optim.SGD)
    with pytest.raises(ValueError, match=name):
        cls(q.params, base, lr=0.1, **kwargs)
    assert torch.equal(flat(q.params), before)


@pytest.mark.parametrize("cls", [SAM, XSAM, EigenSAM])
@pytest.mark.parametrize("name, value, why", [
    ("rho", 1e300, "NaN weights"), ("rho", np.float64(1e39), "NaN weights"),
    pytest.param("rho", 10 ** 400, "NaN weights", id="rho-int-beyond-float64"), ("eps", 1e300, "exactly zero"),
])
def test_values_beyond_float32_are_refused_saying_the_bound_and_why(cls, name, value, why):
    q = Quadratic()
    with pytest.raises(ValueError, match=rf"{name}=.* is invalid: {name} must be a finite number in .*"
                                         rf"3\.40282e\+38\]\..*float32.*{why}"):
        cls(q.params, torch.optim.SGD, lr=0.1, **{name: value})


def test_the_bound_is_float32s_largest_value_and_is_itself_accepted():
    assert FLOAT32_MAX == torch.finfo(torch.float32).max
    assert torch.isinf(torch.tensor(FLOAT32_MAX * (1 + 1e-7), dtype=torch.float32))  # what a larger rho becomes
    q = Quadratic()
    XSAM(q.params, torch.optim.SGD, lr=0.1, rho=FLOAT32_MAX, eps=FLOAT32_MAX)


@pytest.mark.parametrize("group", [5, [0, 1], object(), 0.5, torch.tensor(0)])
@pytest.mark.parametrize("cls", [SAM, XSAM])
def test_a_process_group_that_is_not_one_is_a_type_error_at_construction(cls, group):
    q = Quadratic()
    with pytest.raises(TypeError, match=r"process_group=.* \(type .*\) is not a torch.distributed ProcessGroup: pass "
                                        r"'auto'.*None.*torch.distributed.group.WORLD"):
        cls(q.params, torch.optim.SGD, lr=0.1, process_group=group)


def test_a_real_process_group_none_and_auto_are_accepted():
    q = Quadratic()
    for group in (None, "auto"):
        XSAM(q.params, torch.optim.SGD, lr=0.1, process_group=group)
    with gloo_group(f"tcp://127.0.0.1:{free_port()}", 0, 1):
        opt = XSAM(q.params, torch.optim.SGD, lr=0.1, process_group=dist.new_group([0]))
        opt.step(q.closure, loss_fn=q.loss)

