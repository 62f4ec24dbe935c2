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

/// Every tensor of a safetensors file of f32 tensors (what fila-train writes).
pub fn tensors(file: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{}: `{name}`", file.display());
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// One kind of optimizer state (`master`, `exp_avg`, `exp_avg_sq`) of the step checkpoint
/// `step_dir` by parameter path, put together from the `<kind>.<path>` and `<kind>.<path>@<start>`
/// runs of all its optimizer shards (whatever the world size that wrote them); every element
/// of every trainable parameter must be stored exactly once.
pub fn optimizer_state(step_dir: &Path, kind: &str) -> BTreeMap<String, Vec<f32>> {
    let sizes: BTreeMap<String, usize> = tensors(&step_dir.join("trainable.safetensors")).into_iter().map(|(n, (_, v))| (n, v.len())).collect();
    let mut runs: BTreeMap<String, Vec<Option<f32>>> = BTreeMap::new();
    let shards = std::fs::read_dir(step_dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("optimizer"));
    for shard in shards {
        for (key, (_, values)) in tensors(&shard) {
            let Some(rest) = key.strip_prefix(kind).and_then(|r| r.strip_prefix('.')) else { continue };
            let (name, start) = match rest.rsplit_once('@') {
                Some((name, start)) => (name, start.parse::<usize>().unwrap()),
                None => (rest, 0),
            };
            let len = *sizes.get(name).unwrap_or_else(|| panic!("{}: `{key}` is not a trainable parameter", shard.display()));
            let slot = runs.entry(name.to_string()).or_insert_with(|| vec![None; len]);
            for (i, v) in values.into_iter().enumerate() {
                assert!(slot[start + i].replace(v).is_none(), "{}: element {} of `{name}` stored twice", shard.display(), start + i);
            }
        }
    }
    assert_eq!(runs.len(), sizes.len(), "{}: `{kind}` for {} of {} parameters", step_dir.display(), runs.len(), sizes.len());
    runs.into_iter()
        .map(|(name, v)| {
            let full = v.into_iter().collect::<Option<Vec<f32>>>().unwrap_or_else(|| panic!("{}: `{kind}.{name}` is incomplete", step_dir.display()));
            (name, full)
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

pub fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A tiny stage-2 adapter run (`sets`, tiny/stage2.toml, without dropout: each rank draws its own
/// masks) trained for 2 steps of global batch 4 on one process and on two ranks: the same losses
/// (1e-5 relative) and the same merged model and adapters (2e-5).
pub fn assert_two_ranks_train_adapters_like_one(dir: &Path, sets: &[String]) {
    let with = |acc: usize| -> Vec<String> {
        let mut s = sets.to_vec();
        s.retain(|x| !x.starts_with("lora.dropout"));
        s.extend(["lora.dropout=0".into(), "batch.micro_batch_size=1".into(), format!("batch.accumulation_steps={acc}"), "train.max_steps=2".into()]);
        s
    };
    let (one, two) = (dir.join("one"), dir.join("two"));
    ok(&fila_train(&tiny(2), &one, &refs(&with(4)), &[]));
    ok(&fila_train(&tiny(2), &two, &refs(&with(2)), &["--nproc-per-node", "2"]));
    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), 2);
    for (step, x) in &la {
        assert!((x - lb[step]).abs() <= 1e-5 * x.abs(), "step {step}: loss {x} vs {}", lb[step]);
    }
    for file in ["final/model.safetensors", "final/adapter.safetensors"] {
        let (wa, wb) = (tensors(&one.join(file)), tensors(&two.join(file)));
        let worst = wa.iter().map(|(name, (_, va))| max_abs_diff(va, &wb[name].1)).fold(0.0f32, f32::max);
        assert!(worst <= 2e-5, "{file}: largest difference {worst}");
    }
}

/// The tiny language model's logits for a fixed prompt.
pub fn llm_logits<B: burn::prelude::Backend>(model: &fila_model::fila::Fila<B>, device: &B::Device) -> Vec<f32> {
    use burn::prelude::*;
    let ids = Tensor::<B, 2, Int>::from_data(burn::tensor::TensorData::new(vec![1i64, 17, 30, 5, 9, 44, 2, 12], [1, 8]), device);
    model.llm.forward_embeds(model.llm.embed(ids), None, false).logits.into_data().convert::<f32>().to_vec().unwrap()
}

/// `fila-train --nproc-per-node n`.
pub fn launched(n: usize, config: &Path, out: &Path, sets: &[&str], extra: &[&str]) -> Output {
    let n = n.to_string();
    let mut args = vec!["--nproc-per-node", n.as_str()];
    args.extend(extra);
    fila_train(config, out, sets, &args)
}

/// Losses agree to 1e-5 relative and final weights to 2e-5 absolute: only float summation order
/// differs (micro-batches padded differently, gradients summed across ranks in rank order), as in
/// the accumulation test of `cli.rs`.
pub fn assert_same_run(a: &Path, b: &Path, what: &str) {
    assert_same_losses(a, b, what);
    let (wa, wb) = (tensors(&a.join("final/model.safetensors")), tensors(&b.join("final/model.safetensors")));
    assert_eq!(wa.len(), wb.len());
    let worst = wa.iter().map(|(name, (_, va))| max_abs_diff(va, &wb[name].1)).fold(0.0f32, f32::max);
    assert!(worst <= 2e-5, "{what}: largest weight difference {worst}");
}

pub fn assert_same_losses(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.keys().collect::<Vec<_>>(), lb.keys().collect::<Vec<_>>(), "{what}: steps differ");
    for (step, x) in &la {
        let y = lb[step];
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: step {step}: loss {x} vs {y}");
    }
}

/// One step of the tiny stage 1 in `dir/s1`, exported: `dir/s1/final`, the model a tiny stage 2
/// starts from.
pub fn stage1_export(dir: &Path) -> PathBuf {
    let s1 = dir.join("s1");
    ok(&fila_train(&tiny(1), &s1, &["train.max_steps=1"], &[]));
    s1.join("final")
}
