//! The trainer through its CLI on the tiny configs: resume, accumulation, freezing, config errors,
//! TensorBoard, stage 1 → stage 2, signals.

mod common;

use common::*;
use std::path::Path;

/// Shorter than the config's run: 4 steps of micro 2 × accumulation 2 (the 8 captions, 2 epochs
/// capped), a checkpoint every step, no warmup so every step moves the weights.
const FOUR_STEPS: &[&str] = &["train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "schedule.warmup_steps=0"];

#[test]
fn two_steps_then_resume_equals_four_straight_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    ok(&fila_train(&tiny(1), &straight, FOUR_STEPS, &[]));
    ok(&fila_train(&tiny(1), &split, FOUR_STEPS, &["--stop-after", "2"]));
    assert!(!split.join("final").exists(), "a stopped run exports nothing");
    assert!(split.join("step-2").is_dir());
    // A fresh start into a folder with checkpoints is refused.
    let refused = failed(&fila_train(&tiny(1), &split, FOUR_STEPS, &[]));
    assert!(refused.contains("--resume"), "{refused}");
    let text = ok(&fila_train(&tiny(1), &split, FOUR_STEPS, &["--resume"]));
    assert!(text.contains("resumed from") && text.contains("at step 2"), "{text}");
    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "loss sequences differ");
    // Losses fall on the tiny data (the run really trains).
    assert!(a[&4] < a[&1], "{a:?}");
    let fa = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let fb = std::fs::read(split.join("final/model.safetensors")).unwrap();
    assert!(fa == fb, "final weights differ");
    let oa = std::fs::read(straight.join("step-4/optimizer.safetensors")).unwrap();
    let ob = std::fs::read(split.join("step-4/optimizer.safetensors")).unwrap();
    assert!(oa == ob, "optimizer states differ");
    // --resume DIR from an older checkpoint replays the same steps 3 and 4.
    let again = tmp.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    ok(&fila_train(&tiny(1), &again, FOUR_STEPS, &["--resume", straight.join("step-2").to_str().unwrap()]));
    assert_eq!(losses(&again)[&4], a[&4]);
}

#[test]
fn accumulation_4x1_equals_1x4() {
    // Micro-batch 4 with 1 accumulation step against micro-batch 1 with 4: the same 4 samples per
    // step and the same token-weighted mean loss. Only float summation order differs (padding to
    // the longest sample changes matmul shapes; per-sample vs batched reductions), so losses agree
    // to ~1e-6 relative and weights after 2 AdamW steps to a small fraction of lr = 1e-3.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("4x1"), tmp.path().join("1x4"));
    let common = ["train.max_steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=0"];
    let run = |out: &Path, micro: &str, acc: &str| {
        let sets: Vec<&str> = common.iter().copied().chain([micro, acc]).collect();
        ok(&fila_train(&tiny(1), out, &sets, &[]));
    };
    run(&a, "batch.micro_batch_size=4", "batch.accumulation_steps=1");
    run(&b, "batch.micro_batch_size=1", "batch.accumulation_steps=4");
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 2);
    for (step, x) in &la {
        let y = lb[step];
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {step}: loss {x} vs {y}");
    }
    let (wa, wb) = (tensors(&a.join("final/model.safetensors")), tensors(&b.join("final/model.safetensors")));
    let mut worst = 0.0f32;
    for (name, (_, va)) in &wa {
        worst = worst.max(max_abs_diff(va, &wb[name].1));
    }
    assert!(worst <= 2e-5, "largest weight difference {worst}");
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let unknown = failed(&fila_train(&tiny(1), &out, &["optimizer.lrr=1e-3"], &["--check"]));
    assert!(unknown.contains("optimizer") && unknown.contains("lrr"), "{unknown}");
    let bad_type = failed(&fila_train(&tiny(1), &out, &["optimizer.lr=fast"], &["--check"]));
    assert!(bad_type.contains("`optimizer.lr`"), "{bad_type}");
    let bad_value = failed(&fila_train(&tiny(1), &out, &["optimizer.lr=-1.0"], &["--check"]));
    assert!(bad_value.contains("`optimizer.lr`") && bad_value.contains("positive"), "{bad_value}");
    let top = failed(&fila_train(&tiny(1), &out, &["stagee=1"], &["--check"]));
    assert!(top.contains("stagee"), "{top}");
    let data = failed(&fila_train(&tiny(1), &out, &["data.max_lenn=3"], &["--check"]));
    assert!(data.contains("data") && data.contains("max_lenn"), "{data}");
    let stage = failed(&fila_train(&tiny(1), &out, &["stage=3"], &["--check"]));
    assert!(stage.contains("`stage`"), "{stage}");
    let module = failed(&fila_train(&tiny(2), &out, &["trainable.modules=[\"vision\"]", "model.checkpoint=/nonexistent"], &["--check"]));
    assert!(module.contains("`trainable.modules`") && module.contains("`vision`"), "{module}");
    let wgpu = failed(&fila_train(&tiny(1), &out, &["device=wgpu", "precision=bf16_mixed"], &["--check"]));
    assert!(wgpu.contains("`precision`") && wgpu.contains("on `wgpu` use `f32`"), "{wgpu}");
    assert!(!out.exists(), "--check writes nothing");
    ok(&fila_train(&tiny(1), &out, &[], &["--check"]));
    // On the CPU, `bf16_mixed` runs for tests (tests/ranks.rs).
    ok(&fila_train(&tiny(1), &out, &["precision=bf16_mixed"], &["--check"]));
}

#[test]
fn resume_refuses_a_changed_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&fila_train(&tiny(1), &out, &["train.max_steps=1"], &["--stop-after", "1"]));
    let e = failed(&fila_train(&tiny(1), &out, &["train.max_steps=1", "batch.micro_batch_size=1"], &["--resume"]));
    assert!(e.contains("`batch.micro_batch_size`") && e.contains("checkpoint has 2"), "{e}");
    let e = failed(&fila_train(&tiny(1), &out, &["train.max_steps=1", "model.llm.hidden_size=64"], &["--resume"]));
    assert!(e.contains("`model.llm.hidden_size`"), "{e}");
    // Loader threads are not geometry.
    ok(&fila_train(&tiny(1), &out, &["train.max_steps=1", "data.loader.workers=1"], &["--resume"]));
}

#[test]
fn resume_with_a_new_run_length_follows_its_schedule() {
    // Stopped at step 2 of an 8-step run, resumed as a 4-step run: steps 3 and 4 take the
    // learning rates of a 4-step run, and the run ends at 4 with its export.
    let tmp = tempfile::tempdir().unwrap();
    let (four, cut) = (tmp.path().join("four"), tmp.path().join("cut"));
    ok(&fila_train(&tiny(1), &four, FOUR_STEPS, &[]));
    let eight: Vec<&str> = FOUR_STEPS.iter().copied().chain(["train.max_steps=8"]).collect();
    ok(&fila_train(&tiny(1), &cut, &eight, &["--stop-after", "2"]));
    let text = ok(&fila_train(&tiny(1), &cut, FOUR_STEPS, &["--resume"]));
    assert!(text.contains("run length changed from 8 to 4 steps"), "{text}");
    let (lr4, lr_cut) = (metric(&four, "lr"), metric(&cut, "lr"));
    assert_eq!(lr_cut.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(lr_cut[&2] > lr4[&2], "steps 1-2 ran on the 8-step schedule: {lr_cut:?} vs {lr4:?}");
    for step in [3, 4] {
        assert!((lr_cut[&step] - lr4[&step]).abs() <= 1e-12, "step {step}: {lr_cut:?} vs {lr4:?}");
    }
    assert!(cut.join("final/model.safetensors").is_file());
    // A length below the checkpoint's step is refused, naming the key and the smallest value.
    let short = tmp.path().join("short");
    ok(&fila_train(&tiny(1), &short, &eight, &["--stop-after", "3"]));
    let two: Vec<&str> = FOUR_STEPS.iter().copied().chain(["train.max_steps=2"]).collect();
    let e = failed(&fila_train(&tiny(1), &short, &two, &["--resume"]));
    assert!(e.contains("`train.max_steps`") && e.contains("step 3"), "{e}");
}

#[test]
fn stage1_then_stage2_and_tensorboard_scalars() {
    let tmp = tempfile::tempdir().unwrap();
    let (s1, s2) = (tmp.path().join("s1"), tmp.path().join("s2"));
    ok(&fila_train(&tiny(1), &s1, &[], &[]));
    let final1 = s1.join("final");
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(final1.join(f).is_file(), "final/{f}");
    }
    let init = format!("model.checkpoint={}", final1.display());
    ok(&fila_train(&tiny(2), &s2, &[&init], &[]));
    assert_eq!(losses(&s2).len(), 5, "9 instructions, micro 1 × accumulation 2 → 5 steps");
    // The event files, read back in Rust (framing, both CRCs, protobuf): every scalar at every step.
    let tb2 = tensorboard_scalars(&s2.join("tensorboard"));
    for tag in ["train/loss", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/step_time_s", "train/lr/x0.1", "train/lr/x1"] {
        let points = tb2.get(tag).unwrap_or_else(|| panic!("no `{tag}` in {:?}", tb2.keys()));
        assert_eq!(points.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "{tag}: {points:?}");
        assert!(points.iter().all(|p| p.1.is_finite()), "{tag}: {points:?}");
    }
    // The values are the run's: losses and learning rates as in metrics.jsonl (f32 in the event
    // file), and the towers' LR group at 0.1 × the base rate.
    let (loss2, lr2) = (losses(&s2), metric(&s2, "lr"));
    for (i, (step, loss)) in tb2["train/loss"].iter().enumerate() {
        assert_eq!(*loss, loss2[&(*step as u64)] as f32, "train/loss at step {step}");
        let (x1, x01) = (tb2["train/lr/x1"][i].1, tb2["train/lr/x0.1"][i].1);
        assert_eq!(x1, lr2[&(*step as u64)] as f32, "train/lr/x1 at step {step}");
        assert!((x01 - 0.1 * x1).abs() <= 1e-6 * x1.abs(), "step {step}: x0.1 {x01} vs x1 {x1}");
    }
    assert!(tb2["train/tokens_per_s"].iter().all(|p| p.1 > 0.0), "{:?}", tb2["train/tokens_per_s"]);
    assert!(!tb2.contains_key("train/lr"), "grouped runs log the groups, not `train/lr`");
    let tb1 = tensorboard_scalars(&s1.join("tensorboard"));
    let steps1: Vec<i64> = losses(&s1).keys().map(|s| *s as i64).collect();
    assert!(!steps1.is_empty());
    for tag in ["train/lr", "train/loss"] {
        let points = tb1.get(tag).unwrap_or_else(|| panic!("no `{tag}` in {:?}", tb1.keys()));
        assert_eq!(points.iter().map(|p| p.0).collect::<Vec<_>>(), steps1, "{tag}");
    }
}

/// Scalars per tag as `(step, value)`, read from the run's TensorBoard event files by
/// `common/tfevents.rs` (`scripts/read_tensorboard.py DIR` gives TensorBoard's own reading).
fn tensorboard_scalars(dir: &Path) -> std::collections::BTreeMap<String, Vec<(i64, f32)>> {
    tfevents::read_scalars(dir).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn sigint_finishes_the_step_checkpoints_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let child = std::process::Command::new(common::binary())
        .arg("--config")
        .arg(tiny(1))
        .args(["--set", &format!("checkpoint.output_dir={}", out.display())])
        .args(["--set", "train.max_steps=1000", "--set", "checkpoint.every_steps=0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0) < 2 {
        assert!(t0.elapsed().as_secs() < 60, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Twice at once, as `timeout` delivers it (to the child, then to its process group): still one
    // graceful stop.
    for _ in 0..2 {
        // The system call, not the `kill` program: minimal systems (no procps) lack it.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    let steps = losses(&out).len() as u64;
    let dir = out.join(format!("step-{steps}"));
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["reason"], "signal");
    assert_eq!(state["step"].as_u64(), Some(steps));
}

#[test]
fn sigkill_then_resume_goes_on_from_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (killed, straight) = (tmp.path().join("killed"), tmp.path().join("straight"));
    let sets = ["train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=0", "schedule.warmup_steps=0"];
    let mut cmd = std::process::Command::new(common::binary());
    cmd.arg("--config").arg(tiny(1)).args(["--set", &format!("checkpoint.output_dir={}", killed.display())]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !killed.join("step-2/state.json").exists() {
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Whatever it was doing, no half-written checkpoint is visible and the newest one loads.
    let text = ok(&fila_train(&tiny(1), &killed, &sets, &["--resume"]));
    assert!(text.contains("resumed from"), "{text}");
    ok(&fila_train(&tiny(1), &straight, &sets, &[]));
    let (a, b) = (losses(&straight), losses(&killed));
    assert_eq!(a, b, "after the kill and resume the losses follow the uninterrupted run");
    assert!(std::fs::read(straight.join("final/model.safetensors")).unwrap() == std::fs::read(killed.join("final/model.safetensors")).unwrap());
}

/// Three steps of the tiny config into `tmp/plain`, and with `setting` into `tmp/changed`; asserts
/// that the losses agree within 1e-6 relative.
fn three_steps_with_the_same_losses(tmp: &Path, setting: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (plain, changed) = (tmp.join("plain"), tmp.join("changed"));
    ok(&fila_train(&tiny(1), &plain, &["train.max_steps=3"], &[]));
    ok(&fila_train(&tiny(1), &changed, &["train.max_steps=3", setting], &[]));
    let (a, b) = (losses(&plain), losses(&changed));
    assert_eq!(a.len(), 3);
    for (step, x) in &a {
        assert!((x - b[step]).abs() <= 1e-6 * x.abs(), "{setting}, step {step}: loss {x} vs {}", b[step]);
    }
    (plain, changed)
}

#[test]
fn activation_checkpointing_keeps_the_losses() {
    let tmp = tempfile::tempdir().unwrap();
    // Recomputed layers run the same operations; only float summation order may differ (the
    // gradients' own comparison is in tests/recompute.rs).
    let (plain, recomputed) = three_steps_with_the_same_losses(tmp.path(), "train.activation_checkpointing=true");
    let (wa, wb) = (tensors(&plain.join("final/model.safetensors")), tensors(&recomputed.join("final/model.safetensors")));
    let worst = wa.iter().map(|(name, (_, va))| max_abs_diff(va, &wb[name].1)).fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "largest weight difference {worst}");
}

#[test]
fn sequence_length_buckets_keep_the_losses() {
    let tmp = tempfile::tempdir().unwrap();
    // Padding is masked out of attention and the loss: the same losses.
    three_steps_with_the_same_losses(tmp.path(), "data.loader.seq_len_buckets=[48, 96, 400]");
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("blowup");
    // A huge learning rate makes the first real update overflow the weights.
    let output = fila_train(
        &tiny(1),
        &out,
        &["train.max_steps=20", "optimizer.lr=1e30", "train.max_grad_norm=0.0", "train.max_nonfinite_steps=2", "schedule.warmup_ratio=0.0"],
        &[],
    );
    let err = failed(&output);
    assert!(err.contains("2 steps in a row had a non-finite loss or gradient"), "{err}");
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let finite: Vec<bool> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["finite"].as_bool().unwrap()).collect();
    assert_eq!(&finite[finite.len() - 2..], &[false, false]);
    assert!(finite.len() < 20, "the run must stop early, ran {} steps", finite.len());
    let newest = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, p))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
        .expect("a checkpoint was written");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(newest.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["reason"], "nonfinite");
}

#[test]
fn a_run_whose_every_record_is_bad_fails_naming_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let empty = tmp.path().join("no-images");
    std::fs::create_dir_all(&empty).unwrap();
    let folder = format!("data.sources.0.image_folder=\"{}\"", empty.display());
    let e = failed(&fila_train(&tiny(1), &out, &[folder.as_str()], &[]));
    assert!(e.contains("no training step ran") && e.contains("none of the 8 records"), "{e}");
    assert!(e.contains("missing_image") && e.contains("fila data check"), "{e}");
    assert!(!out.join("final").exists());
}
