#!/usr/bin/env bash
# Builds vdisk and runs the main job on a built-in example: make a raw disk
# with some data, convert it to VHDX, inspect it, convert back and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tools
vdisk=target/release/vdisk
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
head -c 3000000 /dev/urandom > "$dir/payload.bin"
truncate -s 256M "$dir/example.raw"
dd if="$dir/payload.bin" of="$dir/example.raw" bs=1M seek=100 conv=notrunc status=none
echo "+ vdisk convert -O vhdx example.raw example.vhdx"
$vdisk convert -O vhdx "$dir/example.raw" "$dir/example.vhdx"
echo "+ vdisk info example.vhdx"
$vdisk info "$dir/example.vhdx"
echo "+ vdisk write example.vhdx 1M payload.bin"
$vdisk write "$dir/example.vhdx" 1M "$dir/payload.bin"
dd if="$dir/payload.bin" of="$dir/example.raw" bs=1M seek=1 conv=notrunc status=none
echo "+ vdisk convert -O raw example.vhdx back.raw"
$vdisk convert -O raw "$dir/example.vhdx" "$dir/back.raw"
echo "+ vdisk compare example.raw back.raw"
$vdisk compare "$dir/example.raw" "$dir/back.raw"
echo "demo ok: $(du -h "$dir/example.vhdx" | cut -f1) VHDX for a 256M disk holding 6 MB of data"
