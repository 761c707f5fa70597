# One command sets up and runs each job on a fresh machine with only Python installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Every package `make demo` and `make test` install is pinned to the exact version in
# constraints.txt, tested together: an upstream release cannot change what they run. `make lock`
# refreshes the file from the newest releases, after the tests pass on them (`make test-latest`).
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(PIP) install $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
# Rebuild the editable install when the build inputs change.
BUILD_INPUTS := setup.py pyproject.toml xsam/build_info.py $(wildcard csrc/* csrc/*/*)
# One GPU architecture keeps the CUDA compile of `make test` and CI short (about a minute);
# a user's install without it compiles every architecture the installed torch supports.
TORCH_CUDA_ARCH_LIST ?= 9.0
# Every extra any target installs: the lock covers them all.
ALL_EXTRAS := demo,experiment,test,lightning,transformers

.PHONY: demo test test-slow test-latest lock bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel

# torch first (an unpinned torch is the CUDA build here, which lets the CUDA sources
# compile), then the package against it without build isolation.
$(VENV)/.torch: $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) torch numpy
	touch $@

$(VENV)/.installed-%: $(VENV)/.torch $(BUILD_INPUTS) $(CONSTRAINTS)
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" $(PIP_INSTALL) --no-build-isolation -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/xsam demo

# The tests cover the trainer integrations too: Lightning and transformers add about 20 s of
# installation (about 230 MB in the venv) and about 20 s of tests on an idle 2-core machine.
TEST_EXTRAS := test,lightning,transformers

test: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m pytest -q -m slow

# The same tests against the newest releases the registry serves, in a new venv each time.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= TEST_EXTRAS=$(ALL_EXTRAS)

lock: test-latest
	.venv-latest/bin/python -m pip freeze --all --exclude-editable > constraints.txt

bench: $(VENV)/.installed-test
	$(VENV)/bin/xsam bench

clean:
	rm -rf build dist *.egg-info xsam/_C*.so xsam/_build_record.json $(VENV) .venv-latest
