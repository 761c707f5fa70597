"""Hyper-parameter checks: numpy scalars taken like Python numbers, values with no finite step refused,
process_group's type checked at construction. Every refusal leaves the weights and the state as they were."""
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


@pytest.mark.parametrize("name, value", [
    ("rho", True), ("alpha", np.True_), ("eig_interval", True), ("power_iters", np.True_), ("seed", False),
    ("seed", np.False_), ("eps", True), ("eig_interval", np.float64(2.0)), ("seed", np.int64(-1)),
])
def test_bools_and_wrong_kinds_of_numbers_are_still_refused(name, value):
    q = Quadratic()
    with pytest.raises(ValueError, match=f"{name}="):
        XSAM(q.params, torch.optim.SGD, lr=0.1, **{name: value})


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

