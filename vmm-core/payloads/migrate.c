/* Live storage migration: round after round, write the whole of disk 0
 * with the round's pattern (64 KiB writes, in order), then read all of it
 * back and compare; print "round N ok". A write lost across the switch to
 * the new image fails the comparison (status 10 + round % 100). Runs until
 * the host stops it. */
#include "payload.h"

static struct vq q0 __attribute__((aligned(4096)));
static u8 buf[65536] __attribute__((aligned(4096)));

static void fill(u32 seed, u64 sector) {
    u64 i;
    for (i = 0; i < sizeof buf; i++) buf[i] = pattern(seed, sector * 512 + i);
}

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    struct vblk b;
    u64 round, s, i, n;
    (void)ram;
    if (vcpu != 0) park();
    if (disks < 1 || vblk_init(&b, 0, &q0)) fail(1, "init");
    n = b.capacity / 128 * 128; /* whole 64 KiB pieces */
    for (round = 1;; round++) {
        for (s = 0; s < n; s += 128) {
            fill((u32)round, s);
            if (vblk_rw(&b, T_OUT, s, buf, sizeof buf) != S_OK) fail(2, "write");
        }
        for (s = 0; s < n; s += 128) {
            if (vblk_rw(&b, T_IN, s, buf, sizeof buf) != S_OK) fail(3, "read");
            for (i = 0; i < sizeof buf; i++)
                if (buf[i] != pattern((u32)round, s * 512 + i)) {
                    puts("migrate: round "); put_dec(round); puts(": sector ");
                    put_dec(s + i / 512); puts(" reads other bytes\n");
                    payload_exit(10 + (u32)(round % 100));
                }
        }
        puts("round "); put_dec(round); puts(" ok\n");
    }
}
