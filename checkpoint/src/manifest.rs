//! The manifest, `bundle.json`: the tree of a bundle (its nodes, the
//! active leaf, an operation in progress, files to delete), validated when
//! read and replaced atomically when written.

use crate::disks::Format;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// The manifest's file name inside a bundle.
pub const MANIFEST: &str = "bundle.json";
/// The spare child of a VHD bundle (see "Spare child" in the `bundle` module docs).
pub const SPARE: &str = "spare.avhd";
pub(crate) const MANIFEST_VERSION: u32 = 1;

/// One disk of the tree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Unique id.
    pub id: String,
    /// Checkpoint name; `None` for the active leaf.
    pub name: Option<String>,
    /// When the checkpoint was taken (or the active disk created), Unix seconds.
    pub created: u64,
    /// The parent node's id; `None` for the root.
    pub parent: Option<String>,
    /// The disk file, relative to the bundle directory.
    pub disk: String,
}

/// An operation recorded before it changes files (see "Atomicity" in the
/// `bundle` module docs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Pending {
    /// Checkpoint the active disk as `name`; `new_id` becomes active.
    Create {
        /// The checkpoint's name.
        name: String,
        /// Id of the new active node.
        new_id: String,
        /// Time of the checkpoint.
        created: u64,
    },
    /// Drop the active disk; a new child `new_id` of `target` becomes active.
    Revert {
        /// The checkpoint reverted to.
        target: String,
        /// Id of the new active node.
        new_id: String,
        /// Creation time of the new active disk.
        created: u64,
    },
    /// Remove checkpoint `node`, merging it into each child.
    Delete {
        /// The node removed.
        node: String,
    },
    /// Fold the active disk into its parent checkpoint (its only child).
    MergeUp {
        /// The active node.
        child: String,
        /// Its parent, which becomes the active node.
        parent: String,
    },
    /// Fold the active disk's parent checkpoint into the active disk (the
    /// checkpoint stays for its other children).
    MergeDown {
        /// The checkpoint.
        parent: String,
        /// The active node.
        child: String,
    },
}

/// The manifest (`bundle.json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Manifest format version (1).
    pub version: u32,
    /// Format of every disk in the bundle.
    pub format: Format,
    /// The nodes, parents before children.
    pub nodes: Vec<Node>,
    /// Id of the active leaf.
    pub active: String,
    /// An operation in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// Disk files to delete (no longer in the tree).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub garbage: Vec<String>,
}

/// Read and validate the manifest at `path`.
pub(crate) fn read(path: &Path) -> Result<Manifest> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io("cannot read the bundle manifest", e).in_file(&name, 0))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
        Error::corrupt(
            "bundle manifest",
            0,
            format!("line {} column {}: {e}", e.line(), e.column()),
        )
        .in_file(&name, 0)
    })?;
    validate(&manifest).map_err(|m| Error::corrupt("bundle manifest", 0, m).in_file(&name, 0))?;
    Ok(manifest)
}

/// Replace the manifest of the bundle in `dir` with `manifest` atomically
/// (temporary file, fsync, rename, fsync of the directory).
pub(crate) fn write(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let name = tmp.display().to_string();
    let mut text = serde_json::to_string_pretty(manifest)
        .map_err(|e| Error::invalid(format!("cannot encode the manifest: {e}")))?;
    text.push('\n');
    let mut f =
        std::fs::File::create(&tmp).map_err(|e| Error::io("cannot create", e).in_file(&name, 0))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("cannot write", e).in_file(&name, 0))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::io("cannot rename into place", e).in_file(&name, 0))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| {
            Error::io("cannot sync the bundle directory", e).in_file(&dir.display().to_string(), 0)
        })
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_utc(secs: u64) -> String {
    // u64::MAX / 86400 < 2^48: the days fit an i64.
    #[allow(clippy::cast_possible_wrap)]
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Check the manifest's shape: known version, unique ids and names, parents
/// that exist (no cycles), one active leaf without a name, disk files that
/// stay inside the bundle.
fn validate(m: &Manifest) -> std::result::Result<(), String> {
    if m.version != MANIFEST_VERSION {
        return Err(format!("unsupported manifest version {}", m.version));
    }
    let mut ids = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for n in &m.nodes {
        if !ids.insert(n.id.as_str()) {
            return Err(format!("duplicate node id {}", n.id));
        }
        if let Some(name) = &n.name {
            if !names.insert(name.as_str()) {
                return Err(format!("duplicate checkpoint name \"{name}\""));
            }
        }
        let p = Path::new(&n.disk);
        if n.disk.is_empty() || p.components().count() != 1 || p.is_absolute() || n.disk == ".." {
            return Err(format!(
                "node {}: disk \"{}\" is not a file name inside the bundle",
                n.id, n.disk
            ));
        }
    }
    for n in &m.nodes {
        let mut cur = n.parent.as_deref();
        let mut steps = 0;
        while let Some(p) = cur {
            let Some(pn) = m.nodes.iter().find(|x| x.id == p) else {
                return Err(format!("node {} has unknown parent {p}", n.id));
            };
            steps += 1;
            if steps > m.nodes.len() {
                return Err(format!("the tree loops at node {}", n.id));
            }
            cur = pn.parent.as_deref();
        }
    }
    let Some(a) = m.nodes.iter().find(|n| n.id == m.active) else {
        return Err(format!("active node {} does not exist", m.active));
    };
    if a.name.is_some() {
        return Err("the active node has a checkpoint name".into());
    }
    if m.pending.is_none() && m.nodes.iter().any(|n| n.parent.as_deref() == Some(&a.id)) {
        return Err("the active node has children".into());
    }
    // Found by fuzzing: recovering such a delete removed the active node
    // and a later `Bundle::active` panicked.
    if let Some(Pending::Delete { node }) = &m.pending {
        if *node == m.active {
            return Err("the pending delete names the active node".into());
        }
    }
    if m.nodes.iter().filter(|n| n.name.is_none()).count() != 1 {
        return Err("exactly one node (the active one) must be unnamed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz finding (fuzz/ checkpoint_manifest): a pending delete of the
    /// active node is refused, not recovered into a manifest without one.
    #[test]
    fn pending_delete_of_the_active_node_is_refused() {
        let text = r#"{"version":1,"format":"vhd","nodes":[
            {"id":"a","name":"base","created":0,"parent":null,"disk":"base.vhd"},
            {"id":"b","name":null,"created":0,"parent":"a","disk":"b.avhd"}],
            "active":"b","pending":{"op":"delete","node":"b"}}"#;
        let m: Manifest = serde_json::from_str(text).unwrap();
        let err = validate(&m).unwrap_err();
        assert!(
            err.contains("pending delete names the active node"),
            "{err}"
        );
        let ok = Manifest {
            pending: Some(Pending::Delete { node: "a".into() }),
            ..m
        };
        assert_eq!(validate(&ok), Ok(()));
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_398_245), "2026-11-23T01:44:05Z");
    }
}
