# Two commands do all the set-up on a fresh machine:
#   make demo        install, then send the example issue end to end through the embedded SMTP sink
#   make deps test   install the Debian packages the tests drive, then ruff, mypy and the test suite
# `make test` alone installs no system package: without Chromium or SpamAssassin the tests
# that need them are skipped, with the reason.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# What the tests drive besides Python packages (chromium: the preview page through
# Playwright; spamassassin: `newsletter check --spam`; postgresql: the store's contract tests
# run on SQLite and on a temporary PostgreSQL cluster the tests start themselves).
DEBIAN_PACKAGES := chromium spamassassin postgresql

.PHONY: demo deps test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m newsletter demo

# Installs only the packages that are missing, so a second run changes nothing.
deps:
	@missing=""; \
	for package in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q ' installed$$' \
	    || missing="$$missing $$package"; \
	done; \
	if [ -z "$$missing" ]; then \
	  echo "Debian packages already installed: $(DEBIAN_PACKAGES)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "Install these packages with your system's package manager:$$missing" >&2; exit 1; \
	else \
	  echo "Installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check newsletter tests bench
	$(BIN)/ruff format --check newsletter tests bench
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .newsletter .pytest_cache .mypy_cache .ruff_cache
