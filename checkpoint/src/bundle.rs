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

use crate::disks::{create_child, detect, Format};
use crate::manifest::{
    self, format_utc, now, Manifest, Node, Pending, MANIFEST, MANIFEST_VERSION, SPARE,
};
use crate::ops::remove_if_present;
use crate::{Error, Result};
use disk::lock::DirLock;
use disk::Opener;
use image::chain::chain_files;
use image::OpenOptions;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

/// The directory of a bundle holding VM checkpoints' state files.
pub const VM_STATE_DIR: &str = "vm";

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
    /// Whether the checkpoint carries a VM's state (memory, vCPUs,
    /// devices: `vm/ID.state`, taken by `vmm`), not its disk alone.
    pub vm_state: bool,
}

/// An open bundle.
#[derive(Debug)]
pub struct Bundle {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
    /// How the bundle's disks are opened (format, parent policy, opener).
    pub(crate) opts: OpenOptions,
    /// The thread making the spare, if one is running.
    pub(crate) spare_maker: Option<std::thread::JoinHandle<()>>,
    /// The bundle directory, held for the life of this value.
    _lock: DirLock,
}

impl Drop for Bundle {
    fn drop(&mut self) {
        self.wait_for_spare();
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
        let manifest = manifest::read(&dir.join(MANIFEST))?;
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

    pub(crate) fn node(&self, id: &str) -> Option<&Node> {
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

    pub(crate) fn children(&self, id: &str) -> Vec<Node> {
        self.manifest
            .nodes
            .iter()
            .filter(|n| n.parent.as_deref() == Some(id))
            .cloned()
            .collect()
    }

    /// The VM state and memory files of node `id` (a checkpoint taken by a
    /// running VM: see `vmm`), in [`VM_STATE_DIR`].
    pub fn vm_state_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join(VM_STATE_DIR);
        (d.join(format!("{id}.state")), d.join(format!("{id}.mem")))
    }

    /// Remove the VM state files that belong to no checkpoint any more (its
    /// node deleted or merged away, or no longer a named checkpoint).
    pub(crate) fn prune_vm_state(&self) -> Result<()> {
        let dir = self.dir.join(VM_STATE_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let path = e.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.strip_suffix(".state").or(Some(s)))
                .unwrap_or_default()
                .to_string();
            let kept = self
                .node(&id)
                .is_some_and(|n| n.name.is_some() && n.id != self.manifest.active);
            if !kept {
                remove_if_present(&path)?;
            }
        }
        Ok(())
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
                vm_state: self.vm_state_paths(&n.id).0.exists(),
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
}
