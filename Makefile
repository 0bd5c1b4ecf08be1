# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates the virtual environment in .venv if needed and installs cfcd into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cfcd-installed
APT_LOG ?= /tmp/cfcd-apt.log

.PHONY: demo demo-quick test install selfcheck clean-venv chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 matches torchvision 0.28.0; pinning both first keeps pip from
	# pulling a newer torch with several GB of CUDA libraries on CPU-only machines.
	$(BIN)/python -m pip install -q "torch==2.13.0" "torchvision==0.28.0"
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	touch $(STAMP)

install: $(STAMP)

# The demo's photos: scikit-image and scikit-learn's, plus Debian's opencv-doc examples (real
# multi-view pairs) where apt is available and we are root; the demo works without them.
OPENCV_DATA := /usr/share/doc/opencv-doc/examples/data
DEMO_ARGS ?=

demo: $(STAMP)
	@if [ ! -e $(OPENCV_DATA)/graf1.png ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing opencv-doc (real multi-view photos for the demo; apt output in $(APT_LOG))"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends opencv-doc; } \
	    > $(APT_LOG) 2>&1 || echo "opencv-doc could not be installed (see $(APT_LOG)): the demo uses fewer photos"; \
	fi
	$(BIN)/cfcd demo $(DEMO_ARGS)

demo-quick:
	$(MAKE) demo DEMO_ARGS=--quick

selfcheck: $(STAMP)
	$(BIN)/cfcd selfcheck

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The browser test drives Debian's chromium (Playwright from PyPI never downloads a browser here).
# Installed when missing, apt-get is there and we are root; otherwise that one test is skipped.
# apt's hundreds of lines go to $(APT_LOG); the screen gets one line.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test (apt output in $(APT_LOG))"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } > $(APT_LOG) 2>&1 || \
	    echo "chromium could not be installed (see $(APT_LOG)): tests/test_serve_browser.py will be skipped"; \
	  else echo "no chromium (and no root apt-get): tests/test_serve_browser.py will be skipped"; fi; }

clean-venv:
	rm -rf $(VENV)
