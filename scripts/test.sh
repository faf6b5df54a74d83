#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need on a fresh machine
# (Debian: the Rust toolchain, gcc, python3 and qemu-utils are assumed).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in unzip:unzip bzip2:bzip2 gzip:gzip; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
command -v qemu-img >/dev/null || echo "note: qemu-img absent: interop tests will skip"

cargo test --workspace --release "$@"
