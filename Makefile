# fastknock developer targets. `make demo` and `make test` are the README's two commands:
# both set up a fresh machine first (scripts/setup.sh is idempotent). Run as root: the
# end-to-end tests and the demo create network namespaces and nftables rules inside them.
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test unit lint bench bench-flood fuzz debug dist clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

# pytest exit code 5 ("no tests collected") counts as a failure. First the pure-Python
# references on their own (unit tests, FASTKNOCK_NO_EXTENSIONS=1), then everything with the
# compiled extensions (test_extensions.py fails if they silently fell back).
test: setup lint
	FASTKNOCK_NO_EXTENSIONS=1 $(PY) -m pytest -q -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS); \
	  rc=$$?; if [ $$rc -ne 0 ]; then [ $$rc -eq 5 ] && echo "pytest collected no tests" >&2; exit 1; fi
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

unit:
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check fastknock tests bench scripts fuzz
	$(PY) -m ruff format --check fastknock tests bench scripts fuzz
	$(PY) -m mypy

bench: setup
	$(PY) -m pytest bench -p no:cacheprovider --benchmark-enable -q
	$(PY) bench/bench_fwd_install.py
	$(PY) bench/bench_interval_sets.py
	PYTHONPATH=. $(PY) bench/bench_peer.py
	PYTHONPATH=. $(PY) bench/bench_reject_cost.py

# The flood benchmark (root): its own namespaces, both daemons, a C flood generator.
FLOOD_ARGS ?=
bench-flood: setup
	$(PY) bench/flood/run.py $(FLOOD_ARGS)
	$(PY) bench/flood/tcp_idle.py
	$(PY) bench/flood/hooks.py

# The atheris fuzz targets (fuzz/), one after the other, FUZZ_SECONDS each; prints
# executions, crashes, differences and violations per target and fails on any of them.
FUZZ_SECONDS ?= 60
fuzz: setup
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS)

# Line-tracing build of the extensions (coverage / profilers see Cython lines).
debug:
	FASTKNOCK_CYTHON_TRACE=1 $(PY) setup.py build_ext --inplace --force

# Release artefacts: the sdist, then the wheel built from it (isolated: proves the sdist is
# complete), both checked by twine and scripts/check_dist.py. The tools live in a venv of
# their own (build/dist-tools), not in the development Python.
DIST_TOOLS = build/dist-tools
dist:
	rm -rf dist
	[ -x $(DIST_TOOLS)/bin/twine ] || { $(PY) -m venv $(DIST_TOOLS) && \
	  PIP_ROOT_USER_ACTION=ignore $(DIST_TOOLS)/bin/pip install -q build twine; }
	$(DIST_TOOLS)/bin/python -m build --outdir dist .
	$(DIST_TOOLS)/bin/twine check --strict dist/*
	$(PY) scripts/check_dist.py dist

clean:
	rm -rf build dist *.egg-info fastknock/*.so fastknock/*/*.so fastknock/_wire.c fastknock/_hmac.c fastknock/knockd/_recv.c fastknock/knockd/_decide.c
