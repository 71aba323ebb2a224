//! Allocation counting, to show where the forwarding path allocates. The `meridian` binary
//! installs [`CountingAllocator`] as its global allocator; the media worker marks its thread,
//! and wraps every call into the rtc crate in [`in_rtc`], so `/metrics` can tell allocations
//! made by Meridian's own forwarding code from those made inside rtc. Counting costs one
//! relaxed atomic add per allocation; nothing else changes. Where the allocator is not
//! installed (library users, tests), every count stays zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The system allocator, counting.
pub struct CountingAllocator;

static TOTAL: AtomicU64 = AtomicU64::new(0);
static WORKER_OWN: AtomicU64 = AtomicU64::new(0);
static WORKER_RTC: AtomicU64 = AtomicU64::new(0);
static WORKER_COPY: AtomicU64 = AtomicU64::new(0);

const OTHER: u8 = 0;
const WORKER: u8 = 1;
const WORKER_IN_RTC: u8 = 2;
const WORKER_COPYING: u8 = 3;

thread_local! {
    // A const-initialized Cell: no lazy initialization and no destructor, so reading it
    // inside the allocator cannot allocate or recurse.
    static ROLE: Cell<u8> = const { Cell::new(OTHER) };
}

fn count() {
    TOTAL.fetch_add(1, Relaxed);
    match ROLE.try_with(Cell::get) {
        Ok(WORKER) => {
            WORKER_OWN.fetch_add(1, Relaxed);
        }
        Ok(WORKER_IN_RTC) => {
            WORKER_RTC.fetch_add(1, Relaxed);
        }
        Ok(WORKER_COPYING) => {
            WORKER_COPY.fetch_add(1, Relaxed);
        }
        _ => {}
    }
}

// SAFETY: every call is passed unchanged to the system allocator; counting touches only
// atomics and a const thread-local.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`; `ptr` came from this allocator, which is `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Marks the calling thread as the media worker.
pub fn mark_worker_thread() {
    ROLE.with(|r| r.set(WORKER));
}

/// Runs `f` (a call into the rtc crate) with its allocations counted as rtc's.
#[inline]
pub fn in_rtc<R>(f: impl FnOnce() -> R) -> R {
    if ROLE.with(Cell::get) != WORKER {
        return f();
    }
    ROLE.with(|r| r.set(WORKER_IN_RTC));
    let out = f();
    ROLE.with(|r| r.set(WORKER));
    out
}

/// While alive, the media thread is writing one forwarded copy (or repair, or probe): its
/// allocations, in Meridian's code or in rtc's sender, are counted as the copy path's
/// (`code="copy_path"`), the figure the in-place send path is held to (zero).
pub struct CopyPath(bool);

impl CopyPath {
    #[inline]
    pub fn enter() -> Self {
        let on = ROLE.with(Cell::get) == WORKER;
        if on {
            ROLE.with(|r| r.set(WORKER_COPYING));
        }
        CopyPath(on)
    }
}

impl Drop for CopyPath {
    #[inline]
    fn drop(&mut self) {
        if self.0 {
            ROLE.with(|r| r.set(WORKER));
        }
    }
}

/// Allocations so far (allocations and reallocations; frees are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocCounts {
    /// The whole process.
    pub total: u64,
    /// On the media worker thread, in Meridian's own code.
    pub worker_own: u64,
    /// On the media worker thread, inside calls into the rtc crate (outside copies).
    pub worker_rtc: u64,
    /// On the media worker thread, while writing forwarded copies, repairs and probes
    /// ([`CopyPath`]), whoever's code allocated.
    pub worker_copy: u64,
}

pub fn counts() -> AllocCounts {
    AllocCounts {
        total: TOTAL.load(Relaxed),
        worker_own: WORKER_OWN.load(Relaxed),
        worker_rtc: WORKER_RTC.load(Relaxed),
        worker_copy: WORKER_COPY.load(Relaxed),
    }
}
