//! glibc's allocator settings for a training process, which frees and reallocates buffers of tens
//! to hundreds of MB every step (activations, gradients, the optimizer's slices).
//!
//! By default glibc serves every allocation above its mmap threshold (adapting up to 32 MB) with a
//! fresh mapping that it unmaps on free, and hands free memory at the top of the heap back to the
//! OS, so the next buffer of that size faults in zeroed pages again. Keeping freed memory in the
//! process took the mid stage-2 CPU step from 1.95 s to 1.68 s and its system time from 2.2 s to
//! 0.4 s (docs/speed.md). The price: the process does not shrink after a peak.
//!
//! [`Counting`] counts the heap's live bytes and their peak, phase by phase ([`mark`]): the
//! memory profile that `--plan` is checked against (docs/memory-plan.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// Serves large allocations from the heap and keeps freed memory for reuse: `M_MMAP_THRESHOLD`
/// and `M_TRIM_THRESHOLD` at 2 GiB, `M_TOP_PAD` 256 MiB. Call first thing in `main`, before
/// threads start. Does nothing where `GLIBC_TUNABLES` or a `MALLOC_…_` setting is in the
/// environment (the user's choice wins), and off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::vars_os().any(|(k, _)| k.to_str().is_some_and(|k| k == "GLIBC_TUNABLES" || (k.starts_with("MALLOC_") && k.ends_with('_'))));
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; nothing else runs yet.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        }
    }
}

/// The heap's bytes in use, counted exactly: the system allocator with two counters (live bytes
/// and their peak). `fila-train` installs it as the global allocator; the memory profile
/// (`fila-train --profile-memory`) and the memory-plan tests read it. Tensors on the CPU backend
/// are heap buffers, so on the CPU this is the live tensor memory plus the process's small change.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Heap bytes in use now (0 where [`Counting`] is not the global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Relaxed)
}

/// The most heap bytes in use at once since the last [`mark`] (or the start).
pub fn peak_bytes() -> usize {
    PEAK.load(Relaxed)
}

static PROFILE: AtomicBool = AtomicBool::new(false);
static PHASES: Mutex<Vec<(&'static str, usize)>> = Mutex::new(Vec::new());

/// Turns the phase profile on: from now on [`mark`] records each phase's peak.
pub fn profile_phases() {
    PROFILE.store(true, Relaxed);
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// Ends a phase of the profiled work named `name`: records the heap's peak since the previous
/// mark and starts the next phase from the bytes in use now. Does nothing unless
/// [`profile_phases`] was called; costs two atomic reads otherwise.
pub fn mark(name: &'static str) {
    if PROFILE.load(Relaxed) {
        let peak = PEAK.swap(LIVE.load(Relaxed), Relaxed);
        PHASES.lock().unwrap_or_else(|e| e.into_inner()).push((name, peak));
    }
}

/// The phases recorded since the last call, each name once with its highest peak, in the order
/// they first ended.
pub fn take_phases() -> Vec<(&'static str, usize)> {
    let recorded = std::mem::take(&mut *PHASES.lock().unwrap_or_else(|e| e.into_inner()));
    let mut phases: Vec<(&'static str, usize)> = Vec::new();
    for (name, peak) in recorded {
        match phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, p)) => *p = (*p).max(peak),
            None => phases.push((name, peak)),
        }
    }
    phases
}

/// The process's peak resident set (`VmHWM` in /proc/self/status), where Linux tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether [`profile_phases`] was called.
pub fn profiling() -> bool {
    PROFILE.load(Relaxed)
}

/// One line of the memory profile: the bytes in use before the work, each phase's peak and the
/// whole work's, and the process's peak resident set, in MiB.
pub fn profile_line(what: &str, live_before: usize) -> String {
    let mib = |b: usize| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
    let phases = take_phases();
    let peak = phases.iter().map(|p| p.1).max().unwrap_or(0);
    let by_phase: Vec<String> = phases.iter().map(|(n, p)| format!("{n} {}", mib(*p))).collect();
    let rss = peak_rss_bytes().map(|r| format!("; peak RSS {} MiB", mib(r as usize))).unwrap_or_default();
    format!("memory {what}: live before {} MiB; peaks by phase (MiB): {}; peak {} MiB{rss}", mib(live_before), by_phase.join(", "), mib(peak))
}
