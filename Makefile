# `make demo` and `make test` work from a fresh clone with only Python 3.11+ and make:
# they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installs come from the lock files (exact versions with hashes; `make lock` writes them):
# runtime.lock for the image, dev.lock (runtime + dev tools) here. The stamp names both the
# pyproject and the lock, so a change of either reinstalls.
LOCK := requirements/dev.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install lock demo test lint fmt worker bench bench-smoke clean

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	@# poolsadmin itself, with the build backend from the lock and nothing new.
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

# Regenerate the lock files from pyproject.toml (after changing a dependency; `make lock
# UPGRADE=--upgrade` moves every pin to the newest allowed). uv runs from a venv of its own:
# a fresh clone needs it only for this.
LOCK_VENV := .venv-lock
LOCK_FLAGS := --quiet --generate-hashes --python-version 3.11 --custom-compile-command 'make lock'
lock:
	@test -x $(LOCK_VENV)/bin/uv || \
		{ $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet 'uv>=0.5,<1'; }
	$(LOCK_VENV)/bin/uv pip compile $(LOCK_FLAGS) $(UPGRADE) pyproject.toml requirements/build.in \
		-o requirements/runtime.lock
	$(LOCK_VENV)/bin/uv pip compile $(LOCK_FLAGS) $(UPGRADE) --extra dev pyproject.toml \
		requirements/build.in -o requirements/dev.lock

# DEBUG is off unless asked for (settings.py): the development targets ask for it.
demo: install
	DEBUG=true $(BIN)/python manage.py migrate --noinput
	DEBUG=true $(BIN)/python manage.py demo

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DEBUG=true $(BIN)/mypy poolsadmin tests

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

worker: install
	DEBUG=true $(BIN)/python manage.py worker

# Figures, not assertions (docs/benchmarks.md): the pool page, its live partial and the JSON
# pool detail at 100 and 1,000 pods x 4 slots; 1,000 agents heartbeating every 5 s against
# one web process; submission -> assignment at 50 tasks/s with long-polling agents; the
# scheduler's dispatches/s against `pgbench -N` on the same server; one reconcile +
# autoscale round over 1,000 pods; one slot change pushed to 200 open pool pages on one web
# process with Redis (BENCH_REDIS_URL, a database of its own: flushed). The PostgreSQL
# scripts create and drop their own databases on the server of BENCH_ADMIN_URL.
# `bench-smoke` runs each at a tiny size (CI runs it, so the scripts cannot rot) and records
# nothing.
BENCH_ADMIN_URL ?= postgres://postgres@127.0.0.1:5432/postgres
BENCH_REDIS_URL ?= redis://127.0.0.1:6379/11
bench: install
	$(BIN)/python bench/pool_page.py
	$(BIN)/python bench/agents_heartbeat.py --admin-url $(BENCH_ADMIN_URL)
	$(BIN)/python bench/submit_latency.py --admin-url $(BENCH_ADMIN_URL)
	$(BIN)/python bench/scheduler.py --admin-url $(BENCH_ADMIN_URL)
	$(BIN)/python bench/reconcile_pass.py
	$(BIN)/python bench/fanout.py --admin-url $(BENCH_ADMIN_URL) --redis-url $(BENCH_REDIS_URL)

bench-smoke: install
	$(BIN)/python bench/pool_page.py --smoke
	$(BIN)/python bench/agents_heartbeat.py --admin-url $(BENCH_ADMIN_URL) --smoke
	$(BIN)/python bench/submit_latency.py --admin-url $(BENCH_ADMIN_URL) --smoke
	$(BIN)/python bench/scheduler.py --admin-url $(BENCH_ADMIN_URL) --smoke
	$(BIN)/python bench/reconcile_pass.py --smoke
	$(BIN)/python bench/fanout.py --admin-url $(BENCH_ADMIN_URL) --redis-url $(BENCH_REDIS_URL) --smoke

clean:
	rm -rf $(VENV) $(LOCK_VENV) var .pytest_cache .mypy_cache .ruff_cache
