#!/usr/bin/env bash
# Installs Tansu, the Kafka-compatible broker the tests and the demo run
# (no Kafka is packaged for the test machines). Skipped when present.
set -euo pipefail
version=0.6.0
if command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "installing tansu $version from crates.io (about 8 minutes on 2 cores)..." >&2
cargo install tansu --locked --version "$version" --features dynostore,postgres
