# nightshift: `make demo` runs a night on this machine; `make test` is CI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export CARGO_TARGET_DIR ?= $(HOME)/.cache/nightshift/target
export CARGO_TERM_COLOR ?= never
PYTHON ?= python3
VENV := .venv
BIN := $(CARGO_TARGET_DIR)/debug
NIGHTSHIFT := $(BIN)/nightshift
ACCOUNTS ?= 50
CHAOS_TASKS ?= 300

.PHONY: help venv build fmt fmt-check clippy lint-template unit e2e chaos test demo bench package clean

help:
	@echo "make demo     run a night on the local stack: $(ACCOUNTS) accounts, spot workers, the report"
	@echo "make test     fmt, clippy, template lint, unit, conformance, end-to-end and chaos tests (what CI runs)"
	@echo "make chaos    the chaos test at $(CHAOS_TASKS) tasks (CHAOS_SEED=n replays a seed)"
	@echo "make bench    kernel benchmark against NumPy"
	@echo "make package  release builds for Lambda (arm64) and the worker image"

# The Python dev tools (emulator, linter, NumPy), pinned, in .venv.
$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

build:
	cargo build --workspace --bins

fmt:
	cargo fmt --all

fmt-check:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

lint-template: venv
	$(VENV)/bin/cfn-lint template.yaml

unit:
	cargo test --workspace --locked --exclude nightshift-e2e

# One stack at a time: each runs its own emulator and workers. The chaos
# test prints its seed and its verdict line.
e2e: venv build
	cargo test -p nightshift-e2e --locked -- --test-threads=1 --nocapture

chaos: venv build
	CHAOS_TASKS=$(CHAOS_TASKS) cargo test -p nightshift-e2e --locked --test chaos -- --nocapture

test: fmt-check clippy lint-template unit e2e

demo: venv build
	$(NIGHTSHIFT) local down >/dev/null
	$(NIGHTSHIFT) local up >/dev/null
	@echo "local stack up (.nightshift/local.env); running the demo"
	$(NIGHTSHIFT) demo --accounts $(ACCOUNTS); status=$$?; \
		$(NIGHTSHIFT) local down; exit $$status

bench: venv
	bash worker-ami/kernels/bench/run.sh

# Release builds: the functions for Lambda (arm64, via cargo-lambda and zig)
# and the worker for the image. Not part of `make test`: a cold build takes
# several minutes.
$(VENV)/.package: requirements-package.txt | venv
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-package.txt
	touch $@

package: $(VENV)/.package
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --arm64 \
		--bin ingest --bin dispatcher --bin collector
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --arm64 --bin nightshift-worker

clean:
	-$(NIGHTSHIFT) local down
	rm -rf .nightshift $(VENV)
	cargo clean
