/* Writes sector 0 of disk 0 (where a probed raw disk is guarded) and ends
 * with the request's status byte (0 OK, 1 IOERR), or 99 on no answer. */
#include "payload.h"

static struct vq q0 __attribute__((aligned(4096)));
static u8 buf[512];

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    struct vblk b;
    int st;
    u32 i;
    (void)ram;
    if (vcpu != 0) park();
    if (disks < 1 || vblk_init(&b, 0, &q0)) fail(98, "init");
    for (i = 0; i < 512; i++) buf[i] = pattern(0x33, i);
    st = vblk_rw(&b, T_OUT, 0, buf, 512);
    return st < 0 ? 99 : (u32)st;
}
