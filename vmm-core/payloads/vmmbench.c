/* Guest-side disk benchmarks on disk 0, for benches/benches/vmm: 4 KiB
 * random reads and writes with one request in flight (QD1) and with
 * `params.qd` in flight (completions polled from the used ring, each one
 * resubmitted at once), 1 MiB sequential reads and writes (QD1),
 * first-touch 4 KiB writes (one every `params.stride` bytes) and 1 MiB
 * sequential writes over the second half of a fresh image, and one flush.
 *
 * Each test runs for `params.ms` milliseconds of guest TSC time (or until
 * its region is done: the sequential writes and first-touch writes go over
 * their region once) and prints one line on the UART:
 *
 *   VMMBENCH test=NAME ops=N bytes=B cycles=C
 *
 * C is guest TSC cycles (rdtsc) from the first submission to the last
 * completion. The host converts them with the guest TSC frequency it read
 * from KVM (KVM_GET_TSC_KHZ) and patched into `params` before the run (the
 * payload uses it only for the time budget). The run ends with
 *
 *   VMMBENCH end requests=R cycles=C
 *
 * R counting every request the payload made, for the host to compare with
 * the device's own count. Random offsets are 4 KiB aligned, uniform over
 * the disk (xorshift64*, fixed seed: every image gets the same sequence).
 * Built with -DQSIZE=128 (build.rs): 3 descriptors a request, so up to
 * MAXQD requests in flight. */
#include "payload.h"

#define MAXQD 40
#define MIB (1UL << 20)

/* Test bits (benches/benches/vmm keeps the same). */
#define B_RANDREAD_QD1 (1UL << 0)
#define B_RANDREAD_QDN (1UL << 1)
#define B_RANDWRITE_QD1 (1UL << 2)
#define B_RANDWRITE_QDN (1UL << 3)
#define B_SEQREAD (1UL << 4)
#define B_SEQWRITE (1UL << 5)
#define B_FIRSTTOUCH (1UL << 6)
#define B_SEQWRITE_FRESH (1UL << 7)
#define B_FLUSH (1UL << 8)

/* Patched by the host, found by its magic (16 bytes, NUL included). */
struct params {
    char magic[16];
    u64 tsc_khz;    /* guest TSC frequency */
    u64 ms;         /* time budget of each test */
    u64 tests;      /* B_* bits */
    u64 qd;         /* requests in flight in the _qdN tests */
    u64 stride;     /* first-touch: bytes between writes */
    u64 check_seed; /* nonzero: the disk holds pattern(check_seed - 1, off) */
};
volatile struct params params = {"VMMBENCH-PARAMS", 0, 100, 0, 32, 2 * MIB, 0};

struct slot {
    struct blk_req hdr;
    u8 status;
} __attribute__((aligned(32)));

static struct vq q0 __attribute__((aligned(4096)));
static u8 big[MIB] __attribute__((aligned(4096)));
static u8 small[MAXQD][4096] __attribute__((aligned(4096)));
static struct slot slots[MAXQD];
static struct vblk b;
static u64 budget, requests, rng = 0x9e3779b97f4a7c15UL;

static u64 next_rand(void) {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1dUL;
}

/* Chain the request of slot i (descriptors 3i..3i+2) into the available
 * ring, without notifying. len 0: no data (a flush). */
static void submit(u32 i, u32 type, u64 sector, void *buf, u32 len) {
    struct desc *d = b.q->desc;
    u16 h = (u16)(3 * i);
    slots[i].hdr.type = type;
    slots[i].hdr.reserved = 0;
    slots[i].hdr.sector = sector;
    slots[i].status = 0xee;
    d[h].addr = (u64)&slots[i].hdr; d[h].len = sizeof(struct blk_req); d[h].flags = D_NEXT;
    d[h].next = (u16)(h + (len ? 1 : 2));
    d[h + 1].addr = (u64)buf; d[h + 1].len = len; d[h + 1].next = (u16)(h + 2);
    d[h + 1].flags = D_NEXT | (type == T_IN ? D_WRITE : 0);
    d[h + 2].addr = (u64)&slots[i].status; d[h + 2].len = 1; d[h + 2].flags = D_WRITE; d[h + 2].next = 0;
    vq_add(&b, h);
    requests++;
}

/* The slot a used entry completes, its status checked. */
static u32 complete(struct used_elem *u) {
    u32 i = u->id / 3;
    if (u->id % 3 || i >= MAXQD) fail(20, "a used entry names no request of ours");
    if (slots[i].status != S_OK) fail(21, "a request failed");
    return i;
}

/* One request, waited for. */
static void one(u32 type, u64 sector, void *buf, u32 len) {
    struct used_elem u;
    submit(0, type, sector, buf, len);
    vq_notify(&b);
    if (vq_wait(&b, &u)) fail(22, "no answer from the device");
    complete(&u);
}

static void report(const char *name, u64 ops, u64 bytes, u64 cycles) {
    puts("VMMBENCH test="); puts(name);
    puts(" ops="); put_dec(ops);
    puts(" bytes="); put_dec(bytes);
    puts(" cycles="); put_dec(cycles);
    puts("\n");
}

static u64 rand_sector(void) { return (next_rand() % (b.capacity / 8)) * 8; }

static void random_qd1(const char *name, u32 type) {
    u64 t0 = rdtsc(), t = t0, ops = 0;
    while (t - t0 < budget) {
        one(type, rand_sector(), small[0], 4096);
        ops++;
        t = rdtsc();
    }
    report(name, ops, ops * 4096, t - t0);
}

static void random_deep(const char *name, u32 type, u32 qd) {
    u64 t0 = rdtsc(), ops = 0;
    u32 i, inflight = 0, stopping = 0;
    struct used_elem u;
    for (i = 0; i < qd; i++) submit(i, type, rand_sector(), small[i], 4096);
    inflight = qd;
    vq_notify(&b);
    while (inflight) {
        u32 again = 0;
        if (vq_wait(&b, &u)) fail(23, "no answer from the device");
        do {
            i = complete(&u);
            ops++;
            inflight--;
            if (!stopping && rdtsc() - t0 >= budget) stopping = 1;
            if (!stopping) {
                submit(i, type, rand_sector(), small[i], 4096);
                inflight++;
                again = 1;
            }
        } while (vq_poll(&b, &u));
        if (again) vq_notify(&b);
    }
    report(name, ops, ops * 4096, rdtsc() - t0);
}

/* 1 MiB requests from sector `from` up to `to`; reads wrap around until
 * the budget is spent, writes stop at `to`. */
static void sequential(const char *name, u32 type, u64 from, u64 to) {
    u64 t0 = rdtsc(), t = t0, ops = 0, bytes = 0, s = from;
    while (t - t0 < budget) {
        u64 n = to - s < MIB / 512 ? to - s : MIB / 512;
        one(type, s, big, (u32)(n * 512));
        ops++;
        bytes += n * 512;
        s += n;
        if (s >= to) {
            if (type != T_IN) { t = rdtsc(); break; }
            s = from;
        }
        t = rdtsc();
    }
    report(name, ops, bytes, t - t0);
}

static void first_touch(u64 stride_sectors, u64 to) {
    u64 t0 = rdtsc(), t = t0, ops = 0, s;
    for (s = 0; s + 8 <= to && t - t0 < budget; s += stride_sectors) {
        one(T_OUT, s, small[0], 4096);
        ops++;
        t = rdtsc();
    }
    report("firsttouch4k", ops, ops * 4096, t - t0);
}

static void check_prefill(u32 seed) {
    u64 at[3], i, k;
    at[0] = 0;
    at[1] = (b.capacity / 16) * 8;
    at[2] = (b.capacity / 8 - 1) * 8;
    for (k = 0; k < 3; k++) {
        one(T_IN, at[k], small[0], 4096);
        for (i = 0; i < 4096; i++)
            if (small[0][i] != pattern(seed, at[k] * 512 + i)) fail(24, "the disk does not hold the host's prefill");
    }
}

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    u64 tests, qd, stride, seed, t0, half;
    (void)ram;
    if (vcpu != 0) park();
    if (disks < 1) fail(1, "needs a disk");
    if (!params.tsc_khz) fail(2, "the host gave no TSC frequency");
    budget = params.tsc_khz * params.ms;
    tests = params.tests;
    qd = params.qd;
    stride = params.stride / 512;
    seed = params.check_seed;
    if (qd < 1 || qd > MAXQD || 3 * qd > QSIZE) fail(3, "queue depth out of range");
    if (stride < 8 || stride % 8) fail(4, "first-touch stride not a multiple of 4 KiB");
    if (vblk_init(&b, 0, &q0)) fail(5, "device init");
    if (b.capacity < 2 * MIB / 512) fail(6, "disk smaller than 2 MiB");
    half = (b.capacity / 2) & ~7UL;
    memset(big, 0xa5, sizeof(big));
    memset(small, 0x5a, sizeof(small));
    if (seed) check_prefill((u32)(seed - 1));
    t0 = rdtsc();
    if (tests & B_RANDREAD_QD1) random_qd1("randread4k_qd1", T_IN);
    if (tests & B_RANDREAD_QDN) random_deep("randread4k_qdN", T_IN, (u32)qd);
    if (tests & B_SEQREAD) sequential("seqread1m", T_IN, 0, b.capacity);
    if (tests & B_RANDWRITE_QD1) random_qd1("randwrite4k_qd1", T_OUT);
    if (tests & B_RANDWRITE_QDN) random_deep("randwrite4k_qdN", T_OUT, (u32)qd);
    if (tests & B_SEQWRITE) sequential("seqwrite1m", T_OUT, 0, b.capacity);
    if (tests & B_FIRSTTOUCH) first_touch(stride, half);
    if (tests & B_SEQWRITE_FRESH) sequential("seqwrite1m_fresh", T_OUT, half, b.capacity);
    if (tests & B_FLUSH) {
        u64 f0 = rdtsc();
        one(T_FLUSH, 0, 0, 0);
        report("flush", 1, 0, rdtsc() - f0);
    }
    puts("VMMBENCH end requests="); put_dec(requests);
    puts(" cycles="); put_dec(rdtsc() - t0);
    puts("\n");
    return 0;
}
