"""`xsam demo` end to end with a tiny budget: the table it prints and its numbers' sanity."""
import re

from xsam.cli import main


def test_demo_prints_one_row_per_method_with_sane_numbers(capsys):
    assert main(["demo", "--epochs", "1", "--no-progress", "--methods", "SGD,XSAM"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in
            re.finditer(r"^(SGD|SAM|XSAM)\s+([\d.]+)\s+(-?[\d.]+)\s+(\S+)\s+([\d.]+)$", out, re.M)}
    assert set(rows) == {"SGD", "XSAM"}, out
    for method, (acc, eig, cos, seconds) in rows.items():
        assert 0.2 < float(acc) <= 1.0, (method, acc)  # 10 classes: well above chance after one epoch
        assert float(eig) != 0.0 and float(seconds) > 0
    assert rows["SGD"][2] == "-"  # no eigenvector, no angle
    assert 0.0 <= float(rows["XSAM"][2]) <= 1.0  # a mean of |cos|
