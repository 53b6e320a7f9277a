#!/usr/bin/env bash
# Runs every check of Sluice on a fresh machine: installs what is missing (the
# wasm32-wasip2 target, the Tansu broker, socat and openssl, mdBook), makes
# sure the local PostgreSQL runs, checks formatting, builds the plugins as
# WebAssembly components, runs clippy with warnings as errors, builds the book
# under docs/, then runs the plugin crates' unit tests and the host's unit and
# integration tests (which load the real compiled components and start their
# own broker on a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tansu.sh
scripts/install-test-tools.sh
scripts/install-mdbook.sh
scripts/ensure-postgres.sh
cargo fmt --all --check
scripts/build-plugins.sh
cargo clippy --locked -p sluice-abi -p sluice-plugin -p trade-flattener -p symbol-router -p candles -p symbol-totals -p ohlc-candles -p window-stats -p sluice --all-targets -- -D warnings
mdbook build docs
cargo test --locked -p sluice-abi -p sluice-plugin -p trade-flattener -p symbol-router -p candles -p symbol-totals -p ohlc-candles -p window-stats -p sluice "$@"
