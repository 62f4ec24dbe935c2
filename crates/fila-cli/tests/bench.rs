//! `fila bench --json` end to end at the tiny size on CPU: the fields `scripts/gpu/gpu_bench.sh` and
//! `scripts/bench/bench_cpu_compare.py` read, with values that follow from the batch (tokens per step,
//! the canvas cycle, the optimizer slice) and from each other (throughput, FLOPs, MFU).

use serde_json::Value;
use std::process::Command;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fila")).arg("bench").args(args).arg("--json").output().expect("running fila bench");
    assert!(out.status.success(), "fila bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().expect("one JSON line")).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

#[test]
fn stage_two_recipe_cycles_the_canvases_with_a_sharded_optimizer() {
    let v = bench(&[
        "--size",
        "tiny",
        "--stage",
        "2",
        "--batch-shape",
        "recipe",
        "--activation-checkpointing",
        "true",
        "--optimizer",
        "--optimizer-world",
        "8",
        "--steps",
        "5",
        "--peak-tflops",
        "1",
    ]);
    assert_eq!(v["warmup_steps"], 5, "one warm-up step per canvas");
    assert_eq!(v["batch"], 1);
    assert_eq!(v["step_s"].as_array().unwrap().len(), 5);
    // 56-pixel tiles of 4×4 cells: 16 visual tokens per view, plus 32 text tokens; the cycle
    // starts again after the 5 warm-up steps.
    assert_eq!(v["step_canvases"], serde_json::json!([[[2, 2]], [[1, 2]], [[2, 1]], [[1, 3]], [[3, 1]]]));
    assert_eq!(v["step_tokens"], serde_json::json!([5 * 16 + 32, 3 * 16 + 32, 3 * 16 + 32, 4 * 16 + 32, 4 * 16 + 32]));
    let seconds: f64 = v["step_s"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).sum();
    assert!(seconds > 0.0);
    assert!((f(&v, "tokens_per_s") - 464.0 / seconds).abs() < 1e-6 * f(&v, "tokens_per_s"));
    assert!((f(&v, "samples_per_s") - 5.0 / seconds).abs() < 1e-6 * f(&v, "samples_per_s"));

    let flops = &v["flops_per_step"];
    let (fwd, bwd, rec, total) = (f(flops, "forward"), f(flops, "backward"), f(flops, "recompute"), f(flops, "total"));
    assert!(rec > 0.0 && rec < fwd, "the second forward of the decoder layers and the encoder is part of the forward");
    assert!(bwd > 1.9 * fwd && bwd < 2.0 * fwd, "everything trains: backward is 2× forward but the pixel inputs' gradients");
    assert!((total - (fwd + bwd + rec)).abs() <= 2.0);
    let achieved = f(&v, "achieved_tflops") * 1e12;
    assert!((achieved - total * 5.0 / seconds).abs() < 1e-3 * achieved);
    let mfu = f(&v, "mfu");
    assert!((mfu - achieved / 1e12).abs() < 1e-9, "MFU against the 1 TFLOP/s given");
    assert!(mfu > 0.0 && mfu < 1.0, "a tiny model on CPU reaches a fraction of 1 TFLOP/s: {mfu}");
    assert!(f(&v, "mfu_without_recompute") < mfu);

    // One rank's share of 8: whole parameters until 1/8 of the trainable elements.
    let (slice, trainable) = (f(&v, "optimizer_elements"), f(&v, "trainable"));
    assert!(slice >= trainable / 8.0 && slice < trainable / 4.0, "{slice} of {trainable}");
    let peak = f(&v, "peak_memory_bytes");
    assert!(peak > 10e6 && peak < 8e9, "peak RSS {peak}");
    assert!(v["peak_memory_source"].as_str().unwrap().contains("VmHWM"));
}

#[test]
fn stage_one_default_batch_without_optimizer() {
    let v = bench(&["--size", "tiny", "--stage", "1", "--steps", "2"]);
    assert_eq!(v["batch_shape"], "canvas2x2");
    assert_eq!(v["activation_checkpointing"], false);
    assert_eq!(v["precision"], "F32");
    assert_eq!(v["step_tokens"], serde_json::json!([112, 112]));
    assert!(v["mfu"].is_null(), "no peak on CPU unless given");
    assert!(v["optimizer_elements"].is_null());
    let flops = &v["flops_per_step"];
    assert_eq!(f(flops, "recompute"), 0.0);
    // Frozen towers and LLM: no weight gradients there, so far less than 2× the forward.
    assert!(f(flops, "backward") < 1.5 * f(flops, "forward"));
    for key in ["user_s", "wall_s", "median_s", "mean_s", "samples_per_s"] {
        assert!(f(&v, key) >= 0.0, "{key}");
    }
}

#[test]
fn the_real_size_asks_for_a_gpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_fila")).args(["bench", "--size", "real"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run it on a GPU"));
}
