//! `vdisk checkpoint`: a checkpoint tree in a directory (a disk bundle).

use crate::cli::{
    CheckpointArgs, CheckpointCommand, CheckpointInitArgs, CheckpointListArgs, OutputFormat,
};
use crate::open::Format;
use crate::size::{human, image_size};
use anyhow::{bail, Context, Result};
use checkpoint::{Bundle, NodeInfo};
use std::path::Path;

pub fn run(args: &CheckpointArgs) -> Result<()> {
    match &args.command {
        CheckpointCommand::Init(a) => init(a),
        CheckpointCommand::Create(a) => {
            let mut b = match open(&a.bundle) {
                Ok(b) => b,
                Err(e) if is_locked(&e) => return via_vmm(&a.bundle, &a.name, e),
                Err(e) => return Err(e),
            };
            b.create(&a.name)?;
            crate::outln!(
                "Created checkpoint '{}' in '{}'; active disk: {}",
                a.name,
                a.bundle.display(),
                b.active_path().display()
            )?;
            Ok(())
        }
        CheckpointCommand::List(a) => list(a),
        CheckpointCommand::Revert(a) => {
            let mut b = open(&a.bundle)?;
            b.revert(&a.name)?;
            crate::outln!(
                "Reverted '{}' to checkpoint '{}' (later changes dropped); active disk: {}",
                a.bundle.display(),
                a.name,
                b.active_path().display()
            )?;
            Ok(())
        }
        CheckpointCommand::Delete(a) => {
            let mut b = open(&a.bundle)?;
            b.delete(&a.name)?;
            crate::outln!(
                "Deleted checkpoint '{}' from '{}'",
                a.name,
                a.bundle.display()
            )?;
            Ok(())
        }
        CheckpointCommand::Merge(a) => {
            let mut b = open(&a.bundle)?;
            b.merge()?;
            crate::outln!(
                "Merged '{}' into one disk: {}",
                a.bundle.display(),
                b.active_path().display()
            )?;
            Ok(())
        }
        CheckpointCommand::Changes(a) => {
            let b = open(&a.bundle)?;
            super::changes::run_bundle(&b, &a.from, a.to.as_deref(), &a.opts)
        }
        CheckpointCommand::Path(a) => {
            let b = open(&a.bundle)?;
            crate::outln!("{}", b.active_path().display())?;
            Ok(())
        }
    }
}

fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<disk::Error>()
            .is_some_and(|d| d.kind() == disk::ErrorKind::Locked)
    })
}

/// The bundle is held: if a vmm running it recorded its API socket, ask it
/// to take the checkpoint (with the VM's state); otherwise the lock error.
fn via_vmm(dir: &Path, name: &str, locked: anyhow::Error) -> Result<()> {
    let Some(socket) = tools::vmm_api::recorded(dir) else {
        return Err(locked);
    };
    let reply = tools::vmm_api::call(
        &socket,
        &serde_json::json!({"cmd": "checkpoint", "name": name}),
    )
    .with_context(|| {
        format!(
            "{}: held by a vmm whose API is {}",
            dir.display(),
            socket.display()
        )
    })?;
    if reply["ok"] != true {
        bail!(
            "{}: the vmm running it refused the checkpoint: {}",
            dir.display(),
            reply["error"].as_str().unwrap_or("(no reason)")
        );
    }
    crate::outln!(
        "Created checkpoint '{name}' in '{}' through the vmm running it (API {}): the VM's \
         state and its disk",
        dir.display(),
        socket.display()
    )?;
    Ok(())
}

/// Open the bundle in `dir` (finishing an interrupted operation).
fn open(dir: &Path) -> Result<Bundle> {
    if !dir.is_dir() {
        bail!(
            "{}: not a bundle directory (create one with vdisk checkpoint init)",
            dir.display()
        );
    }
    Ok(Bundle::open(dir)?)
}

fn init(a: &CheckpointInitArgs) -> Result<()> {
    let b = match (&a.from, &a.size) {
        (Some(image), _) => Bundle::init_from(&a.bundle, image)?,
        (None, Some(size)) => {
            let size = image_size("SIZE", size, 512)?;
            let format = match a.format.unwrap_or(Format::Vhdx) {
                Format::Vhdx => checkpoint::Format::Vhdx,
                Format::Vhd => checkpoint::Format::Vhd,
                Format::Raw => bail!(
                    "{}: a bundle's disks are vhdx or vhd, not raw",
                    a.bundle.display()
                ),
            };
            Bundle::init(&a.bundle, format, size)?
        }
        (None, None) => bail!("the virtual size (SIZE) is required unless --from IMAGE is given"),
    };
    let base = b
        .list()?
        .into_iter()
        .find(|n| n.depth == 0)
        .map(|n| b.disk_path(&n.node));
    crate::outln!(
        "Created bundle '{}' ({}){}; active disk: {}",
        a.bundle.display(),
        match b.manifest().format {
            checkpoint::Format::Vhdx => "vhdx",
            checkpoint::Format::Vhd => "vhd",
        },
        base.map(|p| format!(", base {}", p.display()))
            .unwrap_or_default(),
        b.active_path().display()
    )?;
    Ok(())
}

fn list(a: &CheckpointListArgs) -> Result<()> {
    let b = open(&a.bundle)?;
    let nodes = b.list()?;
    match a.output {
        OutputFormat::Json => crate::outln!("{}", serde_json::to_string_pretty(&nodes)?)?,
        OutputFormat::Human => super::print_out(&tree(&nodes))?,
    }
    Ok(())
}

/// The tree for people: one line per node, indented by depth, the active
/// disk marked with `*`, a checkpoint with a VM's state with `[vm]`, then
/// aligned columns: creation time, file size, disk file.
fn tree(nodes: &[NodeInfo]) -> String {
    let label = |n: &NodeInfo| {
        let name = match (&n.node.name, n.active) {
            (_, true) => "* (active)".to_string(),
            (Some(name), false) if n.vm_state => format!("{name} [vm]"),
            (Some(name), false) => name.clone(),
            (None, false) => "(unnamed)".to_string(),
        };
        format!("{}{name}", "  ".repeat(n.depth))
    };
    let labels: Vec<String> = nodes.iter().map(label).collect();
    let sizes: Vec<String> = nodes.iter().map(|n| human(n.file_size)).collect();
    let lw = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let sw = sizes.iter().map(String::len).max().unwrap_or(0);
    let mut s = String::new();
    for ((n, l), size) in nodes.iter().zip(&labels).zip(&sizes) {
        let pad = lw - l.chars().count();
        s.push_str(&format!(
            "{l}{}  {}  {size:>sw$}  {}\n",
            " ".repeat(pad),
            n.created_utc,
            n.node.disk
        ));
    }
    s
}
