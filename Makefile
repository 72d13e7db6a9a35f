# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On CPU-only machines the torch CPU wheel is pinned (an unpinned torch pulls a CUDA build).
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check
# glibc's malloc asks for transparent huge pages: XLA:CPU maps its scratch buffer afresh on every
# call, and faulting it in 4 KiB pages cost 5-7 % of a bench_small training step (README, Performance).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) "torch==2.13.0"
	$(PIP_INSTALL) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m train.main --config configs/demo.py --workdir $${WORKDIR:-runs/demo}

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
