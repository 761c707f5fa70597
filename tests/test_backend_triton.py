"""What only the Triton backend has: plans, launch configurations, version counters, compilation for
GPUs, and whole X-SAM runs against the reference. The ops' results on every backend are checked
in tests/test_op_*.py.

On machines without a GPU the kernels run in Triton's interpreter (about 2 ms
per program), so the CPU cases use a tiny launch configuration (chunk 64,
block 16) that crosses every block and chunk boundary with a few hundred
elements. CUDA cases compile the kernels for real and use GPU-sized configs.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton; tests/conftest.py normally did it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

import xsam  # noqa: E402
from xsam import ops  # noqa: E402
from xsam.ops import reference as ref  # noqa: E402
from xsam.ops.dispatch import unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_WHY_NOT = unavailable_reason("triton", DEVICE, torch.float32)
if _WHY_NOT is not None:
    pytest.skip(f"the Triton backend cannot run here: {_WHY_NOT}", allow_module_level=True)

from xsam.kernels import multi_tensor as mt  # noqa: E402
from xsam.ops import triton_backend as tb  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CHUNK, BLOCK = 64, 16  # small: every boundary below costs only a few programs
SIZE_CASES = {
    "one": [197],  # a single odd tensor of several chunks
    "three": [0, 1, 7],
    "edges": [BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 0, 3 * CHUNK + 5],
    "many": [i % 5 for i in range(300)],  # 300 tiny tensors, empty ones included
}


@pytest.fixture(autouse=True)
def small_launches():
    if DEVICE.type == "cuda":
        yield  # the real GPU configuration
        return
    with mt.launch_config(chunk=CHUNK, block=BLOCK):
        yield


def make(sizes, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        shape = (n,) if n % 3 or n == 0 else (3, n // 3)  # some 2-d tensors too
        out.append((scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE))
    return out


def flat64(tensors):
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def clones(tensors):
    return [t.clone() for t in tensors]


def scalar(value, dtype):
    return torch.full((), value, dtype=ref.accumulation_dtype(dtype), device=DEVICE)


def assert_as_good_as_reference(got, want_ref, truth, dtype):
    """``got`` is at most ~2x as far from the float64 ``truth`` as the reference's own result."""
    got, want_ref = flat64(got) if isinstance(got, list) else got.double().cpu(), \
        flat64(want_ref) if isinstance(want_ref, list) else want_ref.double().cpu()
    truth = truth.double().cpu()
    assert got.shape == truth.shape
    if truth.numel() == 0:
        return
    err_got = (got - truth).abs().max().item()
    err_ref = (want_ref - truth).abs().max().item()
    # Half an ulp at the top; for float64 storage the float64 "truth" is itself rounded
    # (and may associate differently), so allow a few ulps there.
    ulps = 4.0 if dtype == torch.float64 else 0.5
    slack = ulps * torch.finfo(dtype).eps * truth.abs().max().item() + 1e-30
    assert err_got <= 2 * err_ref + slack, f"{dtype}: error {err_got:.3g} vs reference {err_ref:.3g}"


# ------------------------------------------------------------------------- structure

@pytest.mark.parametrize("m", [1, 2, 3])
def test_power_update_through_ops_splits_wide_reductions(m):
    """m = 3 needs 6 lists and 9 sums: more than one launch holds, so dots splits it."""
    dtype = torch.float32
    us = [make([7, CHUNK + 3], dtype, 20 + j) for j in range(m)]
    vs = [make([7, CHUNK + 3], dtype, 30 + j) for j in range(m)]
    lists = us + vs
    pairs = [p for j in range(m) for p in ((j, j), (m + j, j), (m + j, m + j))]
    got = ops.dots(lists, pairs, backend="triton")
    truth = torch.stack([flat64(lists[a]) @ flat64(lists[b]) for a, b in pairs])
    torch.testing.assert_close(got.double().cpu(), truth, rtol=1e-5, atol=1e-5)
    vs_t, vs_r = [clones(v) for v in vs], [clones(v) for v in vs]
    st = ops.power_update_(us, vs_t, backend="triton")
    sr = ops.power_update_(us, vs_r, backend="reference")
    for name in ("eigenvalues", "residuals", "norms"):
        torch.testing.assert_close(getattr(st, name), getattr(sr, name), rtol=1e-5, atol=1e-6)
    for a, b in zip(vs_t, vs_r):
        torch.testing.assert_close(flat64(a), flat64(b), rtol=1e-5, atol=1e-7)


def test_batches_cover_pairs_in_order_within_limits():
    pairs = [(i, (i + 1) % 7) for i in range(7)] + [(0, 0)] * 10
    batches = mt._batches(pairs)
    rebuilt = []
    for used, local, where in batches:
        assert len(set(used)) == len(used) <= mt.MAX_LISTS and len(local) <= mt.MAX_PAIRS
        rebuilt += [(used[a], used[b]) for a, b in local]
    assert rebuilt == pairs
    assert [k for _, _, where in batches for k in where] == list(range(len(pairs)))


def test_elementwise_is_deterministic():
    w, g = make([1000, 3], torch.bfloat16, 43), make([1000, 3], torch.bfloat16, 44)
    results = []
    for _ in range(2):
        w_t, saved = clones(w), [torch.empty_like(t) for t in w]
        ops.perturb_(w_t, g, saved, scalar(0.1, torch.bfloat16), adaptive=True, backend="triton")
        results.append(w_t)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_misaligned_lists_raise_a_clear_error():
    a = make([7, 8], torch.float32, 49)
    b = make([7, 9], torch.float32, 50)
    with pytest.raises(ValueError, match="aligned"):
        mt.axpy_(a, b, scalar(1.0, torch.float32))
    with pytest.raises(ValueError, match="aligned"):
        mt.dots([a, b[:1]], [(0, 1)])


def test_in_place_writes_bump_autograd_versions():
    w = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(2)]
    g, saved = clones([t.detach() for t in w]), [torch.empty(5, device=DEVICE) for _ in w]
    before = [t._version for t in w]
    with torch.no_grad():
        ops.perturb_(w, g, saved, scalar(0.1, torch.float32), backend="triton")
    assert all(t._version > v for t, v in zip(w, before))
    # a forward that saved w now refuses to backward through the stale value
    x = w[0] * w[0]
    with torch.no_grad():
        ops.axpy_([w[0]], [g[0]], scalar(1.0, torch.float32), backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.sum().backward()


def test_plan_cache_is_reused_and_keyed_on_storage():
    mt.clear_plan_cache()
    x = make([CHUNK + 1, 3], torch.float32, 51)
    ops.dots([x], [(0, 0)], backend="triton")
    ops.dots([x], [(0, 0)], backend="triton")
    assert mt.plan_cache_info()["entries"] == 1
    # same data_ptr, different size: must get its own plan, never the stale table
    buf = torch.arange(40, dtype=torch.float32, device=DEVICE)
    short, long = buf[:10], buf[:30]
    assert short.data_ptr() == long.data_ptr()
    assert ops.dots([[short]], [(0, 0)], backend="triton").item() == sum(i * i for i in range(10))
    assert ops.dots([[long]], [(0, 0)], backend="triton").item() == sum(i * i for i in range(30))


def test_alignment_promise_only_when_every_address_is_aligned():
    buf = torch.zeros(64, dtype=torch.float32, device=DEVICE)
    aligned = mt._plan([[buf[:9], buf[16:20]]], CHUNK)
    assert aligned.vec == 4  # 16 bytes of float32
    shifted = mt._plan([[buf[:9], buf[1:5]]], CHUNK)  # 4-byte offset: no 128-bit promise
    assert shifted.vec == 1
    buf[1:5] = torch.arange(1.0, 5.0)
    assert ops.dots([[buf[1:5]]], [(0, 0)], backend="triton").item() == 30.0


def test_launch_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        with mt.launch_config(chunk=100):
            pass
    with pytest.raises(ValueError, match="smaller than block"):
        with mt.launch_config(chunk=32, block=64):
            pass


# ------------------------------------------------------------------------- through xsam.ops

def test_ops_dispatch_to_triton_and_unsupported_dtype_raises():
    g = make([7, 3], torch.float32, 52)
    torch.testing.assert_close(ops.dots([g], [(0, 0)], backend="triton"),
                               ops.dots([g], [(0, 0)], backend="reference"))
    ints = [torch.arange(4, device=DEVICE)]
    assert "support" in unavailable_reason("triton", DEVICE, torch.int64)
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.axpy_(ints, ints, 1.0, backend="triton")


def test_availability_reasons_for_the_other_device():
    if DEVICE.type == "cpu":
        why = tb.availability(torch.device("cuda"), torch.float32)
        assert why and ("TRITON_INTERPRET" in why or "CUDA" in why)
    else:
        why = tb.availability(torch.device("cpu"), torch.float32)
        assert why and "TRITON_INTERPRET" in why
    assert "not meta" in tb.availability(torch.device("meta"), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_without_interpreter_cpu_is_refused_with_a_clear_reason():
    code = textwrap.dedent("""
        import os, torch
        os.environ.pop("TRITON_INTERPRET", None)
        import xsam
        from xsam.ops.dispatch import unavailable_reason
        why = unavailable_reason("triton", torch.device("cpu"), torch.float32)
        print("REASON:", why)
        try:
            xsam.ops.dots([[torch.ones(3)]], [(0, 0)], backend="triton")
        except xsam.BackendUnavailableError as exc:
            print("RAISED:", exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REASON: " in out.stdout and "TRITON_INTERPRET=1" in out.stdout
    assert "RAISED: backend='triton'" in out.stdout


# ------------------------------------------------------------------------- a whole X-SAM run

def _model_and_data(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(DEVICE)
    x = torch.randn(32, 6, device=DEVICE)
    y = torch.randint(0, 3, (32,), device=DEVICE)
    return model, x, y


@pytest.mark.parametrize("hvp,adaptive", [("finite_difference", False), ("exact", True)],
                         ids=["fd-sam", "exact-asam"])
def test_xsam_steps_match_reference_backend(hvp, adaptive):
    finals = {}
    for backend in ("reference", "triton"):
        model, x, y = _model_and_data(0)
        opt = xsam.XSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, alpha=0.5,
                        adaptive=adaptive, eig_interval=2, power_iters=2, hvp=hvp, seed=7, backend=backend)

        def loss_fn():
            return torch.nn.functional.cross_entropy(model(x), y)

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        for _ in range(3):  # refreshes at steps 0 and 2
            if hvp == "exact":
                opt.step(closure, loss_fn=loss_fn)
            else:
                opt.step(closure)
        finals[backend] = (flat64(list(model.parameters())), opt.diagnostics())
    (w_ref, d_ref), (w_tri, d_tri) = finals["reference"], finals["triton"]
    torch.testing.assert_close(w_tri, w_ref, rtol=1e-5, atol=1e-6)
    assert d_tri.keys() == d_ref.keys()
    for key, value in d_ref.items():
        if isinstance(value, float):
            assert d_tri[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------- GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cuda_large_lists_match_reference(dtype):
    sizes = [65536 * 3 + 17, 1, 0, 4095, 4097, 2_000_003] + [i % 300 for i in range(1000)]
    g, v, w = make(sizes, dtype, 60), make(sizes, dtype, 61), make(sizes, dtype, 62)
    got = ops.dots([g, v], [(0, 0), (0, 1), (1, 1)], backend="triton")
    want = ops.dots([g, v], [(0, 0), (0, 1), (1, 1)], backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=1e-3)
    assert torch.equal(got, ops.dots([g, v], [(0, 0), (0, 1), (1, 1)], backend="triton"))
    w_t, w_r = clones(w), clones(w)
    saved_t, saved_r = [torch.empty_like(t) for t in w], [torch.empty_like(t) for t in w]
    s = scalar(0.01, dtype)
    ops.perturb_(w_t, g, saved_t, s, adaptive=True, backend="triton")
    ops.perturb_(w_r, g, saved_r, s, adaptive=True, backend="reference")
    w64, g64 = flat64(w), flat64(g)
    assert_as_good_as_reference(w_t, w_r, w64 + 0.01 * w64 * w64 * g64, dtype)
    g_t, g_r = clones(g), clones(g)
    ops.correct_restore_(w_t, g_t, saved_t, v, s, s, backend="triton")
    ops.correct_restore_(w_r, g_r, saved_r, v, s, s, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(w_t, w))
    assert_as_good_as_reference(g_t, g_r, 0.01 * g64 - 0.01 * flat64(v), dtype)


@pytest.mark.cuda
@pytest.mark.gpu_bench
@cuda
def test_cuda_bandwidth_sanity():
    """Prints GB/s of the fused passes beside a copy of the same bytes (loose floor only)."""
    n = 1 << 26
    sizes = [n // 1000] * 1000
    w, g, v = (make(sizes, torch.float32, k) for k in (70, 71, 72))
    saved = [torch.empty_like(t) for t in w]
    s = scalar(0.01, torch.float32)

    def timed(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    big_src, big_dst = torch.empty(2 * n, device="cuda"), torch.empty(2 * n, device="cuda")
    copy_s = timed(lambda: big_dst.copy_(big_src))  # reads 2n, writes 2n floats
    copy_gbs = 16 * n / copy_s / 1e9
    perturb_s = timed(lambda: ops.perturb_(w, g, saved, s, backend="triton"))  # reads 2n, writes 2n
    dots_s = timed(lambda: ops.dots([g, v], [(0, 0), (0, 1), (1, 1)], backend="triton"))  # reads 2n
    perturb_gbs, dots_gbs = 16 * n / perturb_s / 1e9, 8 * n / dots_s / 1e9
    print(f"copy {copy_gbs:.0f} GB/s, perturb {perturb_gbs:.0f} GB/s, dots {dots_gbs:.0f} GB/s")
    assert perturb_gbs > 0.25 * copy_gbs and dots_gbs > 0.25 * copy_gbs


# ------------------------------------------------------------------------- real compiler, no GPU needed

_AOT = textwrap.dedent("""
    import os, re
    os.environ.pop("TRITON_INTERPRET", None)
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from xsam.kernels import multi_tensor as mt
    assert not mt.INTERPRETING

    def compile_(fn, sig, consts, aligned_args):
        attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in aligned_args}
        sig = dict(sig, **{k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]

    ew = dict(OP=1, NL=3, DTYPE=tl.bfloat16, ACC=tl.float32, VEC=8, MANUAL_BF16=False, CHUNK=65536, BLOCK=2048)
    ptx = compile_(mt._elementwise_kernel, {"meta": "*i64", "base": "*bf16", "ntensors": "i32", "s0": "*fp32",
                   "s1": "*fp32"}, ew, ["meta", "base", "s0", "s1"])
    print("perturb", len(re.findall(r"ld\\.global[^\\n]*\\.v4", ptx)), len(re.findall(r"st\\.global[^\\n]*\\.v4", ptx)))
    red = dict(NL=2, NP=3, WEIGHTED=False, ACC=tl.float32, VEC=4, CHUNK=65536, BLOCK=2048)
    for k in range(8):
        red[f"A{k}"], red[f"B{k}"] = k % 2, k // 2 % 2
    ptx = compile_(mt._dots_kernel, {"meta": "*i64", "base": "*fp32", "partials": "*fp32", "ntensors": "i32"},
                   red, ["meta", "base", "partials"])
    print("dots", len(re.findall(r"ld\\.global[^\\n]*\\.v4", ptx)))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile for the real GPU instead")
def test_kernels_compile_for_sm90_with_128_bit_accesses():
    """The interpreter never runs the real compiler: compile for an H100-class target here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and ("ptxas" in out.stderr or "No such file" in out.stderr):
        pytest.skip(f"no Triton CUDA toolchain here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    counts = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.stdout.splitlines()}
    # bf16 perturb: w and g loaded, w and saved stored, 8 elements (128 bits) per thread each
    assert counts["perturb"][0] >= 2 and counts["perturb"][1] >= 2, counts
    assert counts["dots"][0] >= 4, counts  # two fp32 lists, two 128-bit loads per thread each
