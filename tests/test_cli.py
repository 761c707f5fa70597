"""The command line: bad arguments are refused while parsing (one line, exit code 2), and nothing
imports torch's build machinery at run time."""
import subprocess
import sys

import pytest

from xsam.cli import main


@pytest.mark.parametrize("argv, says", [
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--methods", "SGD,Adam"], "'Adam'"),
    (["experiment", "--alpha", "5"], "--alpha"),
    (["experiment", "--epochs", "-1"], "--epochs"),
    (["bench", "--models", "foo"], "'foo'"),
    (["bench", "--scale", "0"], "--scale"),
    (["bench", "--scale", "-4"], "--scale"),
    (["bench", "--batch", "0"], "--batch"),
    (["bench", "--only", "ops,nothing"], "'nothing'"),
    (["bench", "--only", "nothing"], "--only"),
    (["bench", "--device", "tpu"], "--device"),
    (["selftest", "--backends", "cuda"], "'cuda'"),
    (["selftest", "--dtypes", "int8"], "'int8'"),
    (["selftest", "--device", "tpu"], "--device"),
    (["selftest", "--seed", "-1"], "--seed"),
    (["selftest", "--seed", "2147483648"], "it must be >= 0 and <= 2147483647 "),
    (["no-such-command"], "no-such-command"),
    # An output folder that cannot be created (below a file) is refused before any work.
    *[([command, "--out", "/dev/null/results"], "cannot create the output folder")
      for command in ("bench", "demo", "experiment")],
])
def test_bad_arguments_are_one_line_errors_with_exit_code_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    assert says in lines[0]


@pytest.mark.parametrize("argv, says", [(["info"], "xsam._C build: "), (["bench", "--help"], "xsam")])
def test_python_dash_m_xsam_is_the_command_and_prints_no_build_machinery_warning(argv, says):
    out = subprocess.run([sys.executable, "-m", "xsam", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No CUDA runtime" not in out.stderr and "cpp_extension" not in out.stderr, out.stderr
    assert says in out.stdout
