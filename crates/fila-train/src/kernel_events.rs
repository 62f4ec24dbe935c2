//! Kernel compilations and autotune runs of the GPU backend, counted from the events CubeCL
//! reports through the `log` crate: `Compiling kernel` (NVRTC compiles one kernel), `Using PTX
//! cache` (a kernel loaded from the persistent compilation cache that `cubecl.toml` enables) and
//! `Tuning <key>` (an autotune run for a new shape key). A run whose shapes stay within the
//! warmed-up set compiles nothing after warm-up; the trainer and `fila bench` report the counts.
//! The CPU backend compiles nothing, so its counts stay 0.

use std::sync::atomic::{AtomicU64, Ordering};

static COMPILED: AtomicU64 = AtomicU64::new(0);
static FROM_CACHE: AtomicU64 = AtomicU64::new(0);
static TUNED: AtomicU64 = AtomicU64::new(0);

/// Counts since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Kernels compiled from source.
    pub compiled: u64,
    /// Kernels loaded from the persistent compilation cache.
    pub from_cache: u64,
    /// Autotune runs (one per operation and shape key not yet tuned).
    pub tuned: u64,
}

impl KernelCounts {
    /// The events since `earlier`.
    pub fn since(self, earlier: KernelCounts) -> KernelCounts {
        KernelCounts { compiled: self.compiled - earlier.compiled, from_cache: self.from_cache - earlier.from_cache, tuned: self.tuned - earlier.tuned }
    }
}

pub fn counts() -> KernelCounts {
    KernelCounts { compiled: COMPILED.load(Ordering::Relaxed), from_cache: FROM_CACHE.load(Ordering::Relaxed), tuned: TUNED.load(Ordering::Relaxed) }
}

struct Counter;

static COUNTER: Counter = Counter;

/// Which counter a log record feeds, if any.
fn classify(target: &str, level: log::Level, message: Option<&str>) -> Option<&'static AtomicU64> {
    if target.starts_with("cubecl_cuda::compute") || target.starts_with("cubecl_hip::compute") {
        match message {
            Some("Compiling kernel") => Some(&COMPILED),
            Some("Using PTX cache") => Some(&FROM_CACHE),
            _ => None,
        }
    } else if target.starts_with("cubecl_runtime::tune::tuner") && level == log::Level::Info {
        Some(&TUNED)
    } else {
        None
    }
}

impl log::Log for Counter {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target().starts_with("cubecl_")
    }

    fn log(&self, record: &log::Record) {
        if let Some(counter) = classify(record.target(), record.level(), record.args().as_str()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// Installs the counter as the process's `log` logger (no other output: the project prints its
/// own messages). Returns false when another logger is already installed.
pub fn install() -> bool {
    let installed = log::set_logger(&COUNTER).is_ok();
    if installed {
        log::set_max_level(log::LevelFilter::Trace);
    }
    installed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubecl_events_are_counted_by_kind() {
        install();
        let before = counts();
        // The records CubeCL 0.10 emits (cubecl-cuda `compute/context.rs`, cubecl-runtime
        // `tune/tuner.rs`), and records that count nothing.
        log::trace!(target: "cubecl_cuda::compute::context", "Compiling kernel");
        log::trace!(target: "cubecl_cuda::compute::context", "Compiling kernel");
        log::trace!(target: "cubecl_cuda::compute::context", "Using PTX cache");
        log::info!(target: "cubecl_runtime::tune::tuner", "Tuning {}", "matmul-1024x1024");
        log::info!(target: "cubecl_runtime::tune::tune_cache", "Loaded {} autotune cached entries", 3);
        log::trace!(target: "cubecl_cuda::compute::context", "Compiling {} kernels", 2);
        log::trace!(target: "fila_train", "Compiling kernel");
        let seen = counts().since(before);
        assert_eq!(seen, KernelCounts { compiled: 2, from_cache: 1, tuned: 1 });
    }
}
