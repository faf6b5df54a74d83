//! `vdisk completions SHELL` and `vdisk man`: shell completion scripts and
//! roff manual pages, generated from the command-line definitions (so they
//! never disagree with `--help`).

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use anyhow::{Context, Result};
use clap::CommandFactory;

/// Print the completion script for a shell.
pub fn completions(args: &CompletionsArgs) -> Result<()> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "vdisk", &mut buf);
    super::print_bytes(&buf)
}

/// Print the manual page of `vdisk` (all subcommands listed), or with
/// `--dir`, write one page per command and subcommand there
/// (`vdisk.1`, `vdisk-info.1`, ...) and print their names.
pub fn man(args: &ManArgs) -> Result<()> {
    let cmd = Cli::command();
    match &args.dir {
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf)?;
            super::print_bytes(&buf)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vdisk") && n.ends_with(".1"))
                .collect();
            names.sort();
            let list: String = names
                .iter()
                .map(|n| format!("{}\n", dir.join(n).display()))
                .collect();
            super::print_out(&list)
        }
    }
}
