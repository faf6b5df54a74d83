//! Taking a VM checkpoint of a running machine, once its vCPUs are paused
//! ([`crate::Controller::checkpoint`] pauses and resumes them).
//!
//! Order: the vCPUs' state (each vCPU thread reads its own at the gate),
//! then every device's lock taken and its queues drained (every request the
//! guest made available is served, so that nothing is in flight), the
//! devices', UART's and interrupt controllers' state, guest memory and the
//! state file (`vm/ID.state`, written last and atomically: a checkpoint
//! without it has no VM state); then the disk: the active disk flushed,
//! closed and let go of, the bundle's checkpoint `name` taken (the active
//! disk frozen as it, a new child made active), the child opened and given
//! to the device. If the bundle refuses, the old active disk is opened
//! again and the state files removed: the guest goes on as if nothing had
//! happened.

use super::{capture_vm, memory, Checkpoint, DiskConf, MachineConf};
use crate::bus::Bus;
use crate::control::Controller;
use crate::memory::Ram;
use crate::virtio::blk::Blk;
use crate::virtio::mmio::Transport;
use disk::VirtualDisk;
use kvm_ioctls::VmFd;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

/// What a VM checkpoint did.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    /// The checkpoint's name.
    pub name: String,
    /// The bundle node that holds its disk (and names its state files).
    pub node: String,
    /// Bytes of guest memory written (the pieces that are not all zero).
    pub memory_bytes: u64,
    /// From the vCPUs paused to the new disk served.
    pub pause: Duration,
    /// The whole operation.
    pub elapsed: Duration,
}

/// The running machine, as a checkpoint needs it.
pub(crate) struct Machine<'a> {
    pub ctl: &'a Controller,
    pub bundle: &'a mut checkpoint::Bundle,
    pub bus: &'a Arc<Bus>,
    pub vm: &'a Arc<VmFd>,
    pub ram: &'a Arc<Ram>,
    pub linux: bool,
    pub mem: u64,
    pub vcpus: usize,
    pub transports: &'a [Arc<Transport<Blk>>],
    pub disks: Vec<DiskConf>,
    pub name: &'a str,
}

/// Open the bundle's active disk for the device.
fn open_active(bundle: &checkpoint::Bundle) -> Result<Arc<dyn VirtualDisk>, String> {
    let opts = image::OpenOptions {
        format: Some(bundle.manifest().format.image()),
        writable: true,
        ..image::OpenOptions::probing()
    };
    image::open(bundle.active_path(), &opts)
        .map(|img| img.disk().clone())
        .map_err(|e| e.to_string())
}

/// Take the checkpoint (the vCPUs are paused).
pub(crate) fn take(m: &mut Machine<'_>) -> Result<CheckpointReport, String> {
    let paused_at = Instant::now();
    if m.bundle.checkpoint(m.name).is_ok() {
        return Err(format!(
            "{}: a checkpoint called \"{}\" exists",
            m.bundle.dir().display(),
            m.name
        ));
    }
    let vcpus = m.ctl.capture_vcpus(m.vcpus)?;
    let mut devices = m.transports.iter().map(|t| t.lock()).collect::<Vec<_>>();
    for (i, d) in devices.iter_mut().enumerate() {
        if !d.drain(m.ram) {
            return Err(format!(
                "disk {i}'s queue is corrupt (the device needs a reset): no checkpoint"
            ));
        }
    }
    let device_states = devices.iter().map(|d| d.save()).collect();
    let uart = m
        .bus
        .uart
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .state();
    let vm = if m.linux {
        Some(capture_vm(m.vm)?)
    } else {
        None
    };
    let node = m.bundle.active().id.clone();
    let (state_path, mem_path) = m.bundle.vm_state_paths(&node);
    if let Some(dir) = state_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let remove = || {
        let _ = std::fs::remove_file(&state_path);
        let _ = std::fs::remove_file(&mem_path);
    };
    let memory_bytes = memory::save(m.ram, m.mem, &mem_path).inspect_err(|_| remove())?;
    let ckpt = Checkpoint {
        conf: MachineConf {
            mem: m.mem,
            vcpus: m.vcpus,
            linux: m.linux,
            disks: std::mem::take(&mut m.disks),
        },
        vcpus,
        devices: device_states,
        uart,
        vm,
        memory: mem_path.clone(),
    };
    ckpt.to_file()
        .write(&state_path)
        .inspect_err(|_| remove())?;

    // The disk: let go of the active disk, take the bundle's checkpoint,
    // serve the new active child.
    let detached: Arc<dyn VirtualDisk> = Arc::new(
        disk::RawDisk::new(disk::MemStorage::new("(detached)")).map_err(|e| e.to_string())?,
    );
    let blk = devices[0].device_mut();
    let old = blk.replace_disk(detached);
    let closed = old.flush().and_then(|()| old.close());
    if let Err(e) = closed {
        blk.set_disk(old);
        remove();
        return Err(format!("flushing the active disk: {e}"));
    }
    if Arc::strong_count(&old) != 1 {
        blk.set_disk(old);
        remove();
        return Err("the active disk is held elsewhere in this process: no checkpoint".into());
    }
    drop(old);
    if let Err(e) = m.bundle.create(m.name) {
        remove();
        // The active disk is what it was: serve it again.
        let back = open_active(m.bundle).map_err(|o| {
            format!("{e}; and the active disk cannot be opened again: {o} (the guest's disk 0 is detached)")
        })?;
        blk.set_disk(back);
        return Err(e.to_string());
    }
    let new = open_active(m.bundle).map_err(|e| {
        format!(
            "checkpoint \"{}\" taken, but its new active disk cannot be opened: {e} (the \
             guest's disk 0 is detached)",
            m.name
        )
    })?;
    blk.set_disk(new);
    drop(devices);
    Ok(CheckpointReport {
        name: m.name.to_string(),
        node,
        memory_bytes,
        pause: paused_at.elapsed(),
        elapsed: Duration::ZERO,
    })
}
