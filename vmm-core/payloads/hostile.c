/* A hostile guest: malformed descriptor chains, malformed requests and
 * register accesses out of order, each followed by a valid request that
 * must still be answered. Ends with 0 when the device survived all of it
 * as the spec and the VMM's docs say, or the failing step's number.
 * Every malformed write targets sectors 100-199, which the host test
 * checks are still zero. */
#include "payload.h"

static struct vq q0 __attribute__((aligned(4096)));
static struct vblk b;
static struct blk_req hdr;
static volatile u8 st;
static u8 data[8192] __attribute__((aligned(4096)));
static u64 ram_size;
static u32 refused;

static void init(u32 step) {
    const char *why = vblk_init(&b, 0, &q0);
    if (why) fail(step, why);
}

/* A valid read must still work. */
static void alive(u32 step) {
    if (vblk_rw(&b, T_IN, 0, data, 512) != S_OK) fail(100 + step, "the device stopped answering");
}

static void header(u32 type, u64 sector) { hdr.type = type; hdr.reserved = 0; hdr.sector = sector; st = 0xee; }

static void d(int i, u64 addr, u32 len, u16 flags, u16 next) {
    b.q->desc[i] = (struct desc){addr, len, flags, next};
}

/* Publish chain 0 and wait for its used entry: the used length. */
static u32 submit(u32 step) {
    struct used_elem u;
    vq_publish(&b, 0);
    if (vq_wait(&b, &u)) fail(200 + step, "no answer to a malformed request");
    if (u.id != 0) fail(300 + step, "answered with the wrong head");
    return u.len;
}

/* A chain the device must give back unanswered: used length 0, status
 * byte untouched. */
static void unanswered(u32 step) {
    if (submit(step) != 0 || st != 0xee) fail(step, "a malformed chain was answered");
    refused++;
    alive(step);
}

/* A request the device must answer with `want`. */
static void answered(u32 step, u8 want) {
    if (submit(step) != 1 || st != want) fail(step, "a malformed request got the wrong status");
    refused++;
    alive(step);
}

struct seg { u64 sector; u32 num; u32 flags; };

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    u64 H = (u64)&hdr, S = (u64)&st, D = (u64)data;
    static struct seg segs[17];
    u32 i, spins;
    ram_size = ram;
    if (vcpu != 0) park();
    if (disks < 1) fail(1, "needs a disk");
    init(2);
    alive(0);

    /* Chains given back unanswered. */
    header(T_OUT, 100); d(0, H, 16, D_NEXT, 0);
    unanswered(10); /* a descriptor linking to itself */
    header(T_OUT, 101); d(0, H, 16, D_NEXT, 1); d(1, D, 512, D_NEXT, 2); d(2, S, 1, D_WRITE | D_NEXT, 1);
    unanswered(11); /* a loop through three */
    header(T_OUT, 102); d(0, H, 16, D_NEXT, 200);
    unanswered(12); /* a link past the table */
    header(T_IN, 103); d(0, H, 16, D_NEXT, 1); d(1, ram_size - 256, 512, D_WRITE | D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    unanswered(13); /* a buffer running past the end of RAM */
    header(T_IN, 104); d(0, H, 16, D_NEXT, 1); d(1, 0xd0000000UL, 512, D_WRITE | D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    unanswered(14); /* a buffer on the device's own registers */
    header(T_IN, 105); d(0, H, 16, D_NEXT, 1); d(1, 0xfffffffffffff000UL, 0x2000, D_WRITE | D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    unanswered(15); /* an address range that wraps */
    header(T_OUT, 106); d(0, H, 16, D_NEXT, 1); d(1, D, 512, D_WRITE | D_NEXT, 2); d(2, D + 512, 512, D_NEXT, 3); d(3, S, 1, D_WRITE, 0);
    unanswered(16); /* readable after writable */
    header(T_OUT, 107); d(0, H, 16, D_NEXT, 1); d(1, D, 512, D_NEXT, 2); d(2, S, 1, 0, 0);
    unanswered(17); /* no writable byte for the status */
    header(T_OUT, 108); d(0, H, 8, D_NEXT, 1); d(1, S, 1, D_WRITE, 0);
    unanswered(18); /* a header cut short */
    header(T_OUT, 109); d(0, D, 64, D_INDIRECT, 0);
    unanswered(19); /* an indirect table, a feature not offered */

    /* Requests answered IOERR or UNSUPP. */
    header(T_IN, 0); d(0, H, 16, D_NEXT, 1); d(1, D, 100, D_WRITE | D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(20, S_IOERR); /* not whole sectors */
    header(T_IN, 0xffffffffffffffffUL); d(0, H, 16, D_NEXT, 1); d(1, D, 512, D_WRITE | D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(21, S_IOERR); /* a sector whose byte offset overflows */
    header(T_OUT, 110); d(0, H, 16, D_NEXT, 1); d(1, D, 512, D_NEXT, 2); d(2, D + 512, 512, D_WRITE | D_NEXT, 3); d(3, S, 1, D_WRITE, 0);
    answered(22, S_IOERR); /* a write with device-writable data */
    header(T_IN, 0); d(0, H, 16, D_NEXT, 1); d(1, S, 1, D_WRITE, 0);
    answered(23, S_IOERR); /* a read of nothing */
    header(T_FLUSH, 0); d(0, H, 16, D_NEXT, 1); d(1, D, 512, D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(24, S_IOERR); /* a flush carrying data */
    header(T_OUT, 111); d(0, H, 16, D_NEXT, 1); d(1, D, 511, D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(25, S_IOERR); /* a write of 511 bytes */
    header(99, 0); d(0, H, 16, D_NEXT, 1); d(1, S, 1, D_WRITE, 0);
    answered(26, S_UNSUPP); /* an unknown type */
    segs[0] = (struct seg){112, 8, 1};
    header(T_DISCARD, 0); d(0, H, 16, D_NEXT, 1); d(1, (u64)segs, 16, D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(27, S_UNSUPP); /* a discard with the unmap flag */
    for (i = 0; i < 17; i++) segs[i] = (struct seg){120 + i, 1, 0};
    header(T_WRITE_ZEROES, 0); d(0, H, 16, D_NEXT, 1); d(1, (u64)segs, sizeof(segs), D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(28, S_IOERR); /* 17 segments, 16 allowed */
    segs[0] = (struct seg){b.capacity - 1, 2, 0};
    header(T_WRITE_ZEROES, 0); d(0, H, 16, D_NEXT, 1); d(1, (u64)segs, 16, D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(29, S_IOERR); /* zeroes past the end */
    segs[0] = (struct seg){130, 1, 0x80};
    header(T_WRITE_ZEROES, 0); d(0, H, 16, D_NEXT, 1); d(1, (u64)segs, 16, D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(30, S_UNSUPP); /* unknown segment flags */
    header(T_OUT, 140); d(0, H, 16, D_NEXT, 1); d(1, D, 0, D_NEXT, 2); d(2, S, 1, D_WRITE, 0);
    answered(31, S_IOERR); /* a write of zero bytes */

    /* Registers poked out of order. */
    mmio_write(b.base, R_QUEUE_NUM, 3);
    mmio_write(b.base, R_QUEUE_DESC_LOW, 0x1234);
    alive(40); /* queue layout after DRIVER_OK: ignored */
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE);
    if (mmio_read(b.base, R_STATUS) != (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)) fail(41, "a status clearing bits was taken");
    alive(41);
    mmio_write(b.base, R_QUEUE_NOTIFY, 7);
    alive(42); /* a notify of a queue that does not exist */
    if (*(volatile u8 *)(b.base + R_MAGIC) != 0) fail(43, "a 1-byte register read was answered");
    *(volatile u16 *)(b.base + R_STATUS) = 0;
    *(volatile u32 *)(b.base + R_STATUS + 1) = 0;
    alive(43); /* narrow and unaligned register writes: ignored */
    if (mmio_read(b.base, 0x800) != 0 || mmio_read(b.base, 0x0fc) != 0) fail(44, "reads past the registers");
    mmio_write(b.base, 0x800, 0xffffffff);
    alive(44);

    /* DRIVER_OK before FEATURES_OK, features without VERSION_1, absurd
     * queue sizes, a queue outside RAM. */
    mmio_write(b.base, R_STATUS, 0);
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    if (mmio_read(b.base, R_STATUS) != 0) fail(50, "DRIVER_OK before FEATURES_OK was taken");
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE);
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(b.base, R_DRIVER_FEATURES_SEL, 1);
    mmio_write(b.base, R_DRIVER_FEATURES, 0);
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (mmio_read(b.base, R_STATUS) & S_FEATURES_OK) fail(51, "features without VERSION_1 were accepted");
    mmio_write(b.base, R_STATUS, 0);
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE);
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(b.base, R_DRIVER_FEATURES_SEL, 1);
    mmio_write(b.base, R_DRIVER_FEATURES, 1);
    mmio_write(b.base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    mmio_write(b.base, R_QUEUE_SEL, 0);
    mmio_write(b.base, R_QUEUE_NUM, 65535);
    mmio_write(b.base, R_QUEUE_DESC_LOW, (u32)(u64)q0.desc);
    mmio_write(b.base, R_QUEUE_AVAIL_LOW, (u32)(u64)&q0.avail);
    mmio_write(b.base, R_QUEUE_USED_LOW, (u32)(u64)&q0.used);
    mmio_write(b.base, R_QUEUE_READY, 1);
    if (mmio_read(b.base, R_QUEUE_READY)) fail(52, "a queue of 65535 was made ready");
    mmio_write(b.base, R_QUEUE_NUM, 0x10000);
    mmio_write(b.base, R_QUEUE_READY, 1);
    if (mmio_read(b.base, R_QUEUE_READY)) fail(53, "a queue of 65536 was made ready");
    mmio_write(b.base, R_QUEUE_NUM, 16);
    mmio_write(b.base, R_QUEUE_USED_LOW, (u32)ram_size - 64);
    mmio_write(b.base, R_QUEUE_READY, 1);
    if (mmio_read(b.base, R_QUEUE_READY)) fail(54, "a used ring past RAM was made ready");
    mmio_write(b.base, R_QUEUE_USED_HIGH, 1);
    mmio_write(b.base, R_QUEUE_USED_LOW, 0);
    mmio_write(b.base, R_QUEUE_READY, 1);
    if (mmio_read(b.base, R_QUEUE_READY)) fail(55, "a used ring at 4 GiB was made ready");
    init(56);
    alive(56);

    /* A corrupt available index: NEEDS_RESET, and a reset recovers. */
    __atomic_store_n(&q0.avail.idx, (u16)(b.avail_idx + 1000), __ATOMIC_RELEASE);
    mmio_write(b.base, R_QUEUE_NOTIFY, 0);
    for (spins = 0; !(mmio_read(b.base, R_STATUS) & S_NEEDS_RESET); spins++)
        if (spins > 100000000) fail(60, "no NEEDS_RESET after a corrupt available index");
    if (!(mmio_read(b.base, R_INTERRUPT_STATUS) & 2)) fail(61, "no configuration-change interrupt status");
    init(62);
    alive(62);
    puts("hostile: "); put_dec(refused); puts(" malformed requests refused, device alive\n");
    return 0;
}
