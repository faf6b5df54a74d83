//! Replies ("Simple reply message", "Structured reply chunk message") and
//! the outbox that sends them: each reply goes out whole, and replies that
//! complete while another is being sent are gathered and sent together in
//! one system call (a client with many requests in flight gets its replies
//! in a few large writes, not one write and one lock hand-off each).
//!
//! The thread that finds nobody sending becomes the sender: it writes what
//! is pending, then what was queued meanwhile, until nothing is left; the
//! others queue their reply and go back to work. So no reply waits for a
//! later one, and the socket is written by one thread at a time.
//!
//! Locks: the outbox mutex is held only to queue or take replies, never
//! across a socket write.

use crate::handshake::BASE_ALLOCATION_ID;
use crate::proto::{self, reply, Request};
use crate::server::Budget;
use crate::stream::Stream;
use crate::{Error, Result};
use std::io::{IoSlice, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The longest fixed part of a reply (a structured `OFFSET_HOLE` chunk).
const HEAD: usize = 32;
/// The most replies written in one system call (`IOV_MAX` is 1024 slices,
/// two a reply).
const BATCH: usize = 256;

/// One whole reply: a fixed head, then a body (read data, block status
/// descriptors, an error message).
pub(crate) struct Reply {
    head: [u8; HEAD],
    head_len: usize,
    body: Vec<u8>,
    /// Bytes of the budget to give back once sent.
    cost: u64,
    /// The body is a read buffer from [`Outbox::buffer`].
    recycle: bool,
}

impl Reply {
    fn new(head: &[u8], body: Vec<u8>) -> Reply {
        let mut h = [0u8; HEAD];
        h[..head.len()].copy_from_slice(head);
        Reply {
            head: h,
            head_len: head.len(),
            body,
            cost: 0,
            recycle: false,
        }
    }

    /// Give `cost` bytes back to the budget once this reply is sent.
    pub(crate) fn with_cost(mut self, cost: u64) -> Reply {
        self.cost = cost;
        self
    }

    /// Success without data.
    pub(crate) fn done(r: &Request, structured: bool) -> Reply {
        if r.kind == proto::cmd::READ && structured {
            // A read of nothing: one final chunk, nothing to cover.
            Reply::new(
                &proto::chunk_header(reply::FLAG_DONE, reply::NONE, r.cookie, 0),
                Vec::new(),
            )
        } else {
            Reply::new(&proto::simple_reply(0, r.cookie), Vec::new())
        }
    }

    /// The data of a read (`OFFSET_DATA` when structured).
    pub(crate) fn data(r: &Request, structured: bool, buf: Vec<u8>) -> Reply {
        if buf.is_empty() {
            return Reply::done(r, structured);
        }
        let mut reply = if structured {
            let h = offset_chunk(r, reply::OFFSET_DATA, proto::len32(buf.len() + 8));
            Reply::new(&h[..28], buf)
        } else {
            Reply::new(&proto::simple_reply(0, r.cookie), buf)
        };
        reply.recycle = true;
        reply
    }

    /// A read whose whole range reads as zeros, when structured replies
    /// were negotiated and the client did not forbid fragments (`DF`):
    /// one `OFFSET_HOLE` chunk ("Structured reply types"), no data.
    pub(crate) fn hole(r: &Request) -> Reply {
        let mut h = offset_chunk(r, reply::OFFSET_HOLE, 12);
        h[28..].copy_from_slice(&r.length.to_be_bytes());
        Reply::new(&h, Vec::new())
    }

    /// `base:allocation` descriptors `(length, flags)`.
    pub(crate) fn extents(r: &Request, ext: &[(u32, u32)]) -> Reply {
        let mut h = [0u8; 24];
        h[..20].copy_from_slice(&proto::chunk_header(
            reply::FLAG_DONE,
            reply::BLOCK_STATUS,
            r.cookie,
            proto::len32(4 + 8 * ext.len()),
        ));
        h[20..].copy_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        let mut body = Vec::with_capacity(8 * ext.len());
        for (len, flags) in ext {
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&flags.to_be_bytes());
        }
        Reply::new(&h, body)
    }

    /// A failed request: an error chunk when structured, else a simple
    /// reply with the error (the message is then lost).
    pub(crate) fn error(r: &Request, structured: bool, code: u32, msg: &str) -> Reply {
        if structured {
            Reply::new(&[], proto::error_chunk(r.cookie, code, msg))
        } else {
            Reply::new(&proto::simple_reply(code, r.cookie), Vec::new())
        }
    }

    fn len(&self) -> usize {
        self.head_len + self.body.len()
    }
}

/// The final chunk header of a content chunk of `kind` with `length` bytes
/// of payload, then the request's offset: the first 28 bytes.
fn offset_chunk(r: &Request, kind: u16, length: u32) -> [u8; HEAD] {
    let mut h = [0u8; HEAD];
    h[..20].copy_from_slice(&proto::chunk_header(
        reply::FLAG_DONE,
        kind,
        r.cookie,
        length,
    ));
    h[20..28].copy_from_slice(&r.offset.to_be_bytes());
    h
}

/// Read buffers kept for reuse by a connection (each up to
/// [`SPARE_MAX`]): a new 1 MiB buffer per read costs page faults and
/// zeroing, more than the copy to the socket.
const SPARES: usize = 8;
/// The largest read buffer kept for reuse.
const SPARE_MAX: usize = 1 << 20;

/// The replies of one connection and the socket they go out on.
pub(crate) struct Outbox<'a> {
    state: Mutex<State>,
    budget: &'a Budget,
    spare: Mutex<Vec<Vec<u8>>>,
}

struct State {
    pending: Vec<Reply>,
    /// The socket, taken by the sender while it writes.
    stream: Option<Stream>,
    /// A write failed: the connection takes no more replies.
    failed: bool,
}

impl<'a> Outbox<'a> {
    pub(crate) fn new(stream: Stream, budget: &'a Budget) -> Outbox<'a> {
        Outbox {
            state: Mutex::new(State {
                pending: Vec::new(),
                stream: Some(stream),
                failed: false,
            }),
            budget,
            spare: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of `len` bytes for a read to fill: a spare one when there
    /// is one. Its bytes are not zeroed: they are a former read's, and
    /// `read_at` overwrites all of them or fails (and then the buffer is
    /// not sent).
    pub(crate) fn buffer(&self, len: usize) -> Vec<u8> {
        if len > SPARE_MAX {
            return vec![0u8; len];
        }
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut b = spare.unwrap_or_default();
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    /// Keep `b` for a later read, when there is room.
    pub(crate) fn recycle(&self, b: Vec<u8>) {
        if b.capacity() == 0 || b.capacity() > SPARE_MAX {
            return;
        }
        let mut g = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if g.len() < SPARES {
            g.push(b);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Send `r`, now or (when another thread is sending) as part of that
    /// thread's next write; its cost goes back to the budget once written.
    ///
    /// # Errors
    /// The socket failed while this thread was sending: the connection is
    /// shut down (so that its reader stops too) and the replies still
    /// pending are dropped, as are those sent after.
    pub(crate) fn send(&self, r: Reply) -> Result<()> {
        self.post(|pending| pending.push(r))
    }

    /// Send every reply of `replies`, as [`Outbox::send`].
    pub(crate) fn send_all(&self, replies: &mut Vec<Reply>) -> Result<()> {
        if replies.is_empty() {
            return Ok(());
        }
        self.post(|pending| pending.append(replies))
    }

    /// Queue replies with `add`, then send what is pending unless another
    /// thread is sending.
    fn post(&self, add: impl FnOnce(&mut Vec<Reply>)) -> Result<()> {
        let mut g = self.lock();
        add(&mut g.pending);
        if g.failed {
            // The sender that failed reported it; these replies have
            // nowhere to go.
            let cost: u64 = g.pending.drain(..).map(|r| r.cost).sum();
            drop(g);
            self.budget.release(cost);
            return Ok(());
        }
        let Some(mut stream) = g.stream.take() else {
            // Another thread is sending; it will send this one too.
            return Ok(());
        };
        let mut batch = Vec::new();
        let result = loop {
            let n = g.pending.len().min(BATCH);
            if n == 0 {
                break Ok(());
            }
            batch.extend(g.pending.drain(..n));
            drop(g);
            let res = write_all(&mut stream, &batch);
            let cost: u64 = batch.iter().map(|r| r.cost).sum();
            for r in batch.drain(..) {
                if r.recycle {
                    self.recycle(r.body);
                }
            }
            self.budget.release(cost);
            g = self.lock();
            if let Err(e) = res {
                stream.shutdown();
                g.failed = true;
                let cost: u64 = g.pending.drain(..).map(|r| r.cost).sum();
                self.budget.release(cost);
                break Err(Error::io("sending a reply", e));
            }
        };
        g.stream = Some(stream);
        result
    }
}

/// Write every reply of `batch`, whole and in order.
fn write_all(s: &mut Stream, batch: &[Reply]) -> std::io::Result<()> {
    let total: usize = batch.iter().map(Reply::len).sum();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * batch.len());
    for r in batch {
        if r.head_len > 0 {
            slices.push(IoSlice::new(&r.head[..r.head_len]));
        }
        if !r.body.is_empty() {
            slices.push(IoSlice::new(&r.body));
        }
    }
    let mut rest = &mut slices[..];
    let mut done = 0;
    while done < total {
        match s.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                done += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
// Test data: small numbers in any integer type.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::proto::cmd;
    use crate::stream::Socket;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn outbox_pair(budget: &Budget) -> (Outbox<'_>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let s = Stream::new(Socket::Unix(a), Arc::new(AtomicBool::new(false))).unwrap();
        (Outbox::new(s, budget), b)
    }

    fn read_req(cookie: u64, len: u32) -> Request {
        Request {
            flags: 0,
            kind: cmd::READ,
            cookie,
            offset: cookie * 4096,
            length: len,
        }
    }

    #[test]
    fn replies_from_many_threads_arrive_whole() {
        let budget = Budget::new();
        let (outbox, mut peer) = outbox_pair(&budget);
        let reader = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..8 * 200 {
                let mut h = [0u8; 28];
                peer.read_exact(&mut h).unwrap();
                assert_eq!(proto::be32(&h[0..4]), proto::STRUCTURED_REPLY_MAGIC);
                let cookie = proto::be64(&h[8..16]);
                let len = proto::be32(&h[16..20]) as usize - 8;
                assert_eq!(proto::be64(&h[20..28]), cookie * 4096);
                let mut body = vec![0u8; len];
                peer.read_exact(&mut body).unwrap();
                assert!(body.iter().all(|&b| b == cookie as u8), "reply {cookie}");
                seen.push(cookie);
            }
            seen
        });
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let outbox = &outbox;
                let budget = &budget;
                s.spawn(move || {
                    for k in 0..200u64 {
                        let cookie = t * 1000 + k;
                        let len = 1 + (k as usize * 997) % 70_000;
                        assert!(budget.try_acquire(len as u64));
                        let mut buf = outbox.buffer(len);
                        buf.fill(cookie as u8);
                        let r = Reply::data(&read_req(cookie, len as u32), true, buf);
                        outbox.send(r.with_cost(len as u64)).unwrap();
                    }
                });
            }
        });
        let mut seen = reader.join().unwrap();
        seen.sort_unstable();
        let mut want: Vec<u64> = (0..8u64)
            .flat_map(|t| (0..200).map(move |k| t * 1000 + k))
            .collect();
        want.sort_unstable();
        assert_eq!(seen, want);
        assert_eq!(budget.used(), 0, "every reply's cost came back");
        assert!(outbox.spare.lock().unwrap().len() <= SPARES);
    }

    #[test]
    fn a_closed_peer_fails_one_sender_and_the_budget_comes_back() {
        let budget = Budget::new();
        let (outbox, peer) = outbox_pair(&budget);
        drop(peer);
        let mut errors = 0;
        for cookie in 0..4 {
            assert!(budget.try_acquire(4096));
            let r = Reply::data(&read_req(cookie, 4096), true, vec![1u8; 4096]);
            if outbox.send(r.with_cost(4096)).is_err() {
                errors += 1;
            }
        }
        assert_eq!(errors, 1, "the sender that failed says so, once");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn reused_buffers_have_the_length_asked_for() {
        let budget = Budget::new();
        let (outbox, _peer) = outbox_pair(&budget);
        outbox.recycle(vec![9u8; 8192]);
        outbox.recycle(vec![0u8; SPARE_MAX + 1]); // too large to keep
        assert_eq!(outbox.spare.lock().unwrap().len(), 1);
        assert_eq!(outbox.buffer(100).len(), 100);
        assert_eq!(outbox.buffer(10_000).len(), 10_000);
        assert_eq!(outbox.buffer(SPARE_MAX + 7).len(), SPARE_MAX + 7);
    }
}
