# ybyx — two commands: `make run` (set-up + one-machine demo) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests talk to (real DICOM peers).
APT_PKGS := dcmtk orthanc orthanc-dicomweb chromium

.PHONY: setup apt viewer run test lint typecheck pytest bench clean

setup: $(VENV)/.installed apt viewer

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Installs only what is missing; runs `apt-get update` once, before the first install.
apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The web viewer (issue 7): npm ci when the lock file changed, vite build when a source did;
# nothing when both stamps are newer (fast and idempotent). dist/ and node_modules/ are not in git.
VIEWER := viewer_assets
VIEWER_SRC := $(VIEWER)/package.json $(VIEWER)/vite.config.js $(VIEWER)/index.html $(wildcard $(VIEWER)/src/*)

viewer: $(VIEWER)/dist/.built

$(VIEWER)/node_modules/.installed: $(VIEWER)/package-lock.json
	@command -v npm >/dev/null || { echo "the viewer needs Node.js >= 20.19 with npm (Vite 8)" >&2; exit 1; }
	cd $(VIEWER) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(VIEWER)/dist/.built: $(VIEWER)/node_modules/.installed $(VIEWER_SRC)
	cd $(VIEWER) && npm run build --silent -- --logLevel error
	touch $@

run: setup
	$(BIN)/ybyx demo -c config/demo.toml

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q

test: setup lint typecheck pytest

bench: setup
	@command -v wrk >/dev/null || { if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/associations.py
	$(BIN)/python bench/dicomweb.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
