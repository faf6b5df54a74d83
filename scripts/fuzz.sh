#!/usr/bin/env bash
# Fuzz one target, or every target, for SECONDS each (default 20):
#   scripts/fuzz.sh [TARGET|all] [SECONDS]
# Installs what is missing (a C++ compiler for libFuzzer, cargo-fuzz 0.13),
# builds every target once (release, debug assertions on: overflows panic;
# no sanitizer unless FUZZ_SANITIZER=address: the code under test is safe
# Rust, and AddressSanitizer's handling of the multi-MiB buffers of the
# whole-image targets makes them ten times slower),
# then runs each target alone (-jobs=1) with the checked-in seeds
# fuzz/seeds/TARGET, what earlier runs found (fuzz/corpus/TARGET, not
# checked in) and, when ../shared/corpus is there, small pieces of its
# real images (prepared once into fuzz/corpus-shared, not checked in).
# With `all`, first runs the harness's unit tests (cargo test --lib).
# Prints the executions of each target (libFuzzer's
# stat::number_of_executed_units); exits non-zero if any target crashed,
# leaked, ran out of memory or timed out, after printing the file holding
# the input (fuzz/artifacts/TARGET/...).
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, -Cpasses=sancov);
# RUSTC_BOOTSTRAP=1 lets this stable toolchain take them. The targets are
# built through fuzz/rustc-wrapper.sh, which leaves crc32c (not under test,
# and a third of the whole-image targets' time when instrumented) without
# coverage instrumentation.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${1:-all}
seconds=${2:-20}
sanitizer=${FUZZ_SANITIZER:-none}
export RUSTC_BOOTSTRAP=1

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate: it needs c++
# (g++ and its libstdc++).
need=()
command -v c++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
if ! cargo fuzz --version 2>/dev/null | grep -q ' 0\.13\.'; then
  cargo install cargo-fuzz --version '^0.13' --locked
fi

cd fuzz
export RUSTC_WRAPPER=$root/fuzz/rustc-wrapper.sh
all=$(cargo fuzz list)
if [ "$target" = all ]; then
  targets=$all
else
  grep -qx "$target" <<<"$all" || { echo "no fuzz target $target (have: $(echo $all))" >&2; exit 2; }
  targets=$target
fi

# Small pieces of the real images in ../shared/corpus (never copied into
# the repository): struct dumps to their parsers, VHD files up to 1 MiB
# whole (and their footers and dynamic headers), the first 64 KiB of every
# image to the partition parser, VHDX files sparse-encoded (see
# fuzz/src/lib.rs) when that is under 256 KiB.
shared=$root/../shared/corpus
prep_shared() {
  local out=$root/fuzz/corpus-shared tmp
  [ -d "$shared" ] || return 0
  [ -e "$out/.done" ] && return 0
  rm -rf "$out"; mkdir -p "$out"
  tmp=$(mktemp -d)
  put() { mkdir -p "$out/$1"; cp "$2" "$out/$1/$3"; }
  local s=$shared/structs
  [ -f $s/image_header.1 ] && put vhdx_header $s/image_header.1 image_header
  [ -f $s/region_table.1 ] && put vhdx_region_table $s/region_table.1 region_table
  [ -f $s/file_footer.1 ] && put vhd_footer $s/file_footer.1 file_footer
  [ -f $s/dynamic_disk_header.1 ] && put vhd_dynamic_header $s/dynamic_disk_header.1 dynamic_disk_header
  [ -f $s/parent_locator_header.1 ] && put vhdx_parent_locator $s/parent_locator_header.1 parent_locator_header
  for f in "$shared"/vhd/* "$shared"/bad/* "$shared"/vhdx/*; do
    local name raw
    name=$(basename "$f"); raw=$tmp/${name%.*}
    case $f in
      *.gz) gzip -dc "$f" >"$raw" 2>/dev/null || continue ;;
      *.bz2) bzip2 -dc "$f" >"$raw" 2>/dev/null || continue ;;
      *.zip) unzip -p "$f" >"$raw" 2>/dev/null || continue ;;
      *) continue ;;
    esac
    head -c 65536 "$raw" >"$tmp/part" && put partition "$tmp/part" "$name"
    case $raw in
      *.vhd)
        if [ "$(stat -c %s "$raw")" -le 1048576 ]; then put vhd_open "$raw" "$name"; fi
        tail -c 512 "$raw" >"$tmp/footer" && put vhd_footer "$tmp/footer" "$name"
        if [ "$(head -c 520 "$raw" | tail -c 8)" = cxsparse ]; then
          dd if="$raw" of="$tmp/dyn" bs=512 skip=1 count=2 status=none && put vhd_dynamic_header "$tmp/dyn" "$name"
        fi ;;
      *.vhdx | *.avhdx)
        dd if="$raw" of="$tmp/hdr" bs=4096 skip=16 count=1 status=none && put vhdx_header "$tmp/hdr" "$name"
        dd if="$raw" of="$tmp/rt" bs=65536 skip=3 count=1 status=none && put vhdx_region_table "$tmp/rt" "$name"
        if command -v python3 >/dev/null; then
          python3 - "$raw" "$tmp/sparse" <<'EOF'
import sys
f = open(sys.argv[1], 'rb').read()[: 8 << 20]
units = [f[i:i + 512] for i in range(0, len(f), 512)]
zero = bytes(512)
out = bytearray()
u = 0
while u < len(units):
    skip = 0
    while u < len(units) and skip < 0xFFFF and units[u] == zero:
        skip += 1; u += 1
    data = bytearray()
    while u < len(units) and len(data) + len(units[u]) <= 0xFFFF and units[u] != zero:
        data += units[u]; u += 1
    out += skip.to_bytes(2, 'little') + len(data).to_bytes(2, 'little') + data
open(sys.argv[2], 'wb').write(out)
EOF
          if [ "$(stat -c %s "$tmp/sparse")" -le 262144 ]; then
            put vhdx_open "$tmp/sparse" "$name"; put vhdx_replay "$tmp/sparse" "$name"
          fi
        fi ;;
    esac
    rm -f "$raw"
  done
  rm -rf "$tmp"
  touch "$out/.done"
}
prep_shared

if [ "$target" = all ]; then
  # The harness's own unit tests (SparseStorage against MemStorage, the
  # sparse decoder, the read/write plan), uninstrumented.
  echo "== the harness's unit tests"
  RUSTC_WRAPPER= cargo test -q --lib
fi

echo "== building the fuzz targets"
cargo fuzz build -a -s "$sanitizer"

status=0
summary=()
for t in $targets; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  [ -d "corpus-shared/$t" ] && dirs+=("corpus-shared/$t")
  log=$(mktemp)
  echo "== $t: ${seconds}s"
  rc=0
  cargo fuzz run -a -s "$sanitizer" "$t" "${dirs[@]}" -- -max_total_time="$seconds" \
    -timeout=10 -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    status=1
    # What failed and where (not libFuzzer's dump of the input).
    sed -n '/^==[0-9]*==\|panicked at\|^SUMMARY\|^Error\|^thread /,+3p' "$log" | head -n 40
    art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    art=${art:-fuzz/artifacts/$t/}
    echo "!! $t FAILED (exit $rc): input in $art"
    echo "   reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 RUSTC_WRAPPER=\$PWD/rustc-wrapper.sh cargo fuzz run -a -s $sanitizer $t $art"
    summary+=("$t FAILED after ${execs:-?} executions: $art")
  else
    summary+=("$t: ${execs:-?} executions in ${seconds}s (${rate:-?}/s)")
  fi
  rm -f "$log"
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
