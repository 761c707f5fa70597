"""Smoke tests of the benchmark harness: it runs, writes its files, and its baseline is fair.

No timing is asserted: speed is reported by `xsam bench`, not tested.
"""
from __future__ import annotations

import csv

import pytest
import torch

from xsam import ops
from xsam.bench import CSV_NAME, TABLE_NAME, main
from xsam.bench import ops_bench
from xsam.bench.models import PARAMETER_SETS, parameter_shapes
from xsam.bench.report import COLUMNS

TINY = ["--quick", "--scale", "4096", "--blocks", "1", "--models", "resnet18", "--backends", "reference",
        "--no-plot"]


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_ops_section_writes_csv_with_expected_columns(tmp_path):
    assert main(TINY + ["--only", "ops", "--ops", "dots_gg_gv,perturb_,xsam_step", "--out", str(tmp_path)]) == 0
    header, rows = _read(tmp_path / CSV_NAME)
    assert header == COLUMNS
    assert (tmp_path / TABLE_NAME).exists()
    impls = {r["impl"] for r in rows}
    assert impls == {"reference", ops_bench.LOOP}
    assert {r["op"] for r in rows} == {"dots_gg_gv", "perturb_", "xsam_step"}
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["gb_per_s"]) > 0 and float(r["fraction_of_copy_bw"]) > 0
        assert float(r["speedup_vs_reference"]) > 0 and float(r["speedup_vs_loop"]) > 0
        assert int(r["bytes_moved"]) == ops_bench.TENSOR_PASSES[r["op"]] * int(r["n_elements"]) * 4


def test_e2e_and_memory_sections_run(tmp_path):
    assert main(TINY + ["--only", "e2e,memory", "--batch", "4", "--out", str(tmp_path)]) == 0
    _, rows = _read(tmp_path / CSV_NAME)
    e2e = {r["op"]: r for r in rows if r["section"] == "e2e"}
    assert {"sgd", "sam"} <= set(e2e) and any(k.startswith("xsam_exact") for k in e2e)
    assert float(e2e["sam"]["ratio_vs_sam"]) == 1.0
    memory = {r["op"]: r for r in rows if r["section"] == "memory"}
    # SAM holds the saved weights; X-SAM also the eigenvector: one and two copies of the parameters.
    assert float(memory["sam"]["state_over_params"]) == pytest.approx(1.0)
    assert float(memory["xsam_exact"]["state_over_params"]) == pytest.approx(2.0)


def test_unknown_section_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--only", "nothing", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--only" in capsys.readouterr().err


def test_parameter_sets_look_like_the_models():
    counts = {name: len(parameter_shapes(name)) for name in PARAMETER_SETS}
    assert counts == {"resnet18": 62, "vit_b16": 152, "gpt2_small": 148, "many_small": 1000}
    scaled = parameter_shapes("gpt2_small", 16)
    assert len(scaled) == 148  # scaling shrinks tensors, never drops them (launch counts stay real)
    full = sum(torch.Size(s).numel() for s in parameter_shapes("gpt2_small"))
    assert sum(torch.Size(s).numel() for s in scaled) < full / 12


def _pair(shapes):
    return ops_bench.make_workspace(shapes, torch.device("cpu"), torch.float32), \
        ops_bench.make_workspace(shapes, torch.device("cpu"), torch.float32)


SHAPES = [(3, 5), (1,), (7, 2, 3), (130,)]


def test_loop_baseline_computes_what_the_reference_op_computes():
    ref, loop = _pair(SHAPES)
    s = ref.scalars
    torch.testing.assert_close(ops_bench.loop_dots_gg_gv(loop.g, loop.v),
                               ops.dots([ref.g, ref.v], [(0, 0), (0, 1)], backend="reference"))
    torch.testing.assert_close(ops_bench.loop_weighted_sumsq(loop.w, loop.g),
                               ops.weighted_sumsq(ref.w, ref.g, backend="reference"))

    state = {}
    ops_bench.loop_perturb_(loop.w, loop.g, state, s["scale"])
    ops.perturb_(ref.w, ref.g, ref.saved, s["scale"], backend="reference")
    torch.testing.assert_close(loop.w, ref.w, rtol=0, atol=0)
    torch.testing.assert_close([state[i] for i in range(len(SHAPES))], ref.saved, rtol=0, atol=0)

    ops_bench.loop_correct_restore_(loop.w, loop.g, state, loop.v, s["a"], s["b"])
    ops.correct_restore_(ref.w, ref.g, ref.saved, ref.v, s["a"], s["b"], backend="reference")
    torch.testing.assert_close(loop.g, ref.g, rtol=0, atol=0)
    torch.testing.assert_close(loop.w, ref.w, rtol=0, atol=0)

    ops_bench.loop_axpy_(loop.w, loop.v, float(s["h"]))
    ops.axpy_(ref.w, ref.v, s["h"], backend="reference")
    torch.testing.assert_close(loop.w, ref.w)

    ops_bench.loop_scale_copy_(loop.saved, loop.u, s["scale"])
    ops.scale_copy_(ref.saved, ref.u, s["scale"], backend="reference")
    torch.testing.assert_close(loop.saved, ref.saved, rtol=0, atol=0)

    lam = ops_bench.loop_power_update_(loop.u, loop.v)
    stats = ops.power_update_([ref.u], [ref.v], eps=ops_bench.EPS, backend="reference")
    torch.testing.assert_close(lam, stats.eigenvalues[0])
    torch.testing.assert_close(loop.v, ref.v)


def test_loop_step_matches_the_backend_step():
    ref, loop = _pair(SHAPES)
    ops_bench.loop_xsam_step(loop, {})
    ops_bench.backend_xsam_step(ref, "reference")
    for name in ("w", "g", "v"):
        torch.testing.assert_close(getattr(loop, name), getattr(ref, name))
