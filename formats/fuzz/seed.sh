#!/bin/sh
# Writes small valid machines (and a packed executable) into corpus/parse/ as fuzz seeds.
set -eu
cd "$(dirname "$0")"
mkdir -p corpus/parse
cargo run -q --manifest-path ../Cargo.toml --example write_fuzz_seeds -- corpus/parse
