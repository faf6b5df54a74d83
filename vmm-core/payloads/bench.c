/* Request latency on disk 0: 1000 reads and 1000 writes of 4 KiB, one at
 * a time, timed with rdtsc; prints the average cycles per request. */
#include "payload.h"

#define N 1000
static struct vq q0 __attribute__((aligned(4096)));
static u8 buf[4096] __attribute__((aligned(4096)));

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    struct vblk b;
    u64 t0, t1, t2, i, span;
    (void)ram;
    if (vcpu != 0) park();
    if (disks < 1) fail(1, "needs a disk");
    if (vblk_init(&b, 0, &q0)) fail(2, "init");
    span = b.capacity / 8 > 16 ? b.capacity / 8 - 8 : 8;
    t0 = rdtsc();
    for (i = 0; i < N; i++)
        if (vblk_rw(&b, T_IN, (i * 7919 * 8) % span, buf, 4096) != S_OK) fail(3, "read");
    t1 = rdtsc();
    for (i = 0; i < N; i++) {
        buf[0] = (u8)i;
        if (vblk_rw(&b, T_OUT, (i * 7919 * 8) % span, buf, 4096) != S_OK) fail(4, "write");
    }
    t2 = rdtsc();
    puts("bench: read "); put_dec((t1 - t0) / N); puts(" cycles, write "); put_dec((t2 - t1) / N);
    puts(" cycles per 4 KiB request\n");
    return 0;
}
