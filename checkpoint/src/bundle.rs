//! A checkpoint tree kept in a directory (a disk bundle).
//!
//! The directory holds the disks and `bundle.json`, a human-readable
//! manifest: the nodes (id, name, creation time, parent, disk file) and the
//! one active leaf, the disk a VM writes. Every other node is a checkpoint:
//! a frozen disk whose children are differencing disks over it.
//!
//! # Atomicity
//! The manifest is replaced atomically (temporary file, fsync, rename, fsync
//! of the directory). An operation first records itself in the manifest
//! (`pending`), then changes files with steps that can be run again, then
//! commits the new tree and clears `pending` in one manifest replacement.
//! Files no longer referenced are listed under `garbage` and deleted after
//! the commit. [`Bundle::open`] finishes a pending operation and deletes
//! leftover garbage, so an operation interrupted at any point is finished
//! at the next open.
//!
//! # Spare child (VHD)
//! A differencing VHD's BAT is sized to the disk (4 bytes per 2 MiB block:
//! 4 MiB at 2 TiB), so creating a child costs time in proportion to the
//! disk size. To keep [`Bundle::create`] O(1), a VHD bundle keeps a spare:
//! `spare.avhd`, a blank child of a frozen disk of the bundle, made by a
//! background thread after each operation that used it up (and at init),
//! written as `spare.avhd.tmp` and renamed once synced. A checkpoint (or a
//! revert) renames the spare to the new disk's name and rewrites only its
//! header for the new parent. The spare is never in the manifest; a
//! leftover `spare.avhd.tmp` is deleted at open; a spare that does not
//! fit (or is missing) only makes that one checkpoint take the slow way.
//! The thread is waited for before each operation and on drop.
//!
//! # Lock
//! An open [`Bundle`] holds the bundle directory exclusively
//! ([`disk::lock::DirLock`], an `flock` of the directory) from `init` or
//! `open` until dropped: a second bundle operation, in this process or
//! another, is refused with an error naming the holder, and never sees a
//! half-made change. The disks themselves are claimed by their image locks
//! ([`disk::lock`]) as they are opened.

use crate::disks::{create_child, create_vhd_child_using_spare, detect, make_spare, Format};
use crate::merge::{merge_into_ancestor, merge_into_child};
use crate::{Error, Result};
use disk::lock::DirLock;
use disk::{LockMode, Opener, Storage};
use image::chain::chain_files;
use image::OpenOptions;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

/// The manifest's file name inside a bundle.
pub const MANIFEST: &str = "bundle.json";
/// The spare child of a VHD bundle (see the module docs).
pub const SPARE: &str = "spare.avhd";
const MANIFEST_VERSION: u32 = 1;

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

/// An operation recorded before it changes files (see the module docs).
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

/// A node as `list` shows it (serialized with kebab-case keys, as every
/// JSON output of `vdisk`).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct NodeInfo {
    /// The node.
    #[serde(flatten)]
    pub node: Node,
    /// Creation time, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created_utc: String,
    /// Bytes the disk file takes (its length).
    pub file_size: u64,
    /// Whether this is the active leaf.
    pub active: bool,
    /// Depth in the tree (0 for the root).
    pub depth: usize,
}

/// An open bundle.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    /// How the bundle's disks are opened (format, parent policy, opener).
    opts: OpenOptions,
    /// The thread making the spare, if one is running.
    spare_maker: Option<std::thread::JoinHandle<()>>,
    /// The bundle directory, held for the life of this value.
    _lock: DirLock,
}

impl Drop for Bundle {
    fn drop(&mut self) {
        self.wait_for_spare();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_utc(secs: u64) -> String {
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

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| {
            Error::io("cannot sync the bundle directory", e).in_file(&dir.display().to_string(), 0)
        })
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot delete", e).in_file(&path.display().to_string(), 0)),
    }
}

impl Bundle {
    /// Create a bundle in the new (or empty) directory `dir` with an empty
    /// dynamic base disk of `size` bytes and an active child over it.
    ///
    /// # Errors
    /// The directory exists and is not empty, invalid size, I/O errors.
    pub fn init(dir: &Path, format: Format, size: u64) -> Result<Bundle> {
        let lock = Self::prepare_dir(dir)?;
        let base = dir.join(format!("base.{}", format.base_extension()));
        let kind = match format {
            Format::Vhdx => image::Kind::Vhdx(vhdx::CreateOptions::new(size)),
            Format::Vhd => image::Kind::Vhd(vhd::CreateOptions::new(size)),
        };
        image::create(&base, &image::CreateOptions::new(kind))?.close()?;
        Self::init_with_base(dir, format, &base, lock)
    }

    /// Create a bundle in the new (or empty) directory `dir` whose base is a
    /// copy of the (non-differencing) VHDX or VHD `image`.
    ///
    /// # Errors
    /// As [`Bundle::init`]; `image` is differencing or unreadable.
    pub fn init_from(dir: &Path, image: &Path) -> Result<Bundle> {
        let opener = disk::file_opener();
        let format = detect(image, &*opener)?;
        let files = chain_files(image, &OpenOptions::new(format.image()))?;
        if files.len() > 1 {
            return Err(Error::invalid(
                "a differencing disk cannot be a bundle's base: convert (flatten) it first",
            )
            .in_file(&image.display().to_string(), 0));
        }
        let lock = Self::prepare_dir(dir)?;
        let base = dir.join(format!("base.{}", format.base_extension()));
        std::fs::copy(image, &base).map_err(|e| {
            Error::io(format!("cannot copy to {}", base.display()), e)
                .in_file(&image.display().to_string(), 0)
        })?;
        std::fs::File::open(&base)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("cannot sync", e).in_file(&base.display().to_string(), 0))?;
        Self::init_with_base(dir, format, &base, lock)
    }

    /// Make `dir` (or check that it is empty) and claim it.
    fn prepare_dir(dir: &Path) -> Result<DirLock> {
        let name = dir.display().to_string();
        if dir.exists() {
            let mut it = std::fs::read_dir(dir)
                .map_err(|e| Error::io("cannot list", e).in_file(&name, 0))?;
            if it.next().is_some() {
                return Err(
                    Error::invalid("the bundle directory exists and is not empty")
                        .in_file(&name, 0),
                );
            }
        } else {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("cannot create the directory", e).in_file(&name, 0))?;
        }
        DirLock::exclusive(dir, "bundle")
    }

    fn init_with_base(dir: &Path, format: Format, base: &Path, lock: DirLock) -> Result<Bundle> {
        let t = now();
        let root = Node {
            id: Uuid::new_v4().to_string(),
            name: Some("base".into()),
            created: t,
            parent: None,
            disk: base
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let active_id = Uuid::new_v4().to_string();
        let active = Node {
            id: active_id.clone(),
            name: None,
            created: t,
            parent: Some(root.id.clone()),
            disk: format!("{active_id}.{}", format.child_extension()),
        };
        let opener = disk::file_opener();
        create_child(format, &dir.join(&active.disk), base, &opener)?;
        let mut b = Bundle {
            dir: dir.to_path_buf(),
            manifest: Manifest {
                version: MANIFEST_VERSION,
                format,
                nodes: vec![root, active],
                active: active_id,
                pending: None,
                garbage: Vec::new(),
            },
            opts: Self::disk_options(format, opener),
            spare_maker: None,
            _lock: lock,
        };
        b.save()?;
        b.start_spare();
        Ok(b)
    }

    /// Open the bundle in `dir`, finishing an interrupted operation.
    ///
    /// # Errors
    /// No or invalid manifest (named, with the position of a JSON error),
    /// a failure finishing the pending operation, I/O errors.
    pub fn open(dir: &Path) -> Result<Bundle> {
        Self::open_with(dir, disk::file_opener())
    }

    /// [`Bundle::open`], reaching the disks through `opener` (e.g. one
    /// that journals writes, for power-cut tests).
    ///
    /// # Errors
    /// As [`Bundle::open`].
    pub fn open_with(dir: &Path, opener: Arc<dyn Opener>) -> Result<Bundle> {
        let lock = DirLock::exclusive(dir, "bundle")?;
        let path = dir.join(MANIFEST);
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io("cannot read the bundle manifest", e).in_file(&name, 0))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::corrupt(
                "bundle manifest",
                0,
                format!("line {} column {}: {e}", e.line(), e.column()),
            )
            .in_file(&name, 0)
        })?;
        validate(&manifest)
            .map_err(|m| Error::corrupt("bundle manifest", 0, m).in_file(&name, 0))?;
        let mut b = Bundle {
            dir: dir.to_path_buf(),
            opts: Self::disk_options(manifest.format, opener),
            manifest,
            spare_maker: None,
            _lock: lock,
        };
        remove_if_present(&b.dir.join(format!("{SPARE}.tmp")))?;
        b.recover()?;
        Ok(b)
    }

    /// How a bundle of `format` opens its disks: that format, the default
    /// parent policy, `opener`.
    fn disk_options(format: Format, opener: Arc<dyn Opener>) -> OpenOptions {
        OpenOptions {
            opener,
            ..OpenOptions::new(format.image())
        }
    }

    /// The manifest as it is now.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The active leaf.
    pub fn active(&self) -> &Node {
        self.node(&self.manifest.active)
            .expect("validated: the active node exists")
    }

    /// Path of the active disk (the one to write).
    pub fn active_path(&self) -> PathBuf {
        self.dir.join(&self.active().disk)
    }

    /// Path of a node's disk.
    pub fn disk_path(&self, node: &Node) -> PathBuf {
        self.dir.join(&node.disk)
    }

    fn node(&self, id: &str) -> Option<&Node> {
        self.manifest.nodes.iter().find(|n| n.id == id)
    }

    /// The checkpoint called `name`.
    ///
    /// # Errors
    /// No such checkpoint (the message lists the names).
    pub fn checkpoint(&self, name: &str) -> Result<&Node> {
        self.manifest
            .nodes
            .iter()
            .find(|n| n.name.as_deref() == Some(name))
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .manifest
                    .nodes
                    .iter()
                    .filter_map(|n| n.name.as_deref())
                    .collect();
                Error::invalid(format!(
                    "no checkpoint named \"{name}\" (checkpoints: {})",
                    names.join(", ")
                ))
                .in_file(&self.dir.display().to_string(), 0)
            })
    }

    fn children(&self, id: &str) -> Vec<Node> {
        self.manifest
            .nodes
            .iter()
            .filter(|n| n.parent.as_deref() == Some(id))
            .cloned()
            .collect()
    }

    /// The tree, depth first from the root, with sizes and the active mark.
    ///
    /// # Errors
    /// A disk file cannot be read.
    pub fn list(&self) -> Result<Vec<NodeInfo>> {
        let mut out = Vec::new();
        let mut stack: Vec<(Node, usize)> = self
            .manifest
            .nodes
            .iter()
            .filter(|n| n.parent.is_none())
            .map(|n| (n.clone(), 0))
            .collect();
        while let Some((n, depth)) = stack.pop() {
            let path = self.disk_path(&n);
            let file_size = std::fs::metadata(&path)
                .map_err(|e| Error::io("cannot stat", e).in_file(&path.display().to_string(), 0))?
                .len();
            let mut kids = self.children(&n.id);
            kids.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
            stack.extend(kids.into_iter().map(|k| (k, depth + 1)));
            out.push(NodeInfo {
                created_utc: format_utc(n.created),
                active: n.id == self.manifest.active,
                node: n,
                file_size,
                depth,
            });
        }
        Ok(out)
    }

    /// Take a checkpoint called `name`: the active disk is frozen under that
    /// name and a new, empty differencing disk over it becomes active. Costs
    /// the creation of one small file, whatever the disk size (a VHD bundle
    /// uses its spare child, see the module docs, and starts making the
    /// next one in the background).
    ///
    /// # Errors
    /// Empty or duplicate name, I/O errors.
    pub fn create(&mut self, name: &str) -> Result<()> {
        self.check_new_name(name)?;
        self.begin(Pending::Create {
            name: name.to_string(),
            new_id: Uuid::new_v4().to_string(),
            created: now(),
        })
    }

    /// Revert to checkpoint `name`: the active disk's changes are dropped and
    /// a new child of `name` becomes active.
    ///
    /// # Errors
    /// No such checkpoint, I/O errors.
    pub fn revert(&mut self, name: &str) -> Result<()> {
        let target = self.checkpoint(name)?.id.clone();
        self.begin(Pending::Revert {
            target,
            new_id: Uuid::new_v4().to_string(),
            created: now(),
        })
    }

    /// Delete checkpoint `name` without changing what any other checkpoint
    /// or the active disk reads: its data is merged into each child.
    ///
    /// # Errors
    /// No such checkpoint, merge failures, I/O errors.
    pub fn delete(&mut self, name: &str) -> Result<()> {
        let node = self.checkpoint(name)?.id.clone();
        self.begin(Pending::Delete { node })
    }

    /// Collapse the active disk's chain into one disk: each checkpoint on
    /// the way to the root is folded into the active disk (or the active
    /// disk into it, when the active disk is its only child). Checkpoints on
    /// the path are removed; other branches keep reading what they read.
    ///
    /// # Errors
    /// Merge failures, I/O errors.
    pub fn merge(&mut self) -> Result<()> {
        while let Some(parent) = self.active().parent.clone() {
            let child = self.manifest.active.clone();
            let op = if self.children(&parent).len() == 1 {
                Pending::MergeUp { child, parent }
            } else {
                Pending::MergeDown { parent, child }
            };
            self.begin(op)?;
        }
        Ok(())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        let dir = self.dir.display().to_string();
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(
                Error::invalid(format!("invalid checkpoint name {name:?}")).in_file(&dir, 0)
            );
        }
        if self
            .manifest
            .nodes
            .iter()
            .any(|n| n.name.as_deref() == Some(name))
        {
            return Err(
                Error::invalid(format!("a checkpoint named \"{name}\" already exists"))
                    .in_file(&dir, 0),
            );
        }
        Ok(())
    }

    /// Record `op`, then run it.
    fn begin(&mut self, op: Pending) -> Result<()> {
        self.wait_for_spare();
        let _held = self.claim_disks(&op)?;
        self.manifest.pending = Some(op);
        self.save()?;
        self.recover()?;
        self.start_spare();
        Ok(())
    }

    /// Before `op` is recorded: claim the disks it changes, so that a disk
    /// in use (a VM writing the active disk, a reader of a disk about to be
    /// merged or dropped) refuses the operation before anything changes.
    /// A checkpoint holds the active disk shared (it is only read, to be
    /// frozen: no writer may start meanwhile) and a revert holds it
    /// exclusively (it is dropped) until the operation is done; merges,
    /// which open their disks themselves, only check that they are free
    /// (a disk taken in between fails the merge, which the next open
    /// finishes).
    fn claim_disks(&self, op: &Pending) -> Result<Vec<Box<dyn Storage>>> {
        let active = self.disk_path(self.active());
        let opener = &self.opts.opener;
        let claim = |path: &Path, writable: bool| match opener.open(path, writable, LockMode::Auto)
        {
            Ok(s) => Ok(Some(s)),
            // A missing disk is the operation's own error to report.
            Err(e)
                if e.io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        };
        let mut held = Vec::new();
        match op {
            Pending::Create { .. } => held.extend(claim(&active, false)?),
            Pending::Revert { .. } => held.extend(claim(&active, true)?),
            Pending::Delete { node } => {
                claim(&self.path_of(node)?, true)?;
                for c in self.children(node) {
                    claim(&self.disk_path(&c), true)?;
                }
            }
            Pending::MergeUp { child, parent } => {
                claim(&self.path_of(child)?, true)?;
                claim(&self.path_of(parent)?, true)?;
            }
            Pending::MergeDown { parent, child } => {
                claim(&self.path_of(child)?, true)?;
                claim(&self.path_of(parent)?, false)?;
            }
        }
        Ok(held)
    }

    /// Start making a spare child in the background (VHD bundles without
    /// one), over the active disk's parent: a frozen disk, which nothing
    /// writes while the thread reads its footer. Failures are not errors:
    /// the next checkpoint then creates its disk from scratch.
    fn start_spare(&mut self) {
        if self.manifest.format != Format::Vhd || self.spare_maker.is_some() {
            return;
        }
        let spare = self.dir.join(SPARE);
        let Some(parent) = self.active().parent.as_deref().and_then(|p| self.node(p)) else {
            return;
        };
        if spare.exists() {
            return;
        }
        let parent = self.disk_path(parent);
        let opener = self.opts.opener.clone();
        self.spare_maker = Some(std::thread::spawn(move || {
            let _ = make_spare(&spare, &parent, &opener);
        }));
    }

    fn wait_for_spare(&mut self) {
        if let Some(t) = self.spare_maker.take() {
            let _ = t.join();
        }
    }

    /// Create the disk `disk` (a name in the bundle) as a new child of
    /// `parent`, using the spare (VHD) if it fits.
    fn new_child(&self, disk: &str, parent: &Path) -> Result<()> {
        let path = self.dir.join(disk);
        let opener = &self.opts.opener;
        match self.manifest.format {
            Format::Vhd => {
                create_vhd_child_using_spare(&path, parent, &self.dir.join(SPARE), opener)
            }
            Format::Vhdx => create_child(Format::Vhdx, &path, parent, opener),
        }
    }

    /// Finish a pending operation (idempotent steps), then delete garbage.
    fn recover(&mut self) -> Result<()> {
        if let Some(op) = self.manifest.pending.clone() {
            self.run(&op)?;
        }
        if !self.manifest.garbage.is_empty() {
            for f in std::mem::take(&mut self.manifest.garbage) {
                remove_if_present(&self.dir.join(f))?;
            }
            self.save()?;
        }
        Ok(())
    }

    fn path_of(&self, id: &str) -> Result<PathBuf> {
        self.node(id).map(|n| self.disk_path(n)).ok_or_else(|| {
            Error::corrupt(
                "bundle manifest",
                0,
                format!("pending operation names unknown node {id}"),
            )
            .in_file(&self.manifest_path(), 0)
        })
    }

    fn manifest_path(&self) -> String {
        self.dir.join(MANIFEST).display().to_string()
    }

    /// Whether the disk at `child` currently reads from the disk at `parent`.
    fn links_to(&self, child: &Path, parent: &Path) -> Result<bool> {
        let files = chain_files(child, &self.opts)?;
        let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        Ok(files.get(1).is_some_and(|p| same(p, parent)))
    }

    fn run(&mut self, op: &Pending) -> Result<()> {
        let fmt = self.manifest.format;
        match op {
            Pending::Create {
                name,
                new_id,
                created,
            } => {
                let active = self.active().clone();
                let disk = format!("{new_id}.{}", fmt.child_extension());
                self.new_child(&disk, &self.disk_path(&active))?;
                let m = &mut self.manifest;
                if let Some(a) = m.nodes.iter_mut().find(|n| n.id == active.id) {
                    a.name = Some(name.clone());
                    a.created = *created;
                }
                m.nodes.push(Node {
                    id: new_id.clone(),
                    name: None,
                    created: *created,
                    parent: Some(active.id.clone()),
                    disk,
                });
                m.active = new_id.clone();
            }
            Pending::Revert {
                target,
                new_id,
                created,
            } => {
                let disk = format!("{new_id}.{}", fmt.child_extension());
                self.new_child(&disk, &self.path_of(target)?)?;
                let old = self.active().clone();
                let m = &mut self.manifest;
                m.nodes.retain(|n| n.id != old.id);
                m.garbage.push(old.disk);
                m.nodes.push(Node {
                    id: new_id.clone(),
                    name: None,
                    created: *created,
                    parent: Some(target.clone()),
                    disk,
                });
                m.active = new_id.clone();
            }
            Pending::Delete { node } => {
                let path = self.path_of(node)?;
                let gone = self.node(node).cloned().expect("path_of checked it");
                for c in self.children(node) {
                    let cp = self.disk_path(&c);
                    if self.links_to(&cp, &path)? {
                        merge_into_child(&cp, &self.opts, &mut |_| {})?;
                    }
                }
                let m = &mut self.manifest;
                for n in m
                    .nodes
                    .iter_mut()
                    .filter(|n| n.parent.as_deref() == Some(node))
                {
                    n.parent = gone.parent.clone();
                }
                m.nodes.retain(|n| n.id != *node);
                m.garbage.push(gone.disk);
            }
            Pending::MergeUp { child, parent } => {
                let cp = self.path_of(child)?;
                let pp = self.path_of(parent)?;
                if cp.exists() && self.links_to(&cp, &pp)? {
                    merge_into_ancestor(&cp, 1, &self.opts, &mut |_| {})?;
                }
                let gone = self.node(child).cloned().expect("path_of checked it");
                let m = &mut self.manifest;
                m.nodes.retain(|n| n.id != *child);
                if let Some(p) = m.nodes.iter_mut().find(|n| n.id == *parent) {
                    p.name = None;
                    p.created = gone.created;
                }
                m.active = parent.clone();
                m.garbage.push(gone.disk);
            }
            Pending::MergeDown { parent, child } => {
                let cp = self.path_of(child)?;
                let pp = self.path_of(parent)?;
                if self.links_to(&cp, &pp)? {
                    merge_into_child(&cp, &self.opts, &mut |_| {})?;
                }
                let grand = self.node(parent).and_then(|p| p.parent.clone());
                if let Some(c) = self.manifest.nodes.iter_mut().find(|n| n.id == *child) {
                    c.parent = grand;
                }
            }
        }
        self.manifest.pending = None;
        self.save()
    }

    /// Replace the manifest atomically.
    fn save(&mut self) -> Result<()> {
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
        let name = tmp.display().to_string();
        let mut text = serde_json::to_string_pretty(&self.manifest)
            .map_err(|e| Error::invalid(format!("cannot encode the manifest: {e}")))?;
        text.push('\n');
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| Error::io("cannot create", e).in_file(&name, 0))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io("cannot write", e).in_file(&name, 0))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io("cannot rename into place", e).in_file(&name, 0))?;
        sync_dir(&self.dir)
    }
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
    if m.nodes.iter().filter(|n| n.name.is_none()).count() != 1 {
        return Err("exactly one node (the active one) must be unnamed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_398_245), "2026-11-23T01:44:05Z");
    }
}
