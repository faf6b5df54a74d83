//! The transmission phase ("Transmission", "Request types"): one reader
//! per connection validates each whole request before any I/O (an invalid
//! one gets its error reply, never reaches the disk, and never ends the
//! connection). Small reads it serves itself while they come from a cache
//! ([`Inline`]); everything else it hands to a few workers, so that a
//! client with many requests in flight gets them served in parallel.
//! Replies go out whole through the connection's [`Outbox`], in
//! completion order ("Replies need not be sent in the same order as
//! requests"). Requests that arrive in one burst are handed over, and
//! their inline replies sent, together.
//!
//! Only a request the connection cannot recover from ends it (a hard
//! disconnect, "Terminating the transmission phase"): a wrong magic (the
//! client lost its place) or a write payload beyond the maximum (reading
//! it would be a denial of service, skipping it would take as long).
//!
//! Memory: payloads in flight (write data, read buffers) are charged to
//! the server-wide budget ([`crate::server::Budget`]) before they are
//! allocated.

use crate::handshake::Negotiated;
use crate::proto::{self, cflag, cmd, errno, Request};
use crate::reply::{Outbox, Reply};
use crate::server::{Export, Shared};
use crate::stream::Stream;
use crate::{Error, Result, MAX_PAYLOAD};
use disk::{Mapping, VirtualDisk};
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    let outbox = Outbox::new(s.try_clone()?, &shared.budget);
    let queue = Queue::default();
    let result = std::thread::scope(|scope| {
        let (queue, outbox) = (&queue, &outbox);
        for _ in 0..WORKERS {
            scope.spawn(move || work(queue, export, neg, outbox, shared));
        }
        let mut held = Held::default();
        let r = read_requests(s, shared, neg, queue, outbox, &mut held);
        // What was read before an error is still served.
        let sent = held.hand_over(queue, outbox);
        queue.close();
        r.and(sent)
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

/// What the reader has read and not yet handed over: jobs for the
/// workers, and the replies of the reads it served itself.
#[derive(Default)]
struct Held {
    jobs: Vec<Job>,
    replies: Vec<Reply>,
}

impl Held {
    /// Queue the jobs for the workers and send the replies.
    fn hand_over(&mut self, queue: &Queue, outbox: &Outbox<'_>) -> Result<()> {
        queue.push_all(&mut self.jobs);
        outbox.send_all(&mut self.replies)
    }
}

/// Read, validate and queue requests until the client disconnects. Jobs
/// and inline replies are held while more requests are already buffered,
/// and handed over at once before the reader waits for the client or the
/// budget (a client with many requests in flight sends them in one burst:
/// one hand-off, not one each).
fn read_requests(
    s: &mut Stream,
    shared: &Shared,
    neg: Negotiated,
    queue: &Queue,
    outbox: &Outbox<'_>,
    held: &mut Held,
) -> Result<()> {
    let export = &shared.exports[neg.export];
    let acquire = |n: u64, held: &mut Held| -> Result<()> {
        if !shared.budget.try_acquire(n) {
            // Room comes back as queued jobs complete and replies go out:
            // hand ours over first.
            held.hand_over(queue, outbox)?;
            shared.budget.acquire(n);
        }
        Ok(())
    };
    let mut inline = Inline::default();
    loop {
        if s.buffered() < Request::SIZE || held.jobs.len() + held.replies.len() >= QUEUED {
            held.hand_over(queue, outbox)?;
        }
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
            acquire(cost, held)?;
            if s.buffered() < req.length as usize {
                held.hand_over(queue, outbox)?;
            }
            payload = vec![0u8; req.length as usize];
            if let Err(e) = s.read_rest(&mut payload, "write payload") {
                shared.budget.release(cost);
                return Err(e);
            }
        }
        if let Err((code, msg)) = validate(&req, export, neg) {
            shared.budget.release(cost);
            outbox.send(Reply::error(&req, neg.structured, code, &msg))?;
            continue;
        }
        if inline.wants(&req) && shared.budget.try_acquire(u64::from(req.length)) {
            let job = Job {
                req,
                payload,
                cost: u64::from(req.length),
            };
            let start = Instant::now();
            let reply = serve(&job, export, neg, outbox);
            inline.took(start.elapsed());
            held.replies.push(reply);
            continue;
        }
        if req.kind == cmd::READ {
            cost = u64::from(req.length);
            acquire(cost, held)?;
        }
        held.jobs.push(Job { req, payload, cost });
    }
}

/// Which reads the reader serves itself. A small read from a cached or
/// fast file takes a few microseconds, less than handing it to a worker
/// and waking it (on a 2-CPU machine, `qemu-img bench` at queue depth 16
/// spent about a third of the server's time in those wake-ups). But a read
/// the storage is slow to answer would hold up every request behind it,
/// so one that takes longer than [`INLINE_SLOW`] sends the next
/// [`SLOW_SKIP`] small reads to the workers, in parallel, before the
/// reader tries again.
#[derive(Default)]
struct Inline {
    skip: u32,
}

/// The largest read the reader serves itself.
const INLINE_MAX: u32 = 64 * 1024;
/// An inline read slower than this is not served from a cache.
const INLINE_SLOW: Duration = Duration::from_micros(200);
/// Small reads sent to the workers after a slow inline one.
const SLOW_SKIP: u32 = 256;

impl Inline {
    /// Whether to serve `req` here (counting down a skip).
    fn wants(&mut self, req: &Request) -> bool {
        if req.kind != cmd::READ || req.length > INLINE_MAX {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// An inline read took `t`.
    fn took(&mut self, t: Duration) {
        if t > INLINE_SLOW {
            self.skip = SLOW_SKIP;
        }
    }
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
    /// Queue every job of `jobs` (waiting for room while [`QUEUED`] are
    /// queued), waking as many idle workers as there are new jobs.
    fn push_all(&self, jobs: &mut Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut g = self.lock();
        for job in jobs.drain(..) {
            while g.jobs.len() >= QUEUED {
                g.reader_waiting = true;
                if g.idle_workers > 0 {
                    // Nobody was told of the jobs queued so far.
                    self.ready.notify_all();
                }
                g = self
                    .room
                    .wait(g)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                g.reader_waiting = false;
            }
            g.jobs.push_back(job);
        }
        let wake = g.idle_workers.min(g.jobs.len());
        drop(g);
        for _ in 0..wake {
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

fn work(queue: &Queue, export: &Export, neg: Negotiated, outbox: &Outbox<'_>, shared: &Shared) {
    while let Some(job) = queue.pop() {
        let reply = serve(&job, export, neg, outbox);
        if let Err(e) = outbox.send(reply) {
            // The client is gone; the outbox shut the socket, which ends
            // the reader too.
            shared.log(&format!("export {:?}: {e:#}", export.name));
        }
    }
}

/// The reply to a validated request, its I/O done; it carries the job's
/// cost back to the budget.
fn serve(job: &Job, export: &Export, neg: Negotiated, outbox: &Outbox<'_>) -> Reply {
    run(job, export, neg.structured, outbox)
        .unwrap_or_else(|(code, msg)| Reply::error(&job.req, neg.structured, code, &msg))
        .with_cost(job.cost)
}

/// Do the I/O of one validated request; its reply.
fn run(
    job: &Job,
    export: &Export,
    structured: bool,
    outbox: &Outbox<'_>,
) -> std::result::Result<Reply, (u32, String)> {
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
    let done = |()| Reply::done(r, structured);
    let res = match r.kind {
        cmd::READ if structured && r.flags & cflag::DF == 0 && reads_zeros(d, r.offset, len) => {
            Ok(Reply::hole(r))
        }
        cmd::READ => {
            let mut buf = outbox.buffer(r.length as usize);
            match d.read_at(&mut buf, r.offset) {
                Ok(()) => Ok(Reply::data(r, structured, buf)),
                Err(e) => {
                    outbox.recycle(buf);
                    Err(e)
                }
            }
        }
        cmd::WRITE => d
            .write_at(&job.payload, r.offset)
            .and_then(|()| fua(d))
            .map(done),
        cmd::FLUSH => d.flush().map(done),
        cmd::TRIM => d.discard(r.offset, len).and_then(|()| fua(d)).map(done),
        cmd::WRITE_ZEROES => {
            if r.flags & cflag::FAST_ZERO != 0 && !fast_zero(d, r.offset, len) {
                return Err((
                    errno::ENOTSUP,
                    "only whole blocks are zeroed faster than written".into(),
                ));
            }
            d.write_zeroes(r.offset, len, r.flags & cflag::NO_HOLE == 0)
                .and_then(|()| fua(d))
                .map(done)
        }
        cmd::BLOCK_STATUS => block_status(d, r.offset, len, r.flags & cflag::REQ_ONE != 0)
            .map(|ext| Reply::extents(r, &ext)),
        // A hint (validated above): nothing to do.
        _ => Ok(Reply::done(r, structured)),
    };
    res.map_err(|e| (errno_of(&e), format!("{e:#}")))
}

/// Whether `[offset, offset+len)` (not empty) reads as zeros without
/// reading any data: one zero or unallocated extent covers it (the lookup
/// the read itself starts with; no system call on a file's holes). Asked
/// before a read, so that the client gets a hole, not `len` bytes of
/// zeros; a failing lookup just means "read it", and the read reports it.
fn reads_zeros(d: &dyn VirtualDisk, offset: u64, len: u64) -> bool {
    len > 0
        && d.map(offset, len).is_ok_and(|e| {
            e.len >= len && matches!(e.mapping, Mapping::Zero | Mapping::Unallocated)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, length: u32) -> Request {
        Request {
            flags: 0,
            kind,
            cookie: 1,
            offset: 0,
            length,
        }
    }

    #[test]
    fn only_small_reads_are_served_inline_and_a_slow_one_stops_it_for_a_while() {
        let mut i = Inline::default();
        assert!(i.wants(&req(cmd::READ, 4096)));
        assert!(i.wants(&req(cmd::READ, INLINE_MAX)));
        assert!(!i.wants(&req(cmd::READ, INLINE_MAX + 1)));
        assert!(!i.wants(&req(cmd::WRITE, 4096)));
        assert!(!i.wants(&req(cmd::BLOCK_STATUS, 4096)));
        i.took(INLINE_SLOW);
        assert!(i.wants(&req(cmd::READ, 4096)), "not slower than the limit");
        i.took(INLINE_SLOW + Duration::from_micros(1));
        // Writes and large reads do not count down the skip.
        assert!(!i.wants(&req(cmd::WRITE, 4096)));
        assert!(!i.wants(&req(cmd::READ, INLINE_MAX + 1)));
        for _ in 0..SLOW_SKIP {
            assert!(!i.wants(&req(cmd::READ, 4096)));
        }
        assert!(i.wants(&req(cmd::READ, 4096)));
    }
}
