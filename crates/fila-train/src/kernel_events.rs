//! Kernel compilations and autotune runs of the GPU backend, counted from the events CubeCL
//! reports through the `log` crate: `Compiling kernel` (NVRTC compiles one kernel), `Using PTX
//! cache` (a kernel loaded from the persistent compilation cache that `cubecl.toml` enables) and
//! `Tuning <key>` (an autotune run for a new shape key). A run whose shapes stay within the
//! warmed-up set compiles nothing after warm-up; the trainer and `fila bench` report the counts.
//! The CPU backend compiles nothing, so its counts stay 0.
//!
//! Which kernel each autotune run chose ([`TunePick`]: flash or fallback attention, the matmul and
//! convolution variants) comes from CubeCL's autotune log, which [`install`] routes to the `log`
//! crate; `fila bench` prints the picks and `metrics.jsonl` lists each step's new ones.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

static COMPILED: AtomicU64 = AtomicU64::new(0);
static FROM_CACHE: AtomicU64 = AtomicU64::new(0);
static TUNED: AtomicU64 = AtomicU64::new(0);
static PICKS: Mutex<Vec<TunePick>> = Mutex::new(Vec::new());

/// One autotune decision: for an operation and shape key, the kernel CubeCL measured fastest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunePick {
    /// The key's type, which names the operation (`MatmulAutotuneKey`, `AttentionAutotuneKey`,
    /// `ConvAutotuneKey`, ...).
    pub operation: String,
    /// The key's fields: shapes, dtypes, layout classes.
    pub key: String,
    /// The tunable that won (`fallback` for attention means the unfused kernels).
    pub kernel: String,
}

impl TunePick {
    /// Reads CubeCL 0.10's minimal autotune line, `Fastest result <kernel>-<KeyType> - <fields>.
    /// \n Top 3 times: ...` (cubecl-runtime `tune/tuner.rs`, keys formatted by its `AutotuneKey`
    /// derive). Kernel names may contain `-`; key type names do not.
    fn parse(message: &str) -> Option<Self> {
        let rest = message.strip_prefix("Fastest result ")?;
        let rest = rest.split(". \n").next()?;
        let (head, key) = rest.split_once(" - ").unwrap_or((rest, ""));
        let (kernel, operation) = head.rsplit_once('-')?;
        Some(Self { operation: operation.trim().into(), key: key.trim().into(), kernel: kernel.trim().into() })
    }
}

impl std::fmt::Display for TunePick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}] -> {}", self.operation, self.key, self.kernel)
    }
}

/// The autotune picks from the `n`th on (all of them with `n = 0`), in the order they were made.
pub fn picks_from(n: usize) -> Vec<TunePick> {
    let picks = PICKS.lock().unwrap_or_else(|e| e.into_inner());
    picks.get(n..).map(<[TunePick]>::to_vec).unwrap_or_default()
}

/// How many autotune picks were made so far.
pub fn pick_count() -> usize {
    PICKS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

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

/// The `log` target of CubeCL's log sink (`cubecl-common` `config/logger.rs`).
const CUBECL_LOG_SINK: &str = "cubecl_common::config::logger";

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
        if record.target() == CUBECL_LOG_SINK {
            if let Some(pick) = TunePick::parse(&record.args().to_string()) {
                PICKS.lock().unwrap_or_else(|e| e.into_inner()).push(pick);
            }
        } else if let Some(counter) = classify(record.target(), record.level(), record.args().as_str()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// Installs the counter as the process's `log` logger (no other output: the project prints its
/// own messages) and, in GPU builds, routes CubeCL's autotune results to it. Call before any GPU
/// work. Returns false when another logger is already installed.
pub fn install() -> bool {
    let installed = log::set_logger(&COUNTER).is_ok();
    if installed {
        log::set_max_level(log::LevelFilter::Trace);
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    route_autotune_log();
    installed
}

/// CubeCL's settings as it would read them itself (`cubecl.toml` in the working directory or a
/// parent, then its environment variables), with the autotune results also sent to the `log`
/// crate at the minimal level. Nothing else changes: a `cubecl.toml` that already logs them
/// elsewhere keeps doing so.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn route_autotune_log() {
    use cubecl::config::autotune::AutotuneLogLevel;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        let logger = &mut config.autotune.logger;
        if matches!(logger.level, AutotuneLogLevel::Disabled) {
            logger.level = AutotuneLogLevel::Minimal;
        }
        logger.log.get_or_insert_default();
        if CubeClRuntimeConfig::storage().lock().is_none() {
            CubeClRuntimeConfig::set(config);
        }
    });
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

    #[test]
    fn autotune_picks_are_read_from_cubecl_lines() {
        install();
        let before = pick_count();
        // Lines as CubeCL 0.10's minimal autotune log writes them (key fields abridged).
        log::info!(
            target: CUBECL_LOG_SINK,
            "Fastest result blackbox_accelerated_4_planes_p_1-1-AttentionAutotuneKey - SeqQ: 512, SeqKv: 512. \n Top 3 times: [(2, 1ms)], context: "
        );
        log::info!(target: CUBECL_LOG_SINK, "Fastest result fallback-AttentionAutotuneKey - SeqQ: 8192. \n Top 3 times: [], context: ");
        log::info!(target: CUBECL_LOG_SINK, "Load autotune cache ...");
        log::info!(target: "fila_train", "Fastest result x-Y - z. \n");
        let picks = picks_from(before);
        assert_eq!(picks.len(), 2, "{picks:?}");
        assert_eq!(picks[0].kernel, "blackbox_accelerated_4_planes_p_1-1");
        assert_eq!(picks[0].operation, "AttentionAutotuneKey");
        assert_eq!(picks[0].key, "SeqQ: 512, SeqKv: 512");
        assert_eq!(picks[1].to_string(), "AttentionAutotuneKey [SeqQ: 8192] -> fallback");
    }
}
