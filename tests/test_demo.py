"""`xsam demo` end to end with a tiny budget: the table it prints, its numbers' sanity and its reading."""
import re

from xsam.cli import main
from xsam.demo import METHODS, what_it_shows

ROW = re.compile(r"^(SGD|SAM|XSAM-a0|XSAM|EigenSAM)\s+([\d.]+)\s+(-?[\d.]+)\s+(\S+)\s+([\d.]+)$", re.M)


def test_demo_prints_one_row_per_method_with_sane_numbers_and_what_they_show(capsys):
    assert main(["demo", "--epochs", "1", "--no-progress", "--methods", "SGD,SAM,XSAM-a0,XSAM"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(out)}
    assert set(rows) == {"SGD", "SAM", "XSAM-a0", "XSAM"}, out
    for method, (acc, eig, cos, seconds) in rows.items():
        assert 0.2 < float(acc) <= 1.0, (method, acc)  # 10 classes: well above chance after one epoch
        assert float(eig) != 0.0 and float(seconds) > 0
    assert rows["SGD"][2] == "-" and rows["SAM"][2] == "-"  # no eigenvector, no angle
    assert 0.0 <= float(rows["XSAM"][2]) <= 1.0  # a mean of |cos|
    eig = {m: float(r[1]) for m, r in rows.items()}
    assert what_it_shows(eig) in out


def test_the_default_table_has_the_control_and_eigensam_and_the_reading_splits_the_eigenvalue():
    assert METHODS == ("SGD", "SAM", "XSAM-a0", "XSAM", "EigenSAM")
    text = what_it_shows({"SGD": 154.0, "SAM": 113.0, "XSAM-a0": 50.0, "XSAM": 52.0, "EigenSAM": 100.0})
    assert "(XSAM-a0 against SAM) 113 -> 50 (0.44x)" in text
    assert "(XSAM against XSAM-a0) 50 -> 52 (1.04x)" in text
    assert "(EigenSAM against SAM) 113 -> 100 (0.88x)" in text
    assert what_it_shows({"SGD": 1.0, "XSAM": 2.0}) == ""  # nothing to split without SAM and the control
