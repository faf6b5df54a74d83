//! Running a bundle's operations (see "Atomicity" in the module docs of
//! `bundle`): an operation is recorded in the manifest, its disks claimed,
//! its idempotent steps run (again, at the next open, if interrupted), then
//! committed; and the spare child of a VHD bundle made in the background.

use crate::disks::{create_child, create_vhd_child_using_spare, make_spare, Format};
use crate::manifest::{self, Node, Pending, MANIFEST, SPARE};
use crate::merge::{merge_into_ancestor, merge_into_child};
use crate::{Bundle, Error, Result};
use disk::{LockMode, Storage};
use image::chain::chain_files;
use std::path::{Path, PathBuf};

impl Bundle {
    /// Record `op`, then run it.
    pub(crate) fn begin(&mut self, op: Pending) -> Result<()> {
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
    pub(crate) fn claim_disks(&self, op: &Pending) -> Result<Vec<Box<dyn Storage>>> {
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
    pub(crate) fn start_spare(&mut self) {
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

    pub(crate) fn wait_for_spare(&mut self) {
        if let Some(t) = self.spare_maker.take() {
            let _ = t.join();
        }
    }

    /// Create the disk `disk` (a name in the bundle) as a new child of
    /// `parent`, using the spare (VHD) if it fits.
    pub(crate) fn new_child(&self, disk: &str, parent: &Path) -> Result<()> {
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
    pub(crate) fn recover(&mut self) -> Result<()> {
        if let Some(op) = self.manifest.pending.clone() {
            self.run(&op)?;
        }
        if !self.manifest.garbage.is_empty() {
            for f in std::mem::take(&mut self.manifest.garbage) {
                remove_if_present(&self.dir.join(f))?;
            }
            self.save()?;
        }
        self.prune_vm_state()
    }

    pub(crate) fn path_of(&self, id: &str) -> Result<PathBuf> {
        self.node(id).map(|n| self.disk_path(n)).ok_or_else(|| {
            Error::corrupt(
                "bundle manifest",
                0,
                format!("pending operation names unknown node {id}"),
            )
            .in_file(&self.manifest_path(), 0)
        })
    }

    pub(crate) fn manifest_path(&self) -> String {
        self.dir.join(MANIFEST).display().to_string()
    }

    /// Whether the disk at `child` currently reads from the disk at `parent`.
    pub(crate) fn links_to(&self, child: &Path, parent: &Path) -> Result<bool> {
        let files = chain_files(child, &self.opts)?;
        let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        Ok(files.get(1).is_some_and(|p| same(p, parent)))
    }

    pub(crate) fn run(&mut self, op: &Pending) -> Result<()> {
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
    pub(crate) fn save(&mut self) -> Result<()> {
        manifest::write(&self.dir, &self.manifest)
    }
}

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot delete", e).in_file(&path.display().to_string(), 0)),
    }
}
