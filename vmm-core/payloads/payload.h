/* A tiny freestanding runtime for this project's test payloads: port I/O,
 * the UART, and a polling virtio-blk driver over virtio-mmio version 2.
 * See vmm-core's crate docs for the ABI. */
#ifndef PAYLOAD_H
#define PAYLOAD_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* End the run with status v (port 0xf4). */
static inline __attribute__((noreturn)) void payload_exit(u32 v) { for (;;) outl(0xf4, v); }
/* Park this vCPU (port 0xf5). */
static inline __attribute__((noreturn)) void park(void) { for (;;) outb(0xf5, 0); }

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);

void puts(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);
/* Print a message and end the run with status code. */
__attribute__((noreturn)) void fail(u32 code, const char *why);

/* virtio-mmio registers (virtio 1.2, 4.2.2). */
#define VIRTIO_MMIO_BASE 0xd0000000UL
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_AVAIL_LOW 0x090
#define R_QUEUE_AVAIL_HIGH 0x094
#define R_QUEUE_USED_LOW 0x0a0
#define R_QUEUE_USED_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_SEG_MAX 2
#define F_RO 5
#define F_BLK_SIZE 6
#define F_FLUSH 9
#define F_TOPOLOGY 10
#define F_DISCARD 13
#define F_WRITE_ZEROES 14
#define F_VERSION_1 32

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4

/* The queue size a payload's driver uses (a power of two, at most the
 * device's 256); build.rs may give another with -DQSIZE for one payload. */
#ifndef QSIZE
#define QSIZE 16
#endif

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };

struct vq {
    struct desc desc[QSIZE] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(16)));
    struct used used __attribute__((aligned(16)));
};

struct blk_req { u32 type; u32 reserved; u64 sector; };

struct vblk {
    u64 base;
    struct vq *q;
    u16 avail_idx;
    u16 used_seen;
    u64 features;
    u64 capacity;
    u32 blk_size;
};

static inline u32 mmio_read(u64 base, u32 off) { return *(volatile u32 *)(base + off); }
static inline void mmio_write(u64 base, u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }

/* Bring device `index` up with its own queue memory; 0 or a reason. */
const char *vblk_init(struct vblk *b, int index, struct vq *q);
/* Put chain `head` in the available ring and notify the device. */
void vq_publish(struct vblk *b, u16 head);
/* Put chain `head` in the available ring without notifying. */
void vq_add(struct vblk *b, u16 head);
/* Notify the device (QueueNotify) of what vq_add put in the ring. */
void vq_notify(struct vblk *b);
/* Wait for the next used entry: 0, or -1 after a long time without one. */
int vq_wait(struct vblk *b, struct used_elem *out);
/* Take the next used entry if there is one: 1, else 0 (no waiting). */
int vq_poll(struct vblk *b, struct used_elem *out);
/* A request: header, one data buffer (none if len is 0), status; the
 * status byte, or -1 if the device never answered. */
int vblk_rw(struct vblk *b, u32 type, u64 sector, void *buf, u32 len);
/* Read the 20-byte id into out; the status. */
int vblk_get_id(struct vblk *b, char out[20]);

/* The byte tests write at disk offset `off` with `seed`; the host tests
 * compute the same (vmm-core/tests/common). */
static inline u8 pattern(u32 seed, u64 off) {
    return (u8)(((off >> 9) * 131 + (off & 511) * 7 + seed) & 0xff);
}

#endif
