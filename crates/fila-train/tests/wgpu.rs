//! The trainer on Burn's wgpu backend (`--features wgpu`; CI runs it on Mesa's software Vulkan
//! driver), against the same runs on the CPU: the tiny stage 1, a stop and resume on wgpu, and the
//! tiny stage 2 from stage 1's export. This is the CubeCL path the CUDA build runs (the attention
//! seam's custom backward on a device-thread backend, bool masks stored as integers, Burn's tuned
//! kernels), without a GPU.
#![cfg(feature = "wgpu")]

mod common;

use common::*;
use std::collections::BTreeMap;

/// 4 steps of micro 2 × accumulation 2, a checkpoint every step, no warmup.
const FOUR_STEPS: &[&str] = &["train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "schedule.warmup_steps=0"];

/// Both backends compute in f32, in other summation orders; four AdamW steps (whose first updates
/// are ±lr wherever a gradient is nonzero) carry the difference into the losses.
const LOSS_TOL: f64 = 1e-3;

fn with(sets: &[&str], more: &[&'static str]) -> Vec<String> {
    sets.iter().chain(more).map(|s| s.to_string()).collect()
}

fn run(config: u8, out: &std::path::Path, sets: &[String], extra: &[&str]) -> String {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    ok(&fila_train(&tiny(config), out, &sets, extra))
}

fn assert_close(what: &str, cpu: &BTreeMap<u64, f64>, gpu: &BTreeMap<u64, f64>) {
    assert_eq!(cpu.keys().collect::<Vec<_>>(), gpu.keys().collect::<Vec<_>>(), "{what}: steps");
    for (step, a) in cpu {
        let b = gpu[step];
        eprintln!("{what} step {step}: cpu {a:.7} wgpu {b:.7} (rel. {:.1e})", (a - b).abs() / a.abs());
        assert!((a - b).abs() <= LOSS_TOL * a.abs(), "{what} step {step}: cpu loss {a} against wgpu {b}");
    }
}

/// Two wgpu runs that differ only in where AdamW runs: losses within 1e-5 relative, final weights
/// within 2e-5.
fn assert_same_run(what: &str, a: &std::path::Path, b: &std::path::Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.keys().collect::<Vec<_>>(), lb.keys().collect::<Vec<_>>(), "{what}: steps");
    for (step, x) in &la {
        assert!((x - lb[step]).abs() <= 1e-5 * x.abs(), "{what} step {step}: {x} against {}", lb[step]);
    }
    let (wa, wb) = (tensors(&a.join("final/model.safetensors")), tensors(&b.join("final/model.safetensors")));
    let worst = wa.iter().map(|(name, (_, v))| max_abs_diff(v, &wb[name].1)).fold(0.0f32, f32::max);
    assert!(worst <= 2e-5, "{what}: largest weight difference {worst}");
}

/// `configs/tiny/stage1.toml` starting from the FILA checkpoint `init` instead of fresh
/// parameters (each backend draws its own from the seed), with its paths made absolute.
fn stage1_from(init: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(tiny(1)).unwrap();
    let (head, rest) = text.split_once("[model]").unwrap();
    let data = &rest[rest.find("[data]").unwrap()..];
    let text = format!("{head}[model]\ncheckpoint = \"{}\"\n\n{data}", init.display()).replace("\"../../", &format!("\"{}/", repo().display()));
    let path = dir.join("stage1-from-checkpoint.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tiny_stages_on_wgpu_follow_the_cpu_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let cpu = with(FOUR_STEPS, &["device=cpu"]);
    let gpu = with(FOUR_STEPS, &["device=wgpu"]);
    // The starting point of both backends: four CPU steps of stage 1, exported.
    run(1, &dir("init"), &cpu, &[]);
    let stage1 = stage1_from(&dir("init").join("final"), tmp.path());
    let run1 = |out: &std::path::Path, sets: &[String], extra: &[&str]| {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        ok(&fila_train(&stage1, out, &sets, extra))
    };

    // Stage 1: the same four steps on both backends.
    run1(&dir("cpu1"), &cpu, &[]);
    let text = run1(&dir("gpu1"), &gpu, &[]);
    assert!(text.contains("device: wgpu;"), "the run names its device:\n{text}");
    let gpu1 = losses(&dir("gpu1"));
    assert_close("stage 1", &losses(&dir("cpu1")), &gpu1);
    assert!(gpu1[&4] < gpu1[&1], "the wgpu run trains: {gpu1:?}");

    // Stopped after two steps on wgpu and resumed there: the uninterrupted run's losses.
    run1(&dir("split"), &gpu, &["--stop-after", "2"]);
    let text = run1(&dir("split"), &gpu, &["--resume"]);
    assert!(text.contains("resumed from") && text.contains("at step 2"), "{text}");
    assert_close("stage 1 resumed", &gpu1, &losses(&dir("split")));

    // The optimizer offloaded to the CPU (`optimizer.offload = "cpu"`): the model and gradients
    // on wgpu, the state and the update (the fused CPU pass) in host memory. The same run as on
    // the device up to the update's float rounding; and its checkpoint resumes without offload.
    let offload = with(&gpu.iter().map(String::as_str).collect::<Vec<_>>(), &["optimizer.offload=cpu"]);
    run1(&dir("offload"), &offload, &[]);
    assert_same_run("stage 1, optimizer on the CPU", &dir("gpu1"), &dir("offload"));
    run1(&dir("offload-split"), &offload, &["--stop-after", "2"]);
    run1(&dir("offload-split"), &gpu, &["--resume"]);
    assert_same_run("stage 1, offloaded then resumed on the device", &dir("gpu1"), &dir("offload-split"));

    // Stage 2 (everything trained, tiled images) from the same export, on both backends.
    let init = format!("model.checkpoint={}", dir("init").join("final").display());
    let stage2 =
        |device: &'static str| with(&["train.max_steps=3", "schedule.warmup_steps=0"], &[device]).into_iter().chain([init.clone()]).collect::<Vec<_>>();
    run(2, &dir("cpu2"), &stage2("device=cpu"), &[]);
    run(2, &dir("gpu2"), &stage2("device=wgpu"), &[]);
    assert_close("stage 2", &losses(&dir("cpu2")), &losses(&dir("gpu2")));
}
