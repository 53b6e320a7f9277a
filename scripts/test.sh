#!/usr/bin/env bash
# Runs every test of Sluice on a fresh machine: installs what is missing (the
# wasm32-wasip2 target), builds the plugins as WebAssembly components, then
# runs the plugin crates' unit tests and the host's unit and integration tests
# (which load the real compiled components).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-plugins.sh
cargo test --locked -p sluice-plugin -p trade-flattener -p sluice "$@"
