//! Several ranks through the real binary on CPU (the TCP collective): the same losses and weights
//! as one process with the same global batch, resume at another world size, and faults that end
//! every rank with an error naming the one at fault; the same in `bf16_mixed`, with the f32
//! master values of the optimizer shards checked against the model's bf16 weights.

mod common;

use common::*;
use fila_train::optim::state::shard_file;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Global batch 4 (micro 1) over 3 steps; `acc` is the per-rank accumulation for the world size.
fn sets(acc: usize) -> Vec<String> {
    ["train.max_steps=3", "schedule.warmup_steps=0", "checkpoint.every_steps=0", "checkpoint.keep_last=0", "batch.micro_batch_size=1"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("batch.accumulation_steps={acc}")])
        .collect()
}

/// Rank `rank` of `world` started by hand with torchrun's variables.
fn rank_process(rank: usize, world: usize, port: u16, config: &Path, out: &Path, sets: &[&str], timeout_s: &str) -> Child {
    let mut cmd = Command::new(common::binary());
    cmd.arg("--config").arg(config).arg("--set").arg(format!("checkpoint.output_dir={}", out.display()));
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("FILA_DIST_TIMEOUT", timeout_s)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn two_and_four_ranks_train_like_one_process_in_stage_1() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two, four) = (tmp.path().join("one"), tmp.path().join("two"), tmp.path().join("four"));
    ok(&fila_train(&tiny(1), &one, &refs(&sets(4)), &[]));
    let text = ok(&launched(2, &tiny(1), &two, &refs(&sets(2)), &[]));
    assert!(text.contains("2 ranks, optimizer state sharded"), "{text}");
    ok(&launched(4, &tiny(1), &four, &refs(&sets(1)), &[]));
    assert_eq!(losses(&one).len(), 3);
    assert_same_run(&one, &two, "2 ranks");
    assert_same_run(&one, &four, "4 ranks");
    // Rank 0 alone writes the logs and the export; every rank its optimizer shard.
    assert!(four.join("final/model.safetensors").is_file());
    for r in 0..4 {
        assert!(four.join(format!("step-3/optimizer-{r:05}-of-00004.safetensors")).is_file(), "shard {r}");
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(four.join("step-3/state.json")).unwrap()).unwrap();
    let single: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(one.join("step-3/state.json")).unwrap()).unwrap();
    assert_eq!(state["cursor"], single["cursor"], "the data cursor is the run's, not a rank's");
    assert_eq!(state["samples_seen"].as_u64(), Some(12));
    assert_eq!(state["tokens_seen"], single["tokens_seen"]);
}

#[test]
fn two_ranks_train_like_one_process_in_stage_2() {
    let tmp = tempfile::tempdir().unwrap();
    let init = format!("model.checkpoint={}", stage1_export(tmp.path()).display());
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let with = |acc| {
        let mut s = sets(acc);
        s.push(init.clone());
        s
    };
    // 2 steps of 4: the 9 instructions are cut to 8 per epoch on 2 ranks (even shards), so a
    // third step would read a different record.
    let with = |acc| {
        let mut s = with(acc);
        s[0] = "train.max_steps=2".into();
        s
    };
    ok(&fila_train(&tiny(2), &one, &refs(&with(4)), &[]));
    ok(&launched(2, &tiny(2), &two, &refs(&with(2)), &[]));
    assert_same_run(&one, &two, "stage 2, 2 ranks");

    // Uneven shards: 9 instructions without even-shard cutting give rank 0 five and rank 1 four,
    // so the second step has 2 micro-batches on rank 0 and 1 on rank 1 (global 6, then 3).
    let (one, two) = (tmp.path().join("one-uneven"), tmp.path().join("two-uneven"));
    let uneven =
        |acc: usize| vec![init.clone(), "data.loader.even_shards=false".into(), "batch.micro_batch_size=1".into(), format!("batch.accumulation_steps={acc}")];
    ok(&fila_train(&tiny(2), &one, &refs(&uneven(6)), &[]));
    ok(&launched(2, &tiny(2), &two, &refs(&uneven(3)), &[]));
    assert_eq!(losses(&one).len(), 2);
    assert_same_run(&one, &two, "stage 2, 2 uneven ranks");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(two.join("step-2/state.json")).unwrap()).unwrap();
    assert_eq!(state["samples_seen"].as_u64(), Some(9));
}

/// A 4-rank run stopped after 2 of 4 steps and resumed on 2 ranks, and a 2-rank run resumed on 1,
/// end where an uninterrupted run ends.
#[test]
fn checkpoints_resume_at_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let four_steps = |acc: usize| -> Vec<String> {
        let mut s = sets(acc);
        s[0] = "train.max_steps=4".into();
        s
    };
    let straight = tmp.path().join("straight");
    ok(&fila_train(&tiny(1), &straight, &refs(&four_steps(4)), &[]));

    let a = tmp.path().join("4-then-2");
    ok(&launched(4, &tiny(1), &a, &refs(&four_steps(1)), &["--stop-after", "2"]));
    assert!(a.join("step-2/optimizer-00003-of-00004.safetensors").is_file());
    let text = ok(&launched(2, &tiny(1), &a, &refs(&four_steps(2)), &["--resume"]));
    assert!(text.contains("at step 2"), "{text}");
    assert_same_run(&straight, &a, "4 ranks, then 2");

    let b = tmp.path().join("2-then-1");
    ok(&launched(2, &tiny(1), &b, &refs(&four_steps(2)), &["--stop-after", "2"]));
    ok(&fila_train(&tiny(1), &b, &refs(&four_steps(4)), &["--resume"]));
    assert_same_run(&straight, &b, "2 ranks, then 1");
    // The resumed single process wrote one optimizer file covering everything.
    assert!(b.join("step-4/optimizer.safetensors").is_file());
}

fn wait_for_steps(out: &Path, n: usize, children: &mut [Child]) {
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0) < n {
        for c in children.iter_mut() {
            if let Some(s) = c.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("a rank exited early ({s}):\n{err}");
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(c: Child) -> (Option<i32>, String) {
    let o = c.wait_with_output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_killed_rank_ends_the_others_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let port = free_port();
    let long = ["train.max_steps=100000", "checkpoint.every_steps=0"];
    let mut ranks: Vec<Child> = (0..3).map(|r| rank_process(r, 3, port, &tiny(1), &out, &long, "30")).collect();
    wait_for_steps(&out, 2, &mut ranks);
    let t0 = Instant::now();
    ranks[1].kill().unwrap(); // SIGKILL: no goodbye
    let results: Vec<(Option<i32>, String)> = ranks.into_iter().map(finish).collect();
    assert!(t0.elapsed() < Duration::from_secs(30), "the others took {:?} to stop", t0.elapsed());
    for r in [0, 2] {
        let (code, err) = &results[r];
        assert_eq!(*code, Some(1), "rank {r}: {err}");
        assert!(err.contains(&format!("rank {r}/3: error:")), "rank {r} names itself: {err}");
        assert!(err.contains("rank 1 closed its connection"), "rank {r}: {err}");
    }
}

#[test]
fn sigint_on_one_rank_stops_all_with_one_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let port = free_port();
    let long = ["train.max_steps=100000", "checkpoint.every_steps=0"];
    let mut ranks: Vec<Child> = (0..2).map(|r| rank_process(r, 2, port, &tiny(1), &out, &long, "60")).collect();
    wait_for_steps(&out, 2, &mut ranks);
    // The system call, not the `kill` program: minimal systems (no procps) lack it.
    let rc = unsafe { libc::kill(ranks[1].id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let results: Vec<(Option<i32>, String)> = ranks.into_iter().map(finish).collect();
    for (r, (code, err)) in results.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}: {err}");
    }
    let steps = losses(&out).len() as u64;
    let dir = out.join(format!("step-{steps}"));
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["reason"], "signal");
    assert!(dir.join("optimizer-00000-of-00002.safetensors").is_file() && dir.join("optimizer-00001-of-00002.safetensors").is_file());
    // One checkpoint, at the step both ranks agreed on.
    let checkpoints: Vec<PathBuf> =
        std::fs::read_dir(&out).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-")).collect();
    assert_eq!(checkpoints, vec![dir]);
}

#[test]
fn ranks_with_different_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let port = free_port();
    let r0 = rank_process(0, 2, port, &tiny(1), &out, &["optimizer.lr=1e-3"], "30");
    let r1 = rank_process(1, 2, port, &tiny(1), &out, &["optimizer.lr=2e-3"], "30");
    let results: BTreeMap<usize, (Option<i32>, String)> = [r0, r1].into_iter().map(finish).enumerate().collect();
    for (r, (code, err)) in &results {
        assert_eq!(*code, Some(1), "rank {r}: {err}");
        assert!(err.contains("rank 1 resolved a different config than rank 0"), "rank {r}: {err}");
    }
    assert!(!out.join("metrics.jsonl").exists(), "nothing trained");
}

/// The sets of a `steps`-step run of global batch 4 (micro 1 × `acc` per rank) in `bf16_mixed`:
/// bf16 product weights and f32 master slices in the sharded optimizer, the path every GPU run
/// takes (docs/precision.md), here on the CPU backend.
fn bf16_mixed(steps: u64, acc: usize) -> Vec<String> {
    let mut s = sets(acc);
    s[0] = format!("train.max_steps={steps}");
    s.push("precision=bf16_mixed".into());
    s
}

/// The spacing of bf16 values at `x` (8 significant bits; 0 below the normal range).
fn bf16_step(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0x7f80_0000) / 128.0
}

/// Two `bf16_mixed` runs with the same global batch: losses within 1e-5 relative and the f32
/// master values of the step-`step` checkpoints within 2e-5, as for f32 runs
/// ([`assert_same_run`]: only the summation order differs). A master that differs in its last
/// bits can round to the neighbouring bf16 value, so the exported weights agree to one bf16 step.
fn assert_same_bf16_run(a: &Path, b: &Path, step: u64, what: &str) {
    assert_same_losses(a, b, what);
    let dir = format!("step-{step}");
    let (ma, mb) = (optimizer_state(&a.join(&dir), "master"), optimizer_state(&b.join(&dir), "master"));
    let worst = ma.iter().map(|(name, va)| max_abs_diff(va, &mb[name])).fold(0.0f32, f32::max);
    assert!(worst <= 2e-5, "{what}: largest master difference {worst}");
    let (wa, wb) = (tensors(&a.join("final/model.safetensors")), tensors(&b.join("final/model.safetensors")));
    assert_eq!(wa.len(), wb.len());
    for (name, (_, va)) in &wa {
        for (x, y) in va.iter().zip(&wb[name].1) {
            assert!((x - y).abs() <= bf16_step(x.abs().max(y.abs())), "{what}: `{name}`: {x} vs {y}, more than one bf16 step apart");
        }
    }
}

/// `values` as the CPU backend stores them in bf16: Burn's cast, which rounds through f64 (half's
/// `bf16::from_f64`, which ignores the f32's last 3 mantissa bits) and so differs from a
/// correctly rounded conversion in about one element of 10^4.
fn stored_in_bf16(values: &[f32]) -> Vec<f32> {
    use burn::prelude::*;
    let n = values.len();
    let t = Tensor::<burn::backend::Flex, 1>::from_data(burn::tensor::TensorData::new(values.to_vec(), [n]), &Default::default());
    t.cast(burn::tensor::FloatDType::BF16).into_data().convert::<f32>().to_vec().unwrap()
}

/// In a `bf16_mixed` checkpoint the model's trainable weights (`trainable.safetensors`, rank 0's
/// model after the all-gather) are the f32 masters of all shards as the model stores them: the
/// bf16 rounding of each product weight, the master itself for norms and biases. The masters
/// keep what the rounding drops (almost none is a bf16 value), so a resume starts from them.
fn assert_weights_are_stored_masters(step_dir: &Path) {
    let masters = optimizer_state(step_dir, "master");
    let (mut product_elements, mut finer_than_bf16, mut f32_tensors) = (0, 0, 0);
    for (name, (shape, weight)) in tensors(&step_dir.join("trainable.safetensors")) {
        let master = &masters[&name];
        if fila_train::precision::is_product_weight(&name, shape.len()) {
            let rounded = stored_in_bf16(master);
            assert!(weight == rounded, "{}: `{name}` is not its master's bf16 rounding (max diff {})", step_dir.display(), max_abs_diff(&weight, &rounded));
            product_elements += master.len();
            finer_than_bf16 += master.iter().zip(&rounded).filter(|(m, r)| m != r).count();
        } else {
            assert!(&weight == master, "{}: f32 `{name}` differs from its master (max diff {})", step_dir.display(), max_abs_diff(&weight, master));
            f32_tensors += 1;
        }
    }
    assert!(product_elements > 10_000 && f32_tensors > 10, "{product_elements} product-weight elements, {f32_tensors} f32 tensors");
    assert!(
        finer_than_bf16 * 10 >= product_elements * 9,
        "{}: only {finer_than_bf16} of {product_elements} masters of product weights are finer than bf16",
        step_dir.display()
    );
}

/// `bf16_mixed` on several ranks through the binary: 2 ranks train like one process; a 2-rank
/// run stopped at step 2 resumes on 1 process and on 4 ranks with its optimizer state re-cut bit
/// for bit, and ends where the uninterrupted 2-rank run ends.
#[test]
fn bf16_mixed_on_two_ranks_trains_like_one_process_and_resumes_on_one_and_on_four() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let text = ok(&fila_train(&tiny(1), &one, &refs(&bf16_mixed(4, 4)), &[]));
    assert!(text.contains("`bf16_mixed` on `cpu` is for testing"), "{text}");
    ok(&launched(2, &tiny(1), &two, &refs(&bf16_mixed(4, 2)), &[]));
    assert_same_bf16_run(&one, &two, 4, "bf16_mixed, 2 ranks");
    assert_weights_are_stored_masters(&one.join("step-4"));
    assert_weights_are_stored_masters(&two.join("step-4"));

    for (world, acc) in [(1, 4), (4, 1)] {
        let what = format!("bf16_mixed, 2 ranks, then {world}");
        let out = tmp.path().join(format!("2-then-{world}"));
        ok(&launched(2, &tiny(1), &out, &refs(&bf16_mixed(4, 2)), &["--stop-after", "2"]));
        let step2 = out.join("step-2");
        assert_weights_are_stored_masters(&step2);
        let kinds = ["master", "exp_avg", "exp_avg_sq"];
        let saved = kinds.map(|k| optimizer_state(&step2, k));
        let weights = std::fs::read(step2.join("trainable.safetensors")).unwrap();
        // Resumed as a run that ends at step 2, the new ranks write step 2 again at once, from
        // the state they read: the same values, re-cut into their shards.
        let text = ok(&launched(world, &tiny(1), &out, &refs(&bf16_mixed(2, acc)), &["--resume"]));
        assert!(text.contains("at step 2"), "{text}");
        assert!(step2.join(shard_file(world - 1, world)).is_file(), "{what}: step-2 rewritten by {world} ranks");
        for (kind, before) in kinds.iter().zip(&saved) {
            let after = optimizer_state(&step2, kind);
            for (name, values) in before {
                assert!(after[name] == *values, "{what}: `{kind}.{name}` changed on the re-cut (max diff {})", max_abs_diff(&after[name], values));
            }
        }
        assert!(std::fs::read(step2.join("trainable.safetensors")).unwrap() == weights, "{what}: trainable weights changed");
        ok(&launched(world, &tiny(1), &out, &refs(&bf16_mixed(4, acc)), &["--resume"]));
        assert_same_bf16_run(&two, &out, 4, &what);
        assert_weights_are_stored_masters(&out.join("step-4"));
    }
}

/// A `bf16_mixed` 2-rank run whose rank 1 is killed (SIGKILL) mid-run and that is then resumed
/// from its last checkpoint ends with the uninterrupted run's losses, weights and optimizer
/// shards bit for bit.
#[test]
fn bf16_mixed_killed_rank_then_resume_ends_bit_for_bit_like_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    let mut s = bf16_mixed(8, 2);
    s[2] = "checkpoint.every_steps=2".into();
    ok(&launched(2, &tiny(1), &straight, &refs(&s), &[]));
    let port = free_port();
    let mut ranks: Vec<Child> = (0..2).map(|r| rank_process(r, 2, port, &tiny(1), &killed, &refs(&s), "30")).collect();
    // Step 3 logged: the step-2 checkpoint is in place.
    wait_for_steps(&killed, 3, &mut ranks);
    ranks[1].kill().unwrap(); // SIGKILL
    let results: Vec<(Option<i32>, String)> = ranks.into_iter().map(finish).collect();
    assert_eq!(results[0].0, Some(1), "rank 0 stops with an error, before the end of the run: {}", results[0].1);
    let text = ok(&launched(2, &tiny(1), &killed, &refs(&s), &["--resume"]));
    assert!(text.contains("resumed from"), "{text}");
    assert_eq!(losses(&straight), losses(&killed));
    let same = |file: &str| std::fs::read(straight.join(file)).unwrap() == std::fs::read(killed.join(file)).unwrap();
    for file in ["final/model.safetensors", "step-8/optimizer-00000-of-00002.safetensors", "step-8/optimizer-00001-of-00002.safetensors"] {
        assert!(same(file), "{file} differs");
    }
}
