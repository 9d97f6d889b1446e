# The two commands a new user needs:  `make demo` (the main job)  and  `make test` (the suite).
# Both create .venv on first use, with the torch/torchvision pair that works on these machines.
PY := .venv/bin/python
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: .venv/.installed

demo: .venv/.installed
	$(PY) -m cpc_models.demo

test: .venv/.installed
	$(PY) -m pytest -q

# The fast tier: every module, without the slow end-to-end runs (wheel build, ONNX, figure-1 pipeline, demo).
test-fast: .venv/.installed
	$(PY) -m pytest -q -m "not slow"

# Which lines of the package the fast tier runs in process (per module; subprocess runs are not counted).
coverage-fast: .venv/.installed
	$(PY) -m coverage run --data-file=.coverage-fast --source=cpc_models -m pytest -q -m "not slow"
	$(PY) -m coverage report --data-file=.coverage-fast

# timm's own tests/test_models.py (from the sdist of the installed timm version, downloaded from PyPI) on our models.
timm-tests: .venv/.installed
	PY=$(PY) bash tests/timm_suite.sh

# Mutation testing of the core modules (docs/testing.md), in the background at nice 10 with 2 workers;
# `make mutation MODULES="objective augment"` for some of them. Writes docs/mutation/results/ and report.md.
MODULES ?=
mutation: .venv/.installed
	mkdir -p .mutation
	nohup $(PY) tools/mutation.py run $(MODULES) > .mutation/run.log 2>&1 &
	@echo "running in the background: tail -f .mutation/run.log; the report lands in docs/mutation/report.md"

mutation-report: .venv/.installed
	$(PY) tools/mutation.py report --check

.PHONY: install demo test test-fast coverage-fast timm-tests mutation mutation-report
