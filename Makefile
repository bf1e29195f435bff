# ditfleet: the two commands a newcomer needs.
#   make demo   set up (RabbitMQ, Redis, libtorch venv), build, run a scheduler + worker, submit a job
#   make test   set up, build, run every test (unit, end-to-end with real RabbitMQ/Redis/processes,
#               golden comparisons against diffusers, deployment validation), then clippy -D warnings
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
CARGO ?= cargo

.PHONY: demo test setup build build-release goldens validate-deploy drill-broker-restarts loadtest fmt clippy clean-test-queues

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

build-release: setup
	$(CARGO) build --release --workspace --bins

demo: build
	@bash scripts/demo.sh

# Real-width goldens (Flux, SDXL) are generated (~1.5 min, cached under target/goldens) and compared; the small
# committed goldens run in the plain `cargo test` pass. Goldens whose bits depend on the CPU's instruction set
# (the SDXL UNet's and VAE's bf16 outputs, the schedulers' float32 sigmas from torch's CPU kernels) are also
# made on this machine and compared exactly here; the plain pass compares the committed ones within bounds.
goldens: setup
	@dir=$$(bash tests/fixtures/flux_goldens.sh big) && \
	  DITFLEET_GOLDENS=$$dir $(CARGO) test --workspace --test flux_goldens -- --ignored --test-threads 1
	@dir=$$(bash tests/fixtures/sdxl_goldens.sh big) && local=$$(bash tests/fixtures/sdxl_goldens.sh local) && \
	  DITFLEET_SDXL_GOLDENS=$$dir DITFLEET_SDXL_LOCAL_GOLDENS=$$local \
	  $(CARGO) test -p ditfleet-engine --test sdxl_goldens -- --ignored --test-threads 1
	@local=$$(bash tests/fixtures/scheduler_goldens.sh local) && \
	  DITFLEET_SCHEDULER_LOCAL_GOLDENS=$$local $(CARGO) test -p ditfleet-engine --test scheduler_goldens
	@dir=$$(bash tests/fixtures/sdxl_unet_goldens.sh big) && local=$$(bash tests/fixtures/sdxl_unet_goldens.sh local) && \
	  DITFLEET_SDXL_UNET_GOLDENS=$$dir DITFLEET_SDXL_UNET_LOCAL_GOLDENS=$$local \
	  $(CARGO) test -p ditfleet-engine --test sdxl_unet_goldens -- --ignored --test-threads 1

validate-deploy:
	@bash scripts/validate-deploy.sh

# The end-to-end crate's tests each run several real processes against one RabbitMQ and Redis: on
# a 2-core machine they run one at a time (in parallel they starve each other's leases).
# Each pass's output is also kept under target/test-logs/; a failing run ends with the failures'
# messages, so the tail of a CI log names what failed. An end-to-end test that failed while the
# shared RabbitMQ wedged (restarted during the run, or found not answering right after it) is re-run
# once (scripts/e2e-retry-after-heal.sh).
test: build
	@mkdir -p target/test-logs; \
	  $(CARGO) test --workspace --exclude ditfleet-tests --no-fail-fast 2>&1 | tee target/test-logs/unit.log; a=$${PIPESTATUS[0]}; \
	  $(CARGO) test -p ditfleet-engine --features bench --lib --no-fail-fast 2>&1 | tee target/test-logs/bench-lib.log; c=$${PIPESTATUS[0]}; \
	  bash scripts/heal-rabbitmq.sh; \
	  DITFLEET_TEST_HEAL_BROKER=1 $(CARGO) test -p ditfleet-tests --no-fail-fast -- --test-threads=1 2>&1 | tee target/test-logs/e2e.log; b=$${PIPESTATUS[0]}; \
	  if [ $$b -ne 0 ] && CARGO="$(CARGO)" bash scripts/e2e-retry-after-heal.sh target/test-logs/e2e.log; then b=0; fi; \
	  if [ $$(( a | b | c )) -ne 0 ]; then \
	    echo "== failures (target/test-logs/*.log) =="; \
	    grep -h -E -A14 '^---- .* stdout ----$$|^test .* FAILED$$|e2e-watchdog: ' target/test-logs/*.log | cut -c1-400 | head -240; \
	  fi; \
	  exit $$(( a | b | c ))
	$(MAKE) --no-print-directory goldens
	$(MAKE) --no-print-directory validate-deploy
	$(MAKE) --no-print-directory clippy

# 10 restarts of a private RabbitMQ node under load, with its summary table (docs/benchmarks.md);
# `make test` runs the same test.
drill-broker-restarts: build
	$(CARGO) test -p ditfleet-tests --test broker_restarts -- --nocapture

loadtest: build-release
	$(CARGO) run --release -p ditfleet-tests --bin ditfleet-loadtest -- --jobs 5000 --workers 4

fmt:
	$(CARGO) fmt --all

# The engine's benchmark code (loopback communicator, A/B switches, examples) only builds with
# its `bench` feature: checked separately.
clippy: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p ditfleet-engine --all-targets --features bench -- -D warnings
