//! Property test: random write/read/flush/reopen sequences against a
//! `Vec<u8>` model, for fixed and dynamic disks (including blocks whose
//! sector bitmaps have zero bits over junk data, as other tools leave them).

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::MIB;
use disk::{MemStorage, VirtualDisk};
use proptest::prelude::*;
use std::sync::Arc;
use vhd::{CreateOptions, OpenOptions, Vhd};

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

const SIZE: u64 = 6 * MIB + 4096 * 3 + 512;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..SIZE, 1usize..300_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write {
            off,
            len: len.min((SIZE - off) as usize),
            seed
        }),
        3 => (0..SIZE, 1usize..3_000_000).prop_map(|(off, len)| Op::Read {
            off,
            len: len.min((SIZE - off) as usize)
        }),
        1 => (0..SIZE, 1u64..(4 * MIB)).prop_map(|(off, len)| Op::Discard {
            off,
            len: len.min(SIZE - off)
        }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// Allocate a few blocks full of junk, then clear their bitmaps: the
/// blocks are allocated but every sector reads as zero.
fn foreign_partial_bitmaps(st: &Arc<MemStorage>, d: Vhd) -> Arc<MemStorage> {
    let size = d.virtual_size();
    let bs = d.block_size();
    let table = d.info().header.as_ref().unwrap().table_offset as usize;
    for off in [0, size / 2, size - 1000] {
        d.write_at(&vec![0xa5; 1000], off).unwrap();
    }
    d.close().unwrap();
    let mut v = st.to_vec();
    let bm = vhd::sector_bitmap::size(bs as u32) as usize;
    let entries = size.div_ceil(bs) as usize;
    for i in 0..entries {
        let e = u32::from_be_bytes(v[table + i * 4..table + i * 4 + 4].try_into().unwrap());
        if e != u32::MAX {
            let at = e as usize * 512;
            v[at..at + bm].fill(0);
            v[at] = 0; // explicit: sector 0 not present either
        }
    }
    Arc::new(MemStorage::from_vec("model.vhd", v))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn matches_vec_model(
        block_shift in 0u32..4,
        fixed in any::<bool>(),
        foreign in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let block = (64 * 1024u32) << (block_shift * 2); // 64 KiB .. 16 MiB
        let mut o = CreateOptions::new(SIZE);
        o.block_size = block;
        o.fixed = fixed;
        let mut st = Arc::new(MemStorage::new("model.vhd"));
        let mut d = Vhd::create_on(Box::new(st.clone()), &o).unwrap();
        let size = d.virtual_size();
        prop_assert!(size >= SIZE);
        if foreign && !fixed {
            st = foreign_partial_bitmaps(&st, d);
            d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
        }
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
                    // A dynamic disk deallocates the whole blocks inside the
                    // range (they read as zeros); a fixed disk keeps its data.
                    if !fixed {
                        let b = u64::from(block);
                        for blk in off.div_ceil(b)..(off + len) / b {
                            let s = (blk * b) as usize;
                            let e = ((blk + 1) * b).min(size) as usize;
                            model[s..e].fill(0);
                        }
                    }
                }
                Op::Flush => d.flush().unwrap(),
                Op::Reopen => {
                    d.close().unwrap();
                    st = Arc::new(MemStorage::from_vec("model.vhd", st.to_vec()));
                    d = Vhd::open_storage(Box::new(st.clone()), &rw()).unwrap();
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        d.read_at(&mut all, 0).unwrap();
        prop_assert!(all == model);
        d.close().unwrap();
        let again = Vhd::open_storage(Box::new(MemStorage::from_vec("m2.vhd", st.to_vec())), &OpenOptions::default()).unwrap();
        prop_assert_eq!(again.info().footer_source, vhd::FooterSource::End);
        let mut all = vec![0u8; size as usize];
        again.read_at(&mut all, 0).unwrap();
        prop_assert!(all == model);
    }
}
