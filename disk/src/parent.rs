//! Finding the parents of differencing disks, under a policy.
//!
//! A differencing image names its parent by paths written on whatever
//! machine made it (Windows paths, relative paths, our own Unix paths). Each
//! format turns its locators into candidate paths, best first; a
//! [`ChainSearch`] picks the first candidate that exists and that the
//! [`ParentPolicy`] permits, refuses loops and over-deep chains, and keeps
//! the list of what it tried for the error message.
//!
//! The policy exists because the paths come from the image: a hostile image
//! must not make us open arbitrary files (a device, another user's disk) the
//! caller never asked for. By default a parent must lie under the directory
//! of the image the caller opened (the top of the chain); the caller may
//! allow more directories, or opt in to any path.

use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// The deepest chain opened by default (the child included).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Which files a chain open may follow as parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentPolicy {
    /// Directories, besides the directory of the image opened, under which
    /// parents may lie.
    pub allowed_dirs: Vec<PathBuf>,
    /// Follow any path the images name (the caller trusts them).
    pub allow_any: bool,
    /// The deepest chain opened, the child included.
    pub max_depth: usize,
}

impl Default for ParentPolicy {
    fn default() -> Self {
        ParentPolicy {
            allowed_dirs: Vec::new(),
            allow_any: false,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl ParentPolicy {
    /// A policy that follows any path (for images the caller trusts).
    pub fn any() -> Self {
        ParentPolicy {
            allow_any: true,
            ..ParentPolicy::default()
        }
    }
}

/// The outcome of [`ChainSearch::resolve`].
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    /// The parent found (as a path that exists), if any.
    pub found: Option<PathBuf>,
    /// Every candidate looked at, described for messages.
    pub tried: Vec<String>,
    /// Whether a candidate existed but the policy refused it.
    pub refused: bool,
}

impl Resolution {
    /// The error for a differencing `format` image `child` whose parent was
    /// not found: says whether it is missing or refused by the policy, then
    /// `parent` (what the image says of its parent) and every path tried
    /// (`no_paths` when there were none).
    pub fn not_found_error(
        &self,
        child: &str,
        format: &str,
        parent: &str,
        no_paths: &str,
    ) -> Error {
        let paths = if self.tried.is_empty() {
            no_paths.to_string()
        } else {
            format!("tried {}", self.tried.join(", "))
        };
        let why = if self.refused {
            "is not allowed by the parent policy"
        } else {
            "is missing"
        };
        Error::invalid(format!(
            "differencing {format} whose parent {why}: {parent}; {paths}"
        ))
        .in_file(child, 0)
    }
}

/// The state of one chain open: the policy, the directories it permits and
/// the images already open (to refuse loops).
#[derive(Debug, Clone)]
pub struct ChainSearch {
    policy: ParentPolicy,
    roots: Vec<PathBuf>,
    open: Vec<PathBuf>,
}

impl ChainSearch {
    /// Start a chain open at `top`, the image the caller named.
    pub fn new(policy: &ParentPolicy, top: &Path) -> Self {
        let mut roots = Vec::new();
        let top_dir = dir_of(top).to_path_buf();
        for d in std::iter::once(&top_dir).chain(policy.allowed_dirs.iter()) {
            if let Ok(c) = std::fs::canonicalize(d) {
                roots.push(c);
            }
        }
        ChainSearch {
            policy: policy.clone(),
            roots,
            open: Vec::new(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &ParentPolicy {
        &self.policy
    }

    /// Record that `path` is being opened as the next layer (the top first).
    ///
    /// # Errors
    /// The chain loops back to an image already open, or gets deeper than
    /// the policy's `max_depth`; the error is in `child`, the image that
    /// names `path` as its parent.
    pub fn enter(&mut self, child: &str, path: &Path) -> Result<()> {
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if self.open.contains(&canon) {
            return Err(Error::invalid(format!(
                "the parent chain loops: parent {} is this image or one of its descendants",
                path.display()
            ))
            .in_file(child, 0));
        }
        if self.open.len() >= self.policy.max_depth {
            return Err(Error::invalid(format!(
                "the parent chain is deeper than {} images (next parent {})",
                self.policy.max_depth,
                path.display()
            ))
            .in_file(child, 0));
        }
        self.open.push(canon);
        Ok(())
    }

    /// Forget the layers entered after the first `depth` (after a failed
    /// parent open, to try the next candidate).
    pub fn truncate(&mut self, depth: usize) {
        self.open.truncate(depth);
    }

    /// How many layers are open.
    pub fn depth(&self) -> usize {
        self.open.len()
    }

    /// Whether the policy lets us open `path` (which must exist).
    pub fn permits(&self, path: &Path) -> bool {
        if self.policy.allow_any {
            return true;
        }
        match std::fs::canonicalize(path) {
            Ok(c) => self.roots.iter().any(|r| c.starts_with(r)),
            Err(_) => false,
        }
    }

    /// Pick the first candidate (label, path) that is a file the policy
    /// permits. Candidates with no path (a locator that cannot name a file
    /// here) are listed as skipped.
    pub fn resolve(&self, candidates: &[(String, Option<PathBuf>)]) -> Resolution {
        let mut r = Resolution::default();
        for (label, path) in candidates {
            let Some(path) = path else {
                r.tried
                    .push(format!("{label} (not a path on this system: skipped)"));
                continue;
            };
            if !path.is_file() {
                r.tried
                    .push(format!("{label} (looked for {})", path.display()));
                continue;
            }
            if !self.permits(path) {
                r.refused = true;
                r.tried.push(format!(
                    "{label} ({} exists but is outside the directories parents may come from: {}; \
                     allow its directory or any parent path to follow it)",
                    path.display(),
                    self.roots
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            }
            r.tried.push(format!("{label} (found {})", path.display()));
            r.found = Some(path.clone());
            return r;
        }
        r
    }
}

/// The directory of the file at `path` (where paths relative to it start):
/// its parent directory, or `.` for a bare file name.
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// An error from opening the parent `path` of `child`, saying so.
pub fn parent_error(e: Error, child: &str, path: &Path) -> Error {
    let what = format!("cannot open the parent {}", path.display());
    match e {
        Error::Corrupt {
            file,
            structure,
            offset,
            msg,
        } => Error::Corrupt {
            file,
            structure,
            offset,
            msg: format!("{msg} (the parent of {child})"),
        },
        Error::Io {
            file,
            context,
            os_error,
        } => Error::Io {
            file: child.to_string(),
            context: format!("{what}: {file}: {context}"),
            os_error,
        },
        Error::Unsupported { file, msg } => Error::Unsupported {
            file: child.to_string(),
            msg: format!("{what}: {file}: {msg}"),
        },
        Error::InvalidInput { file, msg } => Error::InvalidInput {
            file: child.to_string(),
            msg: format!("{what}: {file}: {msg}"),
        },
        Error::Locked { file, msg } => Error::Locked {
            file: child.to_string(),
            msg: format!("{what}: {file}: {msg}"),
        },
    }
}

/// Whether `p` is a Windows absolute path (`C:\...`, `\\server\...`,
/// `\\?\...`, `\dir`), which cannot name a file on this system.
pub fn is_windows_absolute(p: &str) -> bool {
    let b = p.as_bytes();
    (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':') || p.starts_with('\\')
}

/// A path stored in an image, relative to the directory of the image
/// (`.\parent.vhdx`, `..\dir\p.vhd`, `sub/p.vhd`), as a path here; `None`
/// for absolute paths of either system.
pub fn relative_candidate(child_dir: &Path, p: &str) -> Option<PathBuf> {
    if p.is_empty() || is_windows_absolute(p) || p.starts_with('/') {
        return None;
    }
    Some(normalize(&child_dir.join(p.replace('\\', "/"))))
}

/// A path stored in an image as absolute: a rooted Windows path without a
/// drive (`\vms\base.vhdx`, as [`windows_absolute_path`] writes a Unix
/// path) is that Unix path; a Unix path (as this library wrote before) or a
/// `file://` URL is used as is; a relative path is taken relative to
/// `child_dir`; Windows drive, UNC and volume paths give `None` (the caller
/// falls back to the file name beside the child).
pub fn absolute_candidate(child_dir: &Path, p: &str) -> Option<PathBuf> {
    if let Some(rest) = p.strip_prefix('\\').filter(|r| !r.starts_with('\\')) {
        return (!rest.is_empty())
            .then(|| normalize(&Path::new("/").join(rest.replace('\\', "/"))));
    }
    if p.is_empty() || is_windows_absolute(p) {
        return None;
    }
    let p = p.strip_prefix("file://").unwrap_or(p);
    if p.starts_with('/') {
        Some(normalize(Path::new(p)))
    } else {
        relative_candidate(child_dir, p)
    }
}

/// The absolute path of `file` in Win32 syntax, for the absolute locators
/// of a differencing disk (VHDX `absolute_win32_path`, VHD `W2ku`): Windows
/// writes `C:\dir\parent.vhdx`; a Unix path has no drive, so this is the
/// rooted path `\dir\parent.vhdx`, separated by backslashes as Windows
/// separates them (other readers, such as libvhdi's `vhdimount`, split the
/// value at backslashes only and look for its last component beside the
/// child; a Unix path with slashes would be one component to them).
/// [`absolute_candidate`] reads it back. `None` when a component is not
/// Unicode or holds a backslash (it cannot be written in Win32 syntax).
pub fn windows_absolute_path(file: &Path) -> Option<String> {
    let abs = normalize(&absolute(file)?);
    let mut out = String::new();
    for c in abs.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => {
                let n = n.to_str().filter(|n| !n.contains('\\'))?;
                out.push('\\');
                out.push_str(n);
            }
            _ => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The last component of a path of either system (`C:\vms\base.vhdx` →
/// `base.vhdx`), if it can be a file name.
pub fn file_name_of(p: &str) -> Option<&str> {
    let f = p.rsplit(['\\', '/']).next()?;
    (!f.is_empty() && f != "." && f != "..").then_some(f)
}

/// `dir` relative path from `from_dir` to `file`, Windows style
/// (`.\p.vhdx`, `..\base\p.vhdx`), as Hyper-V writes relative locators.
/// `None` if no such path exists (e.g. different roots), or a name on the
/// way is not Unicode or holds a backslash.
pub fn windows_relative_path(from_dir: &Path, file: &Path) -> Option<String> {
    let from = normalize(&absolute(from_dir)?);
    let to = normalize(&absolute(file)?);
    let fc: Vec<Component> = from.components().collect();
    let tc: Vec<Component> = to.components().collect();
    let common = fc.iter().zip(&tc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    for _ in common..fc.len() {
        parts.push("..".into());
    }
    for c in &tc[common..] {
        // A backslash inside a name would read back as a separator.
        let name = c.as_os_str().to_str().filter(|n| !n.contains('\\'))?;
        parts.push(name.to_string());
    }
    if parts.is_empty() {
        return None;
    }
    if parts[0] != ".." {
        parts.insert(0, ".".into());
    }
    Some(parts.join("\\"))
}

fn absolute(p: &Path) -> Option<PathBuf> {
    if p.is_absolute() {
        Some(p.to_path_buf())
    } else {
        std::env::current_dir().ok().map(|d| d.join(p))
    }
}

/// Drop `.` components and fold `dir/..` (lexically).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_from_stored_paths() {
        let d = Path::new("/vms/x");
        assert_eq!(
            relative_candidate(d, ".\\base.vhdx"),
            Some(PathBuf::from("/vms/x/base.vhdx"))
        );
        assert_eq!(
            relative_candidate(d, "..\\b\\base.vhdx"),
            Some(PathBuf::from("/vms/b/base.vhdx"))
        );
        assert_eq!(relative_candidate(d, "C:\\b.vhdx"), None);
        assert_eq!(relative_candidate(d, "/abs/b.vhdx"), None);
        assert_eq!(
            absolute_candidate(d, "/abs/b.vhdx"),
            Some(PathBuf::from("/abs/b.vhdx"))
        );
        assert_eq!(
            absolute_candidate(d, "file:///abs/b.vhdx"),
            Some(PathBuf::from("/abs/b.vhdx"))
        );
        assert_eq!(absolute_candidate(d, "\\\\?\\C:\\vms\\b.vhdx"), None);
        assert_eq!(file_name_of("\\\\?\\C:\\vms\\b.vhdx"), Some("b.vhdx"));
        assert_eq!(file_name_of("C:\\"), None);
        assert_eq!(
            windows_relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhdx")).as_deref(),
            Some(".\\p.vhdx")
        );
        assert_eq!(
            windows_relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhdx")).as_deref(),
            Some("..\\c\\p.vhdx")
        );
        assert_eq!(
            windows_relative_path(Path::new("/a/b"), Path::new("/a/b/p\\q.vhdx")),
            None
        );
    }

    #[test]
    fn windows_absolute_paths_round_trip() {
        let w = |p: &str| windows_absolute_path(Path::new(p));
        assert_eq!(
            w("/vms/x/base.vhdx").as_deref(),
            Some("\\vms\\x\\base.vhdx")
        );
        assert_eq!(w("/vms/./x/../y.vhdx").as_deref(), Some("\\vms\\y.vhdx"));
        assert_eq!(w("/vms/a\\b.vhdx"), None, "a backslash in a name");
        assert_eq!(w("/"), None);
        let d = Path::new("/elsewhere");
        for p in ["/vms/x/base.vhdx", "/b.vhdx", "/a b/c.vhdx"] {
            let stored = w(p).unwrap();
            assert!(is_windows_absolute(&stored), "{stored}");
            assert_eq!(
                absolute_candidate(d, &stored),
                Some(PathBuf::from(p)),
                "{stored}"
            );
        }
        // Not a rooted path: drive, UNC, volume and empty ones.
        assert_eq!(absolute_candidate(d, "\\"), None);
        assert_eq!(absolute_candidate(d, "\\\\server\\share\\b.vhdx"), None);
        assert_eq!(absolute_candidate(d, "\\\\?\\Volume{1}\\b.vhdx"), None);
        assert_eq!(absolute_candidate(d, "D:\\b.vhdx"), None);
    }

    #[test]
    fn policy_confines_parents_to_the_top_directory() {
        let tmp = std::env::temp_dir().join(format!("disk-parent-{}", std::process::id()));
        let inside = tmp.join("vm");
        let outside = tmp.join("elsewhere");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("base"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let top = inside.join("child");
        let cands = vec![
            ("a".to_string(), Some(outside.join("secret"))),
            ("b".to_string(), None),
            ("c".to_string(), Some(inside.join("missing"))),
            ("d".to_string(), Some(inside.join("base"))),
        ];
        let s = ChainSearch::new(&ParentPolicy::default(), &top);
        let r = s.resolve(&cands);
        assert_eq!(r.found, Some(inside.join("base")));
        assert!(r.refused);
        assert_eq!(r.tried.len(), 4, "{:?}", r.tried);
        assert!(r.tried[0].contains("outside"), "{:?}", r.tried);
        // A symlink inside pointing outside is refused too.
        let link = inside.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(outside.join("secret"), &link).unwrap();
        assert!(!s.permits(&link));
        // Allowed explicitly, or by opting in.
        let p = ParentPolicy {
            allowed_dirs: vec![outside.clone()],
            ..ParentPolicy::default()
        };
        assert!(ChainSearch::new(&p, &top).permits(&outside.join("secret")));
        assert!(ChainSearch::new(&ParentPolicy::any(), &top).permits(&outside.join("secret")));
        // Loops and depth.
        let mut s = ChainSearch::new(
            &ParentPolicy {
                max_depth: 2,
                ..ParentPolicy::default()
            },
            &top,
        );
        s.enter("c", &inside.join("base")).unwrap();
        assert!(s.enter("c", &inside.join("base")).is_err());
        s.enter("c", &inside.join("link")).unwrap();
        let e = s.enter("c", &inside.join("x")).unwrap_err();
        assert!(e.to_string().contains("deeper than 2"), "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
