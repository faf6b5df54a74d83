//! A client connection (TCP or Unix socket) with the reads the protocol
//! needs: whole messages, with a clean end of stream told apart from one
//! in the middle of a message, and the server's stop flag checked between
//! messages (the socket has a short read timeout for that).

use crate::{Error, Result};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked read looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// How long a client stopped in the middle of a message is waited for once
/// the server is stopping.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bytes read from the socket at once.
const READ_BUFFER: usize = 64 * 1024;

/// The socket itself.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
}

/// A connection.
#[derive(Debug)]
pub struct Stream {
    socket: Socket,
    /// Bytes received but not yet consumed: a client with many requests in
    /// flight sends them in one burst, read here in one system call.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    stop: Arc<AtomicBool>,
    /// Longest wait for the next byte (none: wait for ever, as in the
    /// transmission phase, where clients may idle).
    idle_limit: Option<Duration>,
}

impl Stream {
    /// Wrap `socket`; reads give up at a message boundary once `stop` is
    /// set.
    ///
    /// # Errors
    /// The socket refuses its read timeout.
    pub fn new(socket: Socket, stop: Arc<AtomicBool>) -> Result<Stream> {
        let r = match &socket {
            Socket::Tcp(s) => {
                // Replies are written whole; small ones must not wait.
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(POLL))
            }
            Socket::Unix(s) => s.set_read_timeout(Some(POLL)),
        };
        r.map_err(|e| Error::io("setting the socket read timeout", e))?;
        Ok(Stream {
            socket,
            rbuf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            stop,
            idle_limit: None,
        })
    }

    /// Bytes received and not yet consumed: what can be read without
    /// waiting for the client.
    pub fn buffered(&self) -> usize {
        self.rend - self.rpos
    }

    /// Give up on a client that sends nothing for `limit`.
    pub fn set_idle_limit(&mut self, limit: Option<Duration>) {
        self.idle_limit = limit;
    }

    /// Another handle on the same connection (for writing replies).
    ///
    /// # Errors
    /// The OS cannot duplicate the socket.
    pub fn try_clone(&self) -> Result<Stream> {
        let socket = match &self.socket {
            Socket::Tcp(s) => s.try_clone().map(Socket::Tcp),
            Socket::Unix(s) => s.try_clone().map(Socket::Unix),
        }
        .map_err(|e| Error::io("duplicating the socket", e))?;
        // The clone writes replies; it never reads.
        Ok(Stream {
            socket,
            rbuf: Box::new([]),
            rpos: 0,
            rend: 0,
            stop: self.stop.clone(),
            idle_limit: self.idle_limit,
        })
    }

    /// Close both directions (the peer sees the end of the stream).
    pub fn shutdown(&self) {
        let _ = match &self.socket {
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Fill `buf` with the next message (`what`, for errors). `Ok(false)`
    /// when the stream ends, or the server stops, before its first byte.
    ///
    /// # Errors
    /// The stream ends in the middle of the message, the client is idle
    /// past the limit, or an I/O error.
    pub fn read_full(&mut self, buf: &mut [u8], what: &str) -> Result<bool> {
        self.read_message(buf, what, true)
    }

    /// Fill `buf` with the rest of a message whose start was read (a
    /// write's payload): its end, or a stop, is not a boundary here.
    ///
    /// # Errors
    /// As [`Stream::read_full`], and the stream ending at once.
    pub fn read_rest(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if self.read_message(buf, what, false)? {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "the client closed the connection before the {what}"
            )))
        }
    }

    fn read_message(&mut self, buf: &mut [u8], what: &str, boundary: bool) -> Result<bool> {
        let mut got = 0;
        let mut last = Instant::now();
        let mut stopping_since: Option<Instant> = None;
        while got < buf.len() {
            match self.read(&mut buf[got..]) {
                Ok(0) if got == 0 && boundary => return Ok(false),
                Ok(0) => {
                    return Err(Error::protocol(format!(
                        "the client closed the connection in the middle of the {what} \
                         ({got} of {} bytes)",
                        buf.len()
                    )))
                }
                Ok(n) => {
                    got += n;
                    last = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.stop.load(Ordering::Relaxed) {
                        if got == 0 && boundary {
                            return Ok(false);
                        }
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > STOP_GRACE {
                            return Err(Error::protocol(format!(
                                "stopping: the client left its {what} unfinished"
                            )));
                        }
                    }
                    if self.idle_limit.is_some_and(|l| last.elapsed() > l) {
                        return Err(Error::protocol(format!(
                            "the client sent nothing for {} s (waiting for its {what})",
                            last.elapsed().as_secs()
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&format!("reading the {what}"), e)),
            }
        }
        Ok(true)
    }

    /// Read and throw away `n` bytes.
    ///
    /// # Errors
    /// As [`Stream::read_full`]; the stream ending counts as an error.
    pub fn skip(&mut self, mut n: u64, what: &str) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
            self.read_rest(&mut buf[..k], what)?;
            n -= k as u64;
        }
        Ok(())
    }
}

impl Stream {
    fn read_socket(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.socket {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rpos == self.rend {
            if buf.len() >= self.rbuf.len() {
                // Large payloads go straight to their buffer.
                return self.read_socket(buf);
            }
            let mut rbuf = std::mem::take(&mut self.rbuf);
            let r = self.read_socket(&mut rbuf);
            self.rbuf = rbuf;
            self.rpos = 0;
            self.rend = r?;
        }
        let n = buf.len().min(self.rend - self.rpos);
        buf[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
        self.rpos += n;
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.socket {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.socket {
            Socket::Tcp(s) => s.write_vectored(bufs),
            Socket::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
