#include "payload.h"

void *memset(void *d, int c, u64 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, u64 n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }
int memcmp(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++) if (*p != *q) return *p < *q ? -1 : 1;
    return 0;
}

void puts(const char *s) {
    for (; *s; s++) {
        /* Wait for the transmitter holding register to be empty. */
        while (!(inb(0x3f8 + 5) & 0x20)) cpu_relax();
        outb(0x3f8, (u8)*s);
    }
}

void put_hex(u64 v) {
    char buf[19] = "0x";
    int i;
    for (i = 0; i < 16; i++) buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    buf[18] = 0;
    puts(buf);
}

void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(buf + i);
}

void fail(u32 code, const char *why) {
    puts("FAIL ");
    put_dec(code);
    puts(": ");
    puts(why);
    puts("\n");
    payload_exit(code);
}

static void set_status(struct vblk *b, u32 s) { mmio_write(b->base, R_STATUS, s); }

const char *vblk_init(struct vblk *b, int index, struct vq *q) {
    u64 base = VIRTIO_MMIO_BASE + (u64)index * 0x1000;
    u64 wanted, dev;
    u32 max;
    b->base = base;
    b->q = q;
    b->avail_idx = 0;
    b->used_seen = 0;
    memset(q, 0, sizeof(*q));
    if (mmio_read(base, R_MAGIC) != 0x74726976) return "bad magic";
    if (mmio_read(base, R_VERSION) != 2) return "not virtio-mmio version 2";
    if (mmio_read(base, R_DEVICE_ID) != 2) return "not a block device";
    set_status(b, 0);
    set_status(b, S_ACKNOWLEDGE);
    set_status(b, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(base, R_DEVICE_FEATURES_SEL, 0);
    dev = mmio_read(base, R_DEVICE_FEATURES);
    mmio_write(base, R_DEVICE_FEATURES_SEL, 1);
    dev |= (u64)mmio_read(base, R_DEVICE_FEATURES) << 32;
    if (!(dev & (1UL << F_VERSION_1))) return "no VIRTIO_F_VERSION_1";
    wanted = (1UL << F_VERSION_1) | (1UL << F_SEG_MAX) | (1UL << F_RO) | (1UL << F_BLK_SIZE) |
             (1UL << F_FLUSH) | (1UL << F_TOPOLOGY) | (1UL << F_DISCARD) | (1UL << F_WRITE_ZEROES);
    b->features = dev & wanted;
    mmio_write(base, R_DRIVER_FEATURES_SEL, 0);
    mmio_write(base, R_DRIVER_FEATURES, (u32)b->features);
    mmio_write(base, R_DRIVER_FEATURES_SEL, 1);
    mmio_write(base, R_DRIVER_FEATURES, (u32)(b->features >> 32));
    set_status(b, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read(base, R_STATUS) & S_FEATURES_OK)) return "FEATURES_OK refused";
    mmio_write(base, R_QUEUE_SEL, 0);
    if (mmio_read(base, R_QUEUE_READY)) return "queue already ready";
    max = mmio_read(base, R_QUEUE_NUM_MAX);
    if (max < QSIZE) return "queue too small";
    mmio_write(base, R_QUEUE_NUM, QSIZE);
    mmio_write(base, R_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    mmio_write(base, R_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
    mmio_write(base, R_QUEUE_AVAIL_LOW, (u32)(u64)&q->avail);
    mmio_write(base, R_QUEUE_AVAIL_HIGH, (u32)((u64)&q->avail >> 32));
    mmio_write(base, R_QUEUE_USED_LOW, (u32)(u64)&q->used);
    mmio_write(base, R_QUEUE_USED_HIGH, (u32)((u64)&q->used >> 32));
    mmio_write(base, R_QUEUE_READY, 1);
    if (mmio_read(base, R_QUEUE_READY) != 1) return "queue not made ready";
    set_status(b, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    b->capacity = (u64)mmio_read(base, R_CONFIG) | ((u64)mmio_read(base, R_CONFIG + 4) << 32);
    b->blk_size = (b->features & (1UL << F_BLK_SIZE)) ? mmio_read(base, R_CONFIG + 0x14) : 512;
    return 0;
}

void vq_add(struct vblk *b, u16 head) {
    struct vq *q = b->q;
    q->avail.ring[b->avail_idx % QSIZE] = head;
    b->avail_idx++;
    __atomic_store_n(&q->avail.idx, b->avail_idx, __ATOMIC_RELEASE);
}

void vq_notify(struct vblk *b) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    mmio_write(b->base, R_QUEUE_NOTIFY, 0);
}

void vq_publish(struct vblk *b, u16 head) {
    vq_add(b, head);
    vq_notify(b);
}

int vq_poll(struct vblk *b, struct used_elem *out) {
    struct vq *q = b->q;
    if (__atomic_load_n(&q->used.idx, __ATOMIC_ACQUIRE) == b->used_seen) return 0;
    *out = q->used.ring[b->used_seen % QSIZE];
    b->used_seen++;
    return 1;
}

int vq_wait(struct vblk *b, struct used_elem *out) {
    struct vq *q = b->q;
    u64 spins = 0;
    while (__atomic_load_n(&q->used.idx, __ATOMIC_ACQUIRE) == b->used_seen) {
        cpu_relax();
        if (++spins > 400000000UL) return -1;
    }
    *out = q->used.ring[b->used_seen % QSIZE];
    b->used_seen++;
    return 0;
}

static struct blk_req req_hdr;
static volatile u8 req_status;

int vblk_rw(struct vblk *b, u32 type, u64 sector, void *buf, u32 len) {
    struct desc *d = b->q->desc;
    struct used_elem u;
    int n = 0;
    req_hdr.type = type;
    req_hdr.reserved = 0;
    req_hdr.sector = sector;
    req_status = 0xee;
    d[n].addr = (u64)&req_hdr; d[n].len = sizeof(req_hdr); d[n].flags = D_NEXT; d[n].next = (u16)(n + 1); n++;
    if (len) {
        d[n].addr = (u64)buf; d[n].len = len;
        d[n].flags = D_NEXT | ((type == T_IN || type == T_GET_ID) ? D_WRITE : 0);
        d[n].next = (u16)(n + 1); n++;
    }
    d[n].addr = (u64)&req_status; d[n].len = 1; d[n].flags = D_WRITE; d[n].next = 0;
    vq_publish(b, 0);
    if (vq_wait(b, &u)) return -1;
    if (u.id != 0) return -2;
    return req_status;
}

int vblk_get_id(struct vblk *b, char out[20]) {
    return vblk_rw(b, T_GET_ID, 0, out, 20);
}
