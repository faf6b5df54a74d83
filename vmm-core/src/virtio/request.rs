//! A virtio-blk request (virtio 1.2, section 5.2.6), validated whole before
//! any I/O: the header, the direction and length of every part, the
//! sector range (checked arithmetic), discard and write-zeroes segments,
//! and a device-writable status byte.
//!
//! The device makes no assumption about how the driver cut a request into
//! descriptors (virtio 1.x, 2.6.4): the readable segments are one byte
//! stream (the 16-byte header, then the data to write or the segment
//! list), the writable ones another (the data read, then the status
//! byte, its last byte).

use super::queue::{Chain, Segment};
use crate::memory::Ram;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

/// Sectors in requests are always 512 bytes, whatever the block size.
pub const SECTOR: u64 = 512;
/// The request header: type, reserved, sector.
const HEADER: u64 = HEADER_LEN as u64;
/// [`HEADER`] as a buffer length.
const HEADER_LEN: usize = 16;
/// A discard or write-zeroes segment: sector, num_sectors, flags.
const RANGE: u64 = RANGE_LEN as u64;
/// [`RANGE`] as a buffer length.
const RANGE_LEN: usize = 16;
/// The unmap flag of a write-zeroes segment.
const RANGE_F_UNMAP: u32 = 1;
/// The GET_ID answer's length.
pub const ID_BYTES: usize = 20;

/// What the device accepts: the disk's size and writability, and the
/// limits it advertises in its configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether OUT, DISCARD and WRITE_ZEROES may succeed.
    pub writable: bool,
    /// max_discard_seg and max_write_zeroes_seg.
    pub max_ranges: u32,
    /// max_discard_sectors and max_write_zeroes_sectors.
    pub max_range_sectors: u32,
}

/// A range of the disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Write-zeroes: the device may deallocate.
    pub unmap: bool,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into `data`.
    In {
        /// Disk offset.
        offset: u64,
        /// Where the bytes go (total = the length).
        data: Vec<Segment>,
    },
    /// Write the bytes of `data` at `offset`.
    Out {
        /// Disk offset.
        offset: u64,
        /// Where the bytes come from.
        data: Vec<Segment>,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the disk's id string into `data`.
    GetId {
        /// Where it goes (up to 20 bytes of it).
        data: Vec<Segment>,
    },
    /// Discard these ranges.
    Discard(Vec<Range>),
    /// Make these ranges read as zeros.
    WriteZeroes(Vec<Range>),
}

impl Request {
    /// The bytes it moves between the disk and guest memory (0 for a
    /// flush, GET_ID, discard and write-zeroes): what QoS charges.
    pub fn data_len(&self) -> u64 {
        match self {
            Request::In { data, .. } | Request::Out { data, .. } => {
                data.iter().map(|s| u64::from(s.len)).sum()
            }
            _ => 0,
        }
    }
}

/// A request the device answers with a status and does nothing else for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// VIRTIO_BLK_S_IOERR, and why.
    IoErr(String),
    /// VIRTIO_BLK_S_UNSUPP, and why.
    Unsupp(String),
}

/// A chain that is no request at all: there is no status byte to answer
/// in (no device-writable byte, or a header cut short); it goes back in the
/// used ring with length 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// A parsed chain: where its status byte is, and the request or why it is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The guest address of the status byte.
    pub status: u64,
    /// The request, or its refusal.
    pub request: Result<Request, Refusal>,
}

/// Copy the first `out.len()` bytes of the stream `segs` into `out`.
fn gather(ram: &Ram, segs: &[Segment], mut skip: u64, out: &mut [u8]) -> Result<(), String> {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = usize::try_from((len - skip).min((out.len() - done) as u64)).unwrap_or(0);
        ram.read_slice(&mut out[done..done + n], GuestAddress(s.addr + skip))
            .map_err(|e| format!("reading guest memory at {:#x}: {e}", s.addr + skip))?;
        done += n;
        skip = 0;
    }
    if done < out.len() {
        return Err("the request is shorter than its parts".into());
    }
    Ok(())
}

/// The segments of the stream `segs` from byte `from`, `len` bytes of them.
pub fn sub_stream(segs: &[Segment], from: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    let (mut skip, mut left) = (from, len);
    for s in segs {
        if left == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = (slen - skip).min(left);
        if n > 0 {
            out.push(Segment {
                addr: s.addr + skip,
                len: u32::try_from(n).unwrap_or(u32::MAX),
            });
        }
        left -= n;
        skip = 0;
    }
    out
}

/// The byte range [offset, offset + len) of `sectors` starting at `sector`,
/// if it lies on a disk of `capacity` sectors.
fn sector_range(sector: u64, len: u64, capacity: u64) -> Result<u64, Refusal> {
    let end_bytes = sector
        .checked_mul(SECTOR)
        .and_then(|o| o.checked_add(len).map(|e| (o, e)));
    match end_bytes {
        Some((offset, end)) if end <= capacity.saturating_mul(SECTOR) => Ok(offset),
        _ => Err(Refusal::IoErr(format!(
            "{len} bytes at sector {sector} are beyond the disk's {capacity} sectors"
        ))),
    }
}

/// Validate the chain as a virtio-blk request.
///
/// # Errors
/// [`Malformed`]: no status byte to answer in.
pub fn parse(ram: &Ram, chain: &Chain, lim: &Limits) -> Result<Parsed, Malformed> {
    let wlen = chain.writable_len();
    if wlen == 0 {
        return Err(Malformed("no device-writable byte for the status".into()));
    }
    let status_seg = sub_stream(&chain.writable, wlen - 1, 1);
    let status = status_seg
        .first()
        .map(|s| s.addr)
        .ok_or_else(|| Malformed("no device-writable byte for the status".into()))?;
    let rlen = chain.readable_len();
    if rlen < HEADER {
        return Err(Malformed(format!(
            "the device-readable part is {rlen} bytes, shorter than the 16-byte header"
        )));
    }
    let mut hdr = [0u8; HEADER_LEN];
    gather(ram, &chain.readable, 0, &mut hdr).map_err(Malformed)?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
    let request = request(ram, chain, lim, kind, sector, rlen - HEADER, wlen - 1);
    Ok(Parsed { status, request })
}

fn request(
    ram: &Ram,
    chain: &Chain,
    lim: &Limits,
    kind: u32,
    sector: u64,
    out_len: u64,
    in_len: u64,
) -> Result<Request, Refusal> {
    let only_status = |what: &str| {
        if in_len != 0 {
            return Err(Refusal::IoErr(format!(
                "a {what} request with {in_len} device-writable bytes besides the status"
            )));
        }
        Ok(())
    };
    let no_out = |what: &str| {
        if out_len != 0 {
            return Err(Refusal::IoErr(format!(
                "a {what} request with {out_len} device-readable bytes after the header"
            )));
        }
        Ok(())
    };
    let whole = |what: &str, len: u64| {
        if len == 0 || !len.is_multiple_of(SECTOR) {
            return Err(Refusal::IoErr(format!(
                "a {what} request of {len} bytes: not a whole, non-zero number of 512-byte sectors"
            )));
        }
        Ok(())
    };
    let writable = |what: &str| {
        if !lim.writable {
            return Err(Refusal::IoErr(format!(
                "a {what} request on a read-only disk"
            )));
        }
        Ok(())
    };
    match kind {
        VIRTIO_BLK_T_IN => {
            no_out("read")?;
            whole("read", in_len)?;
            let offset = sector_range(sector, in_len, lim.capacity)?;
            Ok(Request::In {
                offset,
                data: sub_stream(&chain.writable, 0, in_len),
            })
        }
        VIRTIO_BLK_T_OUT => {
            only_status("write")?;
            whole("write", out_len)?;
            writable("write")?;
            let offset = sector_range(sector, out_len, lim.capacity)?;
            Ok(Request::Out {
                offset,
                data: sub_stream(&chain.readable, HEADER, out_len),
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            no_out("flush")?;
            only_status("flush")?;
            Ok(Request::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            no_out("get-id")?;
            if in_len == 0 {
                return Err(Refusal::IoErr(
                    "a get-id request with no room for the id".into(),
                ));
            }
            Ok(Request::GetId {
                data: sub_stream(&chain.writable, 0, in_len.min(ID_BYTES as u64)),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let what = if discard { "discard" } else { "write-zeroes" };
            only_status(what)?;
            writable(what)?;
            let ranges = ranges(ram, chain, lim, what, discard, out_len)?;
            Ok(if discard {
                Request::Discard(ranges)
            } else {
                Request::WriteZeroes(ranges)
            })
        }
        other => Err(Refusal::Unsupp(format!("request type {other}"))),
    }
}

/// The segment list of a discard or write-zeroes request.
fn ranges(
    ram: &Ram,
    chain: &Chain,
    lim: &Limits,
    what: &str,
    discard: bool,
    out_len: u64,
) -> Result<Vec<Range>, Refusal> {
    if out_len == 0 || !out_len.is_multiple_of(RANGE) {
        return Err(Refusal::IoErr(format!(
            "a {what} request of {out_len} bytes: not a whole, non-zero number of 16-byte segments"
        )));
    }
    let count = out_len / RANGE;
    if count > u64::from(lim.max_ranges) {
        return Err(Refusal::IoErr(format!(
            "a {what} request of {count} segments: at most {} are accepted",
            lim.max_ranges
        )));
    }
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        let mut r = [0u8; RANGE_LEN];
        gather(ram, &chain.readable, HEADER + i * RANGE, &mut r).map_err(Refusal::IoErr)?;
        let sector = u64::from_le_bytes(r[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
        let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
        if flags & !RANGE_F_UNMAP != 0 || (discard && flags != 0) {
            // The spec: a discard with the unmap flag, or unknown flags,
            // is answered UNSUPP.
            return Err(Refusal::Unsupp(format!(
                "{what} segment {i} has flags {flags:#x}"
            )));
        }
        if sectors > lim.max_range_sectors {
            return Err(Refusal::IoErr(format!(
                "{what} segment {i} of {sectors} sectors: at most {} are accepted",
                lim.max_range_sectors
            )));
        }
        let len = u64::from(sectors) * SECTOR;
        let offset = sector_range(sector, len, lim.capacity)?;
        out.push(Range {
            offset,
            len,
            unmap: flags & RANGE_F_UNMAP != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::type_complexity)] // small test values; case tables
mod tests {
    use super::*;
    use crate::virtio::queue::tests::ram;
    use vm_memory::Bytes;

    const LIM: Limits = Limits {
        capacity: 2048,
        writable: true,
        max_ranges: 4,
        max_range_sectors: 1024,
    };

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    fn header(ram: &Ram, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn chain(readable: Vec<Segment>, writable: Vec<Segment>) -> Chain {
        Chain {
            head: 0,
            readable,
            writable,
        }
    }

    #[test]
    fn reads_and_writes_in_any_framing() {
        let ram = ram();
        header(&ram, 0x1000, VIRTIO_BLK_T_IN, 3);
        // Linux's framing: header, data, status.
        let c = chain(
            vec![seg(0x1000, 16)],
            vec![seg(0x2000, 1024), seg(0x3000, 1)],
        );
        let p = parse(&ram, &c, &LIM).unwrap();
        assert_eq!(p.status, 0x3000);
        assert_eq!(
            p.request,
            Ok(Request::In {
                offset: 3 * 512,
                data: vec![seg(0x2000, 1024)]
            })
        );
        // Data and status in one descriptor; header split in two.
        header(&ram, 0x1000, VIRTIO_BLK_T_OUT, 2047);
        ram.write_slice(&[0u8; 16], GuestAddress(0x5000)).unwrap();
        let c = chain(
            vec![seg(0x1000, 10), seg(0x100a, 6 + 100), seg(0x4000, 412)],
            vec![seg(0x3000, 1)],
        );
        let p = parse(&ram, &c, &LIM).unwrap();
        assert_eq!(
            p.request,
            Ok(Request::Out {
                offset: 2047 * 512,
                data: vec![seg(0x1010, 100), seg(0x4000, 412)]
            })
        );
        header(&ram, 0x1000, VIRTIO_BLK_T_IN, 0);
        let c = chain(vec![seg(0x1000, 16)], vec![seg(0x2000, 513)]);
        let p = parse(&ram, &c, &LIM).unwrap();
        assert_eq!(p.status, 0x2000 + 512);
        assert_eq!(
            p.request,
            Ok(Request::In {
                offset: 0,
                data: vec![seg(0x2000, 512)]
            })
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let ram = ram();
        let st = vec![seg(0x3000, 1)];
        let cases: Vec<(u32, u64, Vec<Segment>, Vec<Segment>, &str)> = vec![
            // Past the end, at the end, overflowing sector arithmetic.
            (
                VIRTIO_BLK_T_IN,
                2048,
                vec![],
                vec![seg(0x2000, 512)],
                "beyond",
            ),
            (
                VIRTIO_BLK_T_IN,
                2047,
                vec![],
                vec![seg(0x2000, 1024)],
                "beyond",
            ),
            (
                VIRTIO_BLK_T_IN,
                u64::MAX / 2,
                vec![],
                vec![seg(0x2000, 512)],
                "beyond",
            ),
            (
                VIRTIO_BLK_T_OUT,
                u64::MAX,
                vec![seg(0x4000, 512)],
                vec![],
                "beyond",
            ),
            // Lengths.
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![],
                vec![seg(0x2000, 100)],
                "512-byte",
            ),
            (VIRTIO_BLK_T_IN, 0, vec![], vec![], "512-byte"),
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![seg(0x4000, 511)],
                vec![],
                "512-byte",
            ),
            // Directions.
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![seg(0x4000, 512)],
                vec![seg(0x2000, 512)],
                "device-readable",
            ),
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![seg(0x4000, 512)],
                vec![seg(0x2000, 512)],
                "device-writable",
            ),
            (
                VIRTIO_BLK_T_FLUSH,
                0,
                vec![],
                vec![seg(0x2000, 8)],
                "device-writable",
            ),
            (VIRTIO_BLK_T_GET_ID, 0, vec![], vec![], "no room"),
            // Segment lists.
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![seg(0x4000, 15)],
                vec![],
                "16-byte",
            ),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![seg(0x4000, 80)],
                vec![],
                "at most 4",
            ),
        ];
        for (kind, sector, out, inn, what) in cases {
            header(&ram, 0x1000, kind, sector);
            let mut r = vec![seg(0x1000, 16)];
            r.extend(out);
            let mut w = inn;
            w.extend(st.clone());
            let p = parse(&ram, &chain(r, w), &LIM).unwrap();
            match p.request {
                Err(Refusal::IoErr(e)) => assert!(e.contains(what), "{kind} {sector}: {e}"),
                other => panic!("{kind} {sector} {what}: {other:?}"),
            }
        }
        header(&ram, 0x1000, 99, 0);
        let p = parse(&ram, &chain(vec![seg(0x1000, 16)], st.clone()), &LIM).unwrap();
        assert!(matches!(p.request, Err(Refusal::Unsupp(_))));
        // Read-only.
        let ro = Limits {
            writable: false,
            ..LIM
        };
        header(&ram, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let c = chain(vec![seg(0x1000, 16), seg(0x4000, 512)], st.clone());
        assert!(
            matches!(parse(&ram, &c, &ro).unwrap().request, Err(Refusal::IoErr(e)) if e.contains("read-only"))
        );
        // No status byte, short header.
        assert!(parse(&ram, &chain(vec![seg(0x1000, 16)], vec![]), &LIM).is_err());
        assert!(parse(&ram, &chain(vec![seg(0x1000, 15)], st), &LIM).is_err());
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let ram = ram();
        let put = |i: u64, sector: u64, n: u32, flags: u32| {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&n.to_le_bytes());
            r[12..16].copy_from_slice(&flags.to_le_bytes());
            ram.write_slice(&r, GuestAddress(0x4000 + 16 * i)).unwrap();
        };
        put(0, 8, 16, 1);
        put(1, 2040, 8, 0);
        header(&ram, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let c = chain(vec![seg(0x1000, 16), seg(0x4000, 32)], vec![seg(0x3000, 1)]);
        assert_eq!(
            parse(&ram, &c, &LIM).unwrap().request,
            Ok(Request::WriteZeroes(vec![
                Range {
                    offset: 4096,
                    len: 8192,
                    unmap: true
                },
                Range {
                    offset: 2040 * 512,
                    len: 4096,
                    unmap: false
                },
            ]))
        );
        // A discard with unmap set is UNSUPP; ranges past the end or too
        // long are IOERR.
        header(&ram, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        assert!(matches!(
            parse(&ram, &c, &LIM).unwrap().request,
            Err(Refusal::Unsupp(_))
        ));
        put(0, 2041, 8, 0);
        assert!(
            matches!(parse(&ram, &c, &LIM).unwrap().request, Err(Refusal::IoErr(e)) if e.contains("beyond"))
        );
        put(0, 0, 1025, 0);
        assert!(
            matches!(parse(&ram, &c, &LIM).unwrap().request, Err(Refusal::IoErr(e)) if e.contains("at most 1024"))
        );
        put(0, u64::MAX, 1, 0);
        assert!(
            matches!(parse(&ram, &c, &LIM).unwrap().request, Err(Refusal::IoErr(e)) if e.contains("beyond"))
        );
    }
}
