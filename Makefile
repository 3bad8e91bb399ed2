# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Prefect runs on its embedded default (a temporary local server on SQLite), telemetry off.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test test-fast clean browser lock

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt constraints-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -c constraints-lock.txt -e '.[test]'
	touch $(STAMP)

# After an upgrade has passed `make test`: the venv's exact versions become the lock (torch stays
# pinned by constraints.txt alone, as its local wheel's version carries "+cpu").
lock:
	{ sed -n '/^#/p' constraints-lock.txt; $(BIN)/pip freeze --all --exclude-editable | \
		grep -v -E '^(pip|torch|pyflakes)=='; } > constraints-lock.txt.new
	mv constraints-lock.txt.new constraints-lock.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaeguard demo

# The report tests open the HTML in a real headless Chromium: Debian's, installed here when we
# may (root with apt, as in CI); elsewhere those tests say they were skipped and why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: browser tests will be skipped"

test: $(STAMP) browser
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
	find exported -mindepth 1 ! -name README.md -exec rm -rf {} +
