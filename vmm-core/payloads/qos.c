/* Storage QoS: as fast as it can, 1500 reads of 4 KiB then 100 reads of
 * 64 KiB on disk 0: 2300 I/Os in Hyper-V's 8 KiB units and 12,697,600
 * bytes. The host times the run against the disk's limits. Ends with 0,
 * or the failing step's number. */
#include "payload.h"

static struct vq q0 __attribute__((aligned(4096)));
static u8 buf[65536] __attribute__((aligned(4096)));

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    struct vblk b;
    u64 i, span;
    (void)ram;
    if (vcpu != 0) park();
    if (disks < 1 || vblk_init(&b, 0, &q0)) fail(1, "init");
    span = b.capacity > 256 ? b.capacity - 128 : 1;
    for (i = 0; i < 1500; i++)
        if (vblk_rw(&b, T_IN, (i * 7919 * 8) % span, buf, 4096) != S_OK) fail(2, "4 KiB read");
    for (i = 0; i < 100; i++)
        if (vblk_rw(&b, T_IN, (i * 131 * 128) % span, buf, 65536) != S_OK) fail(3, "64 KiB read");
    puts("qos: done\n");
    return 0;
}
