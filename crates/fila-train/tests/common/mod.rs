//! Helpers for the CLI tests: run `fila-train` on the tiny configs in a temporary output folder
//! and read back what it wrote.
#![allow(dead_code)]

pub mod tfevents;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The checkout the tests read configs and data from: `FILA_REPO_DIR` when set (test binaries
/// built in one checkout and run from another, e.g. on a GPU machine), else the one they were
/// built in.
pub fn repo() -> PathBuf {
    let dir = std::env::var_os("FILA_REPO_DIR").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."), PathBuf::from);
    dir.canonicalize().unwrap_or_else(|e| panic!("the checkout {}: {e} (set FILA_REPO_DIR to the repository root)", dir.display()))
}

/// The `fila-train` binary: `$FILA_BIN_DIR/fila-train` when set (test binaries run away from
/// their build folder), else the one Cargo built with the tests.
pub fn binary() -> PathBuf {
    std::env::var_os("FILA_BIN_DIR").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fila-train")), |d| PathBuf::from(d).join("fila-train"))
}

pub fn tiny(stage: u8) -> PathBuf {
    repo().join(format!("configs/tiny/stage{stage}.toml"))
}

/// Runs the binary; `sets` are `--set` overrides, `extra` more arguments.
pub fn fila_train(config: &Path, out: &Path, sets: &[&str], extra: &[&str]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.arg("--config").arg(config).arg("--set").arg(format!("checkpoint.output_dir={}", out.display()));
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.args(extra);
    cmd.output().expect("fila-train runs")
}

pub fn ok(output: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "fila-train failed ({:?}):\n{text}", output.status);
    text
}

pub fn failed(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "expected exit 1, got {:?}:\n{text}", output.status);
    text
}

/// Loss per step from `metrics.jsonl` (the last entry of a step wins, as after a crash).
pub fn losses(out: &Path) -> BTreeMap<u64, f64> {
    metric(out, "loss")
}

/// One number per step from `metrics.jsonl` (`loss`, `lr`, `grad_norm`...), the last entry of a
/// step winning.
pub fn metric(out: &Path, key: &str) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v[key].as_f64().unwrap())
        })
        .collect()
}

/// Every tensor of a safetensors file as f32.
pub fn tensors(file: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Serializes the tests of this binary that run autodiff: in Burn 0.21 a `backward()` on one
/// thread may free the steps of a graph another thread is still building (tracel-ai/burn#5573),
/// silently dropping gradients there. The trainer runs one autodiff thread per process; tests
/// that run in parallel threads take this lock so their graphs never overlap.
pub fn autodiff_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
