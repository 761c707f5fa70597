"""`xsam selftest` and the check before first use (backend="auto"): both pass on this machine's kernels,
and both catch a broken kernel, injected by replacing a backend function (one ulp off on the last element,
or the last chunk skipped)."""
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from xsam import ops
from xsam.cli import auto_check_lines, main
from xsam.ops import dispatch, native_backend, reference, verify
from xsam.ops.contract import OPS
from xsam.ops.verify.cases import native_cuda_tensors_per_launch, size_cases
from xsam.selftest import trained_parameters

NATIVE_WHY = dispatch.unavailable_reason("native", torch.device("cpu"), torch.float32)
needs_native = pytest.mark.skipif(NATIVE_WHY is not None, reason=f"native backend unavailable: {NATIVE_WHY}")


@pytest.fixture(autouse=True)
def fresh_checks():
    """Every test starts and ends with no resolved backend and no check outcome."""
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _one_ulp_off_on_the_last_element(real):
    def perturb_(**args):
        real(**args)
        last = args["params"][-1].view(-1)[-1:]
        last.copy_(torch.nextafter(last, torch.full_like(last, float("inf"))))
    return perturb_


def _skipping_the_last_chunk(real):
    def perturb_(**args):
        old = [t.clone() for t in args["params"]]
        real(**args)
        for t, before in zip(args["params"], old):
            chunk = native_backend.CONSTANTS.chunk(t.device.type)
            if t.numel() > chunk:
                start = (t.numel() - 1) // chunk * chunk
                t.view(-1)[start:].copy_(before.view(-1)[start:])
    return perturb_


def _wrong_only_on_several_threads(real):
    """One ulp off where the CPU kernels run their items in parallel (the threshold read from xsam._C)."""
    off = _one_ulp_off_on_the_last_element(real)

    def perturb_(**args):
        total = sum(t.numel() for t in args["params"])
        parallel = args["params"][0].device.type == "cpu" and total >= native_backend.CONSTANTS.cpu_parallel_elements
        return off(**args) if parallel else real(**args)
    return perturb_


def _wrong_only_on_more_than_four_tensors(real):
    off = _one_ulp_off_on_the_last_element(real)
    return lambda **args: off(**args) if len(args["params"]) > 4 else real(**args)


BREAKAGES = [_one_ulp_off_on_the_last_element, _skipping_the_last_chunk]
# Caught by `xsam selftest` and by the check before first use alike; the CPU threads only on the CPU.
HIDDEN_BREAKAGES = [_wrong_only_on_several_threads, _wrong_only_on_more_than_four_tensors]
BROKEN_ON = [(breakage, "cpu") for breakage in BREAKAGES + HIDDEN_BREAKAGES] + [
    pytest.param(breakage, "cuda", marks=pytest.mark.cuda) for breakage in BREAKAGES]


def _break_perturb(monkeypatch, breakage):
    monkeypatch.setattr(native_backend, "perturb_", breakage(native_backend.perturb_))
    dispatch.clear_cache()


# ---------------------------------------------------------------- the self-test on this machine

@needs_native
def test_the_size_cases_cross_the_limits_of_the_cpu_and_cuda_kernels():
    """CPU cases past xsam._C's parallel threshold (one tensor spanning several items), checks of over a dozen
    tensors, GPU cases past every op's launch limit (read from the CUDA header), a multi-chunk tensor closing one."""
    constants = native_backend.CONSTANTS
    threads = size_cases("native", "cpu")["threads"]
    total = sum(math.prod(s) for s in threads)
    assert total >= (constants.cpu_min_parallel_items - 1) * constants.cpu_chunk + 1
    assert max(math.prod(s) for s in threads) > constants.cpu_chunk
    check = verify.quick_cases("native", torch.device("cpu"), torch.float32)
    assert {c.op for c in check} == set(OPS)
    for case in check:
        assert sum(math.prod(s) for s in case.shapes) > total and len(case.shapes) > 12
    header = (Path(__file__).parents[1] / "csrc" / "cuda" / "multi_tensor_apply.cuh").read_text()
    documented = re.search(r"32 KiB: (\d+), (\d+), (\d+), (\d+)", header).groups()
    assert [native_cuda_tensors_per_launch(n) for n in range(1, 5)] == [int(d) for d in documented]
    assert "constexpr int kKernelParamBytes = 32764;" in header and "constexpr int kOtherParamBytes = 256;" in header
    launches = size_cases("native", "cuda")["launches"]
    closing = native_cuda_tensors_per_launch(4) - 1
    assert launches[closing][0] > 2 * constants.cuda_chunk
    assert len(launches) > native_cuda_tensors_per_launch(1)


def test_selftest_passes_on_the_cpu(capsys):
    assert main(["selftest", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "selftest passed" in out and "FAIL" not in out
    for op in OPS:
        for dtype in ("float32", "float64", "mixed"):
            assert f"\n{op:<17} native   cpu       {dtype:<9} " in out
    for method in ("SAM", "ASAM", "X-SAM"):
        assert f"\n{method:<17} native   cpu       float32 " in out


def test_selftest_of_a_backend_that_cannot_run_here_is_skipped_not_failed(capsys):
    # Triton runs on the CPU only in its interpreter, which the self-test uses only when asked.
    assert main(["selftest", "--device", "cpu", "--backends", "triton"]) == 5
    out = capsys.readouterr().out
    assert "triton on cpu: not checked: " in out and "--triton-interpreter" in out
    assert "selftest skipped: triton cannot run here (see above), so nothing was checked (exit code 5)" in out
    assert "FAIL" not in out


@needs_native
@pytest.mark.parametrize("breakage", [_one_ulp_off_on_the_last_element] + HIDDEN_BREAKAGES)
def test_selftest_fails_the_broken_op_and_only_it(breakage, monkeypatch, capsys):
    _break_perturb(monkeypatch, breakage)
    assert main(["selftest", "--device", "cpu", "--quick", "--dtypes", "float64"]) == 1
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    failed = [line.split()[0] for line in table if line.rstrip().endswith("FAIL")]
    assert failed == ["perturb_"], out
    assert "FAIL perturb_ on native, cpu, float64: " in out and "selftest FAILED" in out
    assert "no difference is allowed (exact values)" in out


@needs_native
def test_selftest_reports_an_op_it_has_no_case_for(monkeypatch, capsys):
    assert verify.missing_recipes() == []
    monkeypatch.delitem(verify.RECIPES, "scale_copy_")  # as for a new op that nobody wrote a case for
    assert verify.missing_recipes() == ["scale_copy_"]
    assert main(["selftest", "--device", "cpu", "--quick", "--dtypes", "float64", "--backends", "native"]) == 1
    out = capsys.readouterr().out
    assert "\nscale_copy_       native   cpu       float64       0          -          -  NO CASE" in out, out
    assert "FAIL scale_copy_ on native, cpu, float64: the self-test has no case for this op" in out


@pytest.mark.cuda
def test_selftest_passes_on_the_gpu(capsys):
    assert main(["selftest", "--device", "cuda", "--quick", "--dtypes", "float32,bfloat16"]) == 0
    out = capsys.readouterr().out
    checked = [backend for backend in ("native", "triton")
               if dispatch.unavailable_reason(backend, torch.device("cuda"), torch.float32) is None]
    assert checked, out  # a GPU without any fused backend is a broken installation
    for backend in checked:
        for dtype in ("float32", "bfloat16"):
            assert re.search(rf"\nperturb_ +{backend} +cuda:0 +{dtype} +[1-9]\d* .* PASS\n", out), out


@pytest.mark.slow
def test_selftest_runs_triton_in_its_interpreter(capsys):
    assert main(["selftest", "--quick", "--backends", "triton", "--dtypes", "float32", "--triton-interpreter"]) == 0
    assert "\nperturb_          triton   cpu       float32 " in capsys.readouterr().out


# ---------------------------------------------------------------- the check before first use

@needs_native
def test_the_check_passes_and_is_cached_once_per_device_and_dtype():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) is native_backend
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) is native_backend
    found = verify.outcomes()
    assert list(found) == [("native", torch.device("cpu"), torch.float32)]
    assert found[("native", torch.device("cpu"), torch.float32)].status == "passed"
    lines = "\n".join(auto_check_lines())
    assert "cpu     float32   native: checked ok" in lines and "bfloat16  native: checked ok" in lines


@needs_native
@pytest.mark.parametrize("breakage, device", BROKEN_ON)
def test_a_broken_kernel_is_caught_warned_once_and_auto_trains_like_the_reference(breakage, device, monkeypatch):
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    _break_perturb(monkeypatch, breakage)
    with pytest.warns(verify.KernelCheckWarning) as caught:
        assert dispatch.resolve("auto", device, torch.float32) is reference
    message = str(caught[0].message)
    assert len(caught) == 1
    for part in ("native kernels gave wrong results for torch.float32", "uses the reference", "perturb_",
                 "differs by", verify.REPORT_TO, "xsam selftest", verify.SKIP_ENV):
        assert part in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: no second warning
        assert dispatch.resolve("auto", device, torch.float32) is reference
    assert verify.outcomes()[("native", device, torch.float32)].status == "failed"
    if device.type == "cpu":
        with pytest.warns(verify.KernelCheckWarning):  # `xsam info` checks the other dtypes too
            lines = auto_check_lines()
        assert "cpu     float32   reference: native failed its check, fell back (perturb_ " in "\n".join(lines)

    wide = native_backend.CONSTANTS.chunk(device.type) + 5  # perturb_ writes more than one chunk
    got, want = (trained_parameters("X-SAM", backend, device, torch.float32, wide, seed=0)
                 for backend in ("auto", "reference"))
    assert torch.equal(got, want)


@needs_native
def test_a_named_backend_is_not_checked(monkeypatch):
    _break_perturb(monkeypatch, _one_ulp_off_on_the_last_element)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("native", torch.device("cpu"), torch.float32) is native_backend
    assert verify.outcomes() == {}


@needs_native
@pytest.mark.parametrize("value", ["1", "true", "Yes", " on "])
def test_the_environment_variable_turns_the_check_off(monkeypatch, value):
    _break_perturb(monkeypatch, _one_ulp_off_on_the_last_element)
    monkeypatch.setenv(verify.SKIP_ENV, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) is native_backend
    assert verify.outcomes()[("native", torch.device("cpu"), torch.float32)].status == "skipped"
    assert any(f"native: not checked ({verify.SKIP_ENV}={value.strip()})" in line for line in auto_check_lines())


@needs_native
@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", "OFF", "disabled", "none"])
def test_false_values_of_the_environment_variable_keep_the_check(monkeypatch, value):
    _break_perturb(monkeypatch, _one_ulp_off_on_the_last_element)
    monkeypatch.setenv(verify.SKIP_ENV, value)
    with pytest.warns(verify.KernelCheckWarning, match="perturb_"):
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) is reference
    assert verify.outcomes()[("native", torch.device("cpu"), torch.float32)].status == "failed"


@needs_native
@pytest.mark.parametrize("value", ["skip", "2", "enabled"])
def test_an_unclear_value_of_the_environment_variable_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv(verify.SKIP_ENV, value)
    with pytest.raises(ValueError, match=rf"XSAM_SKIP_KERNEL_CHECK='{value}' is neither true nor false: set it to 1"):
        dispatch.resolve("auto", torch.device("cpu"), torch.float32)
    assert verify.outcomes() == {}


@needs_native
def test_a_kernel_that_raises_fails_its_check(monkeypatch):
    def dots(**args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(native_backend, "dots", dots)
    dispatch.clear_cache()
    with pytest.warns(verify.KernelCheckWarning, match="raised RuntimeError: CUDA error: no kernel image"):
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float64) is reference


@needs_native
def test_the_check_runs_eagerly_when_first_reached_inside_torch_compile():
    def fused(params, grads, saved):
        sums = ops.dots([grads], [(0, 0)])
        ops.perturb_(params, grads, saved, 0.05 / (sums[0].sqrt() + 1e-12))
        return sums

    def data():
        gen = torch.Generator().manual_seed(0)
        return [[torch.randn(s, generator=gen) for s in ((3, 4), (5,))] for _ in range(2)]

    (pe, ge), (pc, gc) = data(), data()
    se, sc = [torch.empty_like(p) for p in pe], [torch.empty_like(p) for p in pc]
    want = fused(pe, ge, se)
    dispatch.clear_cache()
    got = torch.compile(fused, backend="eager")(pc, gc, sc)
    assert verify.outcomes()[("native", torch.device("cpu"), torch.float32)].status == "passed"
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(pc + sc, pe + se))
