#!/usr/bin/env bash
# Runs every test of Sluice on a fresh machine: installs what is missing (the
# wasm32-wasip2 target, the Tansu broker), makes sure the local PostgreSQL
# runs, builds the plugins as WebAssembly components, then runs the plugin
# crates' unit tests and the host's unit and integration tests (which load the
# real compiled components and start their own broker on a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tansu.sh
scripts/install-test-tools.sh
scripts/ensure-postgres.sh
scripts/build-plugins.sh
cargo test --locked -p sluice-plugin -p trade-flattener -p symbol-router -p sluice "$@"
