"""Checkpoints through torch.distributed.checkpoint (DCP), single process.

The oracle is the uninterrupted run: a run saved after n steps and resumed in a freshly built
model and optimizer must continue bit for bit (weights, eigenvector, step counter). The
2-process FSDP2 round trip is in test_fsdp.py.
"""
import copy
import functools
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)

from xsam import SAM, XSAM

import helpers
from helpers import regression_batches

N = 3  # steps before and after the checkpoint
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


make_model = functools.partial(helpers.make_model, 4, 5, 2)


def make_optimizer(kind, model, base="sgd"):
    # Adam's per-parameter "step" and SGD's momentum buffers are both state the load must carry.
    base_optimizer, base_kwargs = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.5)),
                                   "adam": (torch.optim.Adam, dict(lr=0.01))}[base]
    if kind == "sam":
        return SAM(model.parameters(), base_optimizer, rho=0.05, **base_kwargs)
    return XSAM(model.parameters(), base_optimizer, rho=0.05, alpha=0.5, eig_interval=2, power_iters=2,
                hvp="finite_difference", **base_kwargs)


def train(model, opt, steps, start=0):
    helpers.train(model, opt, regression_batches(range(start, start + steps), 100, 6, 4, 2))


def same_run(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert opt_a.diagnostics() == opt_b.diagnostics()
    if isinstance(opt_a, XSAM):
        assert all(torch.equal(p, q) for p, q in zip(opt_a.eigenvector(), opt_b.eigenvector()))


def uninterrupted(kind, base="sgd", steps=2 * N):
    model = make_model()
    opt = make_optimizer(kind, model, base)
    train(model, opt, steps)
    return model, opt


def dcp_round_trip(model, opt, kind, base, tmp_path, seed):
    """``dcp.save`` of (model, opt), then ``dcp.load`` into a freshly built pair (initialised with ``seed``)."""
    model_sd, optim_sd = get_state_dict(model, opt)
    assert set(optim_sd["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # keyed by parameter names
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    model2 = make_model(seed=seed)
    opt2 = make_optimizer(kind, model2, base)
    model_sd, optim_sd = get_state_dict(model2, opt2)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return model2, opt2


KINDS = ["sam", "xsam"]


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("kind", KINDS)
def test_dcp_save_and_load_into_a_fresh_optimizer_resume_bit_identically(kind, base, tmp_path):
    """The DCP recipe (get_state_dict, dcp.save, dcp.load, set_state_dict): dcp.load fills, in place, the
    state_dict of a freshly built model and optimizer.

    That state_dict must already have every entry the checkpoint has, or DCP leaves it out
    silently: the eigenvector, the refresh record and the base optimizer's state.
    """
    model2, opt2 = dcp_round_trip(*uninterrupted(kind, base, steps=N), kind, base, tmp_path, seed=1)
    assert opt2.diagnostics()["step"] == N
    assert opt2.base_optimizer.state  # momentum buffers / Adam moments arrived
    train(model2, opt2, N, start=N)
    same_run(uninterrupted(kind, base), (model2, opt2))


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_of_a_fresh_optimizer_loads_as_fresh(kind, tmp_path):
    """Before the first step the entries are placeholders; loading drops them (Adam's step count, the
    eigenvector), so the loaded optimizer then trains exactly like a fresh one."""
    model = make_model()
    opt = make_optimizer(kind, model, "adam")
    model2, opt2 = dcp_round_trip(model, opt, kind, "adam", tmp_path, seed=0)
    assert not opt.base_optimizer.state  # taking the state_dict did not step the base optimizer
    assert not opt2.base_optimizer.state and not any(opt2.state[p] for p in model2.parameters())
    train(model2, opt2, N)
    same_run(uninterrupted(kind, "adam", steps=N), (model2, opt2))


def leaves(tree, prefix=()):
    """(path, type, shape, dtype) of every leaf of a state_dict: what DCP matches a template against."""
    if isinstance(tree, (dict, list)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return sorted((leaf for k, v in items for leaf in leaves(v, prefix + (str(k),))), key=str)
    if isinstance(tree, torch.Tensor):
        return [(prefix, "tensor", tuple(tree.shape), tree.dtype)]
    return [(prefix, type(tree).__name__)]


@pytest.mark.parametrize("kind", KINDS)
def test_the_state_dict_has_the_same_entries_from_construction_on(kind):
    model = make_model()
    opt = make_optimizer(kind, model)
    fresh = opt.state_dict()
    assert all(isinstance(k, int) for k in fresh["state"])  # DCP maps positions to names, nothing else
    assert fresh["state"][0]["xsam"]["kind"] == opt.KIND and fresh["state"][0]["xsam"]["step"] == 0
    train(model, opt, N)
    trained = opt.state_dict()
    assert leaves(fresh["state"]) == leaves(trained["state"])
    assert trained["state"][0]["xsam"]["step"] == N


def test_a_checkpoint_in_the_earlier_layout_still_loads():
    model, opt = uninterrupted("xsam", steps=N)
    own = torch.optim.Optimizer.state_dict(opt)  # the wrapper's own state, with the global entry under "xsam"
    earlier = {"state": own["state"], "param_groups": own["param_groups"],
               "base_optimizer": opt.base_optimizer.state_dict()}
    assert "xsam" in earlier["state"]
    model2 = make_model()
    model2.load_state_dict(model.state_dict())
    opt2 = make_optimizer("xsam", model2)
    opt2.load_state_dict(copy.deepcopy(earlier))
    train(model2, opt2, N, start=N)
    same_run(uninterrupted("xsam"), (model2, opt2))


def test_dcps_flattened_layout_is_refused_when_saving():
    """flatten_optimizer_state_dict=True would rebuild the entries from the live optimizer's own keys,
    which do not hold the base optimizer's state: torch refuses the string kind before anything is saved."""
    model, opt = uninterrupted("xsam", steps=1)
    with pytest.raises(NotImplementedError, match="only supports tensor, int, float, dict"):
        get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))


def test_a_base_optimizer_that_cannot_be_copied_warns_that_its_placeholders_are_missing():
    class Opaque(torch.optim.SGD):
        def __deepcopy__(self, memo):
            raise TypeError("not copyable")

    model = make_model()
    opt = SAM(model.parameters(), Opaque, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="could not build placeholders for Opaque's state"):
        sd = opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2 = SAM(make_model().parameters(), Opaque, lr=0.1, momentum=0.9)
        opt2.load_state_dict(sd)


def test_set_optimizer_state_dict_refuses_another_kind():
    model, opt = uninterrupted("xsam", steps=1)
    saved = get_optimizer_state_dict(model, opt)
    sam = make_optimizer("sam", model)
    with pytest.raises(ValueError, match="saved by XSAM, but this optimizer is SAM"):
        set_optimizer_state_dict(model, sam, saved)


def test_a_stateless_base_optimizer_is_copied_for_placeholders_once(monkeypatch):
    """SGD without momentum keeps no state: later checkpoints skip the throw-away copy, until a
    hyper-parameter that may create state changes."""
    import xsam.optim.checkpoint as checkpoint

    copies = []
    deepcopy = copy.deepcopy
    monkeypatch.setattr(checkpoint.copy, "deepcopy", lambda *a, **k: copies.append(1) or deepcopy(*a, **k))
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for lr in (0.1, 0.05):  # a scheduler's change of lr keeps the verdict
        opt.param_groups[0]["lr"] = lr
        assert not any(opt.state_dict()["state"][0].keys() - {"xsam"})
    assert len(copies) == 1
    opt.param_groups[0]["momentum"] = 0.9
    assert "momentum_buffer" in opt.state_dict()["state"][0] and len(copies) == 2


@pytest.mark.parametrize("corrupt", ["zero", "missing"])
def test_a_checkpoint_without_an_eigenvector_starts_over_with_a_warning(corrupt):
    model = make_model()
    opt = make_optimizer("xsam", model)
    train(model, opt, N)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        if corrupt == "zero":
            entry["eigenvector"].zero_()
        else:
            del entry["eigenvector"]
    resumed = make_model()
    fresh = make_optimizer("xsam", resumed)
    with pytest.warns(UserWarning, match="no eigenvector.*starts over"):
        fresh.load_state_dict(sd)
    assert fresh.eigenvector() is None and fresh.refresh_due  # the next step refreshes from a start vector
    train(resumed, fresh, 1, start=N)
    assert helpers.flat(fresh.eigenvector()).norm().item() == pytest.approx(1.0)
