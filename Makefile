# Herald: the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test test-python soak lint bench bench-load bench-publish bench-auth bench-hostile bench-compare clean

# The peers' benchmark harness (Django Channels + Redis, warp hello), beside the project.
SHARED ?= ../shared

## Build (release) and serve on 127.0.0.1:8080 with ./data, using the built-in config.
run:
	$(CARGO) run --release -- serve

## Every test: unit, layer (model-based, concurrency, restart) and real-server integration
## tests, then the Django layer package's (clients/python: Django Channels' and
## channels_redis' own layer suites, and a daphne app) against the debug server.
test:
	$(CARGO) test --workspace --lib --bins --tests
	$(MAKE) test-python

## The Python package's tests, in a virtualenv under target/ (needs python3-venv).
PYENV := target/pyenv
test-python:
	$(CARGO) build --quiet
	@test -x $(PYENV)/bin/python || python3 -m venv $(PYENV) || \
		{ echo "python3 -m venv failed: apt-get install python3-venv" >&2; exit 1; }
	$(PYENV)/bin/pip install --quiet --upgrade -e 'clients/python[test]'
	HERALD_BIN=$(CURDIR)/target/debug/herald $(PYENV)/bin/python -m pytest -q -p no:cacheprovider clients/python/tests

## Long runs (release): 10 minutes of constant load whose memory and disk must level
## off (tests/soak.rs), then 200 SIGKILL/restart cycles under load (tests/crash.rs).
soak:
	HERALD_SOAK_SECS=600 HERALD_CRASH_CYCLES=200 $(CARGO) test --release --test soak --test crash -- --nocapture

## What CI checks besides the tests.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Criterion benchmarks of the hot paths: message encoding, store append and flush,
## send/receive, group_send fan-out (durability as configured by default).
bench:
	$(CARGO) bench --bench layer

## The load generator (herald-bench, benches/load/): every scenario against a fresh
## release server pinned to CPU 0, the bench itself on CPU 1; a table, and JSON in
## target/bench-load.json.
bench-load:
	$(CARGO) build --release -p herald -p herald-bench
	taskset -c 1 ./target/release/herald-bench --herald-bin ./target/release/herald --server-cpu 0 --json target/bench-load.json

## Durable HTTP publishing (wrk) against warp hello in the same rounds, pinned like
## bench-load; prints each round and Herald's share of hello's rate.
bench-publish:
	SHARED=$(SHARED) bash benches/wrk-publish.sh

## What access control costs: wrk publishes without a token, with a Bearer token and a
## Bearer JWT on one server, and 1,000 SSE reconnects with one JWT (cached) and with 1,000.
bench-auth:
	bash benches/wrk-auth.sh

## Hostile clients at scale (benches/hostile.py): listings, stats, backups and hostile
## uploads against a release server holding 200,000 channels, with a victim's latencies.
bench-hostile:
	$(CARGO) build --release
	python3 benches/hostile.py --herald-bin target/release/herald

## Side-by-side comparison with the peers (warp hello, Django Channels + Redis) under the
## same load and pinning, with ratios ($(SHARED)/bench). The harness publishes JSON
## without a "type", so Herald runs with --default-message-type; all its clients share
## one address, so Herald allows them all (limits.max_connections_per_client).
bench-compare:
	$(CARGO) build --release
	bash $(SHARED)/bench/setup.sh
	HERALD_BIN=$(CURDIR)/target/release/herald HERALD_ARGS="--default-message-type notify" \
		HERALD_LIMITS__MAX_CONNECTIONS_PER_CLIENT=1000000 bash $(SHARED)/bench/compare.sh

clean:
	$(CARGO) clean
	rm -rf data
