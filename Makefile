# Two commands do all the set-up on a fresh machine:
#   make demo   install, then send the example issue end to end through the embedded SMTP sink
#   make test   install (system packages too), then ruff, mypy and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m newsletter demo

system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v spamassassin >/dev/null 2>&1 || missing="$$missing spamassassin"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check newsletter tests bench
	$(BIN)/ruff format --check newsletter tests bench
	$(BIN)/mypy

test: system-deps $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .newsletter .pytest_cache .mypy_cache .ruff_cache
