//! `vdisk`: inspect, create, convert and compare disk images, shaped like qemu-img.

mod cli;
mod commands;
mod hints;
mod open;
mod options;
mod progress;
use tools::size;

use clap::Parser;
use cli::{Cli, Command, ShareArgs};
use disk::ParentPolicy;
use hints::{linkage_hint, policy_hint};
use std::process::ExitCode;

/// Exit status on error (every command but `compare`).
const EXIT_ERROR: u8 = 1;
/// Exit status of `compare` on error.
const EXIT_COMPARE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS; // --help, --version
            }
            let compare = subcommand_name().as_deref() == Some("compare");
            return ExitCode::from(if compare {
                EXIT_COMPARE_ERROR
            } else {
                EXIT_ERROR
            });
        }
    };
    open::set_policy(ParentPolicy {
        allowed_dirs: cli.parent_dir.clone(),
        allow_any: cli.allow_any_parent,
        ..ParentPolicy::default()
    });
    let (read_only, share) = sharing(&cli.command);
    let _ = READ_ONLY.set(read_only && !share.force_share);
    if let Err(e) = set_read_lock(&cli.command) {
        report(&e);
        return ExitCode::from(EXIT_ERROR);
    }
    let result = match &cli.command {
        Command::Info(a) => commands::info::run(a),
        Command::Create(a) => commands::create::run(a),
        Command::Read(a) => commands::rw::read(a),
        Command::Write(a) => commands::rw::write(a),
        Command::Resize(a) => commands::resize::run(a),
        Command::Compact(a) => commands::compact::run(a),
        Command::Merge(a) => commands::chain::merge(a),
        Command::Rebase(a) => commands::chain::rebase(a),
        Command::Checkpoint(a) => commands::checkpoint::run(a),
        Command::Changes(a) => commands::changes::run(a),
        Command::Mount(a) => commands::mount::mount(a),
        Command::Unmount(a) => commands::mount::unmount(a),
        Command::Map(a) => commands::map::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Completions(a) => commands::completions::completions(a),
        Command::Man(a) => commands::completions::man(a),
        Command::Convert(a) => {
            return match commands::convert::run(a) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    report(&e);
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Check(a) => {
            return match commands::check::run(a) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    report(&e);
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Compare(a) => {
            return match commands::compare::run(a) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    report(&e);
                    ExitCode::from(EXIT_COMPARE_ERROR)
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Whether `command` only reads images, and its `-U`.
fn sharing(command: &Command) -> (bool, ShareArgs) {
    match command {
        Command::Info(a) => (true, a.share),
        Command::Convert(a) => (true, a.share),
        Command::Compare(a) => (true, a.share),
        Command::Check(a) => (a.repair.is_none(), a.share),
        Command::Map(a) => (true, a.share),
        Command::Changes(a) => (true, a.share),
        Command::Read(a) => (true, a.share),
        Command::Mount(a) => (!a.rw, a.share),
        Command::Serve(a) => (!a.rw, a.share),
        _ => (false, ShareArgs::default()),
    }
}

/// How this run's read-only opens claim their images: `-U` makes them
/// force-share; refused where the command writes the image.
fn set_read_lock(command: &Command) -> anyhow::Result<()> {
    let (read_only, share) = sharing(command);
    if share.force_share {
        if !read_only {
            anyhow::bail!(
                "-U (--force-share) is only for read-only use: a writer must hold the image \
                 alone (drop -U, or drop -r / --rw)"
            );
        }
        open::set_read_lock(disk::LockMode::ForceShare);
    }
    Ok(())
}

/// Exit status when stdout is a closed pipe (128 + SIGPIPE, as a shell
/// reports a process killed by it).
const EXIT_BROKEN_PIPE: i32 = 141;

/// Whether `e` comes from writing to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .or_else(|| c.downcast_ref::<disk::Error>().and_then(|d| d.io_error()))
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Print an error on stderr, with a hint when the parent policy refused a parent.
fn report(e: &anyhow::Error) {
    if is_broken_pipe(e) {
        // The reader of our stdout went away (`vdisk map x | head`): stop
        // quietly, with the status a process killed by SIGPIPE has.
        std::process::exit(EXIT_BROKEN_PIPE);
    }
    eprintln!("vdisk: {e:#}");
    policy_hint(&format!("{e:#}"));
    open::damaged_hint(e);
    linkage_hint(&format!("{e:#}"));
    let locked = e.chain().any(|c| {
        c.downcast_ref::<disk::Error>()
            .is_some_and(|d| d.kind() == disk::ErrorKind::Locked)
    });
    if locked && READ_ONLY.get() == Some(&true) {
        eprintln!(
            "vdisk: hint: -U (--force-share) reads an image while another process writes it \
             (what is read may be inconsistent)"
        );
    }
}

/// Whether this run's command only reads images without -U (set by `main`):
/// a lock refusal then comes with the -U hint.
static READ_ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The subcommand named on the command line (the first argument that is
/// neither an option nor the value of --parent-dir).
fn subcommand_name() -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--parent-dir" {
            args.next();
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}
