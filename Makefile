# `make run`: the whole pipeline on the tiny default (installs what it needs first).
# `make test`: the test suite (installs what it needs first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-fast data clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# xgrammar (REC's constrained decoding) without triton, which only GPUs use: `pip install -e .[rec]` there
	$(BIN)/python -m pip install --quiet --no-deps 'xgrammar>=0.2,<0.3' 'apache-tvm-ffi<0.2'
	# DeepSpeed (ZeRO configs in infra/deepspeed): a source package; built against the torch above, no ops compiled
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation 'deepspeed>=0.19,<0.20'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/paft run

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Debian's Chromium + chromedriver for the report page's browser test (tests/test_page.py); `make run` never needs it
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium chromium-driver (apt-get) for tests/test_page.py"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null; } || echo "note: apt-get could not install chromium: the browser test will skip"; \
	else echo "note: no /usr/bin/chromium and no apt-get as root to install it: the browser test of the report page will skip"; fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

data: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro prepare

clean:
	rm -rf outputs mlruns .cache data/processed
