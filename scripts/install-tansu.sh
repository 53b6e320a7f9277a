#!/usr/bin/env bash
# Installs Tansu, the Kafka-compatible broker the tests and the demo run
# (no Kafka is packaged for the test machines), with its in-memory engine and
# its durable SQLite engine (the fault tests restart the broker and need the
# topics to survive). Skipped when this version with these features is present.
set -euo pipefail
version=0.6.0
features=dynostore,libsql
installed() {
  command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$version" &&
    python3 - "${CARGO_HOME:-$HOME/.cargo}/.crates2.json" "$features" <<'PY'
import json, sys
installs = json.load(open(sys.argv[1]))["installs"]
wanted = set(sys.argv[2].split(","))
sys.exit(0 if any(k.startswith("tansu ") and wanted <= set(v.get("features", [])) for k, v in installs.items()) else 1)
PY
}
if installed; then
  exit 0
fi
echo "installing tansu $version ($features) from crates.io (about 13 minutes on 2 cores)..." >&2
cargo install tansu --locked --force --version "$version" --features "$features"
