#!/usr/bin/env bash
# Sequential read throughput of a VHDX (1 GiB of random data, all allocated)
# through `vdisk mount` (FUSE), directly through the library, and through
# qemu-storage-daemon's FUSE export of the same image; prints the MB/s
# (10^6 bytes per second) of each and the ratios.
#
#   bash scripts/bench-mount.sh                 # RUNS=3: each row is a median
#   RUNS=5 SIZE_MIB=2048 bash scripts/bench-mount.sh
#   CACHES=hot bash scripts/bench-mount.sh      # only the page-cache-hot rows
#
# Every run reads the whole virtual disk once, 1 MiB at a time:
#   direct        the library: `iobench read IMAGE N -s 1M` (read_at into a
#                 1 MiB buffer, no FUSE)
#   mount         `dd bs=1M` of the file of a fresh `vdisk mount` (the
#                 default: FOPEN_DIRECT_IO, no page cache over the mount)
#   mount-odirect the same with `iflag=direct`
#   mount-cache   `dd bs=1M` of a fresh `vdisk mount --page-cache` (the
#                 kernel caches the mounted file; its cache starts empty)
#   mount-reread  the second `dd bs=1M` through one `--page-cache` mount
#                 (a re-read: the kernel serves most of it from the mounted
#                 file's own page cache)
#   dd-image      `dd bs=1M` of the first SIZE_MIB MiB of the image file
#                 itself (no FUSE, no format): what dd alone reaches, the
#                 ceiling of every dd row
#   qsd           `dd bs=1M` of a fresh `qemu-storage-daemon --export
#                 type=fuse` of the image (driver=file + driver=vhdx)
#   qsd-odirect   the same with `iflag=direct`
# in two cache states (CACHES, default "cold hot"):
#   cold  the page cache is synced and dropped before every run, so the image
#         file is read from the device (skipped where dropping is not allowed)
#   hot   the image file is in the page cache (read once first): only the
#         cost of the path itself is measured
# Ratios: mount / direct (target >= 0.7) and mount / qsd (target >= 2). The
# order of the contenders rotates from run to run. The script reports; it
# exits 0 when a target is missed.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
CACHES=${CACHES:-cold hot}

for tool in cargo awk dd; do
    command -v "$tool" >/dev/null || {
        echo "bench-mount.sh: $tool is not installed" >&2
        exit 1
    }
done
[ -e /dev/fuse ] || {
    echo "bench-mount.sh: /dev/fuse is absent: no FUSE here" >&2
    exit 1
}

echo "== building (release) =="
cargo build --release -q -p tools --bin vdisk
cargo build --release -q -p benches --example iobench
VDISK=$PWD/target/release/vdisk
IOBENCH=$PWD/target/release/examples/iobench

DIR=$(mktemp -d /var/tmp/vdisk-bench-mount.XXXXXX)
MNT=$DIR/mnt
QSD_FILE=$DIR/qsd-export
QSD_PID=$DIR/qsd.pid
mkdir "$MNT"
touch "$QSD_FILE"

mounted() { grep -q " $1 " /proc/self/mountinfo; }
qsd_stop() {
    if [ -s "$QSD_PID" ]; then
        kill "$(cat "$QSD_PID")" 2>/dev/null || true
        for _ in $(seq 200); do mounted "$QSD_FILE" || break; sleep 0.05; done
        rm -f "$QSD_PID"
    fi
}
cleanup() {
    if mounted "$MNT"; then "$VDISK" unmount "$MNT" 2>/dev/null || umount -l "$MNT" || true; fi
    qsd_stop
    if mounted "$QSD_FILE"; then umount -l "$QSD_FILE" || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT

IMG=$DIR/disk.vhdx
BYTES=$((SIZE_MIB << 20))

# median of the numbers on stdin, one a line
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mbps() { awk -v b="$BYTES" -v s="$1" 'BEGIN { printf "%.0f\n", b / s / 1e6 }'; }

# Seconds of `dd if=$1 of=/dev/null bs=1M [$2...]`, from dd's own report.
dd_seconds() {
    local out a extra=()
    for a in "${@:2}"; do [ -n "$a" ] && extra+=("$a"); done
    out=$(dd if="$1" of=/dev/null bs=1M "${extra[@]}" 2>&1) || {
        echo "bench-mount.sh: dd of $1 failed: $out" >&2
        exit 1
    }
    local copied
    copied=$(echo "$out" | awk '/copied/ { print $1 }')
    if [ "$copied" != "$BYTES" ]; then
        echo "bench-mount.sh: dd read $copied bytes of $1, not $BYTES" >&2
        exit 1
    fi
    echo "$out" | awk -F', ' '/copied/ { split($(NF - 1), a, " "); print a[1] }'
}

QSD=0
if command -v qemu-storage-daemon >/dev/null; then QSD=1; fi

qsd_start() {
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$IMG,read-only=on" \
        --blockdev driver=vhdx,node-name=disk0,file=file0,read-only=on \
        --export "type=fuse,id=exp0,node-name=disk0,mountpoint=$QSD_FILE,writable=off" \
        --daemonize --pidfile "$QSD_PID" >"$DIR/qsd.log" 2>&1
}

# One run of contender $1; prints its seconds.
run_one() {
    local s
    case $1 in
    direct)
        "$IOBENCH" read "$IMG" "$SIZE_MIB" -s 1M >"$DIR/last.log" 2>&1 || {
            cat "$DIR/last.log" >&2
            exit 1
        }
        awk -F'seconds=' '/^RESULT/ { split($2, a, " "); print a[1] }' "$DIR/last.log"
        ;;
    mount-cache)
        "$VDISK" mount --page-cache "$IMG" "$MNT" >/dev/null
        s=$(dd_seconds "$MNT/disk")
        "$VDISK" unmount "$MNT"
        echo "$s"
        ;;
    dd-image)
        dd_seconds "$IMG" count="$SIZE_MIB"
        ;;
    mount-reread)
        "$VDISK" mount --page-cache "$IMG" "$MNT" >/dev/null
        dd_seconds "$MNT/disk" >/dev/null
        s=$(dd_seconds "$MNT/disk")
        "$VDISK" unmount "$MNT"
        echo "$s"
        ;;
    mount | mount-odirect)
        "$VDISK" mount "$IMG" "$MNT" >/dev/null
        s=$(dd_seconds "$MNT/disk" "$([ "$1" = mount-odirect ] && echo iflag=direct)")
        "$VDISK" unmount "$MNT"
        echo "$s"
        ;;
    qsd | qsd-odirect)
        qsd_start
        s=$(dd_seconds "$QSD_FILE" "$([ "$1" = qsd-odirect ] && echo iflag=direct)")
        qsd_stop
        echo "$s"
        ;;
    esac
}

rotate() {
    local k=$1
    shift
    local a=("$@") n=$# i
    for ((i = 0; i < n; i++)); do echo "${a[(i + k) % n]}"; done
}

echo "== $(nproc) CPUs; kernel $(uname -r); $DIR on $(df -T "$DIR" | awk 'NR == 2 { print $2 }'); load average $(cut -d' ' -f1-3 /proc/loadavg) =="
echo "== generating ${SIZE_MIB} MiB of random data as a VHDX =="
head -c "$BYTES" /dev/urandom >"$DIR/disk.raw"
"$VDISK" convert -O vhdx "$DIR/disk.raw" "$IMG"
rm "$DIR/disk.raw"
"$VDISK" info "$IMG" | grep -E 'virtual size|block size|allocated'

CONTENDERS=(direct dd-image mount mount-odirect mount-cache mount-reread)
if [ "$QSD" = 1 ]; then
    if qsd_start && mounted "$QSD_FILE"; then
        qsd_stop
        CONTENDERS+=(qsd qsd-odirect)
        echo "qemu-storage-daemon: $(qemu-storage-daemon --version | head -n1)"
    else
        echo "note: qemu-storage-daemon cannot export over FUSE here: $(cat "$DIR/qsd.log")"
        qsd_stop
        QSD=0
    fi
else
    echo "note: qemu-storage-daemon is absent: its rows are skipped"
fi

for cache in $CACHES; do
    if [ "$cache" = cold ]; then
        sync
        if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
            echo "== cold: skipped (dropping the page cache is not allowed here) =="
            continue
        fi
    fi
    echo "== $cache: ${RUNS} runs of each, MB/s (median) =="
    rm -f "$DIR"/result.*
    for ((r = 0; r < RUNS; r++)); do
        for c in $(rotate "$r" "${CONTENDERS[@]}"); do
            if [ "$cache" = cold ]; then
                sync
                echo 3 >/proc/sys/vm/drop_caches
            else
                cat "$IMG" >/dev/null
            fi
            mbps "$(run_one "$c")" >>"$DIR/result.$c"
        done
    done
    for c in "${CONTENDERS[@]}"; do
        printf '  %-14s %6s MB/s   (runs: %s)\n' "$c" "$(median <"$DIR/result.$c")" "$(paste -sd' ' "$DIR/result.$c")"
    done
    m=$(median <"$DIR/result.mount")
    d=$(median <"$DIR/result.direct")
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
    verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t ? "met" : "MISSED") }'; }
    r=$(ratio "$m" "$d")
    echo "  mount / direct = $r (target >= 0.7: $(verdict "$r" 0.7))"
    r=$(ratio "$m" "$(median <"$DIR/result.dd-image")")
    echo "  mount / dd-image = $r"
    r=$(ratio "$(median <"$DIR/result.mount-odirect")" "$d")
    echo "  mount-odirect / direct = $r"
    r=$(ratio "$(median <"$DIR/result.mount-cache")" "$d")
    echo "  mount-cache / direct = $r"
    r=$(ratio "$(median <"$DIR/result.mount-reread")" "$d")
    echo "  mount-reread / direct = $r"
    if [ "$QSD" = 1 ]; then
        r=$(ratio "$m" "$(median <"$DIR/result.qsd")")
        echo "  mount / qsd = $r (target >= 2: $(verdict "$r" 2))"
        r=$(ratio "$(median <"$DIR/result.mount-odirect")" "$(median <"$DIR/result.qsd-odirect")")
        echo "  mount-odirect / qsd-odirect = $r"
        r=$(ratio "$(median <"$DIR/result.mount-cache")" "$(median <"$DIR/result.qsd")")
        echo "  mount-cache / qsd = $r"
    fi
done
echo "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) =="
