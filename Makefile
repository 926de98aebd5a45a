# Herald: the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test soak lint bench bench-compare clean

## Build (release) and serve on 127.0.0.1:8080 with ./data, using the built-in config.
run:
	$(CARGO) run --release -- serve

## Every test: unit, layer (model-based, concurrency, restart) and real-server integration tests.
test:
	$(CARGO) test --lib --bins --tests

## Long runs (release): 10 minutes of constant load whose memory and disk must level
## off (tests/soak.rs), then 200 SIGKILL/restart cycles under load (tests/crash.rs).
soak:
	HERALD_SOAK_SECS=600 HERALD_CRASH_CYCLES=200 $(CARGO) test --release --test soak --test crash -- --nocapture

## What CI checks besides the tests.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## Criterion benchmarks of the channel layer's hot paths (durability as configured by default).
bench:
	$(CARGO) bench --bench layer

## Side-by-side comparison with the peers (warp hello, Django Channels + Redis), see ../shared/bench.
bench-compare:
	$(CARGO) build --release
	bash ../shared/bench/setup.sh
	HERALD_BIN=$(CURDIR)/target/release/herald bash ../shared/bench/compare.sh

clean:
	$(CARGO) clean
	rm -rf data
