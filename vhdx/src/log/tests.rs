//! Unit tests of the log: entries encoded, checksums and fields validated, the active sequence found.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::ErrorKind;

const LOG_LEN: usize = 64 * LOG_SECTOR;
const GUID: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);

fn page(seed: u8) -> Box<[u8; LOG_SECTOR]> {
    let mut p = Box::new([0u8; LOG_SECTOR]);
    for (i, b) in p.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    p[..8].copy_from_slice(&[seed, 1, 2, 3, 4, 5, 6, 7]);
    p[LOG_SECTOR - 4..].copy_from_slice(&[0xF0, 0xF1, seed, 0xF3]);
    p
}

fn entry(seq: u64, tail: u32, data_pages: usize) -> LogEntry {
    let mut ops = vec![LogOp::Zero {
        file_offset: 0x300000,
        length: 0x2000,
    }];
    for i in 0..data_pages {
        ops.push(LogOp::Data {
            file_offset: 0x200000 + 0x1000 * i as u64,
            page: page(i as u8 + seq as u8),
        });
    }
    ops.push(LogOp::Zero {
        file_offset: 0x400000,
        length: 0,
    });
    let mut e = LogEntry {
        sequence_number: seq,
        log_guid: GUID,
        tail,
        flushed_file_offset: 0x500000,
        last_file_offset: 0x600000,
        entry_length: 0,
        ops,
    };
    e.entry_length = (LogEntry::sectors_needed(e.ops.len(), data_pages) * LOG_SECTOR) as u32;
    e
}

/// Write `e` into `log` at `at`, wrapping around.
fn place(log: &mut [u8], at: usize, e: &LogEntry) -> usize {
    let bytes = e.encode();
    for (i, b) in bytes.iter().enumerate() {
        let n = log.len();
        log[(at + i) % n] = *b;
    }
    (at + bytes.len()) % log.len()
}

#[test]
fn sectors_needed() {
    assert_eq!(LogEntry::sectors_needed(0, 0), 1);
    assert_eq!(LogEntry::sectors_needed(126, 0), 1);
    assert_eq!(LogEntry::sectors_needed(127, 0), 2);
    assert_eq!(LogEntry::sectors_needed(126 + 128, 3), 5);
    assert_eq!(LogEntry::sectors_needed(126 + 129, 3), 6);
}

#[test]
fn encode_layout_and_round_trip() {
    let e = entry(0x1_0000_0002, 0, 2);
    let bytes = e.encode();
    assert_eq!(bytes.len(), 3 * LOG_SECTOR);
    assert_eq!(&bytes[..4], b"loge");
    assert_eq!(le_u32(&bytes, 8), 3 * LOG_SECTOR as u32);
    assert_eq!(le_u32(&bytes, 24), 4);
    // Data descriptor 0 (descriptor index 1): trailing then leading bytes.
    let d = &bytes[HEADER_SIZE + DESCRIPTOR_SIZE..];
    assert_eq!(&d[..4], b"desc");
    let LogOp::Data { page: p, .. } = &e.ops[1] else {
        unreachable!()
    };
    assert_eq!(&d[4..8], &p[4092..]);
    assert_eq!(&d[8..16], &p[..8]);
    // Its data sector.
    let s = &bytes[LOG_SECTOR..2 * LOG_SECTOR];
    assert_eq!(&s[..4], b"data");
    assert_eq!(le_u32(s, 4), 1);
    assert_eq!(le_u32(s, 4092), 2);
    assert_eq!(&s[8..4092], &p[8..4092]);

    let mut log = vec![0u8; LOG_LEN];
    place(&mut log, 5 * LOG_SECTOR, &e);
    let back = LogEntry::decode_at(&log, 5 * LOG_SECTOR, GUID).unwrap();
    assert_eq!(back, e);
    // Pages come back byte for byte, first 8 and last 4 bytes included.
    for (a, b) in back.ops.iter().zip(&e.ops) {
        if let (LogOp::Data { page: pa, .. }, LogOp::Data { page: pb, .. }) = (a, b) {
            assert_eq!(pa[..], pb[..]);
        }
    }
    // encode ignores entry_length.
    let mut e2 = e.clone();
    e2.entry_length = 12345;
    assert_eq!(e2.encode(), bytes);
}

#[test]
fn many_descriptors_span_sectors() {
    let mut e = entry(9, 0, 0);
    e.ops = (0..300)
        .map(|i| LogOp::Zero {
            file_offset: i * 0x1000,
            length: 0x1000,
        })
        .chain((0..3).map(|i| LogOp::Data {
            file_offset: 0x10_0000 + i * 0x1000,
            page: page(i as u8),
        }))
        .collect();
    e.entry_length = (LogEntry::sectors_needed(303, 3) * LOG_SECTOR) as u32;
    let mut log = vec![0u8; LOG_LEN];
    place(&mut log, 0, &e);
    assert_eq!(LogEntry::decode_at(&log, 0, GUID).unwrap(), e);
}

#[test]
fn wrapped_entry() {
    let e = entry(7, (LOG_LEN - 2 * LOG_SECTOR) as u32, 3); // 4 sectors
    let mut log = vec![0u8; LOG_LEN];
    let at = LOG_LEN - 2 * LOG_SECTOR;
    assert_eq!(place(&mut log, at, &e), 2 * LOG_SECTOR);
    assert_eq!(LogEntry::decode_at(&log, at, GUID).unwrap(), e);
    // Header at the very last sector.
    let at = LOG_LEN - LOG_SECTOR;
    let mut log = vec![0u8; LOG_LEN];
    place(&mut log, at, &e);
    assert_eq!(LogEntry::decode_at(&log, at, GUID).unwrap(), e);
}

#[test]
fn any_corrupted_byte_fails() {
    let e = entry(3, 0, 1); // 2 sectors
    let mut log = vec![0u8; 4 * LOG_SECTOR];
    let at = 3 * LOG_SECTOR; // wraps
    place(&mut log, at, &e);
    LogEntry::decode_at(&log, at, GUID).unwrap();
    for i in 0..2 * LOG_SECTOR {
        let p = (at + i) % log.len();
        log[p] ^= 0x01;
        let r = LogEntry::decode_at(&log, at, GUID);
        assert!(r.is_err(), "flip at entry byte {i} not detected");
        log[p] ^= 0x01;
    }
}

#[test]
fn field_errors() {
    let mut log = vec![0u8; LOG_LEN];
    place(&mut log, 0, &entry(3, 0, 1));
    let other = Uuid::from_u128(1);
    let e = LogEntry::decode_at(&log, 0, other).unwrap_err();
    assert!(e.to_string().contains("LogGuid"), "{e}");
    assert_eq!(
        LogEntry::decode_at(&log, 100, GUID).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        LogEntry::decode_at(&log, LOG_LEN, GUID).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        LogEntry::decode_at(&log[..100], 0, GUID)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert!(LogEntry::decode_at(&log, LOG_SECTOR, GUID)
        .unwrap_err()
        .to_string()
        .contains("signature"));

    // Re-encode with a bad field and a fixed-up checksum.
    let fix = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = entry(3, 0, 1).encode();
        f(&mut b);
        b[4..8].fill(0);
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 4, crc);
        let mut log = vec![0u8; LOG_LEN];
        log[..b.len()].copy_from_slice(&b);
        LogEntry::decode_at(&log, 0, GUID).unwrap_err().to_string()
    };
    assert!(fix(&|b| put_u32(b, 8, 0)).contains("EntryLength 0x0"));
    assert!(fix(&|b| put_u32(b, 8, 0x1800)).contains("EntryLength 0x1800"));
    assert!(fix(&|b| put_u32(b, 8, (LOG_LEN + LOG_SECTOR) as u32)).contains("EntryLength"));
    assert!(fix(&|b| put_u32(b, 12, 0x800)).contains("Tail 0x800"));
    assert!(fix(&|b| put_u32(b, 12, LOG_LEN as u32)).contains("Tail"));
    assert!(fix(&|b| put_u32(b, 24, u32::MAX)).contains("DescriptorCount"));
    assert!(fix(&|b| put_u32(b, 24, 4)).contains("descriptor 3: bad signature"));
    assert!(fix(&|b| b[HEADER_SIZE] = b'Z').contains("descriptor 0: bad signature"));
    assert!(fix(&|b| put_u64(b, HEADER_SIZE + 24, 4)).contains("descriptor 0: SequenceNumber"));
    assert!(fix(&|b| put_u64(b, HEADER_SIZE + 16, 0x300200)).contains("not 4 KiB-aligned"));
    assert!(fix(&|b| put_u64(b, HEADER_SIZE + 8, 0x1001)).contains("ZeroLength"));
    assert!(fix(&|b| put_u64(b, HEADER_SIZE + 16, !0xFFF)).contains("ZeroLength"));
    assert!(fix(&|b| put_u64(b, HEADER_SIZE + 48, !0xFFF)).contains("overflows"));
    assert!(fix(&|b| b[LOG_SECTOR] = b'D').contains("data sector 0 (descriptor 1): bad signature"));
    assert!(fix(&|b| put_u32(b, LOG_SECTOR + 4, 1)).contains("SequenceHigh/Low"));
    assert!(fix(&|b| put_u32(b, 2 * LOG_SECTOR - 4, 4)).contains("SequenceHigh/Low"));
    // A data descriptor without room for its data sector.
    assert!(fix(&|b| {
        put_u32(b, 8, LOG_SECTOR as u32);
        b.truncate(LOG_SECTOR);
    })
    .contains("exceed EntryLength"));
    // Checksum itself.
    let mut log2 = log.clone();
    log2[200] ^= 1;
    assert!(LogEntry::decode_at(&log2, 0, GUID)
        .unwrap_err()
        .to_string()
        .contains("checksum"));
}

fn seqs(found: &[(usize, LogEntry)]) -> Vec<(usize, u64)> {
    found
        .iter()
        .map(|(o, e)| (*o / LOG_SECTOR, e.sequence_number))
        .collect()
}

#[test]
fn active_sequence_empty_and_simple() {
    let mut log = vec![0u8; LOG_LEN];
    assert!(find_active_sequence(&log, GUID).is_empty());
    let end = place(&mut log, 0, &entry(10, 0, 1));
    let end = place(&mut log, end, &entry(11, 0, 2));
    place(&mut log, end, &entry(12, 0, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(0, 10), (2, 11), (5, 12)]
    );
    assert!(find_active_sequence(&log, Uuid::nil()).is_empty());
    assert!(find_active_sequence(&log, Uuid::from_u128(5)).is_empty());
    assert!(find_active_sequence(&log[..100], GUID).is_empty());
}

#[test]
fn replay_starts_at_the_heads_tail() {
    let mut log = vec![0u8; LOG_LEN];
    let end = place(&mut log, 0, &entry(10, 0, 1));
    let end = place(&mut log, end, &entry(11, 0, 1));
    place(&mut log, end, &entry(12, 4 * LOG_SECTOR as u32, 0));
    // Entries 10 and 11 are already flushed: replay only 12... unless
    // its tail were not an entry boundary of the run.
    assert_eq!(seqs(&find_active_sequence(&log, GUID)), vec![(4, 12)]);
    place(&mut log, end, &entry(12, 2 * LOG_SECTOR as u32, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(2, 11), (4, 12)]
    );
}

#[test]
fn picks_the_higher_sequence() {
    let mut log = vec![0u8; LOG_LEN];
    let end = place(&mut log, 0, &entry(20, 0, 1));
    place(&mut log, end, &entry(21, 0, 1));
    let b = 30 * LOG_SECTOR;
    let end = place(&mut log, b, &entry(5, b as u32, 0));
    place(&mut log, end, &entry(6, b as u32, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(0, 20), (2, 21)]
    );
    // Make the second run newer.
    let end = place(&mut log, b, &entry(40, b as u32, 0));
    place(&mut log, end, &entry(41, b as u32, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(30, 40), (31, 41)]
    );
}

#[test]
fn ignores_entries_with_another_log_guid() {
    let mut log = vec![0u8; LOG_LEN];
    let end = place(&mut log, 0, &entry(20, 0, 1));
    let mut foreign = entry(21, 0, 0);
    foreign.log_guid = Uuid::from_u128(77);
    place(&mut log, end, &foreign);
    place(&mut log, 40 * LOG_SECTOR, &{
        let mut e = entry(99, 40 * LOG_SECTOR as u32, 0);
        e.log_guid = Uuid::from_u128(77);
        e
    });
    assert_eq!(seqs(&find_active_sequence(&log, GUID)), vec![(0, 20)]);
}

#[test]
fn ignores_a_sequence_whose_tail_is_outside_it() {
    let mut log = vec![0u8; LOG_LEN];
    let end = place(&mut log, 0, &entry(20, 0, 1));
    place(&mut log, end, &entry(21, 0, 1));
    // A newer run whose head points at a sector that is not one of its entries.
    let b = 30 * LOG_SECTOR;
    let end = place(&mut log, b, &entry(50, b as u32, 2)); // sectors 30..33
    place(&mut log, end, &entry(51, 20 * LOG_SECTOR as u32, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(0, 20), (2, 21)]
    );
    // A tail inside an entry (its data sector at 31) is outside too.
    place(&mut log, end, &entry(51, 31 * LOG_SECTOR as u32, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(0, 20), (2, 21)]
    );
    // With the tail at entry 50 the newer run wins.
    place(&mut log, end, &entry(51, b as u32, 0));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(30, 50), (33, 51)]
    );
}

#[test]
fn torn_newer_entry_leaves_the_older_one() {
    let mut log = vec![0u8; LOG_LEN];
    let end = place(&mut log, 0, &entry(20, 0, 1));
    let end2 = place(&mut log, end, &entry(21, 0, 2));
    assert_eq!(find_active_sequence(&log, GUID).len(), 2);
    // Tear the last data sector of entry 21.
    log[end2 - 100] ^= 0xFF;
    assert_eq!(seqs(&find_active_sequence(&log, GUID)), vec![(0, 20)]);
    // Entry 21 never written past its header sector.
    log[end..end2].fill(0);
    place(&mut log, end, &entry(21, 0, 2));
    log[end + LOG_SECTOR..end2].fill(0);
    assert_eq!(seqs(&find_active_sequence(&log, GUID)), vec![(0, 20)]);
}

#[test]
fn sequence_wrapping_around_the_log() {
    let mut log = vec![0u8; LOG_LEN];
    let a = 62 * LOG_SECTOR;
    let end = place(&mut log, a, &entry(100, a as u32, 2)); // 3 sectors: 62, 63, 0
    assert_eq!(end, LOG_SECTOR);
    let end = place(&mut log, end, &entry(101, a as u32, 0));
    place(&mut log, end, &entry(102, a as u32, 1));
    assert_eq!(
        seqs(&find_active_sequence(&log, GUID)),
        vec![(62, 100), (1, 101), (2, 102)]
    );
    // Stale older entries of the same log before the tail do not matter.
    place(
        &mut log,
        10 * LOG_SECTOR,
        &entry(50, 10 * LOG_SECTOR as u32, 0),
    );
    assert_eq!(find_active_sequence(&log, GUID).len(), 3);
}

#[test]
fn self_overlapping_run_is_rejected() {
    // One entry as long as the whole log, its own tail: valid.
    let mut e = entry(1, 0, 0);
    e.ops = (0..15)
        .map(|i| LogOp::Data {
            file_offset: i * 0x1000,
            page: page(i as u8),
        })
        .collect();
    let mut log = vec![0u8; 16 * LOG_SECTOR];
    place(&mut log, 0, &e);
    assert_eq!(seqs(&find_active_sequence(&log, GUID)), vec![(0, 1)]);
}

#[test]
fn checksums_from_prefix_crcs_match_direct_ones() {
    // Entries of 1 to 12 sectors at every offset of a log, wrapping or
    // not, valid or damaged: validating with the prefix CRCs gives what
    // computing each checksum over the entry gives.
    let mut log = vec![0u8; LOG_LEN];
    let mut at = 0;
    let mut seq = 1;
    while at + 12 * LOG_SECTOR < LOG_LEN {
        at = place(&mut log, at, &entry(seq, 0, (seq % 10) as usize));
        seq += 1;
    }
    // One entry wrapping around the end of the log.
    place(&mut log, LOG_LEN - 2 * LOG_SECTOR, &entry(seq, 0, 5));
    let crcs = SectorCrcs::new(&log);
    for s in 0..LOG_LEN / LOG_SECTOR {
        for k in 1..=12usize {
            let a = s * LOG_SECTOR;
            let len = k * LOG_SECTOR;
            let mut direct = log[a..LOG_LEN.min(a + len)].to_vec();
            direct.extend_from_slice(&log[..len - direct.len()]);
            assert_eq!(
                crcs.entry(&log, a, len),
                crate::guid::crc32c_zeroed(&direct, CHECKSUM_AT),
                "sector {s}, {k} sectors"
            );
        }
        let fast = validate_at(&log, s * LOG_SECTOR, GUID, Some(&crcs)).map(|h| h.sequence_number);
        let slow = validate_at(&log, s * LOG_SECTOR, GUID, None).map(|h| h.sequence_number);
        assert_eq!(fast.ok(), slow.ok(), "sector {s}");
    }
    let valid = (0..LOG_LEN / LOG_SECTOR)
        .filter(|s| validate_at(&log, s * LOG_SECTOR, GUID, Some(&crcs)).is_ok())
        .count();
    assert!(valid >= 5, "{valid}");
}

/// The walk `pick_sequence` replaced, kept as its model: each candidate
/// head's run walked from its tail.
fn pick_by_walking(valid: &[Option<ValidHeader>]) -> Option<(usize, usize)> {
    let n = valid.len();
    let mut best: Option<(u64, usize, usize)> = None;
    for head in 0..n {
        let Some(h) = valid[head] else { continue };
        if successor(valid, head).is_some() || best.is_some_and(|(q, _, _)| q >= h.sequence_number)
        {
            continue;
        }
        let tail = h.tail as usize / LOG_SECTOR;
        let (mut cur, mut used) = (tail, 0usize);
        let reached = tail < n
            && loop {
                let Some(c) = valid[cur] else { break false };
                used += entry_sectors(&c);
                if used > n {
                    break false;
                }
                if cur == head {
                    break true;
                }
                match successor(valid, cur) {
                    Some(t) => cur = t,
                    None => break false,
                }
            };
        if reached {
            best = Some((h.sequence_number, tail, head));
        }
    }
    best.map(|(_, t, h)| (t, h))
}

fn header(seq: u64, tail_sector: usize, sectors: usize) -> Option<ValidHeader> {
    Some(ValidHeader {
        sequence_number: seq,
        tail: (tail_sector * LOG_SECTOR) as u32,
        entry_length: (sectors * LOG_SECTOR) as u32,
        descriptor_count: 0,
        descriptor_sectors: 0,
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// On any arrangement of valid headers (runs, branches into one entry,
    /// cycles, tails anywhere), the linear pick agrees with the walk.
    #[test]
    fn picking_the_sequence_agrees_with_walking_each_run(
        n in 1usize..24,
        cells in proptest::collection::vec(
            (0u8..3, 0u64..6, 0usize..24, 1usize..4), 24),
    ) {
        let valid: Vec<Option<ValidHeader>> = cells[..n]
            .iter()
            .map(|&(kind, seq, tail, len)| match kind {
                0 => None,
                _ => header(seq, tail % n, len),
            })
            .collect();
        proptest::prop_assert_eq!(pick_sequence(&valid), pick_by_walking(&valid));
    }
}

#[test]
fn many_heads_whose_tails_reach_into_one_long_run() {
    // A run of entries 1..=k over the first half, then k single-entry runs
    // of rising sequence numbers whose tails all point at the run's start:
    // walking each from its tail took k steps each. The answer is none of
    // them (their tails lead to the run's own head), but the run itself.
    let k = 1 << 14;
    let mut valid = vec![None; 2 * k];
    for (s, v) in valid.iter_mut().enumerate().take(k) {
        *v = header(s as u64 + 1, 0, 1);
    }
    for (i, v) in valid.iter_mut().enumerate().skip(k) {
        *v = header(1_000_000 + 2 * i as u64, 0, 1);
    }
    assert_eq!(pick_sequence(&valid), Some((0, k - 1)));
    // Two entries, the second's end wrapping back to the first.
    let wrap = vec![header(1, 0, 1), header(2, 0, 1)];
    assert_eq!(pick_sequence(&wrap), Some((0, 1)));
}
