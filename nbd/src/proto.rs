//! The wire format of the NBD protocol (the NetworkBlockDevice project's
//! `doc/proto.md`): magic numbers, flags, option and command codes, and
//! the messages this server reads and writes. Every integer is big-endian
//! ("Conventions"). Section names below are that document's.

/// "Newstyle negotiation": `NBDMAGIC`, first word of the greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "Newstyle negotiation": `IHAVEOPT`, second word of the greeting and the
/// magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// "Fixed newstyle negotiation": magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// "Request message".
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// "Simple reply message".
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// "Structured reply chunk message".
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags ("Handshake flags").
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags ("Client flags").
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags ("Transmission flags").
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// A flush on one connection covers writes made on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types ("Option types").
pub mod opt {
    /// Choose an export and end the handshake (no error replies).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Start TLS (not offered here).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types ("Option reply types").
pub mod rep {
    /// Success, no more data.
    pub const ACK: u32 = 1;
    /// An export, in reply to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// An information item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// A metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// Too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types ("Request types").
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the request).
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Cache hint.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags ("Command flags").
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes without making a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read in one content chunk.
    pub const DF: u16 = 1 << 2;
    /// One extent per block status chunk.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail write zeroes unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply types ("Structured reply types").
pub mod reply {
    /// Final chunk, nothing in it.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset (a hole: no data follows).
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Flag of the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
}

/// Error values ("Error values").
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (a write beyond the end, a full host disk).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported (a write zeroes that would not be fast).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `NBD_STATE_HOLE` of the `base:allocation` context.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` of the `base:allocation` context.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A request ("Request message"): 28 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const SIZE: usize = 28;

    /// Decode a request; `None` when the magic is wrong (the client is not
    /// speaking NBD, or lost its place: a hard disconnect).
    #[must_use]
    pub fn parse(b: &[u8; Self::SIZE]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Encode (for clients and tests).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An option reply header ("Fixed newstyle negotiation") followed by its
/// data.
#[must_use]
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&len32(data.len()).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A simple reply header ("Simple reply message").
#[must_use]
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header ("Structured reply chunk message") for
/// `length` bytes of payload.
#[must_use]
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk, the last of its reply.
#[must_use]
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // "message length MUST NOT exceed the 4096 bytes string length limit".
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&chunk_header(
        reply::FLAG_DONE,
        reply::ERROR,
        cookie,
        len32(6 + msg.len()),
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&len16(msg.len()).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A reader over an option's data that refuses to run past its end.
pub struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Over `b`.
    #[must_use]
    pub fn new(b: &'a [u8]) -> Self {
        Cursor { b }
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    /// A string of `len` bytes: `None` when it is not UTF-8 or runs past
    /// the end.
    pub fn string(&mut self, len: u32) -> Option<&'a str> {
        let n = usize::try_from(len).ok()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
    /// Whether everything was read.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// `b` (2 bytes) as a big-endian u16.
#[must_use]
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
/// `b` (4 bytes) as a big-endian u32.
#[must_use]
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
/// `b` (8 bytes) as a big-endian u64.
#[must_use]
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A length this server made (bounded by its own limits) as u32.
pub(crate) fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("reply lengths are bounded by the server's limits")
}

fn len16(n: usize) -> u16 {
    u16::try_from(n).expect("messages are cut to 4096 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_wrong_magic_is_refused() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.to_bytes();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let s = simple_reply(errno::EIO, 7);
        assert_eq!(&s[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(be32(&s[4..8]), 5);
        assert_eq!(be64(&s[8..16]), 7);
        let o = option_reply(opt::GO, rep::ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(be64(&o[0..8]), 0x0003_e889_0455_65a9);
        let e = error_chunk(9, errno::EINVAL, &"é".repeat(3000));
        assert_eq!(be16(&e[6..8]), 0x8001);
        let len = be32(&e[16..20]) as usize;
        assert_eq!(e.len(), 20 + len);
        let msg_len = be16(&e[24..26]) as usize;
        assert!(msg_len <= 4096 && std::str::from_utf8(&e[26..]).is_ok());
    }

    #[test]
    fn cursor_never_reads_past_the_end() {
        let b = [0, 0, 0, 9, b'a'];
        let mut c = Cursor::new(&b);
        let n = c.u32().unwrap();
        assert_eq!(c.string(n), None);
        let mut c = Cursor::new(&b[4..]);
        assert_eq!(c.string(1), Some("a"));
        assert!(c.is_empty());
        assert_eq!(c.u16(), None);
    }
}
