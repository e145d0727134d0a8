# nightshift: `make demo` runs a night on this machine; `make test` is CI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export CARGO_TARGET_DIR ?= $(HOME)/.cache/nightshift/target
export CARGO_TERM_COLOR ?= never
PYTHON ?= python3
VENV := .venv
# The SAM CLI and cargo-lambda live in a venv of their own: aws-sam-cli pins
# boto3, click and pydantic below the versions the emulator is pinned to.
PACKAGE_VENV := .venv-package
# Where `make package` leaves the worker and its unit, for the image
# template (worker-ami/image.pkr.hcl) and for `make upload-worker`.
DIST := dist
ARTIFACTS_BUCKET ?=
ARTIFACTS_PREFIX ?= nightshift/
BIN := $(CARGO_TARGET_DIR)/debug
NIGHTSHIFT := $(BIN)/nightshift
ACCOUNTS ?= 50
# The demo's night ends three hours after it starts, whatever the hour: on
# spot (on-demand is for the last hour) and on as many workers as the
# deadline asks for tasks of a kernel not yet measured.
DEMO_NIGHT = --param NightEnd=$$(date -u -d '+3 hours' +%H:%M) --param Timezone=UTC
CHAOS_TASKS ?= 300

.PHONY: help venv browser build fmt fmt-check clippy lint unit e2e contract chaos test demo dashboard kernel-arm64 bench bench-orchestration bench-scale package upload-worker clean

help:
	@echo "make demo     run a night on the local stack: $(ACCOUNTS) accounts, spot workers, the report"
	@echo "make test     fmt, clippy, lint, unit, conformance, end-to-end, browser and chaos tests (what CI runs)"
	@echo "make dashboard  the operator's page for the local stack (http://127.0.0.1:8642/)"
	@echo "make lint     the template: cfn-lint, sam validate --lint, checkov"
	@echo "make contract the API against openapi.yaml with schemathesis (CONTRACT_EXAMPLES=$(CONTRACT_EXAMPLES))"
	@echo "make chaos    the chaos test at $(CHAOS_TASKS) tasks (CHAOS_SEED=n replays a seed)"
	@echo "make bench    kernel benchmark against NumPy"
	@echo "make kernel-arm64  the kernel's tests built for arm64 (the workers' CPU), run under qemu-user"
	@echo "make bench-orchestration  AWS calls, units and dollars per task through the local stack"
	@echo "make bench-scale  the scale model: $(SCALE_TASKS) tasks on $(SCALE_INSTANCES) instances in virtual time"
	@echo "make package  release builds for Lambda (arm64) and the worker, which goes to $(DIST)/worker/"
	@echo "make upload-worker ARTIFACTS_BUCKET=b [ARTIFACTS_PREFIX=$(ARTIFACTS_PREFIX)]"
	@echo "              the worker and its unit to the bucket that stock-image workers boot from"

# The Python dev tools (emulator, linters, NumPy), pinned, in .venv.
$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The emulator the local stack runs: moto_server with one fix of its speed
# (cli/emulator/nightshift-emulator.py), on the venv's interpreter.
EMULATOR := $(VENV)/bin/nightshift-emulator
$(EMULATOR): cli/emulator/nightshift-emulator.py $(VENV)/.installed
	{ echo '#!$(CURDIR)/$(VENV)/bin/python'; tail -n +2 $<; } >$@
	chmod +x $@

venv: $(VENV)/.installed $(EMULATOR)

# Tooling for make package, make lint and deploying: cargo-lambda (with zig)
# and the SAM CLI.
$(PACKAGE_VENV)/.installed: requirements-package.txt
	$(PYTHON) -m venv $(PACKAGE_VENV)
	$(PACKAGE_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-package.txt
	touch $@

# Headless Chromium and its WebDriver, from Debian's packages, for the
# dashboard's browser test.
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

browser: $(CHROMEDRIVER)

build:
	cargo build --workspace --bins

fmt:
	cargo fmt --all

fmt-check:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

# The template, three ways: the CloudFormation linter, SAM's own validation
# (offline: a region is all it needs) and checkov's policy checks, whose
# skips are justified next to their resources.
lint: venv $(PACKAGE_VENV)/.installed
	$(VENV)/bin/cfn-lint template.yaml
	env AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 SAM_CLI_TELEMETRY=0 \
		$(PACKAGE_VENV)/bin/sam validate --lint --template template.yaml
	$(VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation --file template.yaml

unit:
	cargo test --workspace --locked --exclude nightshift-e2e

# One stack at a time: each runs its own emulator and workers. The chaos
# test prints its seed and its verdict line. Each stack keeps the calls its
# proxy authorized in $(CALLS); the IAM test reads them all, last.
CALLS := $(BIN)/nightshift-calls
E2E_TESTS := --test end_to_end --test conformance --test invoke --test report --test cli --test console --test metrics --test dashboard --test chaos
e2e: venv browser build
	rm -rf $(CALLS)
	cargo test -p nightshift-e2e --locked $(E2E_TESTS) -- --test-threads=1 --nocapture
	cargo test -p nightshift-e2e --locked --test iam -- --nocapture

chaos: venv build
	CHAOS_TASKS=$(CHAOS_TASKS) cargo test -p nightshift-e2e --locked --test chaos -- --nocapture

# The API against openapi.yaml: schemathesis, with generated valid and
# invalid requests, on a local stack of its own; no 5xx, every answer as the
# description says, every invalid request refused. Two checks are left out:
# authentication is API Gateway's on AWS, not the function's; and "every
# schema-valid request is accepted" cannot hold for what a schema cannot say
# (a cursor only the API makes, the kernels a stack has, invisible
# characters in an account). The stack runs one worker at most: the runs
# the stateful phase opens must not starve the emulator that answers it.
CONTRACT_STATE := $(BIN)/contract-stack
CONTRACT_EXAMPLES ?= 25
CONTRACT_SEED ?= 1
contract: venv build
	$(NIGHTSHIFT) local down --state-dir $(CONTRACT_STATE) >/dev/null
	$(NIGHTSHIFT) local up --state-dir $(CONTRACT_STATE) --param MaxInstances=1 >/dev/null
	url=$$(grep '^NIGHTSHIFT_API_URL=' $(CONTRACT_STATE)/local.env | cut -d= -f2-); \
		$(VENV)/bin/schemathesis run openapi.yaml --url "$$url" --checks all \
		--exclude-checks ignored_auth,positive_data_acceptance --max-examples $(CONTRACT_EXAMPLES) --seed $(CONTRACT_SEED) \
		--request-timeout 60; \
		status=$$?; $(NIGHTSHIFT) local down --state-dir $(CONTRACT_STATE) >/dev/null; exit $$status

test: fmt-check clippy lint unit e2e contract

demo: venv build
	$(NIGHTSHIFT) local down >/dev/null
	$(NIGHTSHIFT) local up $(DEMO_NIGHT) >/dev/null
	@echo "local stack up (.nightshift/local.env); running the demo"
	$(NIGHTSHIFT) demo --accounts $(ACCOUNTS); status=$$?; \
		$(NIGHTSHIFT) local down; exit $$status

# The operator's page against the local stack (`make demo` leaves none up:
# run `nightshift local up` first, or pass --api for a deployed stack).
dashboard: build
	$(NIGHTSHIFT) dashboard

# The kernel's bits on the workers' CPU: its portfolio tests built for
# aarch64 and run under qemu-user, which emulates arm64's arithmetic exactly
# (so the bits, not the speed). Apart from `make test`: the toolchain's
# aarch64 standard library is an extra download.
AARCH64_GCC := /usr/bin/aarch64-linux-gnu-gcc
QEMU_AARCH64 := /usr/bin/qemu-aarch64
$(AARCH64_GCC) $(QEMU_AARCH64) &:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross

kernel-arm64: $(AARCH64_GCC) $(QEMU_AARCH64)
	rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=$(AARCH64_GCC) \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$(QEMU_AARCH64) -L /usr/aarch64-linux-gnu" \
		cargo test -p nightshift-kernels --locked --target aarch64-unknown-linux-gnu portfolio::

bench: venv
	bash worker-ami/kernels/bench/run.sh

# N no-op tasks through the local stack: AWS calls per task by component
# and operation, write units, dollars per million tasks, and throughput
# against the emulator's raw SQS. The last line sums it up.
BENCH_TASKS ?= 2000
bench-orchestration: venv build
	log=$$(mktemp); \
	BENCH_TASKS=$(BENCH_TASKS) cargo test -p nightshift-e2e --locked --test orchestration -- --ignored --nocapture >$$log 2>&1 \
		|| { tail -40 $$log; rm -f $$log; exit 1; }; \
	sed -n '/^tasks: /,/^calls_per_task=/p' $$log; rm -f $$log

# The scale model: a night of SCALE_TASKS tasks of 10 s on SCALE_INSTANCES
# two-slot instances, in virtual time, through the real dispatcher and
# collector against a model of AWS's latencies and limits. The functions'
# metric lines are left out; the table and its last line remain.
SCALE_TASKS ?= 100000
SCALE_INSTANCES ?= 200
bench-scale:
	cargo build -q -p nightshift-scale --locked
	$(BIN)/nightshift-scale --tasks $(SCALE_TASKS) --instances $(SCALE_INSTANCES) | grep -v '"_aws"'

# Release builds for arm64: the functions by `sam build` (cargo-lambda and
# zig; what `sam deploy` uploads, in .aws-sam/build) and the worker, copied
# with its unit to $(DIST)/worker/ (what the image template bakes and what
# upload-worker uploads). Not part of `make test`: a cold build takes
# several minutes.
LAMBDA_DIR := $(CARGO_TARGET_DIR)/lambda
SAM_BUILD := .aws-sam/build

package: $(PACKAGE_VENV)/.installed
	PATH="$(CURDIR)/$(PACKAGE_VENV)/bin:$$PATH" SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=us-east-1 \
		sam build --beta-features --template template.yaml
	PATH="$(CURDIR)/$(PACKAGE_VENV)/bin:$$PATH" cargo lambda build --release --arm64 --bin nightshift-worker
	install -d $(DIST)/worker
	install -m 0755 $(LAMBDA_DIR)/nightshift-worker/bootstrap $(DIST)/worker/nightshift-worker
	install -m 0644 worker-ami/nightshift-worker.service $(DIST)/worker/nightshift-worker.service
	@echo
	@printf '%-48s %12s %10s\n' artifact bytes MiB
	@for f in $(SAM_BUILD)/IngestFunction/bootstrap $(SAM_BUILD)/DispatcherFunction/bootstrap \
		$(SAM_BUILD)/CollectorFunction/bootstrap $(DIST)/worker/nightshift-worker; do \
		bytes=$$(wc -c < "$$f" | tr -d ' '); \
		printf '%-48s %12s %10s\n' "$$f" "$$bytes" \
			"$$(awk -v b="$$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"; \
	done

# Stock-image workers fetch these at boot (the stack's ArtifactsBucket and
# ArtifactsPrefix); a new upload reaches the next worker that boots.
upload-worker:
	@test -n "$(ARTIFACTS_BUCKET)" || { echo "usage: make upload-worker ARTIFACTS_BUCKET=<bucket> [ARTIFACTS_PREFIX=$(ARTIFACTS_PREFIX)]" >&2; exit 2; }
	@test -f $(DIST)/worker/nightshift-worker || { echo "no $(DIST)/worker/nightshift-worker: run make package first" >&2; exit 2; }
	@command -v aws >/dev/null || { echo "upload-worker needs the AWS CLI (aws)" >&2; exit 2; }
	aws s3 cp --only-show-errors $(DIST)/worker/nightshift-worker s3://$(ARTIFACTS_BUCKET)/$(ARTIFACTS_PREFIX)nightshift-worker
	aws s3 cp --only-show-errors $(DIST)/worker/nightshift-worker.service s3://$(ARTIFACTS_BUCKET)/$(ARTIFACTS_PREFIX)nightshift-worker.service
	@echo "uploaded to s3://$(ARTIFACTS_BUCKET)/$(ARTIFACTS_PREFIX)"

clean:
	-$(NIGHTSHIFT) local down
	rm -rf .nightshift $(VENV) $(PACKAGE_VENV) $(DIST) .aws-sam
	cargo clean
