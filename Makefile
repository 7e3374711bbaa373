# Two commands on a fresh machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-needs lint typecheck unit bench plots build docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changes.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,cli,redis,phone,otel]'
	touch $@

$(VENV)/.installed-cli: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[cli]'
	touch $@

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

demo: $(VENV)/.installed-cli
	$(BIN)/autocalls-async demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# The tests, in two phases (about N minutes on 2 cores). First every test that neither judges
# real time nor needs the host quiet, in parallel on $(WORKERS) pytest-xdist workers: most of
# them wait on sockets, subprocesses and sleeps, so more workers than cores pay. Then the
# tests marked `timing` or `serial` (pyproject's markers), one at a time with nothing beside
# them. Coverage is appended across the two and the 95 % gate (pyproject's fail_under) is
# applied once, by the second phase, to the combined total: the first has no gate of its own.
# Either phase failing, or selecting no test at all (pytest's exit code 5), fails the target.
WORKERS ?= 4
unit: $(VENV)/.installed-dev
	rm -f .coverage .coverage.*
	$(BIN)/python -m pytest -n $(WORKERS) --dist worksteal -m "not timing and not serial" \
	    --cov --cov-report= --cov-fail-under=0
	$(BIN)/python -m pytest -m "timing or serial" \
	    --cov --cov-append --cov-report=term-missing:skip-covered

# Before a minute of lint: what the full suite needs beyond pip (pytest says it again).
test-needs:
	@command -v redis-server >/dev/null 2>&1 || echo "note: redis-server is not installed:" \
	    "the Redis tests (about 30) will be skipped and the coverage gate may fail; install it:" \
	    "sudo apt-get install redis-server (Debian, Ubuntu) or brew install redis (macOS)"

test: test-needs lint typecheck unit

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.plots

# The docs' figures (docs/img/*.png) from real runs, about a minute and a half; nginx for the first.
plots: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.plots

# The documentation site (docs/, mkdocs.yml) into site/; --strict: any warning fails the build.
# NO_MKDOCS_2_WARNING: Material prints a banner about its future on every build otherwise.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

build: $(VENV)/.installed-dev
	rm -rf dist
	$(BIN)/python -m build

clean:
	rm -rf $(VENV) dist build site .coverage .pytest_cache .mypy_cache .ruff_cache .hypothesis
