#![no_main]
// The virtio-blk request parser over a split queue in 64 KiB of guest RAM
// holding the input (from byte 8): descriptor table at 0, available ring
// at 0x100, used ring at 0x200, queue size 1 << (byte 0 % 4). Bytes 1..8
// are the device's limits. Every chain the driver made available is
// popped, parsed and given back.
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::virtio::queue::{Popped, Queue, QueueConfig};
use vmm_core::virtio::request::{parse, Limits};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let ram: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let body = &data[8..data.len().min(8 + 0x10000)];
    ram.write_slice(body, GuestAddress(0)).unwrap();
    let cfg = QueueConfig {
        size: 1 << (data[0] % 4),
        ready: true,
        desc: 0,
        avail: 0x100,
        used: 0x200,
    };
    let lim = Limits {
        capacity: u64::from(u32::from_le_bytes(data[1..5].try_into().unwrap())),
        writable: data[5] & 1 != 0,
        max_ranges: u32::from(data[6]),
        max_range_sectors: u32::from(data[7]) << 8,
    };
    let mut q = Queue::new(&cfg, &ram).expect("the layout fits");
    for _ in 0..cfg.size {
        match q.pop(&ram) {
            Ok(Some(Popped::Chain(c))) => {
                assert!(c.readable.len() + c.writable.len() <= usize::from(cfg.size));
                if let Ok(p) = parse(&ram, &c, &lim) {
                    assert!(c
                        .writable
                        .iter()
                        .any(|s| p.status >= s.addr && p.status < s.addr + u64::from(s.len)));
                }
                q.add_used(&ram, c.head, 0)
                    .expect("the used ring was checked");
            }
            Ok(Some(Popped::Bad { head, .. })) => q
                .add_used(&ram, head, 0)
                .expect("the used ring was checked"),
            Ok(None) | Err(_) => break,
        }
    }
});
