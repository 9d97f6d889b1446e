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

.PHONY: install demo test
