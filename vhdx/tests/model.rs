//! Property test: random write/read/discard/flush/reopen sequences against a
//! `Vec<u8>` model.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use disk::{MemStorage, VirtualDisk};
use proptest::prelude::*;
use std::sync::Arc;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..size, 1usize..300_000, any::<u8>()).prop_map(move |(off, len, seed)| Op::Write {
            off,
            len: len.min((size - off) as usize),
            seed
        }),
        3 => (0..size, 1usize..3_000_000).prop_map(move |(off, len)| Op::Read {
            off,
            len: len.min((size - off) as usize)
        }),
        1 => (0..size, 1u64..(6 * MIB)).prop_map(move |(off, len)| Op::Discard {
            off,
            len: len.min(size - off)
        }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        bat_cache_pages: 2,
        ..OpenOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn matches_vec_model(
        lss in prop_oneof![Just(512u32), Just(4096u32)],
        block_shift in 0u32..3,
        fixed in any::<bool>(),
        ops in proptest::collection::vec(op(12 * MIB + 4096 * 3), 1..40),
    ) {
        let size = 12 * MIB + 4096 * 3;
        let block = (MIB as u32) << block_shift;
        let mut o = CreateOptions::new(size);
        o.logical_sector_size = lss;
        o.block_size = block;
        o.fixed = fixed;
        let mut st = Arc::new(MemStorage::new("model.vhdx"));
        let mut d = Vhdx::create_on(Box::new(st.clone()), &o).unwrap();
        let mut model = vec![0u8; size as usize];
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect();
                    d.write_at(&data, off).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                Op::Read { off, len } => {
                    let mut got = vec![0u8; len];
                    d.read_at(&mut got, off).unwrap();
                    prop_assert!(got[..] == model[off as usize..off as usize + len], "read {off}+{len}");
                }
                Op::Discard { off, len } => {
                    d.discard(off, len).unwrap();
                    // Whole blocks inside the range read as zeros afterwards.
                    let b = u64::from(block);
                    let first = off.div_ceil(b);
                    let end = off + len;
                    let mut last = end / b;
                    if end == size && !end.is_multiple_of(b) { last += 1; }
                    for blk in first..last {
                        let s = (blk * b) as usize;
                        let e = ((blk + 1) * b).min(size) as usize;
                        model[s..e].fill(0);
                    }
                }
                Op::Flush => d.flush().unwrap(),
                Op::Reopen => {
                    d.close().unwrap();
                    st = Arc::new(MemStorage::from_vec("model.vhdx", st.to_vec()));
                    d = Vhdx::open_storage(Box::new(st.clone()), &rw()).unwrap();
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        d.read_at(&mut all, 0).unwrap();
        prop_assert!(all == model);
    }
}
