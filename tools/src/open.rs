//! How `vdisk` opens and creates images: through the library's front door
//! ([`image`]), with this run's parent policy and lock mode.

use anyhow::Result;
use disk::{FileOpener, LockMode, ParentPolicy};
use image::{CreateOptions, Image, Kind, OpenOptions};
use std::fs::File;
use std::path::Path;
use std::sync::OnceLock;

pub use image::Format;

/// The parent policy of this run (from `--parent-dir` and
/// `--allow-any-parent`), set once by `main`.
static POLICY: OnceLock<ParentPolicy> = OnceLock::new();

/// Set the parent policy of this run (the first call wins).
pub fn set_policy(policy: ParentPolicy) {
    let _ = POLICY.set(policy);
}

/// Which parent files differencing images may lead to: by default only
/// files under the directory of the image opened.
pub fn policy() -> &'static ParentPolicy {
    POLICY.get_or_init(ParentPolicy::default)
}

/// How this run's read-only opens claim their images (`-U` makes it
/// [`LockMode::ForceShare`]), set once by `main`.
static READ_LOCK: OnceLock<LockMode> = OnceLock::new();

/// Set how this run's read-only opens claim their images (the first call wins).
pub fn set_read_lock(mode: LockMode) {
    let _ = READ_LOCK.set(mode);
}

/// How a read-only open claims its image: shared (the default), or
/// force-share with `-U`. Writable opens always claim it exclusively.
pub fn read_lock() -> LockMode {
    *READ_LOCK.get_or_init(LockMode::default)
}

/// The lock mode of an open, read-only unless `writable`.
pub fn lock_for(writable: bool) -> LockMode {
    if writable {
        LockMode::Auto
    } else {
        read_lock()
    }
}

/// Parse a format name (clap value parser): `raw`, `vhdx`, `vhd` or `vpc`.
pub fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s)
}

/// How this run opens an image of `format` (probed when `None`),
/// read-only unless `writable`: under the parent policy, with this run's
/// lock mode.
pub fn options(format: Option<Format>, writable: bool) -> OpenOptions {
    OpenOptions {
        format,
        writable,
        parent_policy: policy().clone(),
        lock: lock_for(writable),
        ..OpenOptions::probing()
    }
}

/// Open the image at `path` (format given or probed), read-only unless
/// `writable`. A probed raw image refuses writes to its first sector
/// ([`image::guard`]).
pub fn open(path: &Path, format: Option<Format>, writable: bool) -> Result<Image> {
    Ok(image::open(path, &options(format, writable))?)
}

/// The format of the file at `path`, probed from its content (a file named
/// `.vhdx`/`.vhd` without its signature is refused as corrupt).
pub fn detect(path: &Path) -> Result<Format> {
    Ok(image::probe(path, &FileOpener)?)
}

/// The format to use for `path`: `given`, or probed from the content.
pub fn resolve(path: &Path, given: Option<Format>) -> Result<Format> {
    match given {
        Some(f) => Ok(f),
        None => detect(path),
    }
}

/// Create (or overwrite, like qemu-img) the image at `path`: `kind`, over
/// `parent` for a differencing disk (its chain opened under the parent
/// policy). Returns it open for writing.
pub fn create(path: &Path, kind: Kind, parent: Option<&Path>) -> Result<Image> {
    let opts = CreateOptions {
        parent: parent.map(Path::to_path_buf),
        parent_policy: policy().clone(),
        overwrite: true,
        ..CreateOptions::new(kind)
    };
    Ok(image::create(path, &opts)?)
}

/// After an error message `msg` (on stderr): when probing refused a file
/// whose name says VHDX or VHD but whose signature is missing, print how
/// to go on.
pub fn damaged_hint(e: &anyhow::Error) {
    for c in e.chain() {
        let Some(disk::Error::Corrupt { file, msg, .. }) = c.downcast_ref::<disk::Error>() else {
            continue;
        };
        let f = if msg.starts_with("the name says VHDX") {
            "vhdx"
        } else if msg.starts_with("the name says VHD") {
            "vhd"
        } else {
            continue;
        };
        eprintln!(
            "vdisk: hint: `vdisk check -f {f} {file}` reports what is damaged (with -r all it \
             restores a lost VHDX signature when a header and a region table are intact, and a \
             VHD footer from its copy or when only its cookie was lost), then `vdisk convert \
             --salvage -f {f}` copies out what can be read; or -f raw uses the file as a raw \
             image anyway"
        );
        return;
    }
}

/// The format of a new image at `path`: `given` (`flag`, -f or -O), or
/// the one its name claims (`.vhdx`/`.avhdx` VHDX, `.vhd`/`.avhd` VHD, any
/// case), raw for any other name. Says on stderr which format a missing
/// `flag` gave, and warns when `given` contradicts the name (Windows goes
/// by the name, and `vdisk` refuses a `.vhdx` or `.vhd` file without its
/// signature unless -f raw).
pub fn new_image_format(path: &Path, given: Option<Format>, flag: &str) -> Format {
    let claim = Format::claimed_by(path);
    let n = path.display();
    match (given, claim) {
        (Some(f), Some(c)) if f != c => {
            let why = if f == Format::Raw {
                "opening it will need -f raw (a file so named without the signature is refused \
                 as damaged)"
            } else {
                "Windows, which goes by the name, will not open it"
            };
            eprintln!(
                "vdisk: warning: {n} will be {} although its name says it is {}: {why}",
                f.describe(),
                c.describe()
            );
            f
        }
        (Some(f), _) => f,
        (None, Some(c)) => {
            eprintln!(
                "vdisk: note: no {flag} given: format {}, from the name {n}",
                c.name()
            );
            c
        }
        (None, None) => {
            eprintln!(
                "vdisk: note: no {flag} given: format raw (the name {n} does not end in .vhdx, \
                 .avhdx, .vhd or .avhd)"
            );
            Format::Raw
        }
    }
}

/// Make the directory entry of a newly created `path` durable.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = disk::parent::dir_of(path);
    let name = dir.display().to_string();
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| disk::Error::io("cannot sync directory", e).in_file(&name, 0))?;
    Ok(())
}
