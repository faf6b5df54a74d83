/* Guest-side disk benchmarks for benches/benches/vmm, on every disk at
 * once, interleaved: each test runs on disk 0, 1, 2... in turn, in slices
 * of `params.slice_ms`, until every disk has had `params.ms` milliseconds
 * of it (or has done its region: first-touch writes and sequential writes
 * of a fresh image go over their region once), so that all disks see the
 * same conditions (load, the host's scheduling) and their ratios come from
 * the same moments. The tests: 4 KiB random reads and writes with one
 * request in flight (QD1) and with `params.qd` in flight (completions
 * polled from the used ring, each resubmitted at once; drained at the end
 * of a slice), 1 MiB sequential reads and writes (QD1, wrapping around),
 * first-touch 4 KiB writes (one every `params.stride` bytes over the first
 * half of a fresh disk) and 1 MiB sequential writes over its second half,
 * and one flush per disk (one disk after the other); before them, when
 * there are write tests, one write per disk timed apart (the first write
 * after an open may cost more: see first_write). For each test and disk
 * one line on the UART:
 *
 *   VMMBENCH test=NAME disk=I ops=N bytes=B cycles=C
 *
 * C is guest TSC cycles (rdtsc) spent in that disk's slices, from a
 * slice's first submission to its last completion. The host converts them
 * with the guest TSC frequency it read from KVM (KVM_GET_TSC_KHZ) and
 * patched into `params` before the run (the payload uses it only for the
 * time budget). The run ends with a line per disk and a last one:
 *
 *   VMMBENCH end disk=I requests=R
 *   VMMBENCH end cycles=C
 *
 * R counting every request made to disk I, for the host to compare with
 * the device's own count. Random offsets are 4 KiB aligned, uniform over
 * the disk (xorshift64*, the same seed and so the same sequence on every
 * disk). Built with -DQSIZE=128 (build.rs): 3 descriptors a request, so up
 * to MAXQD requests in flight. */
#include "payload.h"

#define MAXQD 40
#define MAXDISKS 4
#define MIB (1UL << 20)

/* Tests, and their bits in params.tests (benches/benches/vmm keeps the
 * same). */
enum { RANDREAD_QD1, RANDREAD_QDN, RANDWRITE_QD1, RANDWRITE_QDN, SEQREAD, SEQWRITE, FIRSTTOUCH, SEQWRITE_FRESH, FLUSH,
       FIRSTWRITE };
static const char *const names[] = {"randread4k_qd1", "randread4k_qdN", "randwrite4k_qd1", "randwrite4k_qdN",
                                    "seqread1m", "seqwrite1m", "firsttouch4k", "seqwrite1m_fresh", "flush",
                                    "firstwrite"};
#define WRITE_TESTS ((1UL << RANDWRITE_QD1) | (1UL << RANDWRITE_QDN) | (1UL << SEQWRITE) | (1UL << FIRSTTOUCH) | \
                     (1UL << SEQWRITE_FRESH))

/* Patched by the host, found by its magic (16 bytes, NUL included). */
struct params {
    char magic[16];
    u64 tsc_khz;    /* guest TSC frequency */
    u64 ms;         /* time budget of each test on each disk */
    u64 tests;      /* 1 << test, for each test to run */
    u64 qd;         /* requests in flight in the _qdN tests */
    u64 stride;     /* first-touch: bytes between writes */
    u64 check_seed; /* nonzero: every disk holds pattern(check_seed - 1, off) */
    u64 slice_ms;   /* the slices the disks take turns in */
};
volatile struct params params = {"VMMBENCH-PARAMS", 0, 100, 0, 32, 2 * MIB, 0, 10};

struct slot {
    struct blk_req hdr;
    u8 status;
} __attribute__((aligned(32)));

static struct vq queues[MAXDISKS] __attribute__((aligned(4096)));
static struct vblk disks[MAXDISKS];
/* Reads land in r*, writes come from w* (0xa5 for 1 MiB, 0x5a for 4 KiB):
 * what the guest wrote is never what it read. */
static u8 rbig[MIB] __attribute__((aligned(4096)));
static u8 wbig[MIB] __attribute__((aligned(4096)));
static u8 rsmall[MAXQD][4096] __attribute__((aligned(4096)));
static u8 wsmall[MAXQD][4096] __attribute__((aligned(4096)));
/* Shared by the disks: one disk has requests in flight at a time. */
static struct slot slots[MAXQD];
static struct vblk *b;
static u64 ndisks, qd, stride;
/* Per disk: requests made, random generator, position of the sequential
 * tests, whether the test is done on it, and the test's totals. */
static u64 requests[MAXDISKS], rng[MAXDISKS], pos[MAXDISKS], done[MAXDISKS];
static u64 acc_ops[MAXDISKS], acc_bytes[MAXDISKS], acc_cycles[MAXDISKS];

static u64 next_rand(u32 d) {
    u64 x = rng[d];
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng[d] = x;
    return x * 0x2545f4914f6cdd1dUL;
}

/* Chain the request of slot i (descriptors 3i..3i+2) into the current
 * disk's available ring, without notifying. len 0: no data (a flush). */
static void submit(u32 d, u32 i, u32 type, u64 sector, void *buf, u32 len) {
    struct desc *q = b->q->desc;
    u16 h = (u16)(3 * i);
    slots[i].hdr.type = type;
    slots[i].hdr.reserved = 0;
    slots[i].hdr.sector = sector;
    slots[i].status = 0xee;
    q[h].addr = (u64)&slots[i].hdr; q[h].len = sizeof(struct blk_req); q[h].flags = D_NEXT;
    q[h].next = (u16)(h + (len ? 1 : 2));
    q[h + 1].addr = (u64)buf; q[h + 1].len = len; q[h + 1].next = (u16)(h + 2);
    q[h + 1].flags = D_NEXT | (type == T_IN ? D_WRITE : 0);
    q[h + 2].addr = (u64)&slots[i].status; q[h + 2].len = 1; q[h + 2].flags = D_WRITE; q[h + 2].next = 0;
    vq_add(b, h);
    requests[d]++;
}

/* The slot a used entry completes, its status checked. */
static u32 complete(struct used_elem *u) {
    u32 i = u->id / 3;
    if (u->id % 3 || i >= MAXQD) fail(20, "a used entry names no request of ours");
    if (slots[i].status != S_OK) fail(21, "a request failed");
    return i;
}

/* One request, waited for. */
static void one(u32 d, u32 type, u64 sector, void *buf, u32 len) {
    struct used_elem u;
    submit(d, 0, type, sector, buf, len);
    vq_notify(b);
    if (vq_wait(b, &u)) fail(22, "no answer from the device");
    complete(&u);
}

static u64 rand_sector(u32 d) { return (next_rand(d) % (b->capacity / 8)) * 8; }

/* Requests with qd in flight until the deadline, then drained; the count. */
static u64 deep(u32 d, u32 type, u64 deadline) {
    u64 ops = 0;
    u32 i, inflight = qd, stopping = 0;
    struct used_elem u;
    u8 (*buf)[4096] = type == T_IN ? rsmall : wsmall;
    for (i = 0; i < qd; i++) submit(d, i, type, rand_sector(d), buf[i], 4096);
    vq_notify(b);
    while (inflight) {
        u32 again = 0;
        if (vq_wait(b, &u)) fail(23, "no answer from the device");
        do {
            i = complete(&u);
            ops++;
            inflight--;
            if (!stopping && rdtsc() >= deadline) stopping = 1;
            if (!stopping) {
                submit(d, i, type, rand_sector(d), buf[i], 4096);
                inflight++;
                again = 1;
            }
        } while (vq_poll(b, &u));
        if (again) vq_notify(b);
    }
    return ops;
}

/* 1 MiB requests from sector `from` up to `to`, going on from pos[d]; at
 * `to`, wrap around or (once) be done. */
static u64 sequential(u32 d, u32 type, u64 from, u64 to, int once, u64 deadline, u64 *bytes) {
    u64 ops = 0;
    if (pos[d] < from) pos[d] = from;
    do {
        u64 n = to - pos[d] < MIB / 512 ? to - pos[d] : MIB / 512;
        one(d, type, pos[d], type == T_IN ? rbig : wbig, (u32)(n * 512));
        ops++;
        *bytes += n * 512;
        pos[d] += n;
        if (pos[d] >= to) {
            if (once) { done[d] = 1; break; }
            pos[d] = from;
        }
    } while (rdtsc() < deadline);
    return ops;
}

/* Test t on disk d until the deadline; the requests made. */
static u64 slice(u32 t, u32 d, u64 deadline, u64 *bytes) {
    u64 ops = 0, half = (b->capacity / 2) & ~7UL;
    switch (t) {
    case RANDREAD_QD1:
    case RANDWRITE_QD1:
        do {
            if (t == RANDREAD_QD1) one(d, T_IN, rand_sector(d), rsmall[0], 4096);
            else one(d, T_OUT, rand_sector(d), wsmall[0], 4096);
            ops++;
        } while (rdtsc() < deadline);
        *bytes = ops * 4096;
        return ops;
    case RANDREAD_QDN:
    case RANDWRITE_QDN:
        ops = deep(d, t == RANDREAD_QDN ? T_IN : T_OUT, deadline);
        *bytes = ops * 4096;
        return ops;
    case SEQREAD: return sequential(d, T_IN, 0, b->capacity, 0, deadline, bytes);
    case SEQWRITE: return sequential(d, T_OUT, 0, b->capacity, 0, deadline, bytes);
    case SEQWRITE_FRESH: return sequential(d, T_OUT, half, b->capacity, 1, deadline, bytes);
    case FIRSTTOUCH:
        do {
            if (pos[d] + 8 > half) { done[d] = 1; break; }
            one(d, T_OUT, pos[d], wsmall[0], 4096);
            ops++;
            pos[d] += stride;
        } while (rdtsc() < deadline);
        *bytes = ops * 4096;
        return ops;
    }
    return 0;
}

static void report(u32 t, u32 d, u64 ops, u64 bytes, u64 cycles) {
    puts("VMMBENCH test="); puts(names[t]);
    puts(" disk="); put_dec(d);
    puts(" ops="); put_dec(ops);
    puts(" bytes="); put_dec(bytes);
    puts(" cycles="); put_dec(cycles);
    puts("\n");
}

/* Test t on every disk, the disks taking turns (the first one changing
 * every turn) until each has had the budget or is done. */
static void run_test(u32 t, u64 budget, u64 slice_cycles) {
    u64 d, turn, left;
    for (d = 0; d < ndisks; d++) acc_ops[d] = acc_bytes[d] = acc_cycles[d] = pos[d] = done[d] = 0;
    for (turn = 0;; turn++) {
        u64 ran = 0, k;
        for (k = 0; k < ndisks; k++) {
            u64 t0, bytes = 0, ops;
            d = (turn + k) % ndisks;
            if (done[d] || acc_cycles[d] >= budget) continue;
            b = &disks[d];
            left = budget - acc_cycles[d];
            t0 = rdtsc();
            ops = slice(t, (u32)d, t0 + (left < slice_cycles ? left : slice_cycles), &bytes);
            acc_cycles[d] += rdtsc() - t0;
            acc_ops[d] += ops;
            acc_bytes[d] += bytes;
            ran = 1;
        }
        if (!ran) break;
    }
    for (d = 0; d < ndisks; d++) report(t, (u32)d, acc_ops[d], acc_bytes[d], acc_cycles[d]);
}

/* The first write after an image is opened costs more than the others (a
 * VHDX updates and syncs its header once per session): before the tests,
 * one write per disk, timed apart (test "firstwrite"): its last 4 KiB,
 * read and written back. */
static void first_write(u32 d) {
    u64 last = (b->capacity / 8 - 1) * 8, t0;
    one(d, T_IN, last, rsmall[0], 4096);
    t0 = rdtsc();
    one(d, T_OUT, last, rsmall[0], 4096);
    report(FIRSTWRITE, d, 1, 4096, rdtsc() - t0);
}

static void check_prefill(u32 d, u32 seed) {
    u64 at[3], i, k;
    at[0] = 0;
    at[1] = (b->capacity / 16) * 8;
    at[2] = (b->capacity / 8 - 1) * 8;
    for (k = 0; k < 3; k++) {
        one(d, T_IN, at[k], rsmall[0], 4096);
        for (i = 0; i < 4096; i++)
            if (rsmall[0][i] != pattern(seed, at[k] * 512 + i)) fail(24, "a disk does not hold the host's prefill");
    }
}

u32 payload_main(u64 ram, u64 ndisks_, u64 vcpu) {
    u64 tests, seed, t0, budget, slice_cycles, d;
    u32 t;
    (void)ram;
    if (vcpu != 0) park();
    ndisks = ndisks_;
    if (ndisks < 1 || ndisks > MAXDISKS) fail(1, "needs 1 to 4 disks");
    if (!params.tsc_khz) fail(2, "the host gave no TSC frequency");
    budget = params.tsc_khz * params.ms;
    slice_cycles = params.tsc_khz * (params.slice_ms ? params.slice_ms : 1);
    tests = params.tests;
    qd = params.qd;
    stride = params.stride / 512;
    seed = params.check_seed;
    if (qd < 1 || qd > MAXQD || 3 * qd > QSIZE) fail(3, "queue depth out of range");
    if (stride < 8 || stride % 8) fail(4, "first-touch stride not a multiple of 4 KiB");
    memset(wbig, 0xa5, sizeof(wbig));
    memset(wsmall, 0x5a, sizeof(wsmall));
    for (d = 0; d < ndisks; d++) {
        b = &disks[d];
        if (vblk_init(b, (int)d, &queues[d])) fail(5, "device init");
        if (b->capacity < 2 * MIB / 512) fail(6, "a disk smaller than 2 MiB");
        rng[d] = 0x9e3779b97f4a7c15UL;
        if (seed) check_prefill((u32)d, (u32)(seed - 1));
        if (tests & WRITE_TESTS) first_write((u32)d);
    }
    t0 = rdtsc();
    for (t = RANDREAD_QD1; t < FLUSH; t++)
        if (tests & (1UL << t)) run_test(t, budget, slice_cycles);
    if (tests & (1UL << FLUSH)) {
        for (d = 0; d < ndisks; d++) {
            u64 f0 = rdtsc();
            b = &disks[d];
            one((u32)d, T_FLUSH, 0, 0, 0);
            report(FLUSH, (u32)d, 1, 0, rdtsc() - f0);
        }
    }
    for (d = 0; d < ndisks; d++) {
        puts("VMMBENCH end disk="); put_dec(d);
        puts(" requests="); put_dec(requests[d]);
        puts("\n");
    }
    puts("VMMBENCH end cycles="); put_dec(rdtsc() - t0);
    puts("\n");
    return 0;
}
