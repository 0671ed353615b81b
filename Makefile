# Developer and CI entry points for Holdfast.
# Targets that talk to PostgreSQL or RabbitMQ depend on `services`, which
# starts both locally if needed (see scripts/services.sh).

.PHONY: help services build install migrate demo test lint fmt ci fleet fleet-status fleet-stop observability schemas contract

# Default target: list what is available.
help:
	@echo "make services  start local PostgreSQL and RabbitMQ if needed"
	@echo "make build     build the whole workspace, including tests"
	@echo "make install   build the release binary and install \`holdfast\` in ~/.cargo/bin (on the PATH)"
	@echo "make migrate   apply database migrations"
	@echo "make demo      run the demo against local services"
	@echo "make test      run the workspace tests (nextest if installed)"
	@echo "make lint      check formatting and run clippy with warnings denied"
	@echo "make fmt       format the code"
	@echo "make schemas   write the JSON Schemas of the wire messages to docs/schemas/ (from the code)"
	@echo "make contract  validate docs/asyncapi.yaml with the AsyncAPI CLI (npm)"
	@echo "make ci        what CI runs (.ci/run): lint, contract, test, chaos, fuzz, observability, browser, python-client"
	@echo "make fleet     start 2 coordinators, 3 workers, 1 reconciler as local processes"
	@echo "make fleet-status / make fleet-stop   inspect or stop that fleet"
	@echo "make compose-secrets  passwords and URLs for docker/compose.yml in docker/secrets/"
	@echo "make observability  check the dashboard and alerts against a live fleet"
	@echo "make fuzz      fuzz the HTTP API against its OpenAPI document (schemathesis)"
	@echo "make bench     measure throughput, latency and memory against the machine ceilings (holdfast-bench)"
	@echo "make bench-profile  PostgreSQL per statement and per item, on a throwaway cluster (holdfast-bench --profile-pg)"
	@echo "make browser   end-to-end tests of the reference page /demo in Chromium (Playwright)"
	@echo "make chaos     fault injection against real processes on throwaway services, ledger checked (holdfast-chaos)"
	@echo "make python-client  the Python producer client (clients/python): mypy --strict, pytest against a real fleet"

services:
	bash scripts/services.sh

build:
	cargo build --workspace --all-targets

# `cargo install --path` builds in this workspace's target/ (release), so
# after `make demo` it only copies the binary.
install:
	cargo install --path . --locked

migrate: services
	cargo run --quiet -- migrate

# The build first, with cargo's progress shown (a cold build takes minutes),
# then the demo from the release binary: target/release/holdfast.
demo: services
	cargo build --release --bin holdfast
	./target/release/holdfast demo

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

# The JSON Schema of every wire message, generated from the Rust types
# (holdfast schemas). A test fails when the committed files differ.
schemas:
	cargo run --quiet -- schemas --out docs/schemas

# docs/asyncapi.yaml validated by the AsyncAPI CLI (installed from npm into
# tools/contract/), and checked against the names of the topology.
contract:
	bash scripts/asyncapi-validate.sh

# The same steps, in the same order, as .ci/run.
ci: lint contract test chaos fuzz observability browser python-client

# The compose fleet of docker/compose.yml as local processes, on the local
# services (scripts/fleet.sh; settings in its header). Returns once every
# process answers /readyz.
fleet: services
	cargo build --bin holdfast
	bash scripts/fleet.sh start

fleet-status:
	bash scripts/fleet.sh status

fleet-stop:
	bash scripts/fleet.sh stop

# One database user per Compose service, and the URLs that name them
# (docker/secrets/, not committed; see docs/operations.md, "Database roles").
.PHONY: compose-secrets
compose-secrets:
	bash scripts/compose-secrets.sh

# A real Prometheus scrapes a fleet while a scenario runs; every dashboard
# query and alert rule must return series (docs/operations.md).
observability: services
	bash scripts/verify-observability.sh

# Fuzz the HTTP API against its own OpenAPI document with schemathesis: no
# 5xx, every status, header, media type and body as documented
# (scripts/fuzz-api.sh; installs schemathesis from PyPI if missing).
.PHONY: fuzz
fuzz: services
	bash scripts/fuzz-api.sh

# Throughput, latency and memory against this machine's broker and PostgreSQL
# ceilings, in one run (release build). See docs/performance.md.
.PHONY: bench
# holdfast-bench starts the roles from the `holdfast` binary beside it, which
# `cargo run -p` does not build: build it first.
bench: services
	cargo build --release --quiet --bin holdfast
	cargo run --release --quiet -p holdfast-bench

# PostgreSQL per statement, per item, on a throwaway cluster with
# pg_stat_statements (docs/performance.md, "Where PostgreSQL's time goes").
.PHONY: bench-profile
bench-profile: services
	cargo build --release --quiet --bin holdfast
	cargo run --release --quiet -p holdfast-bench -- --profile-pg

# End-to-end tests of the reference page (/demo) in Debian's Chromium with
# playwright-core; saves docs/screenshots/*.png (scripts/browser-test.sh).
.PHONY: browser
browser: services
	bash scripts/browser-test.sh

# Fault injection: real role processes on throwaway PostgreSQL and RabbitMQ
# instances of its own (ports 5433 and 5673, removed afterwards), producers,
# crashes, restarts; then the ledger is checked and a table printed. Exits
# non-zero on any loss, double capture, overspend, open hold or drift.
# `services` only makes sure the packages are installed. See docs/reliability.md.
.PHONY: chaos
# holdfast-chaos starts the roles from the `holdfast` binary beside it, which
# `cargo run -p` does not build: build it first.
chaos: services
	cargo build --quiet --bin holdfast
	cargo run --quiet -p holdfast-chaos

# The Python producer client (clients/python): a virtualenv with the package
# and its test extras from PyPI, mypy --strict, then pytest against a fleet on
# a database, namespace and virtual host of its own, all removed afterwards
# (scripts/python-client-test.sh).
.PHONY: python-client
python-client: services
	bash scripts/python-client-test.sh
