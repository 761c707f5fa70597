"""What only the compiled backend (xsam._C through torch.ops.xsam) has: its argument and overlap checks, thread-count
independence, fast entries, whole X-SAM runs, and its reasons when it cannot run (results: tests/test_op_*.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from xsam import ops
from xsam.ops import native_backend as native
from xsam.ops.contract import OPS

from helpers import assert_each_close
from op_cases import NATIVE_CHUNK, make, opcheck_cases, scalar, why_not, xsam_run

pytestmark = pytest.mark.skipif(
    bool(native.UNAVAILABLE_REASON), reason=f"xsam._C is not built: {native.UNAVAILABLE_REASON}")

CPU_CHUNK = NATIVE_CHUNK["cpu"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    why_not("native", "cuda") is not None, reason=str(why_not("native", "cuda")))])]


def test_mismatched_lists_raise_a_clear_error():
    x = make([(3,), (4,)], torch.float32, "cpu", 0)
    with pytest.raises(RuntimeError, match="aligned"):
        torch.ops.xsam.axpy_(x, x[:1], scalar(1.0, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.xsam.axpy_(x, x[::-1], scalar(1.0, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match=r"group the tensors by \(device, dtype\)"):
        torch.ops.xsam.axpy_(x, [t.double() for t in x], scalar(1.0, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="num_lists"):
        torch.ops.xsam.dots(x, 3, [0, 0])


def test_a_mismatch_among_many_tensors_is_found_and_named():
    # Long lists are checked on several threads; the message still names the first bad position.
    n = 600
    xs = [torch.randn(3) for _ in range(n)]
    s = scalar(1.0, torch.float32, "cpu")
    for bad, pattern in ((599, r"xs\[599\] has shape \[4\]"), (300, r"xs\[300\] is Double"),
                         (257, r"xs\[257\] must be dense")):
        ys = [torch.randn(3) for _ in range(n)]
        before = [y.clone() for y in ys]
        wrong = list(xs)
        wrong[bad] = {599: torch.randn(4), 300: torch.randn(3, dtype=torch.float64),
                      257: torch.randn(6)[::2]}[bad]
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.xsam.axpy_(ys, wrong, s)
        assert all(torch.equal(a, b) for a, b in zip(ys, before)), "a refused call must not write"
    torch.ops.xsam.axpy_(ys, xs, s)  # and the same lists, all well formed, pass
    torch.testing.assert_close(ys, [b + x for b, x in zip(before, xs)])


@pytest.mark.parametrize("n", [3, 300])  # serial, and with the checks on several threads
def test_copy_on_write_tensors_are_materialised_before_anything_is_written(n):
    base = [torch.randn(5) for _ in range(n)]
    ys = [torch._lazy_clone(b) for b in base]  # share base's storage until written
    xs = [torch._lazy_clone(b) for b in base]  # read only: may keep sharing it
    before = [b.clone() for b in base]
    torch.ops.xsam.axpy_(ys, ys, scalar(0.5, torch.float32, "cpu"))
    torch.ops.xsam.axpy_(ys, xs, scalar(1.0, torch.float32, "cpu"))
    assert all(torch.equal(b, b0) for b, b0 in zip(base, before)), "a lazy clone's source must not change"
    torch.testing.assert_close(ys, [2.5 * b for b in before])
    assert all(torch.equal(x, b) for x, b in zip(xs, before))


# --- written tensors that share memory --------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_written_tensors_that_share_memory_are_refused(device):
    s = scalar(0.5, torch.float32, device)
    y, x = make([(6,), (6,)], torch.float32, device, 0), make([(6,), (6,)], torch.float32, device, 1)
    before = [t.clone() for t in y]
    with pytest.raises(RuntimeError, match=r"ys\[1\] shares memory with ys\[0\].*clone the duplicate"):
        torch.ops.xsam.axpy_([y[0], y[0]], x, s)
    base = torch.zeros(20, device=device)
    with pytest.raises(RuntimeError, match=r"dsts\[1\] shares memory with dsts\[0\]"):
        torch.ops.xsam.scale_copy_([base[:12], base[8:]], [torch.ones(12, device=device)] * 2, s)
    w, g = make([(6,)], torch.float32, device, 2), make([(6,)], torch.float32, device, 3)
    with pytest.raises(RuntimeError, match=r"saved\[0\] shares memory with params\[0\]"):
        torch.ops.xsam.perturb_(w, g, w, s, False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] shares memory with params\[0\]"):
        torch.ops.xsam.correct_restore_(w, w, g, None, s, s)
    assert all(torch.equal(a, b) for a, b in zip(y, before)), "a refused call must not write"
    assert torch.equal(base, torch.zeros(20, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_a_checked_written_set_vouches_only_for_the_same_address_ranges(device):
    # Verdicts on written sets are remembered (a step reuses its lists): a new set with the same
    # count, the same first tensor and the same sizes, one of them overlapping, is still refused.
    s = scalar(0.5, torch.float32, device)
    base = torch.zeros(30, device=device)
    srcs = [torch.ones(10, device=device)] * 2
    for _ in range(2):
        torch.ops.xsam.scale_copy_([base[:10], base[10:20]], srcs, s)
        torch.ops.xsam.scale_copy_([base[:10], base[20:]], srcs, s)
    for overlapping in ([base[:10], base[9:19]], [base[:10], base[:10]], [base[10:20], base[:10], base[19:29]]):
        with pytest.raises(RuntimeError, match="shares memory with"):
            torch.ops.xsam.scale_copy_(overlapping, srcs + srcs[:1] if len(overlapping) == 3 else srcs, s)
    assert torch.equal(base, torch.full((30,), 0.5, device=device)), "a refused call must not write"


@pytest.mark.parametrize("device", DEVICES)
def test_written_lists_may_alias_read_lists_at_the_same_index_and_views_may_touch(device):
    s = scalar(0.5, torch.float32, device)
    y = make([(5,), (7,)], torch.float32, device, 0)
    want = [2.0 * t for t in y]
    torch.ops.xsam.scale_copy_(y, y, scalar(2.0, torch.float32, device))
    assert all(torch.equal(a, b) for a, b in zip(y, want))
    torch.ops.xsam.axpy_(y, y, s)  # y += 0.5 y
    torch.testing.assert_close(y, [1.5 * t for t in want])
    base = torch.zeros(20, device=device)
    torch.ops.xsam.axpy_(list(base.split(5)), [torch.ones(5, device=device)] * 4, s)  # adjacent, not overlapping
    assert torch.equal(base, torch.full((20,), 0.5, device=device))
    empty = torch.empty(0, device=device)
    torch.ops.xsam.axpy_([empty, empty], [empty, empty], s)  # empty tensors share nothing
    # Every element is read before any is written: grads aliasing saved still adds the old grads.
    w, gs = make([(9,)], torch.float32, device, 4), make([(9,)], torch.float32, device, 5)
    w0, g0 = w[0].clone(), gs[0].clone()
    torch.ops.xsam.perturb_(w, gs, gs, s, False)
    assert torch.equal(gs[0], w0)
    torch.testing.assert_close(w[0], w0 + 0.5 * g0)


# --- determinism ----------------------------------------------------------------------------

def _reductions(dtype):
    lists = [make([(3 * CPU_CHUNK + 5,), (CPU_CHUNK + 1,), (11,)] * 3, dtype, "cpu", seed) for seed in range(2)]
    return torch.cat([ops.dots(lists, [(0, 0), (0, 1)], backend="native").double(),
                      ops.weighted_sumsq(lists[0], lists[1], backend="native").double().reshape(1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions_are_bitwise_identical_for_1_and_2_threads(dtype):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _reductions(dtype)
        torch.set_num_threads(2)
        two = _reductions(dtype)
        again = _reductions(dtype)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(two, again)


def test_reductions_are_bitwise_identical_across_omp_num_threads():
    # A fresh process per setting, so OpenMP reads OMP_NUM_THREADS at start-up.
    code = textwrap.dedent("""
        import torch, xsam
        lists = [[torch.randn(n, generator=torch.Generator().manual_seed(s)) for n in (49157, 16385, 11)]
                 for s in range(2)]
        out = xsam.ops.dots(lists, [(0, 0), (0, 1), (1, 1)], backend="native")
        print(torch.get_num_threads(), out.numpy().tobytes().hex())
    """)
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        results.append(proc.stdout.split())
    assert [r[0] for r in results] == ["1", "2"]
    assert results[0][1] == results[1][1]


# --- the registered ops ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(opcheck_cases("cpu", torch.float32)))
def test_fast_entries_give_the_registered_ops_results(device, name):
    """xsam._C's eager entries (borrowed tensors, typed dispatcher call) against torch.ops.xsam."""
    from xsam import _C

    args = opcheck_cases(device, torch.float32)[name]
    op_name = "correct_restore_" if name.startswith("correct_restore_") else name
    tensor_list = lambda a: isinstance(a, list) and all(isinstance(t, torch.Tensor) for t in a)  # noqa: E731
    via_ops = [[t.clone() for t in a] if tensor_list(a) else a for a in args]
    via_fast = [tuple(t.clone() for t in a) if tensor_list(a) else a for a in args]  # tuples too
    out_ops = getattr(torch.ops.xsam, op_name)(*via_ops)
    out_fast = getattr(_C, op_name)(*via_fast)
    assert out_fast is None if out_ops is None else torch.equal(out_ops, out_fast)
    for a, b in zip(via_ops, via_fast):
        if tensor_list(a):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fast_entries_refuse_non_tensors_and_route_tensor_subclasses_through_the_dispatcher():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from xsam import _C

    with pytest.raises(TypeError, match=r"ys\[1\] is not a tensor"):
        _C.axpy_([torch.ones(2), 3.0], [torch.ones(2), torch.ones(2)], torch.ones(()))
    with pytest.raises(TypeError, match="must be a list of tensors"):
        _C.axpy_(torch.ones(2), [torch.ones(2)], torch.ones(()))
    with FakeTensorMode() as mode:  # a Python-key tensor: the full dispatcher path, i.e. the fake
        x = mode.from_tensor(torch.ones(5))
        out = _C.dots([x, x], 2, [0, 1])
    assert out.shape == (1,) and type(out).__name__ == "FakeTensor"


# --- through the optimizer --------------------------------------------------------------------

@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_xsam_steps_with_native_equal_reference(hvp, dtype):
    w_native, v_native, _ = xsam_run("native", hvp, dtype=dtype)
    w_ref, v_ref, _ = xsam_run("reference", hvp, dtype=dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    if hvp == "finite_difference" and dtype == torch.float32:
        tol = dict(rtol=2e-3, atol=2e-4)  # FD steps amplify last-bit differences of the reductions
    assert_each_close(w_native, w_ref, **tol)
    assert_each_close(v_native, v_ref, **tol)


# --- missing extension --------------------------------------------------------------------------

def test_without_the_extension_auto_warns_once_and_native_raises_with_the_import_error():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["xsam._C"] = None  # `import xsam._C` now fails as if the .so did not load
        import torch, xsam
        from xsam import ops
        from xsam.cli import info
        x = [torch.ones(3)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ops.dots([x], [(0, 0)]).item() == 3.0  # auto still works, on the reference
            assert ops.dots([x], [(0, 0)], layout=None).item() == 3.0
            ops.axpy_(x, x, 1.0, backend="auto")
        loads = [w for w in caught if issubclass(w.category, ops.BackendLoadWarning)]
        assert len(loads) == 1, [str(w.message) for w in caught]
        print("WARNING:", loads[0].message, "AT:", loads[0].filename)
        info()
        try:
            ops.dots([x], [(0, 0)], backend="native")
        except ops.BackendUnavailableError as exc:
            print("RAISED:", exc)
        else:
            raise SystemExit("backend='native' did not raise")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    warning = proc.stdout.split("WARNING:")[1].splitlines()[0]
    assert "the native backend failed to load" in warning and "xsam._C is not built or cannot be loaded" in warning
    assert "import of xsam._C halted; None in sys.modules" in warning  # the import error itself
    assert "AT: <string>" in warning  # points at the user's call
    rows = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    assert "auto cpu uses xsam.ops.reference (native failed to load: see above)" in rows, proc.stdout
    assert any(row.startswith("native cpu unavailable: the compiled extension xsam._C is not built") for row in rows)
    raised = proc.stdout.split("RAISED:")[1]
    assert "xsam._C is not built" in raised and "pip install --no-build-isolation" in raised


def test_every_op_of_the_contract_has_a_fast_entry_a_cpu_kernel_and_an_adapter():
    assert native.extension_gaps(native._C) is None
    for op in OPS:
        assert callable(getattr(native._C, op)) and native.has_kernel("cpu", op), op
        assert getattr(native, op).__name__ == op and getattr(native, op).__doc__ == OPS[op].doc


def test_an_extension_without_an_ops_fast_entry_is_unavailable_with_the_reason():
    stale = types.SimpleNamespace(**{op: getattr(native._C, op) for op in OPS if op != "scale_copy_"})
    why = native.extension_gaps(stale)
    assert why.startswith("xsam._C has no fast entry (csrc/module.cpp) for scale_copy_ "), why
    assert "pip install --no-build-isolation" in why


def test_availability_reasons():
    assert native.availability(torch.device("cpu"), torch.float32) is None
    assert "not supported" in native.availability(torch.device("cpu"), torch.int32)
    if not native.has_kernel("cuda"):
        assert "without CUDA" in native.availability(torch.device("cuda"), torch.float32)
