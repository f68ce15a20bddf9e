# `make demo` and `make test` work from a fresh clone with only Python 3.11+ and make:
# they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo test lint fmt worker bench bench-smoke clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

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

# Figures, not assertions (docs/benchmarks.md): the pool page with 2 pods against 500 pods x 4
# slots; 200 agents heartbeating once a second against one web process; the scheduler's
# dispatches/s against `pgbench -N` on the same server; one reconcile + autoscale round over
# 1,000 pods. The PostgreSQL scripts create and drop
# their own databases on the server of BENCH_ADMIN_URL. `bench-smoke` runs each at a tiny size
# (CI runs it, so the scripts cannot rot) and records nothing.
BENCH_ADMIN_URL ?= postgres://postgres@127.0.0.1:5432/postgres
bench: install
	$(BIN)/python bench/pool_page.py
	$(BIN)/python bench/agents_heartbeat.py --admin-url $(BENCH_ADMIN_URL)
	$(BIN)/python bench/scheduler.py --admin-url $(BENCH_ADMIN_URL)
	$(BIN)/python bench/reconcile_pass.py

bench-smoke: install
	$(BIN)/python bench/pool_page.py --pods 5 --running 3 --rounds 1
	$(BIN)/python bench/agents_heartbeat.py --admin-url $(BENCH_ADMIN_URL) --agents 5 --seconds 3 --runs 1
	$(BIN)/python bench/scheduler.py --admin-url $(BENCH_ADMIN_URL) --smoke
	$(BIN)/python bench/reconcile_pass.py --smoke

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
