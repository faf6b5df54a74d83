#!/usr/bin/env bash
# `vdisk serve` against `qemu-nbd` serving the same VHDX, with the same
# client (`qemu-img bench -f raw nbd://...`), side by side in one run;
# prints each server's median time and the ratio qemu-nbd / vdisk (above
# 1: vdisk is faster).
#   scripts/bench-nbd.sh [COUNT] [ROUNDS]
# Rows: 4 KiB reads at queue depth 1 and 16 (strided by 257 x 4 KiB, so
# consecutive requests land in different blocks; qemu-img bench has no
# random mode) and 1 MiB sequential reads, from an image written whole and
# one half written; then first-touch 64 KiB writes into a fresh image (each
# a new allocation). Each row runs ROUNDS times
# (default 5), the two servers alternating, and reports the medians: on a
# shared 2-CPU machine single runs vary by 30% and more.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-20000}
rounds=${2:-5}
# VDISK=PATH benchmarks that binary instead (e.g. an older build).
if [ -z "${VDISK:-}" ]; then
  cargo build --release -q -p tools --bin vdisk
fi
vdisk=${VDISK:-$PWD/target/release/vdisk}
command -v qemu-nbd >/dev/null || { echo "qemu-nbd is needed" >&2; exit 2; }
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# Two 2 GiB dynamic VHDX (2 MiB blocks): one written whole, one only its
# first GiB (half of the reads then land in unallocated blocks, which both
# servers answer with a hole chunk). qemu-io writes at most 2 GiB - 512 at
# once.
qemu-img create -q -f vhdx -o block_size=2M "$dir/full.vhdx" 2G
qemu-io -f vhdx -c "write -P 0x33 0 1G" -c "write -P 0x33 1G 1G" "$dir/full.vhdx" >/dev/null
qemu-img create -q -f vhdx -o block_size=2M "$dir/half.vhdx" 2G
qemu-io -f vhdx -c "write -P 0x33 0 1G" "$dir/half.vhdx" >/dev/null
qemu-img create -q -f vhdx -o block_size=2M "$dir/fresh.vhdx" 2G

port_v=$((20000 + RANDOM % 10000)); port_q=$((port_v + 1))

start_vdisk() { # image, extra args
  "$vdisk" serve --bind "127.0.0.1:$port_v" "$@" >"$dir/v.out" 2>"$dir/v.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q serving "$dir/v.out" 2>/dev/null && return; sleep 0.05; done
  cat "$dir/v.err" >&2; exit 1
}
start_qemu() { # image, extra args
  qemu-nbd -t -f vhdx -p "$port_q" -b 127.0.0.1 "$@" &
  pids+=($!)
  for _ in $(seq 100); do qemu-img info "nbd://127.0.0.1:$port_q" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "qemu-nbd did not start" >&2; exit 1
}
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
secs() { # url, bench args...
  local url=$1; shift
  qemu-img bench -f raw "$@" "$url" 2>&1 | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
report() { # name, vdisk times, qemu-nbd times (a line each)
  local v q
  v=$(printf '%s' "$2" | median)
  q=$(printf '%s' "$3" | median)
  printf '%-28s vdisk %8.3f s   qemu-nbd %8.3f s   qemu-nbd/vdisk %5.2fx\n' \
    "$1" "$v" "$q" "$(awk -v q="$q" -v v="$v" 'BEGIN { print q / v }')"
}
row() { # name, bench args...
  local name=$1; shift
  local vs="" qs=""
  for _ in $(seq "$rounds"); do
    vs+="$(secs "nbd://127.0.0.1:$port_v" "$@")"$'\n'
    qs+="$(secs "nbd://127.0.0.1:$port_q" "$@")"$'\n'
  done
  report "$name" "$vs" "$qs"
}

for image in full half; do
  case $image in
    full) echo "reads, image written whole ($count requests each, median of $rounds runs; one connection; load: $(cut -d' ' -f1 /proc/loadavg))" ;;
    half) echo "reads, image half written" ;;
  esac
  cp "$dir/$image.vhdx" "$dir/q.vhdx"
  start_vdisk "$dir/$image.vhdx"
  start_qemu -r "$dir/q.vhdx"
  row "4K strided read QD1" -c "$count" -d 1 -s 4096 -S 1052672
  row "4K strided read QD16" -c "$count" -d 16 -s 4096 -S 1052672
  row "1M sequential read QD4" -c 2048 -d 4 -s 1M
  stop_all
done

echo "first-touch writes (a fresh image each run)"
vs="" qs=""
for _ in $(seq "$rounds"); do
  cp "$dir/fresh.vhdx" "$dir/fv.vhdx"; cp "$dir/fresh.vhdx" "$dir/fq.vhdx"
  start_vdisk --rw "$dir/fv.vhdx"
  start_qemu "$dir/fq.vhdx"
  vs+="$(secs "nbd://127.0.0.1:$port_v" -w -c 8192 -d 16 -s 65536 -S 262144)"$'\n'
  qs+="$(secs "nbd://127.0.0.1:$port_q" -w -c 8192 -d 16 -s 65536 -S 262144)"$'\n'
  stop_all
done
report "64K first-touch write QD16" "$vs" "$qs"
