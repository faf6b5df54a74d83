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

/// What kind of error an [`Error`] is, for callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// KVM is missing or not usable by this user.
    NoKvm,
    /// A KVM ioctl failed.
    Kvm,
    /// The configuration (memory, vCPUs, a payload or kernel) is refused.
    Config,
    /// Guest memory could not be set up.
    Memory,
    /// A disk image: its kind says more (locked, corrupt, I/O...).
    Disk(disk::ErrorKind),
    /// A host I/O error.
    Io,
    /// Not supported here.
    Unsupported,
}

impl Error {
    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoKvm(_) => ErrorKind::NoKvm,
            Error::Kvm { .. } => ErrorKind::Kvm,
            Error::Config(_) => ErrorKind::Config,
            Error::Memory(_) => ErrorKind::Memory,
            Error::Disk(e) => ErrorKind::Disk(e.kind()),
            Error::Io { .. } => ErrorKind::Io,
            Error::Unsupported(_) => ErrorKind::Unsupported,
        }
    }

    /// A host I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
