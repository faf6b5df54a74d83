/* Real I/O on every disk: GET_ID, the host's pattern read back, patterns
 * written at unaligned sectors, across a 2 MiB boundary, through three
 * descriptors and at the last sector; FLUSH; everything read back and
 * compared; reads past the end answered IOERR; WRITE_ZEROES and DISCARD.
 * A read-only disk must refuse a write. Ends with 0, or the failing
 * step's number. The host test checks the bytes through the library. */
#include "payload.h"

#define HOST_SEED 0x5a
#define HOST_SECTOR 64
#define HOST_COUNT 8

static struct vq queues[4] __attribute__((aligned(4096)));
static u8 buf[256 * 512] __attribute__((aligned(4096)));
static u8 buf2[256 * 512] __attribute__((aligned(4096)));

static void fill(u8 *p, u32 seed, u64 sector, u64 count) {
    u64 i;
    for (i = 0; i < count * 512; i++) p[i] = pattern(seed, sector * 512 + i);
}

static int check(const u8 *p, u32 seed, u64 sector, u64 count) {
    u64 i;
    for (i = 0; i < count * 512; i++)
        if (p[i] != pattern(seed, sector * 512 + i)) return 0;
    return 1;
}

static int zeros(const u8 *p, u64 n) {
    u64 i;
    for (i = 0; i < n; i++) if (p[i]) return 0;
    return 1;
}

/* A write of `count` sectors through three data descriptors. */
static int write3(struct vblk *b, u64 sector, u8 *data, u32 count) {
    static struct blk_req h;
    static volatile u8 st;
    struct desc *d = b->q->desc;
    struct used_elem u;
    u32 a = 100 * 512, c = 50 * 512, e = count * 512 - a - c;
    h.type = T_OUT; h.reserved = 0; h.sector = sector;
    st = 0xee;
    d[0] = (struct desc){(u64)&h, 16, D_NEXT, 1};
    d[1] = (struct desc){(u64)data, a, D_NEXT, 2};
    d[2] = (struct desc){(u64)data + a, c, D_NEXT, 3};
    d[3] = (struct desc){(u64)data + a + c, e, D_NEXT, 4};
    d[4] = (struct desc){(u64)&st, 1, D_WRITE, 0};
    vq_publish(b, 0);
    if (vq_wait(b, &u) || u.len != 1) return -1;
    return st;
}

struct seg { u64 sector; u32 num; u32 flags; };

/* Some SSE arithmetic, as compiled C does (CR0/CR4 must allow it). */
static double harmonic(int n) {
    volatile double s = 0;
    int i;
    for (i = 1; i <= n; i++) s += 1.0 / i;
    return s;
}

static void disk_io(int i) {
    struct vblk b;
    const char *why = vblk_init(&b, i, &queues[i]);
    u32 seed = 0xa5 + (u32)i;
    u64 c, k;
    char id[21];
    static const u64 regions[4][2] = {{1, 7}, {4095, 3}, {10000, 256}, {0, 1}};
    u64 reg[4][2];
    int ro, st;
    if (why) fail(10, why);
    c = b.capacity;
    ro = (b.features >> F_RO) & 1;
    puts("disk "); put_dec((u64)i); puts(": "); put_dec(c); puts(" sectors, features ");
    put_hex(b.features); puts(ro ? " (read-only)\n" : "\n");
    if (c < 32768) fail(11, "disk smaller than 16 MiB");
    memset(id, 0, sizeof(id));
    if ((st = vblk_get_id(&b, id)) != S_OK) fail(12, "GET_ID failed");
    puts("disk "); put_dec((u64)i); puts(" id "); puts(id); puts("\n");
    /* The host's pattern, written before the run. */
    if (vblk_rw(&b, T_IN, HOST_SECTOR, buf, HOST_COUNT * 512) != S_OK) fail(13, "reading the host pattern");
    if (!check(buf, HOST_SEED, HOST_SECTOR, HOST_COUNT)) fail(14, "the host pattern reads wrong");
    /* Past the end: IOERR. */
    if (vblk_rw(&b, T_IN, c, buf, 512) != S_IOERR) fail(15, "a read at the capacity was not IOERR");
    if (vblk_rw(&b, T_IN, c - 1, buf, 1024) != S_IOERR) fail(16, "a read across the end was not IOERR");
    if (vblk_rw(&b, T_FLUSH, 0, 0, 0) != S_OK) fail(17, "FLUSH failed");
    if (ro) {
        fill(buf, seed, 1, 1);
        if (vblk_rw(&b, T_OUT, 1, buf, 512) != S_IOERR) fail(18, "a write to a read-only disk was not IOERR");
        return;
    }
    for (k = 0; k < 4; k++) { reg[k][0] = regions[k][0]; reg[k][1] = regions[k][1]; }
    reg[3][0] = c - 1;
    for (k = 0; k < 4; k++) {
        fill(buf, seed, reg[k][0], reg[k][1]);
        st = k == 2 ? write3(&b, reg[k][0], buf, (u32)reg[k][1])
                    : vblk_rw(&b, T_OUT, reg[k][0], buf, (u32)(reg[k][1] * 512));
        if (st != S_OK) fail(20 + (u32)k, "a write failed");
    }
    if (vblk_rw(&b, T_FLUSH, 0, 0, 0) != S_OK) fail(24, "FLUSH after the writes failed");
    for (k = 0; k < 4; k++) {
        memset(buf2, 0, sizeof(buf2));
        if (vblk_rw(&b, T_IN, reg[k][0], buf2, (u32)(reg[k][1] * 512)) != S_OK) fail(25, "a read back failed");
        if (!check(buf2, seed, reg[k][0], reg[k][1])) fail(30 + (u32)k, "read back differs");
    }
    /* Unwritten sectors between the regions read as zeros. */
    if (vblk_rw(&b, T_IN, 8, buf2, 8 * 512) != S_OK || !zeros(buf2, 8 * 512)) fail(26, "sectors 8-15 not zero");
    if (b.features & (1UL << F_WRITE_ZEROES)) {
        static struct seg z[2];
        z[0] = (struct seg){2, 2, 0};
        z[1] = (struct seg){10064, 128, 1};
        if (vblk_rw(&b, T_WRITE_ZEROES, 0, z, sizeof(z)) != S_OK) fail(40, "WRITE_ZEROES failed");
        if (vblk_rw(&b, T_IN, 1, buf2, 7 * 512) != S_OK) fail(41, "read after WRITE_ZEROES failed");
        if (!check(buf2, seed, 1, 1) || !zeros(buf2 + 512, 1024) || !check(buf2 + 1536, seed, 4, 4))
            fail(42, "WRITE_ZEROES did not zero sectors 2-3 alone");
        if (vblk_rw(&b, T_IN, 10064, buf2, 128 * 512) != S_OK || !zeros(buf2, 128 * 512))
            fail(43, "WRITE_ZEROES with unmap did not zero");
    }
    if (b.features & (1UL << F_DISCARD)) {
        static struct seg dz;
        dz = (struct seg){20000, 2048, 0};
        if (vblk_rw(&b, T_DISCARD, 0, &dz, sizeof(dz)) != S_OK) fail(44, "DISCARD failed");
        dz.flags = 1;
        if (vblk_rw(&b, T_DISCARD, 0, &dz, sizeof(dz)) != S_UNSUPP) fail(45, "DISCARD with unmap was not UNSUPP");
    }
    if (vblk_rw(&b, T_FLUSH, 0, 0, 0) != S_OK) fail(46, "the last FLUSH failed");
}

u32 payload_main(u64 ram, u64 disks, u64 vcpu, u64 vcpus) {
    u64 i;
    double h;
    (void)vcpus;
    if (vcpu != 0) park();
    puts("blk_io: ");
    put_dec(ram >> 20);
    puts(" MiB, ");
    put_dec(disks);
    puts(" disks\n");
    h = harmonic(1000);
    if (h < 7.48 || h > 7.49) fail(2, "floating point is wrong");
    if (disks == 0 || disks > 4) fail(3, "expects 1 to 4 disks");
    for (i = 0; i < disks; i++) disk_io((int)i);
    puts("blk_io: ok\n");
    return 0;
}
