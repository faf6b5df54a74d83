//! `vdisk`: inspect, create, convert and compare disk images, shaped like qemu-img.

mod commands;
mod open;
mod options;
mod progress;
mod size;

use clap::{Args, Parser, Subcommand, ValueEnum};
use open::Format;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "vdisk",
    version,
    about = "Inspect, create, convert and compare VHDX, VHD and raw disk images",
    after_help = "Examples:\n  \
        vdisk create -f vhdx disk.vhdx 64G\n  \
        vdisk info disk.vhdx\n  \
        vdisk convert -p -O vhdx disk.raw disk.vhdx\n  \
        vdisk convert -O vhd -o subformat=fixed disk.vhdx disk.vhd\n  \
        vdisk compare disk.raw disk.vhdx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the format, sizes, allocation and metadata of an image
    #[command(after_help = "Examples:\n  \
        vdisk info disk.vhdx\n  \
        vdisk info --output json disk.vhdx\n  \
        vdisk info -f vpc disk.vhd\n\n\
        The format is detected from the content when -f is absent (a fixed VHD by its \
        trailing footer).")]
    Info(InfoArgs),
    /// Create a new image (an existing file is overwritten, like qemu-img)
    #[command(after_help = "Examples:\n  \
        vdisk create -f vhdx disk.vhdx 64G\n  \
        vdisk create -f vhdx -o subformat=fixed,block_size=1M disk.vhdx 10G\n  \
        vdisk create -f vhd -o subformat=fixed disk.vhd 10G\n  \
        vdisk create -f vhd -o azure=on azure.vhd 30G\n  \
        vdisk create -f raw disk.raw 1G\n  \
        vdisk create -f vhd -b base.vhd child.vhd\n\n\
        VHDX options (-o): subformat=fixed|dynamic, block_size=SIZE (1M..256M, power of two), \
        logical_sector_size=512|4096, physical_sector_size=512|4096, log_size=SIZE (multiple of 1M)\n\
        VHD options (-o, format vhd or vpc): subformat=fixed|dynamic, block_size=SIZE (dynamic only; \
        4K..256M, power of two, default 2M), azure=on|off (a fixed VHD of exactly SIZE, a whole \
        number of MiB, as Azure requires). Without azure=on, a VHD's size is rounded up to a whole \
        CHS geometry, like qemu-img does.\n\
        With -b PARENT (VHD only), a differencing VHD is created: it starts empty, reads \
        what it does not hold from PARENT (found again by a relative and an absolute path, \
        or by file name beside the child), and takes PARENT's virtual size; block_size may \
        be given.")]
    Create(CreateArgs),
    /// Copy an image into a new image, possibly of another format
    #[command(after_help = "Examples:\n  \
        vdisk convert -O vhdx disk.raw disk.vhdx\n  \
        vdisk convert -p -f vhdx -O raw disk.vhdx disk.raw\n  \
        vdisk convert -O vhdx -o block_size=1M disk.raw small-blocks.vhdx\n  \
        vdisk convert -O vpc -o azure=on disk.raw azure.vhd\n\n\
        Zero ranges of the source are not allocated in the target.")]
    Convert(ConvertArgs),
    /// Check whether two images have the same virtual contents
    #[command(after_help = "Examples:\n  \
        vdisk compare disk.raw disk.vhdx\n  \
        vdisk compare -f raw -F vhdx disk.raw disk.vhdx\n  \
        vdisk compare disk.vhd disk.vhdx\n\n\
        Exit status: 0 identical, 1 different, 2 error.")]
    Compare(CompareArgs),
    /// Copy virtual bytes of an image to stdout
    #[command(after_help = "Examples:\n  \
        vdisk read disk.vhdx 0 512 > mbr.bin\n  \
        vdisk read disk.vhdx 1M 4K | hexdump -C\n  \
        vdisk read -f vhd disk.vhd 0 512 > mbr.bin")]
    Read(ReadArgs),
    /// Write bytes from a file or stdin into an image
    #[command(after_help = "Examples:\n  \
        vdisk write disk.vhdx 0 mbr.bin\n  \
        printf hello | vdisk write disk.vhdx 1M\n  \
        vdisk write disk.vhd 0 mbr.bin")]
    Write(WriteArgs),
}

/// How `info` prints.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OutputFormat {
    /// Lines for people.
    Human,
    /// One JSON object with stable snake_case keys.
    Json,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = Format::parse_arg)]
    format: Option<Format>,
    /// The image
    image: PathBuf,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Image format: vhdx, vhd (alias vpc) or raw
    #[arg(short = 'f', long = "format", value_parser = Format::parse_arg, default_value = "raw")]
    format: Format,
    /// Format options, comma-separated key=value (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Parent image: create a differencing image over it (VHD only; the
    /// parent is opened read-only and never modified)
    #[arg(short = 'b', long = "backing", value_name = "PARENT")]
    backing: Option<PathBuf>,
    /// Format of the parent image (vhd or vpc; detected when absent)
    #[arg(short = 'F', long = "backing-format", value_parser = Format::parse_arg)]
    backing_format: Option<Format>,
    /// The image to create
    image: PathBuf,
    /// Virtual size, in bytes or with a K, M, G or T suffix (with -b:
    /// optional, and if given must be the parent's)
    size: Option<String>,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// Source format (detected from the content when absent)
    #[arg(short = 'f', value_parser = Format::parse_arg)]
    format: Option<Format>,
    /// Target format: raw, vhdx or vhd (alias vpc)
    #[arg(short = 'O', value_parser = Format::parse_arg, default_value = "raw")]
    output_format: Format,
    /// Target format options, comma-separated key=value (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Show a progress bar on stderr
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// The source image
    source: PathBuf,
    /// The target image (overwritten if it exists)
    target: PathBuf,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Format of the first image (detected when absent)
    #[arg(short = 'f', value_parser = Format::parse_arg)]
    format_a: Option<Format>,
    /// Format of the second image (detected when absent)
    #[arg(short = 'F', value_parser = Format::parse_arg)]
    format_b: Option<Format>,
    /// Show a progress bar on stderr
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// The first image
    image_a: PathBuf,
    /// The second image
    image_b: PathBuf,
}

#[derive(Args, Debug)]
struct ReadArgs {
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = Format::parse_arg)]
    format: Option<Format>,
    /// The image
    image: PathBuf,
    /// Virtual offset, in bytes or with a K, M, G or T suffix
    offset: String,
    /// Number of bytes, in bytes or with a K, M, G or T suffix
    length: String,
}

#[derive(Args, Debug)]
struct WriteArgs {
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = Format::parse_arg)]
    format: Option<Format>,
    /// The image
    image: PathBuf,
    /// Virtual offset, in bytes or with a K, M, G or T suffix
    offset: String,
    /// File with the bytes to write (stdin when absent)
    file: Option<PathBuf>,
}

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
            let compare = std::env::args().nth(1).as_deref() == Some("compare");
            return ExitCode::from(if compare {
                EXIT_COMPARE_ERROR
            } else {
                EXIT_ERROR
            });
        }
    };
    let result = match &cli.command {
        Command::Info(a) => commands::info::run(a),
        Command::Create(a) => commands::create::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Read(a) => commands::rw::read(a),
        Command::Write(a) => commands::rw::write(a),
        Command::Compare(a) => {
            return match commands::compare::run(a) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("vdisk: {e:#}");
                    ExitCode::from(EXIT_COMPARE_ERROR)
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdisk: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
