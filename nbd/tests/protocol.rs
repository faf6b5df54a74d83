//! The server against a small client written from the protocol document:
//! the handshake, every command, and hostile clients (bad magic, unknown
//! flags, huge lengths, out-of-range offsets, option floods, clients that
//! vanish mid-request). After every hostile client the server still
//! serves a well-behaved one, and the disk reads what it should.

// Test data: small disks whose offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

use disk::{Extent, FileOffset, Geometry, Mapping, MemStorage, RawDisk, Storage, VirtualDisk};
use nbd::proto::{self, cflag, cmd, errno, opt, rep, tflag, Request};
use nbd::{Export, Listener, Server};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const SIZE: u64 = 8 << 20;

struct Fixture {
    server: Arc<Server>,
    disk: Arc<dyn VirtualDisk>,
    path: PathBuf,
    thread: Option<JoinHandle<nbd::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(writable: bool) -> Fixture {
        let disk =
            Arc::new(RawDisk::new(MemStorage::from_vec("mem", vec![0u8; SIZE as usize])).unwrap());
        Fixture::over(disk, writable)
    }

    /// Serve `disk` (of [`SIZE`] bytes; the pattern is written at 1 MiB).
    fn over(disk: Arc<dyn VirtualDisk>, writable: bool) -> Fixture {
        disk.write_at(&pattern(1 << 20, 1 << 20), 1 << 20).unwrap();
        Fixture::serving(disk, writable)
    }

    /// Serve `disk` as it is.
    fn serving(disk: Arc<dyn VirtualDisk>, writable: bool) -> Fixture {
        let server = Arc::new(
            Server::new(
                vec![Export {
                    name: "d".into(),
                    description: "test disk".into(),
                    disk: disk.clone(),
                    writable,
                }],
                |_| {},
            )
            .unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = Listener::Unix(UnixListener::bind(&path).unwrap());
        let s = server.clone();
        let thread = Some(std::thread::spawn(move || s.run(&listener)));
        Fixture {
            server,
            disk,
            path,
            thread,
            _dir: dir,
        }
    }

    fn raw(&self) -> UnixStream {
        let c = UnixStream::connect(&self.path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c
    }

    /// A client through `NBD_OPT_GO` with structured replies and
    /// `base:allocation`.
    fn client(&self) -> Client {
        let mut c = Client::greet(self.raw(), 1);
        c.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.reply().1, rep::ACK);
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.push(b'd');
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        c.option(opt::SET_META_CONTEXT, &d);
        let (_, t, data) = c.reply();
        assert_eq!(t, rep::META_CONTEXT);
        assert_eq!(&data[4..], b"base:allocation");
        assert_eq!(c.reply().1, rep::ACK);
        c.go("d");
        c
    }

    /// Wait until the server has counted `n` dropped clients.
    fn wait_dropped(&self, n: usize) {
        for _ in 0..200 {
            if self.server.dropped() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} clients dropped, expected {n}", self.server.dropped());
    }

    /// A well-behaved client still gets the right data.
    fn still_serves(&self) {
        let mut c = self.client();
        let (e, data) = c.read(1 << 20, 4096, 0);
        assert_eq!(e, 0);
        assert_eq!(data, pattern(1 << 20, 4096));
        c.disconnect();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.stop_flag().store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let r = t.join().unwrap();
            if !std::thread::panicking() {
                r.unwrap();
            }
        }
    }
}

/// Storage that takes `delay` for each read, fails reads that start at
/// `fail_at`, and counts the most reads it served at once.
struct SlowStorage {
    inner: MemStorage,
    delay: Duration,
    fail_at: Option<u64>,
    now: AtomicUsize,
    most: Arc<AtomicUsize>,
}

impl SlowStorage {
    /// The disk, and the most reads it served at once.
    fn disk(
        delay: Duration,
        fail_at: Option<u64>,
    ) -> (Arc<RawDisk<SlowStorage>>, Arc<AtomicUsize>) {
        let most = Arc::new(AtomicUsize::new(0));
        let st = SlowStorage {
            inner: MemStorage::from_vec("slow", vec![0u8; SIZE as usize]),
            delay,
            fail_at,
            now: AtomicUsize::new(0),
            most: most.clone(),
        };
        (Arc::new(RawDisk::new(st).unwrap()), most)
    }
}

impl Storage for SlowStorage {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        if self.fail_at == Some(offset) {
            return Err(disk::Error::io(
                format!("reading at {offset:#x}"),
                std::io::Error::other("injected"),
            ));
        }
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> disk::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> disk::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> disk::Result<()> {
        self.inner.set_len(len)
    }
    fn is_writable(&self) -> bool {
        true
    }
}

struct Client {
    s: UnixStream,
    flags: u16,
    cookie: u64,
}

impl Client {
    fn greet(mut s: UnixStream, client_flags: u32) -> Client {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(proto::be16(&g[16..18]), 3, "fixed newstyle and no zeroes");
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Client {
            s,
            flags: 0,
            cookie: 0,
        }
    }
    fn option(&mut self, option: u32, data: &[u8]) {
        let mut v = Vec::new();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(proto::be64(&h[0..8]), proto::REPLY_MAGIC);
        let mut d = vec![0u8; proto::be32(&h[16..20]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (proto::be32(&h[8..12]), proto::be32(&h[12..16]), d)
    }
    fn go(&mut self, name: &str) {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::info::BLOCK_SIZE.to_be_bytes());
        self.option(opt::GO, &d);
        loop {
            let (o, t, data) = self.reply();
            assert_eq!(o, opt::GO);
            match t {
                rep::ACK => break,
                rep::INFO => {
                    if proto::be16(&data[0..2]) == proto::info::EXPORT {
                        assert_eq!(proto::be64(&data[2..10]), SIZE);
                        self.flags = proto::be16(&data[10..12]);
                    }
                }
                _ => panic!("GO failed: {t:#x} {:?}", String::from_utf8_lossy(&data)),
            }
        }
    }
    fn send(&mut self, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let r = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length,
        };
        self.s.write_all(&r.to_bytes()).unwrap();
        self.s.write_all(payload).unwrap();
        self.cookie
    }
    /// One whole structured (or simple) reply: (error, data or
    /// descriptors as bytes).
    fn answer(&mut self, cookie: u64) -> (u32, Vec<u8>) {
        let (c, e, d) = self.next_answer();
        assert_eq!(c, cookie);
        (e, d)
    }
    /// The next whole reply, whichever request it answers (replies come
    /// in completion order): (cookie, error, data).
    fn next_answer(&mut self) -> (u64, u32, Vec<u8>) {
        let mut out = Vec::new();
        let mut cookie = None;
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m).unwrap();
            if proto::be32(&m) == proto::SIMPLE_REPLY_MAGIC {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                assert!(cookie.is_none(), "a simple reply among chunks");
                return (proto::be64(&h[4..12]), proto::be32(&h[0..4]), out);
            }
            assert_eq!(proto::be32(&m), proto::STRUCTURED_REPLY_MAGIC);
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            let (flags, kind) = (proto::be16(&h[0..2]), proto::be16(&h[2..4]));
            let c = proto::be64(&h[4..12]);
            assert_eq!(*cookie.get_or_insert(c), c, "chunks of two replies mixed");
            let mut p = vec![0u8; proto::be32(&h[12..16]) as usize];
            self.s.read_exact(&mut p).unwrap();
            let mut err = 0;
            match kind {
                proto::reply::OFFSET_DATA => out.extend_from_slice(&p[8..]),
                proto::reply::OFFSET_HOLE => {
                    assert_eq!(p.len(), 12, "a hole chunk's length");
                    out.resize(out.len() + proto::be32(&p[8..12]) as usize, 0);
                }
                proto::reply::BLOCK_STATUS => out.extend_from_slice(&p[4..]),
                proto::reply::ERROR => err = proto::be32(&p[0..4]),
                _ => {}
            }
            if flags & proto::reply::FLAG_DONE != 0 {
                return (c, err, out);
            }
        }
    }
    fn read(&mut self, offset: u64, len: u32, flags: u16) -> (u32, Vec<u8>) {
        let c = self.send(flags, cmd::READ, offset, len, &[]);
        self.answer(c)
    }
    fn request(&mut self, flags: u16, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        let c = self.send(flags, kind, offset, len, payload);
        self.answer(c).0
    }
    fn disconnect(mut self) {
        self.send(0, cmd::DISC, 0, 0, &[]);
        let mut b = [0u8; 1];
        assert_eq!(
            self.s.read(&mut b).unwrap(),
            0,
            "the server closes after DISC"
        );
    }
}

#[test]
fn every_command_on_a_writable_export() {
    let f = Fixture::new(true);
    let mut c = f.client();
    let want = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::SEND_FAST_ZERO
        | tflag::CAN_MULTI_CONN
        | tflag::SEND_DF;
    assert_eq!(c.flags & want, want, "{:#x}", c.flags);
    assert_eq!(c.flags & tflag::READ_ONLY, 0);
    // Write (FUA), read back, unaligned.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8 + 100).collect();
    assert_eq!(
        c.request(cflag::FUA, cmd::WRITE, 3 * 1024 * 1024 + 7, 10_000, &data),
        0
    );
    assert_eq!(
        c.read(3 * 1024 * 1024 + 7, 10_000, cflag::DF),
        (0, data.clone())
    );
    assert_eq!(c.request(0, cmd::FLUSH, 0, 0, &[]), 0);
    // Write zeroes, then trim: both read as zeros.
    assert_eq!(
        c.request(
            cflag::NO_HOLE,
            cmd::WRITE_ZEROES,
            3 * 1024 * 1024,
            4096,
            &[]
        ),
        0
    );
    assert_eq!(c.read(3 * 1024 * 1024, 4096, 0), (0, vec![0u8; 4096]));
    assert_eq!(c.request(0, cmd::CACHE, 0, 4096, &[]), 0);
    // Block status: data where the pattern is, one descriptor with REQ_ONE.
    let c1 = c.send(cflag::REQ_ONE, cmd::BLOCK_STATUS, 1 << 20, 4096, &[]);
    let (e, d) = c.answer(c1);
    assert_eq!((e, d.len()), (0, 8));
    assert!(proto::be32(&d[0..4]) <= 4096);
    assert_eq!(proto::be32(&d[4..8]) & proto::STATE_HOLE, 0);
    c.disconnect();
    let mut got = vec![0u8; 10_000];
    f.disk.read_at(&mut got, 3 * 1024 * 1024 + 4096).unwrap();
    assert_eq!(&got[..10_000 - 4089], &data[4089..]);
}

#[test]
fn invalid_requests_fail_and_the_connection_goes_on() {
    let f = Fixture::new(false);
    let mut c = f.client();
    assert_ne!(c.flags & tflag::READ_ONLY, 0);
    // Writes on a read-only export: EPERM, the payload consumed.
    assert_eq!(c.request(0, cmd::WRITE, 0, 512, &[1u8; 512]), errno::EPERM);
    assert_eq!(c.request(0, cmd::TRIM, 0, 512, &[]), errno::EPERM);
    // Out of range, overflowing, too large, unknown command, bad flags.
    assert_eq!(c.read(SIZE - 100, 4096, 0).0, errno::EINVAL);
    assert_eq!(c.read(u64::MAX - 10, 4096, 0).0, errno::EINVAL);
    assert_eq!(c.read(0, u32::MAX, 0).0, errno::EINVAL);
    assert_eq!(c.request(0, 99, 0, 0, &[]), errno::EINVAL);
    assert_eq!(
        c.request(cflag::REQ_ONE, cmd::READ, 0, 512, &[]),
        errno::EINVAL
    );
    assert_eq!(
        c.request(0, cmd::BLOCK_STATUS, SIZE, 512, &[]),
        errno::EINVAL
    );
    assert_eq!(c.request(0, cmd::BLOCK_STATUS, 0, 0, &[]), errno::EINVAL);
    // Still fine.
    assert_eq!(c.read(1 << 20, 1, 0), (0, vec![1u8]));
    c.disconnect();
    f.still_serves();
    assert_eq!(f.server.dropped(), 0);
}

#[test]
fn writes_past_the_end_are_no_space() {
    let f = Fixture::new(true);
    let mut c = f.client();
    assert_eq!(
        c.request(0, cmd::WRITE, SIZE - 1, 2, &[1, 2]),
        errno::ENOSPC
    );
    assert_eq!(
        c.request(0, cmd::WRITE_ZEROES, SIZE, 512, &[]),
        errno::ENOSPC
    );
    c.disconnect();
    f.still_serves();
}

#[test]
fn block_status_needs_a_selected_context() {
    let f = Fixture::new(false);
    let mut c = Client::greet(f.raw(), 1);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, rep::ACK);
    c.go("d");
    assert_eq!(c.request(0, cmd::BLOCK_STATUS, 0, 512, &[]), errno::EINVAL);
    c.disconnect();
}

#[test]
fn handshake_options_and_their_errors() {
    let f = Fixture::new(false);
    let mut c = Client::greet(f.raw(), 3);
    c.option(opt::LIST, &[]);
    let (_, t, d) = c.reply();
    assert_eq!(t, rep::SERVER);
    assert_eq!(&d[4..5], b"d");
    assert_eq!(c.reply().1, rep::ACK);
    c.option(opt::LIST, b"x");
    assert_eq!(c.reply().1, rep::ERR_INVALID);
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.reply().1, rep::ERR_POLICY);
    c.option(77, b"whatever");
    assert_eq!(c.reply().1, rep::ERR_UNSUP);
    // Meta contexts before structured replies.
    c.option(opt::LIST_META_CONTEXT, &[0, 0, 0, 1, b'd', 0, 0, 0, 0]);
    assert_eq!(c.reply().1, rep::ERR_INVALID);
    // INFO of an unknown export, malformed INFO.
    c.option(opt::INFO, &[0, 0, 0, 1, b'x', 0, 0]);
    assert_eq!(c.reply().1, rep::ERR_UNKNOWN);
    c.option(opt::INFO, &[0, 0, 0, 200, b'x']);
    assert_eq!(c.reply().1, rep::ERR_INVALID);
    // Option data too large to parse but small enough to skip.
    c.option(opt::GO, &vec![0u8; 100_000]);
    assert_eq!(c.reply().1, rep::ERR_TOO_BIG);
    // Then the classic way in: NBD_OPT_EXPORT_NAME, no zeroes (flag 2).
    c.option(opt::EXPORT_NAME, b"d");
    let mut h = [0u8; 10];
    c.s.read_exact(&mut h).unwrap();
    assert_eq!(proto::be64(&h[0..8]), SIZE);
    c.flags = proto::be16(&h[8..10]);
    assert_ne!(c.flags & tflag::READ_ONLY, 0);
    // Simple replies (no structured replies negotiated).
    let cookie = c.send(0, cmd::READ, 1 << 20, 3, &[]);
    let mut r = [0u8; 19];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(proto::be32(&r[0..4]), proto::SIMPLE_REPLY_MAGIC);
    assert_eq!((proto::be32(&r[4..8]), proto::be64(&r[8..16])), (0, cookie));
    assert_eq!(&r[16..], &[1, 2, 3]);
    c.disconnect();
    assert_eq!(f.server.dropped(), 0);
}

#[test]
fn abort_gets_an_ack() {
    let f = Fixture::new(false);
    let mut c = Client::greet(f.raw(), 1);
    c.option(opt::ABORT, &[]);
    assert_eq!(c.reply().1, rep::ACK);
    f.still_serves();
}

/// Hostile clients: each is dropped, counted, and the server goes on.
#[test]
fn hostile_clients_are_dropped_never_the_server() {
    let f = Fixture::new(true);
    let mut dropped = 0;
    let mut check = |what: &str, f: &Fixture, mut s: UnixStream| {
        // The server closes its side: reads end.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        dropped += 1;
        f.wait_dropped(dropped);
        f.still_serves();
        eprintln!("{what}: dropped");
    };
    // Unknown client flags.
    let c = Client::greet(f.raw(), 0x80);
    check("unknown client flags", &f, c.s);
    // Bad option magic.
    let mut c = Client::greet(f.raw(), 1);
    c.s.write_all(&[0xffu8; 16]).unwrap();
    check("bad option magic", &f, c.s);
    // An option claiming 4 GiB of data.
    let mut c = Client::greet(f.raw(), 1);
    let mut h = Vec::new();
    h.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&opt::GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).unwrap();
    check("option of 4 GiB", &f, c.s);
    // A flood of options.
    let mut c = Client::greet(f.raw(), 1);
    let s2 = c.s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s2 = s2;
        let mut sink = Vec::new();
        let _ = s2.read_to_end(&mut sink);
    });
    for _ in 0..300 {
        let mut v = Vec::new();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&77u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        if c.s.write_all(&v).is_err() {
            break;
        }
    }
    reader.join().unwrap();
    check("option flood", &f, c.s);
    // An unknown export through NBD_OPT_EXPORT_NAME.
    let mut c = Client::greet(f.raw(), 1);
    c.option(opt::EXPORT_NAME, b"nope");
    check("unknown export name", &f, c.s);
    // Bad request magic in transmission.
    let mut c = f.client();
    c.s.write_all(&[0x55u8; 28]).unwrap();
    check("bad request magic", &f, c.s);
    // A write whose payload is beyond the maximum.
    let mut c = f.client();
    c.send(0, cmd::WRITE, 0, u32::MAX, &[]);
    check("write of 4 GiB", &f, c.s);
    // A client that vanishes in the middle of a write payload.
    let mut c = f.client();
    c.send(0, cmd::WRITE, 0, 4096, &[9u8; 100]);
    drop(c);
    dropped += 1;
    f.wait_dropped(dropped);
    f.still_serves();
    // Nothing of that write reached the disk.
    let mut got = vec![0u8; 100];
    f.disk.read_at(&mut got, 0).unwrap();
    assert_eq!(got, vec![0u8; 100]);
    // A client that vanishes with requests in flight: the server finishes
    // them and goes on.
    let mut c = f.client();
    for i in 0..32 {
        c.send(0, cmd::READ, i * 4096, 4096, &[]);
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    f.still_serves();
}

#[test]
fn a_stop_finishes_in_flight_requests_and_refuses_new_clients() {
    let f = Fixture::new(true);
    let mut c = f.client();
    let data = vec![7u8; 1 << 20];
    let cookies: Vec<u64> = (0..8)
        .map(|i| c.send(0, cmd::WRITE, i << 20, 1 << 20, &data))
        .collect();
    f.server.stop_flag().store(true, Ordering::Relaxed);
    let mut answered: Vec<u64> = (0..8)
        .map(|_| {
            let (k, e, _) = c.next_answer();
            assert_eq!(e, 0);
            k
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, cookies);
    // The connection then ends (the server stops reading at the next
    // request boundary).
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).unwrap_or(0), 0);
    let mut got = vec![0u8; 1 << 20];
    f.disk.read_at(&mut got, 7 << 20).unwrap();
    assert_eq!(got, data);
}

#[test]
fn many_clients_at_once() {
    let f = Fixture::new(true);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let f = &f;
            s.spawn(move || {
                let mut c = f.client();
                let data = vec![t as u8 + 1; 65536];
                for k in 0..16u64 {
                    let off = (t * 16 + k) * 65536;
                    assert_eq!(c.request(0, cmd::WRITE, off, 65536, &data), 0);
                }
                assert_eq!(c.request(0, cmd::FLUSH, 0, 0, &[]), 0);
                for k in 0..16u64 {
                    let off = (t * 16 + k) * 65536;
                    assert_eq!(c.read(off, 65536, 0), (0, data.clone()));
                }
                c.disconnect();
            });
        }
    });
    assert_eq!(f.server.dropped(), 0);
}

/// The pattern [`Fixture::over`] writes at 1 MiB, `len` bytes from `at`.
fn pattern(at: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((at - (1 << 20) + i) % 251) as u8 + 1)
        .collect()
}

#[test]
fn a_burst_of_small_reads_is_answered_whole_and_right() {
    // 64 reads in one write (the reader serves small reads itself and
    // sends their replies together): each gets its own data, an invalid
    // one its error, and a failing one an error without data (its buffer
    // is reused; nothing of an earlier read may leak into a reply).
    let (disk, _) = SlowStorage::disk(Duration::ZERO, Some((1 << 20) + 40 * 4096));
    let f = Fixture::over(disk, false);
    let mut c = f.client();
    let mut want = std::collections::HashMap::new();
    let mut burst = Vec::new();
    for k in 0..64u64 {
        c.cookie += 1;
        let (offset, length) = match k {
            20 => (SIZE - 100, 4096),                         // past the end
            _ => ((1 << 20) + k * 4096, 4096 - k as u32 * 3), // 40 fails
        };
        burst.extend_from_slice(
            &Request {
                flags: 0,
                kind: cmd::READ,
                cookie: c.cookie,
                offset,
                length,
            }
            .to_bytes(),
        );
        want.insert(c.cookie, (k, offset, length));
    }
    c.s.write_all(&burst).unwrap();
    for _ in 0..64 {
        let (cookie, e, data) = c.next_answer();
        let (k, offset, length) = want.remove(&cookie).expect("one reply per request");
        match k {
            20 => assert_eq!((e, data.len()), (errno::EINVAL, 0)),
            40 => assert_eq!((e, data.len()), (errno::EIO, 0)),
            _ => {
                assert_eq!(e, 0, "read {k}");
                assert_eq!(data, pattern(offset, length as usize), "read {k}");
            }
        }
    }
    c.disconnect();
    assert_eq!(f.server.dropped(), 0);
}

#[test]
fn small_reads_from_slow_storage_are_served_in_parallel() {
    // Reads from a cache are served by the reader itself, one after the
    // other; once one is slow, the next small reads go to the workers.
    let (disk, most) = SlowStorage::disk(Duration::from_millis(20), None);
    let f = Fixture::over(disk, false);
    let mut c = f.client();
    let cookies: Vec<u64> = (0..16u64)
        .map(|k| c.send(0, cmd::READ, (1 << 20) + k * 8192, 4096, &[]))
        .collect();
    let mut answered: Vec<u64> = (0..16)
        .map(|_| {
            let (k, e, data) = c.next_answer();
            assert_eq!(e, 0);
            let offset = (1 << 20) + (k - cookies[0]) * 8192;
            assert_eq!(data, pattern(offset, 4096));
            k
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, cookies);
    let most = most.load(Ordering::SeqCst);
    assert!(most >= 2, "at most {most} read at once");
    c.disconnect();
}

/// A disk whose first MiB is unallocated (reads as zeros without a read),
/// the rest raw data.
struct Holey(MemStorage);

impl VirtualDisk for Holey {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: SIZE,
            logical_sector_size: 512,
            physical_sector_size: 512,
        }
    }
    fn storage(&self) -> &dyn Storage {
        &self.0
    }
    fn map(&self, offset: u64, len: u64) -> disk::Result<Extent> {
        let hole = 1 << 20;
        let (end, mapping) = if offset < hole {
            (hole, Mapping::Unallocated)
        } else {
            (SIZE, Mapping::Data(FileOffset(offset)))
        };
        Ok(Extent {
            offset,
            len: len.min(end - offset),
            mapping,
        })
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
}

#[test]
fn a_read_of_zeros_gets_a_hole_unless_the_client_forbids_fragments() {
    let st = MemStorage::from_vec("holey", vec![0u8; SIZE as usize]);
    st.write_at(&pattern(1 << 20, 1 << 20), 1 << 20).unwrap();
    let f = Fixture::serving(Arc::new(Holey(st)), false);
    let mut c = f.client();
    // The raw chunk: (type, payload).
    let chunk = |c: &mut Client, flags: u16, offset: u64, len: u32| {
        let cookie = c.send(flags, cmd::READ, offset, len, &[]);
        let mut h = [0u8; 20];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(proto::be32(&h[0..4]), proto::STRUCTURED_REPLY_MAGIC);
        assert_eq!(proto::be16(&h[4..6]), proto::reply::FLAG_DONE);
        assert_eq!(proto::be64(&h[8..16]), cookie);
        let mut p = vec![0u8; proto::be32(&h[16..20]) as usize];
        c.s.read_exact(&mut p).unwrap();
        (proto::be16(&h[6..8]), p)
    };
    let (kind, p) = chunk(&mut c, 0, 4096, 65536);
    assert_eq!(kind, proto::reply::OFFSET_HOLE);
    assert_eq!(proto::be64(&p[0..8]), 4096);
    assert_eq!(proto::be32(&p[8..12]), 65536);
    // DF: one data chunk of zeros.
    let (kind, p) = chunk(&mut c, cflag::DF, 4096, 65536);
    assert_eq!(kind, proto::reply::OFFSET_DATA);
    assert_eq!(p.len(), 8 + 65536);
    assert!(p[8..].iter().all(|&b| b == 0));
    // Across the end of the hole: data (the pattern starts at 1 MiB).
    let (kind, p) = chunk(&mut c, 0, (1 << 20) - 4096, 8192);
    assert_eq!(kind, proto::reply::OFFSET_DATA);
    assert!(p[8..8 + 4096].iter().all(|&b| b == 0));
    assert_eq!(&p[8 + 4096..], &pattern(1 << 20, 4096)[..]);
    // Large reads too.
    let (kind, _) = chunk(&mut c, 0, 0, 1 << 20);
    assert_eq!(kind, proto::reply::OFFSET_HOLE);
    c.disconnect();
}
