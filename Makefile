# fedbiopsy: the whole set-up is `make demo` and `make test` on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= demo-output

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export MPLBACKEND := Agg

.PHONY: install data browser demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision come from this machine's local wheel store (pip's find-links); never another torch.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedbiopsy study run --out $(OUT)

# The real MRI of pyradiomics 3.0.1's source archive (from PyPI, cached under .cache/) for the real-data tests.
data: install
	$(BIN)/python -m simulations.realdata

# Headless Chromium renders the study report in the end-to-end test (Debian's package; CI runs as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs Debian's chromium for the report test: sudo apt-get install chromium"; fi; }

test: install data browser
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy common client server simulations deploy cli

clean:
	rm -rf $(OUT) .pytest_cache .mypy_cache .ruff_cache
