#!/usr/bin/env bash
# Build a payload for `vmm run --payload` from freestanding C:
#   bash scripts/payload.sh SRC.c OUT.bin
# SRC.c defines `u32 payload_main(u64 ram, u64 disks, u64 vcpu, u64 vcpus)`
# and may use vmm-core/payloads/payload.h (port I/O, the UART, a polling
# virtio-blk driver). The result is a flat binary linked at 0x200000, the
# ABI's load address. These are the flags vmm-core/build.rs uses for the
# test payloads.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 SRC.c OUT.bin" >&2; exit 2; }
src=$1 out=$2
lib="$(cd "$(dirname "$0")/.." && pwd)/vmm-core/payloads"
elf=$(mktemp)
trap 'rm -f "$elf"' EXIT
gcc -ffreestanding -nostdlib -nostartfiles -static -fno-pic -no-pie -mno-red-zone -O2 \
    -fno-stack-protector -fno-asynchronous-unwind-tables -fno-tree-loop-distribute-patterns \
    -fcf-protection=none -Wall -Werror -Wl,--build-id=none -Wl,-T,"$lib/link.ld" \
    -I"$lib" -o "$elf" "$lib/start.S" "$lib/payload.c" "$src"
objcopy -O binary "$elf" "$out"
