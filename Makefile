# Developer and CI entry points for Holdfast.
# Targets that talk to PostgreSQL or RabbitMQ depend on `services`, which
# starts both locally if needed (see scripts/services.sh).

.PHONY: help services build migrate demo test lint fmt ci

# Default target: list what is available.
help:
	@echo "make services  start local PostgreSQL and RabbitMQ if needed"
	@echo "make build     build the whole workspace, including tests"
	@echo "make migrate   apply database migrations"
	@echo "make demo      run the demo against local services"
	@echo "make test      run the workspace tests (nextest if installed)"
	@echo "make lint      check formatting and run clippy with warnings denied"
	@echo "make fmt       format the code"
	@echo "make ci        lint + test, as run by CI"

services:
	bash scripts/services.sh

build:
	cargo build --workspace --all-targets

migrate: services
	cargo run --quiet -- migrate

demo: services
	cargo run --quiet -- demo

# Prefer cargo-nextest when it is installed; fall back to cargo test.
test: services
	@if cargo nextest --version >/dev/null 2>&1; then \
		echo "cargo nextest run --workspace --no-fail-fast"; \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo test --workspace --no-fail-fast"; \
		cargo test --workspace --no-fail-fast; \
	fi

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

ci: lint test
