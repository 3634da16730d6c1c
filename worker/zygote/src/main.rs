use clap::Parser;
use pyrunner_zygote::Args;

/// The zygote's own allocations (its messages, each child's spawn request) come from
/// mimalloc's mapped segments, not from the C library's heap, where CPython keeps the preload's
/// larger objects. That heap is moved into 2 MiB pages before the first fork
/// (`ffi::collapse_heap`), and the zygote writing to one of them after a fork splits it back
/// into 512 small pages that every later fork copies and every exit drops: with the C
/// library's allocator, 14 of 46 MiB of huge pages were split by the first forks and stayed so.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pyrunner_zygote::run(&Args::parse())
}
