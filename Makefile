# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates the virtual environment in .venv if needed and installs cfcd into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cfcd-installed

.PHONY: demo test install selfcheck clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 matches torchvision 0.28.0; pinning both first keeps pip from
	# pulling a newer torch with several GB of CUDA libraries on CPU-only machines.
	$(BIN)/python -m pip install -q "torch==2.13.0" "torchvision==0.28.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cfcd demo

selfcheck: $(STAMP)
	$(BIN)/cfcd selfcheck

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean-venv:
	rm -rf $(VENV)
