#!/usr/bin/env bash
# Side-by-side throughput of vdisk (this library) and qemu-img, in one run on
# the same data, as ratios: our throughput / theirs (> 1 means we are faster).
#
#   bash benches/compare-qemu.sh            # RUNS=5 by default (each test, median)
#   RUNS=3 bash benches/compare-qemu.sh
#   DROP_CACHES=0 bash benches/compare-qemu.sh   # sync between runs, but keep the page cache
#
# Tests (all files in a tempdir under /var/tmp, i.e. a real file system):
#   1. convert raw → vhdx, 2 GiB raw image, half allocated (alternating 64 MiB
#      of random data and 64 MiB holes): `vdisk convert -O vhdx` (durable: it
#      flushes before it exits) vs `qemu-img convert -t writeback -O vhdx`, vs
#      `cp --sparse=always` + `sync`, and (for information) vs qemu-img's
#      default target cache mode, `-t unsafe`, which never syncs.
#   2. convert vhdx → raw of one VHDX made once by qemu-img: `vdisk convert
#      -O raw` vs `qemu-img convert -O raw` (default `-t unsafe`) and vs
#      `-t writeback`.
#   3. random 4 KiB reads, one at a time, on a 1 GiB fully allocated VHDX (page
#      cache hot): our `iobench read` vs `qemu-img bench -d 1` on the same
#      VHDX and on the raw file with the same bytes; and against a bare pread
#      loop on the very same page-cache pages (`iobench --pread-mapped`: the
#      library maps each request to its offset in the VHDX file first,
#      untimed). Two different files can sit in memory that is not equally
#      fast (seen here: the same pread loop at 2x apart on two copies of one
#      file), so the same-pages loop is the exact baseline for our overhead.
#      The stride is 1009 pages (a prime): every request lands ~4 MiB after
#      the previous one, modulo the disk size, so 262144 requests read every
#      page of the 1 GiB disk once.
#   4. first-touch 4 KiB writes: a fresh 2 GiB dynamic VHDX with 1 MiB
#      blocks, stride 1 MiB, so each write allocates a new block: our
#      `iobench write` (one flush, at the end, timed) vs `qemu-img bench -w`.
#
# The order of the contenders rotates from run to run; each row reports the
# median. Before every convert run and every write run the page cache is
# synced and, when the kernel allows it, dropped, so that no run pays for
# another's write-back. The script reports; it exits 0 when a target is missed.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
SECTIONS=${SECTIONS:-1234}          # for debugging: run only some of the tests
DROP_CACHES=${DROP_CACHES:-1}       # 0: do not drop the page cache between runs
IMAGE_SIZE_MIB=2048                 # tests 1, 2: the half-allocated image
REGION_MIB=64                       # its data/hole regions
READ_SIZE_MIB=1024                  # test 3
READ_STEP=$((1009 * 4096))          # test 3 stride
READ_COUNT=$((READ_SIZE_MIB * 256)) # every 4 KiB page once
WRITE_SIZE=2G                       # test 4
WRITE_COUNT=2048                    # one write per 1 MiB block
PATTERN=165                         # byte written by the write tests (0xa5)

for tool in qemu-img cargo awk dd cp; do
    command -v "$tool" >/dev/null || {
        echo "compare-qemu.sh: $tool is not installed" >&2
        exit 1
    }
done

echo "== building (release) =="
cargo build --release -q -p tools -p benches --bins --examples
VDISK=$PWD/target/release/vdisk
IOBENCH=$PWD/target/release/examples/iobench

DIR=$(mktemp -d /var/tmp/vdisk-compare.XXXXXX)
cleanup() { rm -rf "$DIR"; }
trap cleanup EXIT
cd "$DIR"

now() { date +%s.%N; }
# median of the numbers on stdin, one a line
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

CAN_DROP=$DROP_CACHES
settle() {
    sync
    if [ "$CAN_DROP" = 1 ]; then
        { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || CAN_DROP=0
    fi
}

# Run "$@" with stdout and stderr to $DIR/last.log; print its wall time in seconds.
timed() {
    local t0 t1
    t0=$(now)
    if ! "$@" >"$DIR/last.log" 2>&1; then
        echo "compare-qemu.sh: command failed: $*" >&2
        cat "$DIR/last.log" >&2
        exit 1
    fi
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

# ops/s of the last qemu-img bench ($1 requests) or iobench run.
qemu_ops() { awk -v n="$1" '/Run completed in/ { printf "%.1f\n", n / $4 }' "$DIR/last.log"; }
iobench_ops() { awk -F'ops_per_sec=' '/^RESULT/ { split($2, a, " "); print a[1] }' "$DIR/last.log"; }

# Results: name → file with one number a line.
record() { echo "$2" >>"$DIR/result.$1"; }
med() { median <"$DIR/result.$1"; }

# Rotate the word list "$@" left by $1.
rotate() {
    local k=$1
    shift
    local a=("$@") n=$# i
    for ((i = 0; i < n; i++)); do echo "${a[(i + k) % n]}"; done
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_START=$(loadavg)
echo "== qemu-img: $(qemu-img --version | head -n1); $(nproc) CPUs; $DIR on $(df -T "$DIR" | awk 'NR == 2 { print $2 }'); load average $LOAD_START =="

echo "== generating data =="
t0=$(now)
head -c $((REGION_MIB << 20)) /dev/urandom >random.chunk
truncate -s $((IMAGE_SIZE_MIB))M half.raw
for ((i = 0; i < IMAGE_SIZE_MIB / REGION_MIB; i += 2)); do
    dd if=random.chunk of=half.raw bs=${REGION_MIB}M seek=$i conv=notrunc status=none
done
truncate -s $((READ_SIZE_MIB))M full.raw
for ((i = 0; i < READ_SIZE_MIB / REGION_MIB; i++)); do
    dd if=random.chunk of=full.raw bs=${REGION_MIB}M seek=$i conv=notrunc status=none
done
rm random.chunk
qemu-img convert -O vhdx full.raw full.vhdx
settle
if [ "$CAN_DROP" = 1 ]; then
    CACHE_NOTE="page cache synced and dropped before every convert/write run"
elif [ "$DROP_CACHES" = 0 ]; then
    CACHE_NOTE="page cache synced (not dropped: DROP_CACHES=0) before every convert/write run"
else
    CACHE_NOTE="page cache synced before every convert/write run (dropping it is not allowed here)"
fi
echo "half.raw: ${IMAGE_SIZE_MIB} MiB, $(du -m half.raw | cut -f1) MiB allocated; full.raw/full.vhdx: ${READ_SIZE_MIB} MiB, all allocated ($(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s)"
echo "$CACHE_NOTE"

# ---------------------------------------------------------------- 1 raw→vhdx
section1() {
    echo "== 1. convert raw -> vhdx, ${RUNS} runs (wall seconds) =="
    c1_vdisk() { "$VDISK" convert -O vhdx half.raw out.vhdx; }
    c1_qemu_wb() { qemu-img convert -t writeback -O vhdx half.raw out.vhdx; }
    c1_qemu_unsafe() { qemu-img convert -O vhdx half.raw out.vhdx; }
    c1_cp() { cp --sparse=always half.raw out.raw && sync; }
    for ((r = 0; r < RUNS; r++)); do
        line="run $((r + 1)):"
        for c in $(rotate "$r" c1_vdisk c1_qemu_wb c1_cp c1_qemu_unsafe); do
            rm -f out.vhdx out.raw
            settle
            t=$(timed "$c")
            record "$c" "$t"
            line+=" $c=$t"
        done
        echo "$line"
    done
    # Our output must be the same disk as the input.
    "$VDISK" convert -O vhdx half.raw out.vhdx
    qemu-img compare -q -f raw -F vhdx half.raw out.vhdx ||
        echo "WARNING: vdisk's VHDX differs from the source (qemu-img compare)"
    rm -f out.vhdx out.raw
}

# ---------------------------------------------------------------- 2 vhdx→raw
section2() {
    echo "== 2. convert vhdx -> raw, ${RUNS} runs (wall seconds) =="
    qemu-img convert -O vhdx half.raw src.vhdx
    c2_vdisk() { "$VDISK" convert -O raw src.vhdx out.raw; }
    c2_qemu_unsafe() { qemu-img convert -O raw src.vhdx out.raw; }
    c2_qemu_wb() { qemu-img convert -t writeback -O raw src.vhdx out.raw; }
    for ((r = 0; r < RUNS; r++)); do
        line="run $((r + 1)):"
        for c in $(rotate "$r" c2_vdisk c2_qemu_unsafe c2_qemu_wb); do
            rm -f out.raw
            settle
            t=$(timed "$c")
            record "$c" "$t"
            line+=" $c=$t"
        done
        echo "$line"
    done
    "$VDISK" convert -O raw src.vhdx out.raw
    cmp -s half.raw out.raw || echo "WARNING: vdisk's raw output differs from the source"
    rm -f out.raw src.vhdx
}

# ---------------------------------------------------------------- 3 reads
section3() {
    echo "== 3. random 4 KiB reads, ${READ_COUNT} per run, stride ${READ_STEP}, ${RUNS} runs (ops/s) =="
    cat full.raw full.vhdx >/dev/null # page cache hot; both tools read through it
    r3_vdisk_vhdx() { "$IOBENCH" read full.vhdx "$READ_COUNT" -s 4096 -S "$READ_STEP"; }
    r3_qemu_vhdx() { qemu-img bench -f vhdx -t writeback -d 1 -c "$READ_COUNT" -s 4096 -S "$READ_STEP" full.vhdx; }
    r3_qemu_raw() { qemu-img bench -f raw -t writeback -d 1 -c "$READ_COUNT" -s 4096 -S "$READ_STEP" full.raw; }
    r3_pread_same() { "$IOBENCH" read full.vhdx "$READ_COUNT" -s 4096 -S "$READ_STEP" --pread-mapped; }
    for ((r = 0; r < RUNS; r++)); do
        line="run $((r + 1)):"
        for c in $(rotate "$r" r3_vdisk_vhdx r3_qemu_vhdx r3_qemu_raw r3_pread_same); do
            timed "$c" >/dev/null
            case $c in
            r3_qemu_*) ops=$(qemu_ops "$READ_COUNT") ;;
            *) ops=$(iobench_ops) ;;
            esac
            record "$c" "$ops"
            line+=" $c=$ops"
        done
        echo "$line"
    done
}

# ---------------------------------------------------------------- 4 writes
section4() {
    echo "== 4. first-touch 4 KiB writes, ${WRITE_COUNT} per run, stride 1 MiB, ${RUNS} runs (ops/s) =="
    w4_vdisk() {
        "$VDISK" create -f vhdx -o subformat=dynamic,block_size=1M w.vhdx "$WRITE_SIZE" >/dev/null &&
            sync &&
            "$IOBENCH" write w.vhdx "$WRITE_COUNT" -s 4096 -S 1M --pattern "$PATTERN"
    }
    w4_qemu() {
        qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M w.vhdx "$WRITE_SIZE" &&
            sync &&
            qemu-img bench -w -f vhdx -t writeback -d 1 -c "$WRITE_COUNT" -s 4096 -S 1M --pattern "$PATTERN" w.vhdx
    }
    for ((r = 0; r < RUNS; r++)); do
        line="run $((r + 1)):"
        for c in $(rotate "$r" w4_vdisk w4_qemu); do
            rm -f w.vhdx
            settle
            timed "$c" >/dev/null
            case $c in
            w4_qemu) ops=$(qemu_ops "$WRITE_COUNT") ;;
            *) ops=$(iobench_ops) ;;
            esac
            record "$c" "$ops"
            line+=" $c=$ops"
        done
        echo "$line"
    done
    rm -f w.vhdx
}

for sec in 1 2 3 4; do
    if [[ $SECTIONS == *$sec* ]]; then "section$sec"; fi
done
rm -f half.raw full.raw full.vhdx

# ---------------------------------------------------------------- table
MIB_C=$IMAGE_SIZE_MIB
mibs() { awk -v m="$MIB_C" -v s="$1" 'BEGIN { printf "%.0f MiB/s", m / s }'; }
kops() { awk -v o="$1" 'BEGIN { printf "%.1fk ops/s", o / 1000 }'; }
# row LABEL OURS_TEXT THEIRS_TEXT RATIO TARGET(or -) PER_RUN_RANGE
ROWS=()
row() {
    local verdict=info target=$5
    if [ "$target" != - ]; then
        verdict=$(awk -v r="$4" -v t="$target" 'BEGIN { print (r >= t) ? "PASS" : "MISS" }')
        target=">= ${target}x"
    else
        target="-"
    fi
    ROWS+=("$(printf '%-46s %15s %15s %7.3fx %9s  %-6s  %s' "$1" "$2" "$3" "$4" "$target" "$verdict" "$6")")
}
# min-max of the ratios of the same run index: "$1" = time or ops.
per_run_range() {
    paste "$DIR/result.$2" "$DIR/result.$3" | awk -v kind="$1" '
        { r = (kind == "time") ? $2 / $1 : $1 / $2
          if (NR == 1 || r < lo) lo = r
          if (NR == 1 || r > hi) hi = r }
        END { printf "%.2f-%.2f", lo, hi }'
}
t_ratio() { awk -v ours="$1" -v theirs="$2" 'BEGIN { printf "%.4f", theirs / ours }'; }
o_ratio() { awk -v ours="$1" -v theirs="$2" 'BEGIN { printf "%.4f", ours / theirs }'; }

# Rows: OURS|THEIRS|KIND (time: seconds, lower is better; ops: ops/s)|LABEL|TARGET or -
ROW_SPECS=(
    "c1_vdisk|c1_qemu_wb|time|raw->vhdx vs qemu-img -t writeback|1.3"
    "c1_vdisk|c1_cp|time|raw->vhdx vs cp --sparse=always + sync|0.9"
    "c1_vdisk|c1_qemu_unsafe|time|raw->vhdx vs qemu-img (default -t unsafe)|-"
    "c2_vdisk|c2_qemu_unsafe|time|vhdx->raw vs qemu-img (default -t unsafe)|-"
    "c2_vdisk|c2_qemu_wb|time|vhdx->raw vs qemu-img -t writeback|-"
    "r3_vdisk_vhdx|r3_qemu_vhdx|ops|rand 4K read vhdx vs qemu-img bench vhdx|-"
    "r3_vdisk_vhdx|r3_qemu_raw|ops|rand 4K read vhdx vs qemu-img bench raw|0.9"
    "r3_vdisk_vhdx|r3_pread_same|ops|rand 4K read vhdx vs pread, same pages|0.9"
    "w4_vdisk|w4_qemu|ops|first-touch 4K write vs qemu-img bench -w|3"
)
for spec in "${ROW_SPECS[@]}"; do
    IFS='|' read -r ours theirs kind label target <<<"$spec"
    [ -s "$DIR/result.$ours" ] && [ -s "$DIR/result.$theirs" ] || continue
    v=$(med "$ours")
    q=$(med "$theirs")
    range=$(per_run_range "$kind" "$ours" "$theirs")
    if [ "$kind" = time ]; then
        row "$label" "$(mibs "$v")" "$(mibs "$q")" "$(t_ratio "$v" "$q")" "$target" "$range"
    else
        row "$label" "$(kops "$v")" "$(kops "$q")" "$(o_ratio "$v" "$q")" "$target" "$range"
    fi
done

echo
echo "== vdisk vs qemu-img: medians of ${RUNS} runs; ratio = ours / theirs (> 1: we are faster) =="
printf '%-46s %15s %15s %9s %9s  %-6s  %s\n' "test" "ours" "theirs" "ratio" "target" "result" "per-run"
for r in "${ROWS[@]}"; do echo "$r"; done
cat <<EOF
notes: ratio = median(ours) / median(theirs); per-run = range of the ratios within each run.
       convert throughput is the ${IMAGE_SIZE_MIB} MiB virtual size / median wall time (half of it is data);
       vdisk convert ends durable (fsync), qemu-img -t unsafe and cp without sync would not.
       Reads: page cache hot, one request at a time (qemu-img bench -d 1, default aio=threads,
       -t writeback = page cache); ops/s from each tool's own timer (qemu-img: "Run completed in").
       Writes: iobench time includes its one final flush; qemu-img bench's time includes the
       syncs its VHDX driver does per allocation but not the flush at close.
       qemu-img convert's default target cache is -t unsafe (no syncs at all); with -t writeback its
       VHDX driver syncs the log on every block allocation and the image on close.
       ${CACHE_NOTE}. Load average at start: ${LOAD_START}; at end: $(loadavg).
EOF
