//! The server: exports, the accept loop, one thread per connection, the
//! stop flag and the memory budget shared by every connection.
//!
//! Locks: the budget's mutex is held only to count; a connection's queue
//! and outbox mutexes only to move jobs and replies (never across a socket
//! write). Disk I/O holds none of them.

use crate::handshake;
use crate::stream::{Socket, Stream};
use crate::transmission;
use crate::{Error, Result};
use disk::VirtualDisk;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Payload bytes (write data, read buffers) in flight across all
/// connections.
const BUDGET: u64 = 256 << 20;
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client may take over each handshake message.
const HANDSHAKE_IDLE: Duration = Duration::from_secs(30);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// One disk served under a name.
pub struct Export {
    /// The name clients ask for (`nbd://host/NAME`); "" is the default.
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The disk (a chain is one disk: its view).
    pub disk: Arc<dyn VirtualDisk>,
    /// Whether clients may write (else the export is flagged read-only and
    /// every write fails with `EPERM`).
    pub writable: bool,
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket.
    Unix(UnixListener),
}

/// Counts payload bytes in flight; `acquire` waits for room.
pub(crate) struct Budget {
    /// Bytes in use, and how many threads wait for room.
    used: Mutex<(u64, usize)>,
    freed: Condvar,
}

impl Budget {
    pub(crate) fn new() -> Budget {
        Budget {
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
        }
    }

    /// Bytes in use.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Wait until `n` more bytes fit (a request larger than the whole
    /// budget waits until nothing else is in flight).
    pub(crate) fn acquire(&self, n: u64) {
        let mut g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while g.0 > 0 && g.0 + n > BUDGET {
            g.1 += 1;
            g = self.freed.wait(g).unwrap_or_else(|e| e.into_inner());
            g.1 -= 1;
        }
        g.0 += n;
    }
    /// Take `n` bytes if they fit now (as [`Budget::acquire`] would
    /// without waiting).
    pub(crate) fn try_acquire(&self, n: u64) -> bool {
        let mut g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 > 0 && g.0 + n > BUDGET {
            return false;
        }
        g.0 += n;
        true
    }
    pub(crate) fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(n);
        let wake = g.1 > 0;
        drop(g);
        if wake {
            self.freed.notify_all();
        }
    }
}

type Log = Box<dyn Fn(&str) + Send + Sync>;

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) exports: Vec<Export>,
    pub(crate) budget: Budget,
    stop: Arc<AtomicBool>,
    log: Log,
    dropped: AtomicUsize,
}

impl Shared {
    pub(crate) fn find(&self, name: &str) -> Option<usize> {
        self.exports.iter().position(|e| e.name == name)
    }
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    pub(crate) fn log(&self, msg: &str) {
        (self.log)(msg);
    }
}

/// An NBD server over a set of exports.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server of `exports` (names must differ); `log` receives one line
    /// per client dropped or failed flush.
    ///
    /// # Errors
    /// No export, or two with one name.
    pub fn new(exports: Vec<Export>, log: impl Fn(&str) + Send + Sync + 'static) -> Result<Self> {
        if exports.is_empty() {
            return Err(Error::Config("no export".into()));
        }
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(Error::Config(format!("two exports named {:?}", e.name)));
            }
            if e.name.len() > 4096 {
                return Err(Error::Config(
                    "an export name is longer than 4096 bytes".into(),
                ));
            }
        }
        Ok(Server {
            shared: Arc::new(Shared {
                exports,
                budget: Budget::new(),
                stop: Arc::new(AtomicBool::new(false)),
                log: Box::new(log),
                dropped: AtomicUsize::new(0),
            }),
        })
    }

    /// The flag that stops the server: once set, no connection is
    /// accepted, each connection finishes the requests it has in flight
    /// and closes, and [`Server::run`] returns.
    #[must_use]
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.shared.stop.clone()
    }

    /// Clients dropped so far for breaking the protocol or vanishing.
    #[must_use]
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Accept and serve clients until the stop flag is set, then wait for
    /// every connection to finish and flush the writable exports.
    ///
    /// # Errors
    /// The listener fails; a flush at the end fails.
    pub fn run(&self, listener: &Listener) -> Result<()> {
        let nb = match listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        };
        nb.map_err(|e| Error::io("making the listener non-blocking", e))?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        while !self.shared.stopping() {
            let accepted = match listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Socket::Tcp(s)
                }),
                Listener::Unix(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Socket::Unix(s)
                }),
            };
            match accepted {
                Ok(socket) => {
                    threads.retain(|t| !t.is_finished());
                    if threads.len() >= MAX_CONNECTIONS {
                        self.shared.log(&format!(
                            "refused a client: {MAX_CONNECTIONS} connections already"
                        ));
                        continue; // dropping the socket closes it
                    }
                    let shared = self.shared.clone();
                    threads.push(std::thread::spawn(move || serve_socket(&shared, socket)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    self.shared.log(&format!("accept: {e}"));
                    std::thread::sleep(ACCEPT_POLL * 10);
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
        self.flush_all()
    }

    /// Serve one already connected client (blocking until it leaves).
    pub fn serve(&self, socket: Socket) {
        serve_socket(&self.shared, socket);
    }

    /// Flush every writable export.
    ///
    /// # Errors
    /// A flush fails (every export is still tried).
    pub fn flush_all(&self) -> Result<()> {
        let mut first = None;
        for e in self.shared.exports.iter().filter(|e| e.writable) {
            if let Err(err) = e.disk.flush() {
                first.get_or_insert(Error::Disk(err));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn serve_socket(shared: &Shared, socket: Socket) {
    let r = (|| {
        let mut s = Stream::new(socket, shared.stop.clone())?;
        s.set_idle_limit(Some(HANDSHAKE_IDLE));
        let Some(neg) = handshake::handshake(&mut s, shared)? else {
            s.shutdown();
            return Ok(());
        };
        s.set_idle_limit(None);
        let r = transmission::transmit(&mut s, shared, neg);
        s.shutdown();
        r
    })();
    if let Err(e) = r {
        shared.dropped.fetch_add(1, Ordering::Relaxed);
        shared.log(&format!("client dropped: {e:#}"));
    }
}
