#!/usr/bin/env bash
# Installs mdBook, which builds the book under docs/ (scripts/test.sh builds
# it, so a broken chapter fails CI), from crates.io when this version is
# missing: without its `serve` and `watch` features, which only an author
# previewing the book needs (`cargo install mdbook` gives those).
set -euo pipefail
version=0.5.4
if command -v mdbook >/dev/null 2>&1 && mdbook --version 2>/dev/null | grep -q "v$version"; then
  exit 0
fi
echo "installing mdbook $version from crates.io (about 2 minutes on 2 cores)..." >&2
cargo install mdbook --locked --version "$version" --no-default-features --features search
