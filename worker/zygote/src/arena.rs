//! Where the interpreter's object arenas live while the zygote preloads.
//!
//! CPython's small-object allocator takes its memory from the system in 1 MiB arenas, one
//! `mmap` each, scattered over the address space. The zygote's preloaded heap is mostly such
//! arenas, and every fork copies (and every child's exit drops) one page-table entry and one
//! page reference per 4 KiB of them. Here the arenas of the preload are carved one after the other
//! from a single region aligned to 2 MiB, so that the whole of it can be moved to 2 MiB pages
//! (see `ffi::collapse_heap`): one entry per 2 MiB to copy and to drop.
//!
//! [`install`] must run before the interpreter starts, [`seal`] before the first fork. After
//! the seal, arenas come from `mmap` as in CPython (in the zygote and in its children alike),
//! and the unused rest of the region is unmapped, so a child's address space (which its
//! `RLIMIT_AS` counts) holds no reservation.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pyo3::ffi;

const HUGE_PAGE: usize = 2 << 20;
/// Address space reserved for the preload's arenas: the default preload (numpy, sympy) fills
/// about 30 MiB; arenas past the region come from `mmap`, as they would anyway.
const REGION_BYTES: usize = 512 << 20;

/// The region: `[START, END)`; arenas are handed out from `NEXT` up while `OPEN`.
static START: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
static OPEN: AtomicBool = AtomicBool::new(false);

/// An anonymous private mapping of `len` bytes, or `None`.
fn map(len: usize, flags: libc::c_int) -> Option<*mut c_void> {
    // SAFETY: an anonymous mapping at an address of the kernel's choice touches no existing
    // memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    (ptr != libc::MAP_FAILED).then_some(ptr)
}

/// Unmaps `[start, start + len)`, which lies inside a mapping this module made.
fn unmap(start: usize, len: usize) {
    if len > 0 {
        // SAFETY: the range belongs to this module's region or to an arena handed out by
        // `alloc`, which CPython no longer uses once it frees it; nothing else points there.
        unsafe { libc::munmap(start as *mut c_void, len) };
    }
}

extern "C" fn alloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    if OPEN.load(Ordering::Relaxed) {
        // Arenas are allocated under the GIL, on the zygote's only thread; the atomics are
        // for the statics' sake, not for contention.
        let next = NEXT.load(Ordering::Relaxed);
        let aligned = size.next_multiple_of(page_size());
        if next + aligned <= END.load(Ordering::Relaxed) {
            NEXT.store(next + aligned, Ordering::Relaxed);
            return next as *mut c_void;
        }
    }
    map(size, 0).unwrap_or(std::ptr::null_mut())
}

extern "C" fn free(_ctx: *mut c_void, ptr: *mut c_void, size: usize) {
    // An arena of the region or one of its own mapping: unmapping it is right for both.
    unmap(ptr as usize, size.next_multiple_of(page_size()));
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Reserves the region and makes it CPython's arena allocator. Call before the interpreter
/// starts; on failure CPython keeps its own allocator.
pub fn install() -> io::Result<()> {
    // Reserved with room to align its start to 2 MiB; MAP_NORESERVE, as pages are committed
    // only where arenas are touched.
    let len = REGION_BYTES + HUGE_PAGE;
    let base = map(len, libc::MAP_NORESERVE).ok_or_else(io::Error::last_os_error)? as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    unmap(base, start - base);
    unmap(start + REGION_BYTES, base + len - (start + REGION_BYTES));
    START.store(start, Ordering::Relaxed);
    NEXT.store(start, Ordering::Relaxed);
    END.store(start + REGION_BYTES, Ordering::Relaxed);
    OPEN.store(true, Ordering::Relaxed);
    let mut allocator = ffi::PyObjectArenaAllocator {
        ctx: std::ptr::null_mut(),
        alloc: Some(alloc),
        free: Some(free),
    };
    // SAFETY: called before Py_Initialize, so no arena exists yet that another allocator would
    // have to free; CPython copies the struct.
    unsafe { ffi::PyObject_SetArenaAllocator(&mut allocator) };
    Ok(())
}

/// Ends the region: later arenas come from `mmap`, and the unused rest of the region (from the
/// first 2 MiB boundary past the last arena) is unmapped. Returns the bytes of arenas in it.
pub fn seal() -> usize {
    if !OPEN.swap(false, Ordering::Relaxed) {
        return 0;
    }
    let (start, next, end) = (
        START.load(Ordering::Relaxed),
        NEXT.load(Ordering::Relaxed),
        END.load(Ordering::Relaxed),
    );
    // The tail of the last 2 MiB stays mapped, so that the last arenas can share a huge page.
    let keep = next.next_multiple_of(HUGE_PAGE).min(end);
    unmap(keep, end - keep);
    next - start
}
