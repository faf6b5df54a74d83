#![no_main]
// A partition table (MBR with extended partitions, or GPT) on a small disk.
use disk::{MemStorage, RawDisk};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let len = (data.len() as u64).div_ceil(512) * 512;
    if let Ok(d) = RawDisk::create(MemStorage::from_vec("fuzz.raw", data.to_vec()), len) {
        let _ = disk::partition::partitions(&d);
    }
});
