//! The command line: clap's argument structs, one per subcommand, with the
//! help text each command prints (`after_help` holds what `--help` says
//! beyond the options; README.md's command-line section says the same).

use crate::open::{self, Format};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

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
        vdisk compare disk.raw disk.vhdx\n  \
        vdisk create -b base.vhdx child.avhdx\n  \
        vdisk info --backing-chain child.avhdx\n  \
        vdisk --parent-dir /vms/base read child.avhdx 0 512\n  \
        vdisk merge child.avhdx\n  \
        vdisk checkpoint create vm before-upgrade\n\n\
        Parents of differencing disks (VHDX and VHD): the paths come from the image file, so \
        by default a parent must lie under the directory of the image opened (the top of the \
        chain). --parent-dir DIR (repeatable) allows parents under DIR too; \
        --allow-any-parent follows any path an image names (only for images you trust). \
        A parent whose identity no longer matches the child's record is refused, with a \
        hint naming the `vdisk rebase -u` command that relinks it (see vdisk rebase --help).\n\n\
        Formats: without -f, an image's format is detected from its content (VHDX: \
        \"vhdxfile\" at 0; VHD: \"conectix\" at 0 or in the last 512 bytes; else raw). A file \
        named .vhdx, .avhdx, .vhd or .avhd without that signature is refused as corrupt (the \
        message lists what survives; -f raw reads it as raw anyway), and an image taken for \
        raw without -f raw refuses writes to its first sector (bytes 0 to 511) and writes \
        that would make it detect as a fixed VHD, so a guess can never destroy an image. \
        New images (create, convert) take the format of their name's extension when -f/-O \
        is absent.\n\n\
        Progress (-p, on stderr): on a terminal a bar; otherwise (a pipe, a log) lines like \
        qemu-img's, \"    (12.34/100%) 96.0 MiB written, 120.5 MiB/s\", at most one per whole \
        percent, the last \"    (100.00/100%) ... in T s, R/s\". The percentage is of the work \
        scanned; the amount and the rate are of the bytes actually moved: convert the bytes \
        written into the target (zero ranges are skipped), compare the bytes read and \
        compared (ranges both images map as zeros are skipped), merge and rebase the bytes \
        copied into the image, compact the bytes of the blocks moved.\n\n\
        Image locks: every open claims the image as QEMU's tools do (qemu-img, qemu-io, \
        qemu-nbd and vdisk refuse each other as they refuse themselves): a writer holds it \
        alone, readers share it, and a differencing disk's parents are held shared. A refusal \
        names the file and the process holding it. Read-only commands take -U \
        (--force-share) to read an image another process is writing."
)]
pub(crate) struct Cli {
    /// A directory, besides the opened image's own, where parents of
    /// differencing disks may lie (repeatable)
    #[arg(long = "parent-dir", value_name = "DIR", global = true)]
    pub(crate) parent_dir: Vec<PathBuf>,
    /// Follow any parent path a differencing image names (trusted images only)
    #[arg(long = "allow-any-parent", global = true)]
    pub(crate) allow_any_parent: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Show the format, sizes, allocation and metadata of an image
    #[command(after_help = "Examples:\n  \
        vdisk info disk.vhdx\n  \
        vdisk info --output json disk.vhdx\n  \
        vdisk info -f vpc disk.vhd\n  \
        vdisk info --backing-chain child.avhdx\n  \
        vdisk info --backing-chain --output json child.vhd\n\n\
        The format is detected from the content when -f is absent (a fixed VHD by its \
        trailing footer); a file named .vhdx, .avhdx, .vhd or .avhd that lacks the signature \
        is refused as corrupt, with what survives of it (valid headers, region tables, \
        footers) and how to go on. A differencing disk shows its parent locator entries (key=value) and \
        the parent file opened; --backing-chain shows every layer of the chain, the image \
        first (JSON: an array).\n\
        File size is the file's length (ls -l); disk size is the space it takes on the host \
        (du): less where the file is sparse. Allocated bytes are the virtual bytes the image \
        holds data for.\n\
        A truncated image (VHDX or VHD blocks that run past the end of the file) gets the \
        warning \"image is truncated: N blocks lie past the end of the file\" (JSON: \
        truncated-blocks, null for raw images; a VHDX whose file ends inside its BAT also \
        warns so, and lost-bat-entries counts the entries lost). Reading its lost data fails, \
        naming the block; see vdisk check and vdisk convert --salvage.\n\
        JSON keys (kebab-case, qemu-img's names where it has the same thing; null where a \
        field does not apply): filename, format, subformat, virtual-size, cluster-size (the \
        block size), logical-sector-size, physical-sector-size, file-size, actual-size (the \
        disk size), allocated-bytes (null when the parent is not opened), log (VHDX: clean \
        or dirty), log-entries, creator, virtual-disk-id, data-write-guid (VHDX), parent (the \
        parent locator entries as key: value), backing-filename (the parent's path as the \
        image records it), full-backing-filename (the parent file opened), truncated-blocks, \
        lost-bat-entries, vhd (VHD only: disk-type, creator-application, creator-version, \
        creator-host-os, timestamp, original-size, current-size, geometry, unique-id, \
        saved-state, footer, allocated-blocks, max-table-entries, parent-name, \
        parent-unique-id, parent-locators, parent-file, warnings).")]
    Info(InfoArgs),
    /// Create a new image (an existing file is overwritten, like qemu-img)
    #[command(after_help = "Examples:\n  \
        vdisk create -f vhdx disk.vhdx 64G\n  \
        vdisk create -f vhdx -o subformat=fixed,block_size=1M disk.vhdx 10G\n  \
        vdisk create -f vhd -o subformat=fixed disk.vhd 10G\n  \
        vdisk create -f vhd -o azure=on azure.vhd 30G\n  \
        vdisk create -f raw disk.raw 1G\n  \
        vdisk create disk.vhdx 64G                  # vhdx, from the name\n  \
        vdisk create disk.vhdx 1.5G                 # 1610612736 bytes\n  \
        vdisk create -b base.vhdx child.avhdx\n  \
        vdisk create -f vhdx -o block_size=1M -b base.vhdx child.avhdx\n  \
        vdisk create -f vhd -b base.vhd child.vhd\n\n\
        SIZE: bytes, or with a K, M, G or T suffix (powers of 1024), fractions allowed \
        (1.5G is 1610612736 bytes); it is rounded up to a whole number of sectors (512 \
        bytes; 4096 for a VHDX with logical_sector_size=4096), with a note on stderr when \
        it was not one. A negative, malformed or too large size is refused.\n\
        Without -f the format is the one the name says: .vhdx or .avhdx vhdx, .vhd or .avhd \
        vhd, any other name raw (a note on stderr says which). -f that contradicts the name \
        (-f raw disk.vhdx) is obeyed with a warning: the file will need -f to be opened.\n\
        VHDX options (-o): subformat=fixed|dynamic, block_size=SIZE (1M..256M, power of two), \
        logical_sector_size=512|4096, physical_sector_size=512|4096, log_size=SIZE (multiple of 1M)\n\
        VHD options (-o, format vhd or vpc): subformat=fixed|dynamic, block_size=SIZE (dynamic only; \
        4K..256M, power of two, default 2M), azure=on|off (a fixed VHD of exactly SIZE, a whole \
        number of MiB, as Azure requires). Without azure=on, a VHD's size is rounded up to a whole \
        CHS geometry, like qemu-img does.\n\
        With -b PARENT, a differencing disk of PARENT's format is created (without -f, the \
        format is PARENT's, and a name that says the other format is refused; a VHDX child \
        needs a VHDX parent, a VHD child a VHD parent): it \
        starts empty, reads what it does not hold from PARENT (found again by a relative and \
        an absolute path, or by file name beside the child), and takes PARENT's virtual size \
        (a SIZE given must be PARENT's). VHDX: block_size (default 2M, as Hyper-V) and \
        log_size may be given; VHD: block_size. A differencing disk cannot be fixed. Opening \
        the child later follows the parent policy (see vdisk --help): keep the parent in the \
        child's directory, or pass --parent-dir.")]
    Create(CreateArgs),
    /// Copy an image into a new image, possibly of another format
    #[command(after_help = "Examples:\n  \
        vdisk convert -O vhdx disk.raw disk.vhdx\n  \
        vdisk convert -p -f vhdx -O raw disk.vhdx disk.raw\n  \
        vdisk convert -O vhdx -o block_size=1M disk.raw small-blocks.vhdx\n  \
        vdisk convert -O vpc -o azure=on disk.raw azure.vhd\n  \
        vdisk convert disk.raw disk.vhdx            # vhdx, from the target's name\n  \
        vdisk convert --salvage -O vhdx truncated.vhdx rescued.vhdx\n\n\
        Without -O the target's format is the one its name says: .vhdx or .avhdx vhdx, .vhd \
        or .avhd vhd, any other name raw (a note on stderr says which); -O that contradicts \
        the name is obeyed with a warning. The source's format is detected from its content \
        when -f is absent. Zero ranges of the source are not allocated in the target.\n\
        --salvage: copy everything readable from a damaged source (a truncated image, I/O \
        errors). A range that fails to read is read again in smaller pieces (64 KiB, then \
        one sector) so that only what is really unreadable is replaced by zeros; every range \
        replaced is listed on stderr (virtual range and why). The target is always complete. \
        Exit status: 0 nothing was lost, 2 some ranges were replaced by zeros (listed), 1 \
        error. Without --salvage, the first read error stops the convert (exit 1).\n\n\
        A convert that fails (the source cannot be read, the target cannot be written: \
        EIO, a full disk) removes the target it created, rather than leave an image that \
        opens fine and reads zeros where the copy did not reach (qemu-img leaves it); an \
        existing file of that name was already replaced. A target another program holds \
        open is refused and left alone.")]
    Convert(ConvertArgs),
    /// Check whether two images have the same virtual contents
    #[command(after_help = "Examples:\n  \
        vdisk compare disk.raw disk.vhdx\n  \
        vdisk compare -f raw -F vhdx disk.raw disk.vhdx\n  \
        vdisk compare disk.vhd disk.vhdx\n  \
        vdisk compare -s disk.raw disk.vhd          # sizes must match too\n\n\
        As qemu-img compare: images of different sizes (a VHD rounded up to a CHS size, say) \
        are identical when the common part is and the longer image's extra part reads as \
        zeros; \"Warning: Image size mismatch!\" is printed first. A non-zero byte there is \
        a difference (\"Content mismatch at offset N!\"). -s (strict): any size difference is \
        a difference (\"Strict mode: Image size mismatch!\").\n\
        Exit status: 0 identical, 1 different, 2 error.")]
    Compare(CompareArgs),
    /// Check an image's structures for corruption and leaked space (like qemu-img check)
    #[command(after_help = "Examples:\n  \
        vdisk check disk.vhdx\n  \
        vdisk check --output json disk.vhd\n  \
        vdisk check -r leaks disk.vhdx             # reclaim unreferenced space at the end\n  \
        vdisk check -r all disk.vhdx               # also replay a dirty log, restore a footer\n\n\
        VHDX: the file type identifier (a lost signature is an error that -r all repairs \
        when a header and a region table are intact), both headers, the log (a log never \
        replayed is an error until -r all replays it), both region tables, the metadata, every BAT entry (blocks and sector bitmap \
        blocks inside the file, on no structure and on no other block) and a differencing \
        disk's parent linkage. VHD: the footer and its copy at offset 0 (-r all restores \
        either from the other, or both when only their cookie was lost and the checksum \
        proves the rest intact), the dynamic disk header, the BAT, the parent's unique id. \
        Leaks: file space at the end of the file that no structure uses and that lies past \
        the last byte any structure references (-r leaks cuts it off; so does the next \
        writable open of an image with nothing else wrong: such space is what a crash leaves \
        between a block's allocation and the flush that would have referenced it). Unused \
        space between \
        structures is listed but is no leak (nothing is lost, and vdisk compact packs blocks \
        into it). Raw images have nothing to check.\n\
        Repairs never destroy data: -r never cuts or overwrites a referenced byte, whatever \
        else is wrong. A block that runs past the end of the file (the file was truncated) is \
        an error naming the block, its virtual range (JSON: virtual-offset, virtual-length; \
        truncated-blocks counts them) and its file offset; the part of it still inside the \
        file is used space, never a leak. No repair brings lost data back: -r leaves a \
        truncated file's length alone (a VHD's footer is not restored over a truncated \
        block); vdisk convert --salvage copies what is left.\n\
        JSON keys (kebab-case; qemu-img check's first): filename, format, check-errors, \
        corruptions, leaks, corruptions-fixed and leaks-fixed (after -r), image-end-offset, \
        total-clusters, allocated-clusters, fragmented-clusters, compressed-clusters, \
        cluster-size, leaked-bytes, unused-bytes, truncated-blocks, file-size, problems (each: \
        kind, structure, offset, length, message, repair, and for a truncated block \
        virtual-offset, virtual-length), problems-omitted, and after -r repairs and \
        problems-before-repair.\n\
        Exit status (as qemu-img check; after -r, for what remains): 0 no problem, 1 the \
        check could not be completed, 2 corruptions found, 3 only leaked space found.")]
    Check(CheckArgs),
    /// Show where each range of the virtual disk is stored (like qemu-img map)
    #[command(after_help = "Examples:\n  \
        vdisk map disk.vhdx\n  \
        vdisk map --output json child.avhdx\n\n\
        Adjacent ranges with the same attributes are merged. The human form lists the data \
        ranges only: offset, length, where they are in the file, and the file.\n\
        --output json prints one JSON array covering the whole virtual disk, one object per \
        range in order, with qemu-img map's keys: start (virtual offset), length (bytes), \
        depth (the layer that holds it: 0 the image, 1 its parent...; the last layer looked \
        at when none does), present (some layer holds it, as data or as zeros), zero (reads \
        as zeros), data (stored data), compressed (always false), offset (where the data is \
        in the layer's file; only for data) and filename (the layer's file). For example:\n  \
        [{ \"start\": 0, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": false, \
        \"data\": true, \"compressed\": false, \"offset\": 4194304, \"filename\": \"disk.vhdx\"},\n  \
        { \"start\": 1048576, \"length\": 66060288, \"depth\": 0, \"present\": false, \
        \"zero\": true, \"data\": false, \"compressed\": false, \"filename\": \"disk.vhdx\"}]")]
    Map(MapArgs),
    /// Serve an image, a chain or a checkpoint bundle's active disk over NBD
    #[command(after_help = "Examples:\n  \
        vdisk serve disk.vhdx                          # read-only on 127.0.0.1:10809, export \"\"\n  \
        vdisk serve --rw --bind 0.0.0.0:10809 --export d disk.vhdx\n  \
        vdisk serve --socket /tmp/d.sock child.avhdx   # the whole chain, one disk\n  \
        vdisk serve vm-bundle/                         # a bundle's active disk\n  \
        qemu-img convert -f raw -O qcow2 nbd://127.0.0.1:10809 copy.qcow2\n  \
        qemu-img map -f raw nbd+unix:///?socket=/tmp/d.sock\n\n\
        An NBD server (fixed newstyle handshake, NBD_OPT_GO/INFO with block sizes, structured \
        replies, the base:allocation metadata context for qemu-img map and nbdinfo --map, \
        FLUSH, FUA, TRIM, WRITE_ZEROES with FAST_ZERO). Many clients at once; every connection \
        shares one open disk, so a flush on any of them covers all (multi-connection is \
        advertised). A client that breaks the protocol is dropped, never the server.\n\
        Read-only by default: a VHDX whose log is dirty is served with the log replayed in \
        memory and the file left untouched. With --rw writes go to the image (for a chain, \
        its top file), held with an exclusive image lock; parents are only read.\n\
        A directory is a checkpoint bundle: its active disk is served with the bundle locked \
        (an interrupted bundle operation is finished first, as every bundle command does).\n\
        Once listening, the address is printed on stdout: `serving IMAGE on nbd://ADDR/NAME` \
        (--bind 127.0.0.1:0 picks a free port). SIGINT or SIGTERM stop accepting clients, \
        let each connection finish the requests it has in flight, flush the image, close it \
        and exit 0. No TLS: serve on a Unix socket or a trusted network.\n\
        Exit status: 0 stopped cleanly, 1 error.")]
    Serve(ServeArgs),
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
        vdisk write disk.vhd 0 mbr.bin\n  \
        vdisk write -f raw disk.img 0 mbr.bin       # a raw image's first sector needs -f raw\n\n\
        An image taken for raw without -f raw (no signature found) refuses writes to its \
        first sector (bytes 0 to 511), and writes that would put a VHD footer cookie 512 \
        bytes before its end: either could make it detect as another format, or destroy \
        what is left of a damaged image. Pass -f raw for a raw image.")]
    Write(WriteArgs),
    /// Change the virtual size of an image (like qemu-img resize)
    #[command(after_help = "Examples:\n  \
        vdisk resize disk.vhdx 40G\n  \
        vdisk resize disk.vhdx +1G\n  \
        vdisk resize disk.vhd -512M                  # refused if the cut part holds data\n  \
        vdisk resize --force disk.vhdx 10G           # discards the data past 10G\n\n\
        SIZE is absolute, or relative to the current size with + or - (K, M, G, T suffixes, \
        fractions allowed: +1.5G); the new size is rounded up to a whole number of sectors \
        (512 bytes; a VHDX's logical sector size), with a note when it was not one. \
        Shrinking refuses \
        when the cut part holds data (an allocated block of a dynamic image, a non-zero byte \
        of a fixed or raw one) unless --force. VHD sizes are rounded up to a CHS geometry \
        as at creation (whole MiB for Azure disks, whose size is not CHS-rounded). \
        Differencing disks cannot be resized: their size must match their parent's. A \
        shrink gives back the file space its cut blocks leave at the end of the file (blocks \
        freed below one that is kept stay as unused space, which vdisk compact packs), so \
        `vdisk check` finds no leak after any resize. An image taken for raw without -f raw \
        is not cut to a length that would make it detect as a fixed VHD. Prints \
        \"Image resized.\" on success.")]
    Resize(ResizeArgs),
    /// Give back unused space: zero blocks become unallocated, the file shrinks (like Optimize-VHD)
    #[command(after_help = "Examples:\n  \
        vdisk compact disk.vhdx\n  \
        vdisk compact -p --output json disk.vhd\n  \
        vdisk compact child.avhdx                    # blocks reading as the parent does\n\n\
        Allocated blocks that read as all zeros become unallocated (in a differencing disk: \
        blocks that hold what the parent reads there; a VHDX block of zeros over other parent \
        data becomes a ZERO block, a VHD one is kept), then the blocks at the end of the file move into the holes and \
        the file is cut short. Every byte reads the same afterwards, and a crash at any point \
        leaves an image that reads the same. Fixed and raw images are refused (a fixed disk \
        keeps every block allocated by design: convert it to dynamic). Prints what was freed \
        and reclaimed (JSON: blocks-freed, blocks-moved, old-file-size, new-file-size, \
        reclaimed).\n\
        Exit status: 0 compacted, 1 error (the image still reads as before).")]
    Compact(CompactArgs),
    /// Fold a differencing disk into its parent or an older ancestor (like Merge-VHD)
    #[command(after_help = "Examples:\n  \
        vdisk merge child.avhdx                      # into its parent; child.avhdx is deleted\n  \
        vdisk merge --depth 2 grandchild.avhdx       # into the grandparent\n  \
        vdisk merge --into base.vhdx --keep -p gc.avhdx\n  \
        vdisk merge child.vhd\n\n\
        Afterwards the ancestor reads what IMAGE read. The merged layers (IMAGE and those \
        between it and the ancestor) are deleted unless --keep is given (IMAGE, kept, still \
        reads the same; the layers between it and the ancestor, and other disks over the \
        ancestor, do not).")]
    Merge(MergeArgs),
    /// Give a differencing disk another parent (like qemu-img rebase)
    #[command(after_help = "Examples:\n  \
        vdisk rebase -b base.vhdx grandchild.avhdx   # then child.avhdx may be deleted\n  \
        vdisk rebase -u -b /moved/base.vhdx child.avhdx\n  \
        vdisk rebase -p -b base.vhd child.vhd\n\n\
        Safe mode (the default) needs the old chain: where the image reads from its old \
        parents something NEW_PARENT does not hold, those bytes are copied into the image, \
        so it reads the same afterwards (when NEW_PARENT is the same disk as the old parent, \
        e.g. moved, only the link is rewritten). -u (unsafe) only rewrites the link and \
        records NEW_PARENT's identity: use it when NEW_PARENT holds the same data.\n\
        When a differencing disk does not open because the parent found no longer has the \
        identity it records (VHDX parent_linkage, VHD parent unique id: the parent was \
        written, or replaced by a copy), the error is followed by a hint with the \
        `vdisk rebase -u -b PARENT CHILD` command that relinks it; run it only if PARENT \
        still holds the data CHILD was made over (else CHILD would read wrong data).")]
    Rebase(RebaseArgs),
    /// List the ranges that may differ between two images of one chain (changed-block tracking)
    #[command(after_help = "Examples:\n  \
        vdisk changes base.vhdx child.avhdx\n  \
        vdisk changes --output json old.avhdx new.avhdx\n  \
        vdisk changes --verify base.vhd child.vhd\n  \
        vdisk changes --output-image delta.avhdx old.avhdx new.avhdx\n\n\
        OLD and NEW are images whose chains share a file: one an ancestor of the other (a \
        differencing disk and its parent, or grandparent...), or two children of one \
        parent; images of different chains are refused, with both chains listed. The \
        order matters only for what the listing and the delta describe: NEW's content.\n\
        The changes are found from the block tables and sector bitmaps of the layers \
        between the two disks (no data is read): OLD and NEW read alike wherever no layer \
        above their lowest common ancestor (the first file of NEW's chain that OLD's chain \
        holds too; OLD itself when it is NEW's ancestor) holds data or explicit zeros. So \
        the list is a superset of the ranges that truly differ (a rewrite of the same \
        bytes, or of part of a sector, is listed), and exactly those ranges when every \
        write covered whole blocks with new data. Ranges are sorted, merged, and split \
        where NEW maps zeros (a ZERO block, nothing allocated) or data.\n\
        The human form lists offset, length and whether NEW reads data or zeros there, \
        then a summary (changes, bytes, the common ancestor). --output json prints one \
        JSON array of objects in offset order, qemu-img map style: start, length, zero \
        (NEW maps zeros there), data (the opposite). For example:\n  \
        [{ \"start\": 2097152, \"length\": 2097152, \"zero\": false, \"data\": true },\n  \
        { \"start\": 8388608, \"length\": 1048576, \"zero\": true, \"data\": false }]\n\
        --verify reads both disks whole, compares them sector by sector and checks that \
        every differing sector lies inside a listed range; it prints the bytes compared, \
        the bytes that differ and the bytes listed (on stderr with --output json), and \
        fails (exit 1) naming the ranges outside the list if there are any.\n\
        --output-image DELTA writes the changes as a differencing disk over OLD's file \
        (OLD's format: VHDX with 2 MiB blocks, or VHD; a name saying the other format is \
        refused): NEW's bytes for each range (zeros where NEW maps zeros). Read over OLD, \
        DELTA reads exactly as NEW: an incremental backup, which `vdisk merge` folds into \
        (a copy of) OLD. OLD and NEW are only read. DELTA is written as DELTA.tmp and \
        renamed once complete and synced (an existing DELTA is replaced, unless in use); \
        it may not be a file of either chain. Its parent locator names OLD: open it with \
        --parent-dir OLD's directory when it lies elsewhere. Done after --verify, and \
        only if that passed.\n\
        Exit status: 0 done, 1 error (or --verify found a difference outside the list).")]
    Changes(ChangesArgs),
    /// Manage a checkpoint tree in a directory (a disk bundle)
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint init vm 20G                 # base.vhdx + an active child\n  \
        vdisk checkpoint init -f vhd vm 20G\n  \
        vdisk checkpoint init vm --from disk.vhdx    # base is a copy of disk.vhdx\n  \
        vdisk write $(vdisk checkpoint path vm) 0 mbr.bin\n  \
        vdisk checkpoint create vm before-upgrade\n  \
        vdisk checkpoint list vm\n  \
        vdisk checkpoint revert vm before-upgrade\n  \
        vdisk checkpoint delete vm before-upgrade\n  \
        vdisk checkpoint merge vm\n  \
        vdisk checkpoint changes vm before-upgrade   # what changed since\n\n\
        The bundle directory holds the disks and bundle.json; the active disk (printed by \
        `path`) is the one a VM writes. Every change is atomic and is finished at the next \
        command if interrupted. A command holds the bundle while it runs (another one is \
        refused, naming it), and refuses to change a disk another process has open: a \
        checkpoint or revert while a VM writes the active disk, a delete or merge while a \
        disk it rewrites is in use.")]
    Checkpoint(CheckpointArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(after_help = "Examples:\n  \
        vdisk completions bash > /etc/bash_completion.d/vdisk\n  \
        vdisk completions zsh > ~/.zfunc/_vdisk\n  \
        vdisk completions fish > ~/.config/fish/completions/vdisk.fish")]
    Completions(CompletionsArgs),
    /// Print the manual page (roff), or write one page per command into a directory
    #[command(after_help = "Examples:\n  \
        vdisk man | man -l -\n  \
        vdisk man --dir /usr/local/share/man/man1")]
    Man(ManArgs),
    /// Expose a virtual disk as one regular file of a FUSE mount (read-only unless --rw)
    #[command(after_help = "Examples:\n  \
        vdisk mount disk.vhdx /mnt/vd                # prints /mnt/vd/disk, read-only\n  \
        vdisk mount --rw disk.vhdx /mnt/vd && mkfs.ext4 /mnt/vd/disk\n  \
        vdisk mount --rw child.avhdx /mnt/vd         # writes go to child.avhdx only\n  \
        vdisk mount --foreground -f raw disk.raw /mnt/vd   # until Ctrl-C or SIGTERM\n  \
        vdisk mount --page-cache disk.vhdx /mnt/vd   # repeated reads from memory\n  \
        vdisk unmount /mnt/vd\n\n\
        MOUNTPOINT must be an existing, empty directory (a mount over files would hide \
        them until unmounted: a non-empty one is refused). It then holds one regular file, \
        `disk`, of the \
        virtual size, whose bytes are the virtual disk's (printed on stdout once mounted). \
        The image is opened writable only with --rw; a differencing disk reads through its \
        chain and, with --rw, writes only its own file. The image stays claimed until it is \
        unmounted (see image locks in vdisk --help): with --rw, a second mount, vdisk write or \
        qemu-io on it is refused; without, only writers are. fsync (and close after writes) \
        flushes the image. The file's size is fixed: write with `dd conv=notrunc`, not a \
        truncating copy. The mount is private to the mounting user (default_permissions, no \
        allow_other); without root privilege it needs fusermount3 (package fuse3). By \
        default every read and write goes to the image (direct I/O: no second copy of the \
        data in memory, the host already caches the image file; measured faster for \
        sequential reads, and the disk and partition files always agree). --page-cache lets \
        the kernel cache the disk file's pages instead, so repeated reads of the same data \
        are served from memory, and shared mmap of the file works on kernels older than \
        6.6. A disk with an MBR or GPT partition table also shows each partition as a file \
        partN (N as Linux numbers sdaN; re-read when the directory is listed).\n\
        Without --foreground, vdisk returns once the mount is ready and a background process \
        serves it. SIGINT, SIGTERM or SIGHUP to the serving process, `vdisk unmount`, \
        `umount` or `fusermount3 -u` unmount it; the image is then flushed and closed.\n\
        An image taken for raw without -f raw refuses, with --rw, writes to its first sector \
        and writes that would make it detect as a fixed VHD (EIO; a note says so at mount \
        time): pass -f raw for a raw image.\n\
        Exit status: 0 mounted (with --foreground: unmounted and the image closed cleanly), \
        1 error (the mount failed, or closing the image failed).")]
    Mount(MountArgs),
    /// Unmount a `vdisk mount` and wait until its image is closed
    #[command(after_help = "Examples:\n  \
        vdisk unmount /mnt/vd\n\n\
        Fails if MOUNTPOINT is not a vdisk mount or is busy (a process has the file open or \
        its working directory inside). Returns once the serving process has flushed and \
        closed the image.\n\
        Exit status: 0 unmounted and the image closed, 1 error.")]
    Unmount(UnmountArgs),
}

/// How `info` prints.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutputFormat {
    /// Lines for people.
    Human,
    /// JSON with stable kebab-case keys, qemu-img's where it has the same
    /// thing (listed in the command's help).
    Json,
}

/// `-U`: read an image that another process holds for writing.
#[derive(Args, Debug, Clone, Copy, Default)]
pub(crate) struct ShareArgs {
    /// Open read-only images sharing every permission (like qemu-img -U):
    /// succeeds while another process (vdisk or QEMU) writes the image, but
    /// what is read may be inconsistent
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
}

#[derive(Args, Debug)]
pub(crate) struct InfoArgs {
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// Show every layer of the chain of a differencing disk, the image first
    #[arg(long = "backing-chain")]
    pub(crate) backing_chain: bool,
    /// The image
    pub(crate) image: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Image format: vhdx, vhd (alias vpc) or raw (by default the one the
    /// name says: .vhdx/.avhdx vhdx, .vhd/.avhd vhd, else raw; with -b, the
    /// parent's format)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// Format options, comma-separated key=value (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Parent image: create a differencing image over it (VHDX or VHD; the
    /// parent is opened read-only and never modified)
    #[arg(short = 'b', long = "backing", value_name = "PARENT")]
    pub(crate) backing: Option<PathBuf>,
    /// Format of the parent image (vhdx, vhd or vpc; detected when absent)
    #[arg(short = 'F', long = "backing-format", value_parser = open::parse_format)]
    pub(crate) backing_format: Option<Format>,
    /// The image to create
    pub(crate) image: PathBuf,
    /// Virtual size, in bytes or with a K, M, G or T suffix, fractions
    /// allowed (1.5G), rounded up to whole sectors (with -b: optional, and
    /// if given must be the parent's)
    pub(crate) size: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct ConvertArgs {
    /// Source format (detected from the content when absent)
    #[arg(short = 'f', value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// Target format: raw, vhdx or vhd (alias vpc); by default the one the
    /// target's name says (.vhdx/.avhdx vhdx, .vhd/.avhd vhd, else raw)
    #[arg(short = 'O', value_parser = open::parse_format)]
    pub(crate) output_format: Option<Format>,
    /// Target format options, comma-separated key=value (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Show progress on stderr: a bar on a terminal, else percentage lines
    /// (one per whole percent) with the bytes written into the target and the rate
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// Copy what is readable, zeros for ranges that fail to read (listed; exit 2)
    #[arg(long)]
    pub(crate) salvage: bool,
    /// The source image
    pub(crate) source: PathBuf,
    /// The target image (overwritten if it exists)
    pub(crate) target: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct CompareArgs {
    /// Format of the first image (detected when absent)
    #[arg(short = 'f', value_parser = open::parse_format)]
    pub(crate) format_a: Option<Format>,
    /// Format of the second image (detected when absent)
    #[arg(short = 'F', value_parser = open::parse_format)]
    pub(crate) format_b: Option<Format>,
    /// Strict: images of different sizes are different (by default the
    /// longer one's extra part must read as zeros)
    #[arg(short = 's', long = "strict")]
    pub(crate) strict: bool,
    /// Show progress on stderr: a bar on a terminal, else percentage lines
    /// (one per whole percent) with the bytes read and compared and the rate
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// The first image
    pub(crate) image_a: PathBuf,
    /// The second image
    pub(crate) image_b: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

/// What `check -r` may repair.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RepairArg {
    /// Reclaim leaked space only.
    Leaks,
    /// Also repair corruptions that can be repaired without losing data.
    All,
}

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    /// Repair: leaks (reclaim unreferenced space) or all (also corruptions)
    #[arg(short = 'r', long = "repair", value_enum, value_name = "leaks|all")]
    pub(crate) repair: Option<RepairArg>,
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The image
    pub(crate) image: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct MapArgs {
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The image
    pub(crate) image: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub(crate) struct ManArgs {
    /// Write vdisk.1 and one page per subcommand (vdisk-info.1, ...) here
    #[arg(long = "dir", value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ReadArgs {
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The image
    pub(crate) image: PathBuf,
    /// Virtual offset, in bytes or with a K, M, G or T suffix
    pub(crate) offset: String,
    /// Number of bytes, in bytes or with a K, M, G or T suffix
    pub(crate) length: String,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct WriteArgs {
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The image
    pub(crate) image: PathBuf,
    /// Virtual offset, in bytes or with a K, M, G or T suffix
    pub(crate) offset: String,
    /// File with the bytes to write (stdin when absent)
    pub(crate) file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ResizeArgs {
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// Allow shrinking even when the cut part holds data (it is discarded)
    #[arg(long = "force")]
    pub(crate) force: bool,
    /// Show a spinner with the elapsed time on stderr (a resize that moves
    /// blocks out of the BAT's way can take a while); not on a terminal,
    /// one line when done
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// The image
    pub(crate) image: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one (K, M, G, T
    /// suffixes, fractions allowed: 1.5G), rounded up to whole sectors
    #[arg(allow_hyphen_values = true)]
    pub(crate) size: String,
}

#[derive(Args, Debug)]
pub(crate) struct CompactArgs {
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// Show progress on stderr: a bar on a terminal, else percentage lines
    /// (one per whole percent) with the bytes of the blocks moved and the rate
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// The image (VHDX or VHD, dynamic or differencing)
    pub(crate) image: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// The ancestor to merge into (a file of IMAGE's chain)
    #[arg(long = "into", value_name = "ANCESTOR", conflicts_with = "depth")]
    pub(crate) into: Option<PathBuf>,
    /// How many levels down the ancestor is (1 = the parent, the default)
    #[arg(long = "depth", value_name = "N")]
    pub(crate) depth: Option<usize>,
    /// Keep the merged layers' files (by default they are deleted)
    #[arg(long = "keep")]
    pub(crate) keep: bool,
    /// Show progress on stderr: a bar on a terminal, else percentage lines
    /// (one per whole percent) with the bytes copied into the ancestor and the rate
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// The differencing image to merge
    pub(crate) image: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct RebaseArgs {
    /// The new parent
    #[arg(short = 'b', long = "backing", value_name = "NEW_PARENT")]
    pub(crate) backing: PathBuf,
    /// Unsafe: only rewrite the link (NEW_PARENT must hold the same data)
    #[arg(short = 'u', long = "unsafe")]
    pub(crate) unsafe_relink: bool,
    /// Show progress on stderr: a bar on a terminal, else percentage lines
    /// (one per whole percent) with the bytes copied into the image and the rate
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// The differencing image to rebase
    pub(crate) image: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct CheckpointArgs {
    #[command(subcommand)]
    pub(crate) command: CheckpointCommand,
}

#[derive(Subcommand, Debug)]
pub(crate) enum CheckpointCommand {
    /// Create a bundle: an empty base disk of SIZE (or a copy of --from IMAGE) and an active child
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint init vm 20G\n  \
        vdisk checkpoint init -f vhd vm 20G\n  \
        vdisk checkpoint init vm --from disk.vhdx\n\n\
        BUNDLE must not exist or be an empty directory.")]
    Init(CheckpointInitArgs),
    /// Take a checkpoint: the active disk is frozen as NAME, a new empty child becomes active
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint create vm before-upgrade")]
    Create(CheckpointNameArgs),
    /// Show the checkpoint tree and where the active disk is
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint list vm\n  \
        vdisk checkpoint list --output json vm\n\n\
        JSON: an array of the bundle's disks, parents before children, each with the keys \
        id, name (null for the active disk), created (Unix seconds), parent (its id; null \
        for the base), disk (the file, in BUNDLE), created-utc, file-size, active and depth \
        (0 for the base).")]
    List(CheckpointListArgs),
    /// Drop the active disk's changes: a new child of checkpoint NAME becomes active
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint revert vm before-upgrade")]
    Revert(CheckpointNameArgs),
    /// Delete checkpoint NAME (its data is merged into its children; nothing else changes)
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint delete vm before-upgrade")]
    Delete(CheckpointNameArgs),
    /// Collapse the active disk's chain into one disk (checkpoints on the way are removed)
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint merge vm")]
    Merge(CheckpointBundleArgs),
    /// List the ranges that may differ between checkpoint FROM and TO (or the active disk)
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint changes vm before-upgrade\n  \
        vdisk checkpoint changes --output json vm monday tuesday\n  \
        vdisk checkpoint changes --verify vm monday\n  \
        vdisk checkpoint changes --output-image /backup/tuesday.avhdx vm monday tuesday\n\n\
        FROM and TO name checkpoints (an unknown name is refused, listing the names); \
        without TO, the active disk. They may lie on different branches of the tree (a \
        revert makes the active disk a new child of the checkpoint reverted to): the \
        changes are then those of both branches above their lowest common ancestor. \
        Below, OLD is FROM and NEW is TO. The bundle is held while the command runs and \
        its disks are only read: the active disk cannot be read while a VM writes it.\n\
        The changes are found from the block tables and sector bitmaps of the layers \
        between the two disks (no data is read): OLD and NEW read alike wherever no layer \
        above their lowest common ancestor (the first file of NEW's chain that OLD's chain \
        holds too; OLD itself when it is NEW's ancestor) holds data or explicit zeros. So \
        the list is a superset of the ranges that truly differ (a rewrite of the same \
        bytes, or of part of a sector, is listed), and exactly those ranges when every \
        write covered whole blocks with new data. Ranges are sorted, merged, and split \
        where NEW maps zeros (a ZERO block, nothing allocated) or data.\n\
        The human form lists offset, length and whether NEW reads data or zeros there, \
        then a summary (changes, bytes, the common ancestor). --output json prints one \
        JSON array of objects in offset order, qemu-img map style: start, length, zero \
        (NEW maps zeros there), data (the opposite). For example:\n  \
        [{ \"start\": 2097152, \"length\": 2097152, \"zero\": false, \"data\": true },\n  \
        { \"start\": 8388608, \"length\": 1048576, \"zero\": true, \"data\": false }]\n\
        --verify reads both disks whole, compares them sector by sector and checks that \
        every differing sector lies inside a listed range; it prints the bytes compared, \
        the bytes that differ and the bytes listed (on stderr with --output json), and \
        fails (exit 1) naming the ranges outside the list if there are any.\n\
        --output-image DELTA (outside the bundle) writes the changes as a differencing \
        disk over OLD's file (OLD's format: VHDX with 2 MiB blocks, or VHD; a name \
        saying the other format is refused): NEW's bytes for each range (zeros where NEW \
        maps zeros). Read over OLD, DELTA reads exactly as NEW: an incremental backup, \
        which `vdisk merge` folds into (a copy of) OLD. OLD and NEW are only read. DELTA \
        is written as DELTA.tmp and renamed once complete and synced (an existing DELTA \
        is replaced, unless in use); it may not be a file of either chain. Its parent \
        locator names OLD: open it with --parent-dir OLD's directory when it lies \
        elsewhere. Done after --verify, and \
        only if that passed.\n\
        Exit status: 0 done, 1 error (or --verify found a difference outside the list).")]
    Changes(CheckpointChangesArgs),
    /// Print the path of the active disk (the one to write)
    #[command(after_help = "Examples:\n  \
        vdisk checkpoint path vm\n  \
        vdisk read $(vdisk checkpoint path vm) 0 512 > mbr.bin")]
    Path(CheckpointBundleArgs),
}

#[derive(Args, Debug)]
pub(crate) struct CheckpointInitArgs {
    /// Format of the disks: vhdx (default) or vhd (alias vpc)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format, conflicts_with = "from")]
    pub(crate) format: Option<Format>,
    /// Copy this (non-differencing) VHDX or VHD image as the base
    #[arg(long = "from", value_name = "IMAGE", conflicts_with = "size")]
    pub(crate) from: Option<PathBuf>,
    /// The bundle directory (created; must be empty if it exists)
    pub(crate) bundle: PathBuf,
    /// Virtual size of the base disk, in bytes or with a K, M, G or T
    /// suffix, fractions allowed (1.5G), rounded up to whole sectors
    #[arg(required_unless_present = "from")]
    pub(crate) size: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct CheckpointNameArgs {
    /// The bundle directory
    pub(crate) bundle: PathBuf,
    /// The checkpoint name
    pub(crate) name: String,
}

#[derive(Args, Debug)]
pub(crate) struct CheckpointBundleArgs {
    /// The bundle directory
    pub(crate) bundle: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct MountArgs {
    /// Open the image writable and allow writes (default: read-only)
    #[arg(long = "rw")]
    pub(crate) rw: bool,
    /// Serve in this process until unmounted or signalled (default: return
    /// once mounted, a background process serves)
    #[arg(long = "foreground")]
    pub(crate) foreground: bool,
    /// Let the kernel cache the disk file's pages (by default every read
    /// and write goes to the image: direct I/O)
    #[arg(long = "page-cache")]
    pub(crate) page_cache: bool,
    /// Set by `vdisk mount` on the background process it starts
    #[arg(long = "daemon-child", hide = true, requires = "foreground")]
    pub(crate) daemon_child: bool,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The image
    pub(crate) image: PathBuf,
    /// An existing, empty directory where the file `disk` appears
    pub(crate) mountpoint: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Listen on this TCP address (default 127.0.0.1:10809; port 0 picks one)
    #[arg(long = "bind", value_name = "ADDR:PORT", conflicts_with = "socket")]
    pub(crate) bind: Option<String>,
    /// Listen on this Unix socket instead (created; removed at exit)
    #[arg(long = "socket", value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    /// Let clients write (default: read-only)
    #[arg(long = "rw")]
    pub(crate) rw: bool,
    /// The export name clients ask for (default: "", the default export)
    #[arg(long = "export", value_name = "NAME", default_value = "")]
    pub(crate) export: String,
    /// Image format (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The image, or a checkpoint bundle directory
    pub(crate) image: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct UnmountArgs {
    /// The directory where `vdisk mount` mounted an image
    pub(crate) mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct CheckpointListArgs {
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// The bundle directory
    pub(crate) bundle: PathBuf,
}

/// What `changes` and `checkpoint changes` do besides listing.
#[derive(Args, Debug)]
pub(crate) struct ChangesOptions {
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Also read both disks whole and check that every difference is listed
    #[arg(long)]
    pub(crate) verify: bool,
    /// Write the changes as a differencing disk over OLD (FROM) that reads
    /// as NEW (TO): an incremental backup
    #[arg(long = "output-image", value_name = "DELTA")]
    pub(crate) output_image: Option<PathBuf>,
    /// Show progress on stderr (--verify: the bytes compared; --output-image:
    /// the bytes written)
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ChangesArgs {
    #[command(flatten)]
    pub(crate) opts: ChangesOptions,
    /// Format of both images (detected from the content when absent)
    #[arg(short = 'f', long = "format", value_parser = open::parse_format)]
    pub(crate) format: Option<Format>,
    /// The older image
    pub(crate) old: PathBuf,
    /// The newer image
    pub(crate) new: PathBuf,
    #[command(flatten)]
    pub(crate) share: ShareArgs,
}

#[derive(Args, Debug)]
pub(crate) struct CheckpointChangesArgs {
    #[command(flatten)]
    pub(crate) opts: ChangesOptions,
    /// The bundle directory
    pub(crate) bundle: PathBuf,
    /// The older checkpoint
    pub(crate) from: String,
    /// The newer checkpoint (the active disk when absent)
    pub(crate) to: Option<String>,
}
