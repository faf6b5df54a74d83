#!/bin/sh
# RUSTC_WRAPPER that scripts/fuzz.sh builds the fuzz targets with: crates
# that are not under test and whose loops dominate the run time are built
# without coverage instrumentation (LLVM takes the last of a repeated
# option, so `-sanitizer-coverage-level=0` after cargo-fuzz's flags turns
# it off). crc32c: its checksum of every 64 KiB region table and 4 KiB
# header, instrumented (a counter and a comparison callback per
# iteration), was a third of the time of the whole-image targets.
rustc=$1
shift
case " $* " in
*" --crate-name crc32c "*) exec "$rustc" "$@" -Cllvm-args=-sanitizer-coverage-level=0 ;;
esac
exec "$rustc" "$@"
