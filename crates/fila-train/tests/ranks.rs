//! Several ranks through the real binary on CPU (the TCP collective): the same losses and weights
//! as one process with the same global batch, resume at another world size, and faults that end
//! every rank with an error naming the one at fault.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Global batch 4 (micro 1) over 3 steps; `acc` is the per-rank accumulation for the world size.
fn sets(acc: usize) -> Vec<String> {
    ["train.max_steps=3", "schedule.warmup_steps=0", "checkpoint.every_steps=0", "checkpoint.keep_last=0", "batch.micro_batch_size=1"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("batch.accumulation_steps={acc}")])
        .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `fila-train --nproc-per-node n`.
fn launched(n: usize, config: &Path, out: &Path, sets: &[&str], extra: &[&str]) -> Output {
    let n = n.to_string();
    let mut args = vec!["--nproc-per-node", n.as_str()];
    args.extend(extra);
    fila_train(config, out, sets, &args)
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

/// Losses agree to 1e-5 relative and final weights to 2e-5 absolute: only float summation order
/// differs (micro-batches padded differently, gradients summed across ranks in rank order), as in
/// the accumulation test of `cli.rs`.
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.keys().collect::<Vec<_>>(), lb.keys().collect::<Vec<_>>(), "{what}: steps differ");
    for (step, x) in &la {
        let y = lb[step];
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: step {step}: loss {x} vs {y}");
    }
    let (wa, wb) = (tensors(&a.join("final/model.safetensors")), tensors(&b.join("final/model.safetensors")));
    assert_eq!(wa.len(), wb.len());
    let worst = wa.iter().map(|(name, (_, va))| max_abs_diff(va, &wb[name].1)).fold(0.0f32, f32::max);
    assert!(worst <= 2e-5, "{what}: largest weight difference {worst}");
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
    let s1 = tmp.path().join("s1");
    ok(&fila_train(&tiny(1), &s1, &["train.max_steps=1"], &[]));
    let init = format!("model.checkpoint={}", s1.join("final").display());
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
