//! The transmission phase ("Transmission", "Request types"): one reader
//! per connection validates each whole request before any I/O (an invalid
//! one gets its error reply, never reaches the disk, and never ends the
//! connection), then hands it to a few workers, so that a client with many
//! requests in flight gets them served in parallel; replies go out whole,
//! one at a time, in completion order ("Replies need not be sent in the
//! same order as requests").
//!
//! Only a request the connection cannot recover from ends it (a hard
//! disconnect, "Terminating the transmission phase"): a wrong magic (the
//! client lost its place) or a write payload beyond the maximum (reading
//! it would be a denial of service, skipping it would take as long).
//!
//! Memory: payloads in flight (write data, read buffers) are charged to
//! the server-wide budget ([`crate::server::Budget`]) before they are
//! allocated.

use crate::handshake::{Negotiated, BASE_ALLOCATION_ID};
use crate::proto::{self, cflag, cmd, errno, reply, Request};
use crate::server::{Export, Shared};
use crate::stream::Stream;
use crate::{Error, Result, MAX_PAYLOAD};
use disk::{Mapping, VirtualDisk};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Workers per connection.
const WORKERS: usize = 4;
/// Requests queued per connection beyond those being served (clients keep
/// up to 16 in flight).
const QUEUED: usize = 16;
/// Most descriptors in one block status reply (the protocol asks for at
/// most 2^20; clients ask again from where a reply ended).
const MAX_EXTENTS: usize = 1 << 16;

/// A validated request and its payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
    /// Bytes charged to the budget.
    cost: u64,
}

/// Serve `neg.export` to the client on `s` until it disconnects or the
/// server stops; in-flight requests are finished first, and a writable
/// export is flushed.
pub(crate) fn transmit(s: &mut Stream, shared: &Shared, neg: Negotiated) -> Result<()> {
    let export = &shared.exports[neg.export];
    let writer = Mutex::new(s.try_clone()?);
    let queue = Queue::default();
    let result = std::thread::scope(|scope| {
        let queue = &queue;
        let writer = &writer;
        for _ in 0..WORKERS {
            scope.spawn(move || work(queue, export, neg, writer, shared));
        }
        let r = (|| loop {
            let mut h = [0u8; Request::SIZE];
            if !s.read_full(&mut h, "request header")? {
                return Ok(());
            }
            let Some(req) = Request::parse(&h) else {
                return Err(Error::protocol(format!(
                    "request magic {:#x} is not NBD_REQUEST_MAGIC",
                    proto::be32(&h[0..4])
                )));
            };
            if req.kind == cmd::DISC {
                return Ok(());
            }
            let mut payload = Vec::new();
            let mut cost = 0;
            if req.kind == cmd::WRITE {
                if req.length > MAX_PAYLOAD {
                    return Err(Error::protocol(format!(
                        "write of {} bytes is beyond the {MAX_PAYLOAD}-byte maximum payload",
                        req.length
                    )));
                }
                cost = u64::from(req.length);
                shared.budget.acquire(cost);
                payload = vec![0u8; req.length as usize];
                if let Err(e) = s.read_rest(&mut payload, "write payload") {
                    shared.budget.release(cost);
                    return Err(e);
                }
            }
            if let Err((code, msg)) = validate(&req, export, neg) {
                shared.budget.release(cost);
                send_error(writer, neg, &req, code, &msg)?;
                continue;
            }
            if req.kind == cmd::READ {
                cost = u64::from(req.length);
                shared.budget.acquire(cost);
            }
            queue.push(Job { req, payload, cost });
        })();
        queue.close();
        r
    });
    if export.writable {
        if let Err(e) = export.disk.flush() {
            shared.log(&format!(
                "export {:?}: flush at disconnect: {e:#}",
                export.name
            ));
        }
    }
    result
}

/// Check a request against the export and what was negotiated (the
/// "Error values" the protocol asks for): `(errno, message)` when it must
/// fail.
fn validate(req: &Request, e: &Export, neg: Negotiated) -> std::result::Result<(), (u32, String)> {
    let allowed = cflag::FUA
        | match req.kind {
            cmd::READ if neg.structured => cflag::DF,
            cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => 0,
            k => return Err((errno::EINVAL, format!("unknown command {k}"))),
        };
    if req.flags & !allowed != 0 {
        return Err((
            errno::EINVAL,
            format!(
                "command flags {:#x} are not valid for this command",
                req.flags
            ),
        ));
    }
    let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && !e.writable {
        return Err((errno::EPERM, "the export is read-only".into()));
    }
    if req.kind == cmd::READ && req.length > MAX_PAYLOAD {
        return Err((
            errno::EINVAL,
            format!(
                "read of {} bytes is beyond the {MAX_PAYLOAD}-byte maximum payload",
                req.length
            ),
        ));
    }
    if req.kind == cmd::BLOCK_STATUS && req.length == 0 {
        // A reply must hold at least one (non-empty) descriptor.
        return Err((errno::EINVAL, "block status of 0 bytes".into()));
    }
    if req.kind == cmd::BLOCK_STATUS && !neg.base_allocation {
        return Err((
            errno::EINVAL,
            "no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)".into(),
        ));
    }
    if req.kind != cmd::FLUSH {
        let size = e.disk.virtual_size();
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|end| end > size) {
            // A write past the end is "no space"; anything else invalid.
            let code = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err((
                code,
                format!(
                    "{} bytes at offset {:#x} run past the end of the {size}-byte export",
                    req.length, req.offset
                ),
            ));
        }
    }
    Ok(())
}

/// What a request produced.
enum Outcome {
    Done,
    Data(Vec<u8>),
    Extents(Vec<(u32, u32)>),
}

/// The jobs of one connection: the reader pushes (waiting while
/// [`QUEUED`] are queued), workers pop. Waits are counted so that a push
/// or pop wakes a thread only when one is waiting.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    room: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    idle_workers: usize,
    reader_waiting: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn push(&self, job: Job) {
        let mut g = self.lock();
        while g.jobs.len() >= QUEUED {
            g.reader_waiting = true;
            g = self
                .room
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.reader_waiting = false;
        g.jobs.push_back(job);
        let wake = g.idle_workers > 0;
        drop(g);
        if wake {
            self.ready.notify_one();
        }
    }
    /// The next job; `None` once closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut g = self.lock();
        loop {
            if let Some(j) = g.jobs.pop_front() {
                let wake = g.reader_waiting;
                drop(g);
                if wake {
                    self.room.notify_one();
                }
                return Some(j);
            }
            if g.closed {
                return None;
            }
            g.idle_workers += 1;
            g = self
                .ready
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            g.idle_workers -= 1;
        }
    }
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

fn work(queue: &Queue, export: &Export, neg: Negotiated, writer: &Mutex<Stream>, shared: &Shared) {
    loop {
        let Some(job) = queue.pop() else { return };
        let out = run(&job, export);
        let sent = match out {
            Ok(o) => send_outcome(writer, neg, &job.req, o),
            Err((code, msg)) => send_error(writer, neg, &job.req, code, &msg),
        };
        shared.budget.release(job.cost);
        if let Err(e) = sent {
            // The client is gone: end the reader too (it may be blocked).
            shared.log(&format!("export {:?}: {e:#}", export.name));
            lock(writer).shutdown();
        }
    }
}

/// Do the I/O of one validated request.
fn run(job: &Job, export: &Export) -> std::result::Result<Outcome, (u32, String)> {
    let d = &*export.disk;
    let r = &job.req;
    let len = u64::from(r.length);
    let fua = |d: &dyn VirtualDisk| {
        if r.flags & cflag::FUA != 0 {
            d.flush()
        } else {
            Ok(())
        }
    };
    let res = match r.kind {
        cmd::READ => {
            let mut buf = vec![0u8; r.length as usize];
            d.read_at(&mut buf, r.offset).map(|()| Outcome::Data(buf))
        }
        cmd::WRITE => d
            .write_at(&job.payload, r.offset)
            .and_then(|()| fua(d))
            .map(|()| Outcome::Done),
        cmd::FLUSH => d.flush().map(|()| Outcome::Done),
        cmd::TRIM => d
            .discard(r.offset, len)
            .and_then(|()| fua(d))
            .map(|()| Outcome::Done),
        cmd::WRITE_ZEROES => {
            if r.flags & cflag::FAST_ZERO != 0 && !fast_zero(d, r.offset, len) {
                return Err((
                    errno::ENOTSUP,
                    "only whole blocks are zeroed faster than written".into(),
                ));
            }
            d.write_zeroes(r.offset, len, r.flags & cflag::NO_HOLE == 0)
                .and_then(|()| fua(d))
                .map(|()| Outcome::Done)
        }
        cmd::BLOCK_STATUS => {
            block_status(d, r.offset, len, r.flags & cflag::REQ_ONE != 0).map(Outcome::Extents)
        }
        // A hint (validated above): nothing to do.
        _ => Ok(Outcome::Done),
    };
    res.map_err(|e| (errno_of(&e), format!("{e:#}")))
}

/// Whether zeroing `[offset, offset+len)` is quicker than writing zeros:
/// whole blocks become zero/unallocated entries without touching data.
fn fast_zero(d: &dyn VirtualDisk, offset: u64, len: u64) -> bool {
    let g = d.discard_granularity();
    let end = offset + len;
    g > 0 && offset.is_multiple_of(g) && (end.is_multiple_of(g) || end == d.virtual_size())
}

/// `base:allocation` descriptors from `offset`: holes (`HOLE|ZERO`) where
/// no layer holds data, `ZERO` blocks likewise, data (0) elsewhere.
fn block_status(
    d: &dyn VirtualDisk,
    offset: u64,
    len: u64,
    one: bool,
) -> disk::Result<Vec<(u32, u32)>> {
    let end = offset + len;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < MAX_EXTENTS {
        let ext = d.map_allocation(pos, end - pos)?;
        // At least one byte of progress, never past the request.
        let n = ext.len.clamp(1, end - pos);
        let flags = match ext.mapping {
            Mapping::Zero | Mapping::Unallocated => proto::STATE_HOLE | proto::STATE_ZERO,
            Mapping::Data(_) | Mapping::Parent | Mapping::Ancestor { .. } => 0,
        };
        // n ≤ len, a u32.
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += n32,
            _ => out.push((n32, flags)),
        }
        pos += n;
        if one {
            break;
        }
    }
    Ok(out)
}

/// The NBD error for a disk error ("Error values").
fn errno_of(e: &disk::Error) -> u32 {
    if let Some(io) = e.io_error() {
        // ENOSPC, EDQUOT and EFBIG are "no space".
        if matches!(io.raw_os_error(), Some(28 | 122 | 27)) {
            return errno::ENOSPC;
        }
    }
    match e.kind() {
        disk::ErrorKind::InvalidInput => errno::EINVAL,
        _ => errno::EIO,
    }
}

fn lock(w: &Mutex<Stream>) -> std::sync::MutexGuard<'_, Stream> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn send_outcome(w: &Mutex<Stream>, neg: Negotiated, r: &Request, o: Outcome) -> Result<()> {
    let io = |e| Error::io("sending a reply", e);
    match o {
        Outcome::Done if r.kind == cmd::READ && neg.structured => {
            // A zero-length read: nothing to cover.
            let h = proto::chunk_header(reply::FLAG_DONE, reply::NONE, r.cookie, 0);
            lock(w).write_all(&h).map_err(io)
        }
        Outcome::Done => lock(w)
            .write_all(&proto::simple_reply(0, r.cookie))
            .map_err(io),
        Outcome::Data(buf) if buf.is_empty() => send_outcome(w, neg, r, Outcome::Done),
        Outcome::Data(buf) => {
            let mut h = [0u8; 28];
            let head = if neg.structured {
                h[..20].copy_from_slice(&proto::chunk_header(
                    reply::FLAG_DONE,
                    reply::OFFSET_DATA,
                    r.cookie,
                    proto::len32(buf.len() + 8),
                ));
                h[20..].copy_from_slice(&r.offset.to_be_bytes());
                &h[..]
            } else {
                h[..16].copy_from_slice(&proto::simple_reply(0, r.cookie));
                &h[..16]
            };
            write_two(&mut lock(w), head, &buf).map_err(io)
        }
        Outcome::Extents(ext) => {
            let mut v = Vec::with_capacity(24 + 8 * ext.len());
            v.extend_from_slice(&proto::chunk_header(
                reply::FLAG_DONE,
                reply::BLOCK_STATUS,
                r.cookie,
                proto::len32(4 + 8 * ext.len()),
            ));
            v.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for (len, flags) in ext {
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            lock(w).write_all(&v).map_err(io)
        }
    }
}

/// `a` then `b`, in one system call when the socket takes both.
fn write_two(s: &mut Stream, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let mut done = 0;
    let total = a.len() + b.len();
    while done < total {
        let n = if done < a.len() {
            s.write_vectored(&[std::io::IoSlice::new(&a[done..]), std::io::IoSlice::new(b)])
        } else {
            s.write(&b[done - a.len()..])
        };
        match n {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn send_error(w: &Mutex<Stream>, neg: Negotiated, r: &Request, code: u32, msg: &str) -> Result<()> {
    let bytes = if neg.structured {
        proto::error_chunk(r.cookie, code, msg)
    } else {
        proto::simple_reply(code, r.cookie).to_vec()
    };
    lock(w)
        .write_all(&bytes)
        .map_err(|e| Error::io("sending an error reply", e))
}
