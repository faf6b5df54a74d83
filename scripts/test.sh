#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need on a fresh machine
# (Debian: the Rust toolchain, gcc, python3 and qemu-utils are assumed).
set -euo pipefail
cd "$(dirname "$0")/.."

# A tool is there when it is on PATH or in an sbin directory (mkfs.ext4 and
# friends live in /usr/sbin, which is not on every user's PATH).
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
need=()
# fusermount3 (fuse3): `vdisk mount` without root privilege; mkfs.ext4,
# debugfs and e2fsck (e2fsprogs): the mount tests put an ext4 file system on
# a mounted image; sfdisk (fdisk): partition files of a mount; vhdimount
# (libvhdi-utils): another reader of the differencing disks vdisk writes;
# iasl (acpica-tools): disassembles the ACPI tables vmm-core makes; cpio:
# reads back the initramfs the Linux boot test writes.
for tool in unzip:unzip bzip2:bzip2 gzip:gzip fusermount3:fuse3 \
  mkfs.ext4:e2fsprogs debugfs:e2fsprogs e2fsck:e2fsprogs sfdisk:fdisk \
  vhdimount:libvhdi-utils iasl:acpica-tools cpio:cpio; do
  pkg=${tool#*:}
  have "${tool%%:*}" || [[ " ${need[*]-} " == *" $pkg "* ]] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
command -v qemu-img >/dev/null || echo "note: qemu-img absent: interop tests will skip"
[ -e /dev/fuse ] || echo "note: /dev/fuse absent: the mount tests will skip"

cargo test --workspace --release "$@"

# A 20-second smoke run of every fuzz target (fuzz/README.md; it installs
# g++ and cargo-fuzz when missing): any panic, overflow, timeout or
# out-of-memory fails the run. Skipped when arguments narrow the tests, or
# with FUZZ_SECONDS=0; FUZZ_SECONDS sets the seconds per target.
if [ $# -eq 0 ] && [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  bash scripts/fuzz.sh all "${FUZZ_SECONDS:-20}"
fi
