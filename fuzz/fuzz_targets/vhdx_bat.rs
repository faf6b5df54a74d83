#![no_main]
// A BAT under a geometry from the first 16 bytes: every entry is read,
// checked and mapped to its virtual range.
use vhdx::bat::{BatEntry, BatGeometry};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let virtual_size = u64::from_le_bytes(data[0..8].try_into().unwrap()) >> (data[8] & 31);
    let block_size = 1u32 << (20 + (data[9] % 10));
    let sector = if data[10] & 1 == 0 { 512 } else { 4096 };
    let has_parent = data[10] & 2 != 0;
    let bat = &data[16..];
    let Ok(g) = BatGeometry::new(virtual_size, block_size, sector, has_parent) else {
        return;
    };
    let _ = (
        g.chunk_ratio(),
        g.chunk_size(),
        g.payload_blocks(),
        g.bitmap_blocks(),
        g.bat_bytes(),
    );
    let total = g.total_entries().min(bat.len() as u64 / 8);
    for i in 0..total {
        let e = BatEntry::read(bat, i).expect("an entry inside the BAT");
        let _ = g.check_entry(i, e);
        let _ = e.payload_state();
        let (start, end) = g.entry_virtual_range(i);
        assert!(start <= end && end <= g.virtual_size);
        if !g.is_bitmap_index(i) {
            let block = i - i / (g.chunk_ratio() + 1);
            assert_eq!(g.payload_index(block), i);
        }
    }
});
