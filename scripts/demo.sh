#!/usr/bin/env bash
# A short tour of vdisk on a built-in example, in a temporary directory:
# create a VHDX, write into it, inspect it (file size versus space used),
# convert it to raw and compare, make a differencing child, take a
# checkpoint, check the images; then, where KVM is available, run a small
# guest program in the vmm whose virtio-blk disk is the checkpoint bundle.
# Builds vdisk and vmm first (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "Building vdisk and vmm (cargo build --release -p tools; the first build takes a few minutes)..."
cargo build --release -q -p tools
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
vdisk=$target/release/vdisk
vmm=$target/release/vmm
scripts=$PWD/scripts
[ -x "$vdisk" ] || { echo "demo: $vdisk was not built" >&2; exit 1; }

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"

say() { printf '\n# %s\n' "$*"; }
run() { printf '$ vdisk %s\n' "$*"; "$vdisk" "$@"; }
# A file's length (what ls -l shows) and the space it takes (what du shows).
sizes() {
    for f in "$@"; do
        printf '  %-12s %11s bytes long (ls -l), %7s KiB used (du)\n' \
            "$f" "$(stat -c %s "$f")" "$(du -k "$f" | cut -f1)"
    done
}

say "A dynamic VHDX of 256 MiB: blocks are allocated as they are written."
run create disk.vhdx 256M
head -c 3000000 /dev/urandom > payload.bin
run write disk.vhdx 1M payload.bin
run info disk.vhdx
say "File size is the file's length (ls -l); disk size is the space it takes on the
# host (du), smaller where the file is sparse; allocated bytes are the virtual bytes
# in allocated blocks. The one block written (32 MiB) makes the file long, but only
# its 3 MB of data take space:"
sizes disk.vhdx

say "Convert to raw and back, and compare the virtual contents."
run convert -O raw disk.vhdx disk.raw
sizes disk.raw
run convert -O vhd disk.raw disk.vhd
run compare disk.raw disk.vhd

say "A differencing child: it starts empty and reads what it lacks from its parent."
run create -b disk.vhdx child.avhdx
printf 'hello from the child' > hello.txt
run write child.avhdx 0 hello.txt
run read child.avhdx 0 20
echo
run info --backing-chain child.avhdx
say "The child now differs from its parent (compare exits 1):"
run compare disk.vhdx child.avhdx || true
sizes child.avhdx

say "A checkpoint bundle: a base disk, checkpoints, and the active disk a VM writes."
run checkpoint init vm 256M
active=$("$vdisk" checkpoint path vm)
run write "$active" 0 hello.txt
run checkpoint create vm first-boot
run checkpoint list vm

say "Check the images' structures (exit 0: no problem)."
run check disk.vhdx
run check child.avhdx
run check disk.vhd

say "A guest on KVM: vmm runs a small program (vmm-core/payloads/hello.c) whose disk
# is the bundle's active disk; it writes a line at 1 MiB, flushes and reads it back."
if [ -r /dev/kvm ] && [ -w /dev/kvm ] && command -v gcc >/dev/null; then
    bash "$scripts/payload.sh" "$scripts/../vmm-core/payloads/hello.c" hello.bin
    printf '$ vmm run --disk vm --payload hello.bin\n'
    "$vmm" run --disk vm --payload hello.bin
    active=$("$vdisk" checkpoint path vm)
    printf '$ vdisk read %s 1M 31\n' "$active"
    "$vdisk" read "$active" 1M 31
    run check "$active"
else
    echo "(skipped: /dev/kvm is not usable here, or gcc is missing)"
fi

say "demo ok"
