//! An NBD server for any [`disk::VirtualDisk`]: every image, chain and
//! checkpoint bundle the library opens can be served to `qemu-img`,
//! `qemu-io`, `nbdinfo`, `nbdcopy` or a kernel client.
//!
//! The protocol is the NetworkBlockDevice project's `doc/proto.md`; the
//! modules cite its sections. Written here rather than taken from a crate:
//! `nbd` 0.3 (its server serves a `Read + Write + Seek`, without
//! structured replies or block status, "a rather early version"),
//! `nbdkit` (a plugin for the C nbdkit server, which would have to be
//! installed and run) and `tokio-nbd` (a tokio runtime for what a thread
//! per connection does) each miss what `vdisk serve` needs.
//!
//! - `proto`: the wire format.
//! - `handshake`: fixed newstyle negotiation (`NBD_OPT_GO`/`INFO` with
//!   block sizes, `LIST`, structured replies, `base:allocation`).
//! - `transmission`: requests validated whole before any I/O, then served
//!   by the connection's reader (small reads from a cache) or a few
//!   workers (READ, WRITE with FUA, FLUSH, TRIM, WRITE_ZEROES with NO_HOLE
//!   and FAST_ZERO, BLOCK_STATUS, CACHE).
//! - `reply`: replies, sent whole, those completed together in one write.
//! - `server`: the accept loop, a thread per connection, the stop flag,
//!   and a memory budget for payloads in flight.
//!
//! One disk object serves every connection, so a flush on any of them
//! covers writes made on all of them: `NBD_FLAG_CAN_MULTI_CONN` is always
//! set. A client that breaks the protocol (bad magic, unknown flags, an
//! oversized write payload, a flood of options, silence during the
//! handshake) is dropped; the server and its other clients go on. No TLS
//! (`NBD_OPT_STARTTLS` is refused): serve on a Unix socket or a trusted
//! network.
//!
//! ```
//! use disk::{MemStorage, RawDisk, VirtualDisk};
//! use nbd::{Export, Listener, Server};
//! use std::io::Read;
//! use std::sync::Arc;
//!
//! let disk = RawDisk::new(MemStorage::from_vec("mem", vec![0u8; 1 << 20])).unwrap();
//! let export = Export {
//!     name: String::new(),
//!     description: "an example".into(),
//!     disk: Arc::new(disk),
//!     writable: false,
//! };
//! let server = Arc::new(Server::new(vec![export], |msg| eprintln!("{msg}")).unwrap());
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("nbd.sock");
//! let listener = Listener::Unix(std::os::unix::net::UnixListener::bind(&path).unwrap());
//! let s = server.clone();
//! let t = std::thread::spawn(move || s.run(&listener));
//! let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
//! let mut greeting = [0u8; 18];
//! c.read_exact(&mut greeting).unwrap();
//! assert_eq!(&greeting[..8], b"NBDMAGIC");
//! drop(c);
//! server.stop_flag().store(true, std::sync::atomic::Ordering::Relaxed);
//! t.join().unwrap().unwrap();
//! ```
#![forbid(unsafe_code)]

mod handshake;
pub mod proto;
mod reply;
mod server;
mod stream;
mod transmission;

pub use server::{Export, Listener, Server, MAX_CONNECTIONS};
pub use stream::Socket;

/// The largest read or write payload accepted (the protocol's 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The class of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A socket failed.
    Io,
    /// The client broke the protocol (and was dropped).
    Protocol,
    /// The disk failed.
    Disk,
    /// The server was set up wrong.
    Config,
}

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The disk failed.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// The server was set up wrong.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The class of the error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Disk(_) => ErrorKind::Disk,
            Error::Config(_) => ErrorKind::Config,
        }
    }
    pub(crate) fn io(context: &str, source: std::io::Error) -> Error {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
    pub(crate) fn protocol(msg: String) -> Error {
        Error::Protocol(msg)
    }
}

/// Results of the server.
pub type Result<T> = std::result::Result<T, Error>;
