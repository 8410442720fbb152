#!/usr/bin/env bash
# Writes a CycloneDX 1.5 SBOM (JSON) for each shipped binary into target/sbom/ (or $1):
# hospital-ingest, vehicle-agent, ed-monitor, ed-web, ed-hl7-feed, relay-devcerts. Only what the binary
# links is listed (no dev- or build-dependencies), with versions, licences and crates.io checksums.
# Needs cargo-cyclonedx: `cargo install --locked cargo-cyclonedx@0.5.9`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/sbom}
mkdir -p "$out"
# cargo-cyclonedx writes <bin>_bin.cdx.json beside each crate's Cargo.toml, for every binary
# of the workspace; keep the shipped ones and remove the rest.
cargo cyclonedx --format json --spec-version 1.5 --describe binaries --no-build-deps \
  --target x86_64-unknown-linux-gnu -q
for bin in hospital-ingest vehicle-agent ed-monitor ed-web ed-hl7-feed relay-devcerts; do
  sbom=$(find . -path ./target -prune -o -name "${bin}_bin.cdx.json" -print)
  mv "$sbom" "$out/$bin.cdx.json"
done
find . -path ./target -prune -o -name '*_bin.cdx.json' -exec rm {} +
ls "$out"
