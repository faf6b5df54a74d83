//! The crate's one error type.

/// What can go wrong building or running a virtual machine (what the guest
/// does wrong is not an error: see [`crate::Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open it?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The machine's configuration is refused (memory size, vCPU count,
    /// a payload too large...).
    #[error("{0}")]
    Config(String),
    /// Guest memory cannot be mapped or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// An image cannot be opened (missing, locked, corrupt...) or closed.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// A host I/O error (a payload file, an event fd, a thread).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not supported (yet) on this VMM or this host.
    #[error("{0}")]
    Unsupported(String),
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A host I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
