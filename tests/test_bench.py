"""Smoke tests of the benchmark harness: it runs and writes its files, and what makes its numbers honest holds
(every baseline computes what the op computes, the peer SAM takes our steps, the ceiling's stand-ins move at
least the op's bytes, the timing helpers interleave and pair). No timing is asserted."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from xsam import ops
from xsam.bench import CSV_NAME, TABLE_NAME, baselines, main, ops_bench, overhead_bench, timing
from xsam.bench.models import BANDWIDTH_SETS, PARAMETER_SETS, MNIST1DCNN, dram_scale, parameter_shapes
from xsam.bench.report import COLUMNS, format_tables, markdown_summary, read_csv
from xsam.ops.dispatch import unavailable_reason

from helpers import assert_each_close

pytestmark = pytest.mark.usefixtures("one_thread")  # what is checked here does not depend on threads
TINY = ["--quick", "--scale", "4096", "--blocks", "1", "--rounds", "1", "--models", "resnet18",
        "--backends", "reference", "--no-plot"]
CPU_BACKENDS = [b for b in ("reference", "native") if unavailable_reason(b, torch.device("cpu"), torch.float64) is None]


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_ops_section_writes_csv_with_expected_columns(tmp_path):
    assert main(TINY + ["--only", "ops", "--ops", "dots_gg_gv,perturb_,xsam_step", "--out", str(tmp_path)]) == 0
    header, rows = _read(tmp_path / CSV_NAME)
    assert header == COLUMNS
    assert "reference time over skilled_foreach time" in (tmp_path / TABLE_NAME).read_text()
    assert {r["impl"] for r in rows} == {"reference", ops_bench.FOREACH, ops_bench.LOOP}
    assert {r["op"] for r in rows} == {"dots_gg_gv", "perturb_", "xsam_step"}
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["gb_per_s"]) > 0 and float(r["fraction_of_ceiling"]) > 0
        for col in ("speedup_vs_reference", "speedup_vs_foreach", "speedup_vs_loop", "speedup_vs_best_baseline"):
            assert float(r[col]) > 0
        assert r["best_baseline"] in ops_bench.BASELINES and r["memory"] in ("cache", "partly", "DRAM", "?")
        traffic = ops_bench.TRAFFIC[r["op"]]
        assert int(r["bytes_moved"]) == traffic.passes * int(r["n_elements"]) * 4
        assert int(r["footprint_bytes"]) == traffic.arrays * int(r["n_elements"]) * 4
    summary = markdown_summary(read_csv(tmp_path / CSV_NAME))
    assert "| ResNet-18 (62 tensors" in summary and "reference time over skilled_foreach time" in summary


def test_e2e_overhead_and_memory_sections_run(tmp_path, monkeypatch):
    monkeypatch.setattr(overhead_bench, "HOST_TENSORS", 20)  # the section's shape, kept small here
    assert main(TINY + ["--only", "e2e,overhead,memory", "--batch", "4", "--out", str(tmp_path)]) == 0
    _, rows = _read(tmp_path / CSV_NAME)
    e2e = {r["op"]: r for r in rows if r["section"] == "e2e"}
    assert {"sgd", "sam"} <= set(e2e) and any(k.startswith("xsam_exact") for k in e2e)
    assert float(e2e["sam"]["ratio"]) == 1.0 and e2e["sam"]["unstable"] in ("True", "False")
    overhead = [r for r in rows if r["section"] == "overhead"]
    assert {r["model"] for r in overhead} >= {"mnist1d_cnn"} and any(r["model"].startswith("host_") for r in overhead)
    assert {r["dtype"] for r in overhead if r["model"] == "mnist1d_cnn"} == {"float32", "float64"}
    assert all(float(r["ratio"]) > 0 for r in overhead)
    summary = markdown_summary(read_csv(tmp_path / CSV_NAME))
    assert "| small_cnn | sam | reference |" in summary and "(baseline)" in summary and "mnist1d_cnn" in summary
    memory = {r["op"]: r for r in rows if r["section"] == "memory"}
    # SAM holds the saved weights; X-SAM also the eigenvector: one and two copies of the parameters.
    assert float(memory["sam"]["state_over_params"]) == pytest.approx(1.0)
    assert float(memory["xsam_exact"]["state_over_params"]) == pytest.approx(2.0)


def test_parameter_sets_look_like_the_models():
    counts = {name: len(parameter_shapes(name)) for name in PARAMETER_SETS}
    assert counts == {"resnet18": 62, "vit_b16": 152, "gpt2_small": 148, "many_small": 1000}
    scaled = parameter_shapes("gpt2_small", 16)
    assert len(scaled) == 148  # scaling shrinks tensors, never drops them (launch counts stay real)
    full = sum(torch.Size(s).numel() for s in parameter_shapes("gpt2_small"))
    assert sum(torch.Size(s).numel() for s in scaled) < full / 12
    assert len(list(MNIST1DCNN().parameters())) == 9


def test_default_cpu_scale_keeps_the_bandwidth_sets_beyond_the_cache():
    mib = 1 << 20
    assert {m: dram_scale(m, 32 * mib) for m in PARAMETER_SETS} == {
        "resnet18": 1.0, "vit_b16": 8.0, "gpt2_small": 8.0, "many_small": 1.0}
    for cache in (2 * mib, 32 * mib, 256 * mib):
        for m in BANDWIDTH_SETS:
            array = sum(torch.Size(s).numel() for s in parameter_shapes(m, dram_scale(m, cache))) * 4
            assert array > cache or dram_scale(m, cache) == 1.0
    assert dram_scale("resnet18", None) == 1.0
    assert ops_bench.memory_label(10, 100) == "cache" and ops_bench.memory_label(150, 100) == "partly"
    assert ops_bench.memory_label(200, 100) == "DRAM" and ops_bench.memory_label(200, None) == "?"


@pytest.mark.parametrize("op", ops_bench.OP_NAMES)
def test_ceiling_stand_ins_stay_in_the_ops_footprint_and_never_move_less(op):
    traffic, standin = ops_bench.TRAFFIC[op], ops_bench.standin_traffic(op)
    assert all(i < traffic.arrays and j < traffic.arrays for _, i, j in ops_bench.CEILING[op])
    for write_allocate in (True, False):
        assert standin.physical_passes(write_allocate) >= traffic.physical_passes(write_allocate)
    assert ops_bench.ceiling_scale(op, torch.device("cpu")) <= 1.0
    flat = ops_bench.make_flat_buffers(10, torch.device("cpu"), torch.float32)
    ops_bench.ceiling_fn(op, flat)()


def _pair(shapes):
    return tuple(ops_bench.make_workspace(shapes, torch.device("cpu"), torch.float32) for _ in range(2))


SHAPES = [(3, 5), (1,), (7, 2, 3), (130,)]


@pytest.mark.parametrize("style", ["foreach", "loop"])
def test_baselines_compute_what_the_reference_op_computes(style):
    ref, base = _pair(SHAPES)
    s, b = ref.scalars, baselines
    loop = style == "loop"
    state = dict(enumerate(base.saved))
    fn = {name: getattr(b, f"{style}_{name}") for name in ops_bench.OP_NAMES if name != "xsam_step"}
    torch.testing.assert_close(fn["dots_gg_gv"](base.g, base.v),
                               ops.dots([ref.g, ref.v], [(0, 0), (0, 1)], backend="reference"))
    torch.testing.assert_close(fn["weighted_sumsq"](base.w, base.g).reshape(()),
                               ops.weighted_sumsq(ref.w, ref.g, backend="reference"))

    fn["perturb_"](base.w, base.g, state if loop else base.saved, s["scale"])
    saved = [state[i] for i in range(len(SHAPES))] if loop else base.saved
    ops.perturb_(ref.w, ref.g, ref.saved, s["scale"], backend="reference")
    torch.testing.assert_close(base.w, ref.w, rtol=0, atol=0)
    torch.testing.assert_close(saved, ref.saved, rtol=0, atol=0)

    fn["correct_restore_"](base.w, base.g, state if loop else base.saved, base.v, s["a"], s["b"])
    ops.correct_restore_(ref.w, ref.g, ref.saved, ref.v, s["a"], s["b"], backend="reference")
    torch.testing.assert_close(base.g, ref.g, rtol=0, atol=0)
    torch.testing.assert_close(base.w, ref.w, rtol=0, atol=0)

    fn["axpy_"](base.w, base.v, float(s["h"]) if loop else s["h"])
    ops.axpy_(ref.w, ref.v, s["h"], backend="reference")
    torch.testing.assert_close(base.w, ref.w)

    fn["scale_copy_"](base.saved, base.u, s["scale"])
    ops.scale_copy_(ref.saved, ref.u, s["scale"], backend="reference")
    torch.testing.assert_close(base.saved, ref.saved, rtol=0, atol=0)

    lam = fn["power_update_"](base.u, base.v)
    stats = ops.power_update_([ref.u], [ref.v], eps=ops_bench.EPS, backend="reference")
    torch.testing.assert_close(lam, stats.eigenvalues[0])
    torch.testing.assert_close(base.v, ref.v)


@pytest.mark.parametrize("impl", [ops_bench.FOREACH, ops_bench.LOOP] + CPU_BACKENDS)
def test_every_implementation_takes_the_same_xsam_step(impl):
    ref, other = _pair(SHAPES)
    ops_bench.backend_xsam_step(ref, "reference")
    ops_bench.implementation_op(impl, "xsam_step", other)()
    for name in ("w", "g", "v"):
        torch.testing.assert_close(getattr(other, name), getattr(ref, name))


def test_workspace_saved_copy_starts_as_the_weights():
    ws = ops_bench.make_workspace(SHAPES, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(ws.saved, ws.w, rtol=0, atol=0)
    assert all(s.data_ptr() != w.data_ptr() for s, w in zip(ws.saved, ws.w))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_peer_sam_and_xsam_sam_take_the_same_steps(backend):
    peer_model, peer_step = overhead_bench.peer_stepper("davda54_sam", torch.float64, None)
    our_model, our_step = overhead_bench.peer_stepper("xsam_sam", torch.float64, backend)
    for _ in range(5):
        peer_step()
        our_step()
    assert_each_close(peer_model.parameters(), our_model.parameters(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(next(our_model.parameters()),
                           next(overhead_bench.peer_stepper("xsam_sam", torch.float64, backend)[0].parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_host_optimizer_steps_without_a_refresh(backend):
    opt = overhead_bench.host_optimizer(3, 5, torch.device("cpu"), torch.float32, backend)
    weights = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    refreshes = opt.diagnostics()["refreshes"]
    overhead_bench.host_step(opt)()
    assert opt.diagnostics()["refreshes"] == refreshes  # the eigenvector was set before, not recomputed
    assert opt.eigenvector() is not None
    # The base step is a no-op: first_step + second_step put the weights back bit for bit.
    assert_each_close(opt.param_groups[0]["params"], weights, rtol=0, atol=0)


def test_interleaved_timing_rotates_and_pairs_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = timing.time_interleaved(fns, blocks=3, block_seconds=0.0, warmup_calls=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(s.blocks == 3 and len(s.samples) == 3 for s in stats.values())
    slow = timing.summarize([2.0, 4.0, 6.0])
    fast = timing.summarize([1.0, 2.0, 3.0])
    ratio = timing.paired_ratio(slow, fast)
    assert ratio.median == 2.0 and ratio.iqr == 0.0 and not timing.unstable(fast, ratio)
    wide = timing.summarize([1.0, 1.0, 2.0, 3.0])  # IQR 1.25 over median 1.5
    assert timing.unstable(fast, wide) and timing.unstable(wide) and not timing.unstable(fast)
    assert timing.summarize([2.0, 4.0]).scaled(0.5).median == 1.5


def test_timing_synchronises_the_measured_gpu_not_the_current_one(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timing.time_callable(lambda: None, blocks=2, block_seconds=0.0, warmup_calls=1, device="cuda:1")
    assert synced and all(d == torch.device("cuda:1") for d in synced)
    synced.clear()
    timing.time_callable(lambda: None, blocks=2, block_seconds=0.0, warmup_calls=1, device="cpu")
    assert not synced


def test_unstable_rows_are_flagged_in_the_table():
    row = {"section": "e2e", "model": "m", "op": "xsam", "impl": "native", "device": "cpu", "median_s": 0.01,
           "spread": 0.5, "min_s": 0.005, "max_s": 0.02, "ratio": 2.0, "ratio_q1": 1.0, "ratio_q3": 3.0,
           "unstable": True, "note": "n"}
    text = format_tables([row])
    assert "UNSTABLE" in text and "2.00 [1.00-3.00]" in text
    assert "UNSTABLE" not in format_tables([dict(row, unstable=False)])


def test_ops_rows_name_the_best_baseline():
    rows = [{"model": "m", "op": "o", "device": "cpu", "dtype": "float32", "impl": impl, "median_s": t}
            for impl, t in (("reference", 2.0), (ops_bench.FOREACH, 1.0), (ops_bench.LOOP, 4.0), ("native", 0.5))]
    ops_bench.add_ratios(rows)
    native = rows[-1]
    assert native["best_baseline"] == ops_bench.FOREACH and native["speedup_vs_best_baseline"] == 2.0
    assert native["speedup_vs_reference"] == 4.0 and native["speedup_vs_loop"] == 8.0


def test_traffic_model_adds_up():
    assert ops_bench.TENSOR_PASSES["xsam_step"] == sum(
        ops_bench.TENSOR_PASSES[o] for o in ("dots_gg_gv", "perturb_", "dots_gg_gv", "correct_restore_",
                                             "power_update_"))
    assert ops_bench.TRAFFIC["xsam_step"].fresh_writes == 2 and ops_bench.TRAFFIC["xsam_step"].arrays == 5


def test_the_report_command_explains_itself():
    helped = subprocess.run([sys.executable, "-m", "xsam.bench.report", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: python -m xsam.bench.report BENCH_RESULTS_CSV" in helped.stdout
    missing = subprocess.run([sys.executable, "-m", "xsam.bench.report"], capture_output=True, text=True)
    assert missing.returncode == 2 and "usage:" in missing.stderr
