//! ZeRO-3 (`distributed.zero_stage = 3`: the trainable weights sharded too, each segment's
//! gathered just before it runs) through the real binary on CPU ranks: one process's losses
//! (1e-5 relative) and final weights (2e-5) in stage 1 and stage 2 on 2 and 4 ranks, with and
//! without activation checkpointing; checkpoints resumed across ZeRO stages and world sizes; and
//! the per-rank peak RSS against the plan on 1, 2 and 4 ranks.

mod common;

use common::*;

/// `n` steps of global batch 4 (micro 1) with `acc` micro-batches per rank, and `more`.
fn sets(steps: u64, acc: usize, more: &[&str]) -> Vec<String> {
    [format!("train.max_steps={steps}"), format!("batch.accumulation_steps={acc}")]
        .into_iter()
        .chain(["schedule.warmup_steps=0", "checkpoint.every_steps=0", "checkpoint.keep_last=0", "batch.micro_batch_size=1"].map(String::from))
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

fn zero3(steps: u64, acc: usize, more: &[&str]) -> Vec<String> {
    let mut s = sets(steps, acc, more);
    s.push("distributed.zero_stage=3".into());
    s
}

#[test]
fn stage_1_on_two_and_four_ranks_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    for (name, more) in [("plain", vec![]), ("checkpointed", vec!["train.activation_checkpointing=true"])] {
        ok(&fila_train(&tiny(1), &dir(&format!("one-{name}")), &refs(&sets(3, 4, &more)), &[]));
        let text = ok(&launched(2, &tiny(1), &dir(&format!("two-{name}")), &refs(&zero3(3, 2, &more)), &[]));
        assert!(text.contains("ZeRO-3"), "{text}");
        ok(&launched(4, &tiny(1), &dir(&format!("four-{name}")), &refs(&zero3(3, 1, &more)), &[]));
        assert_same_run(&dir(&format!("one-{name}")), &dir(&format!("two-{name}")), &format!("stage 1 {name}, 2 ranks"));
        assert_same_run(&dir(&format!("one-{name}")), &dir(&format!("four-{name}")), &format!("stage 1 {name}, 4 ranks"));
    }
}

/// Under `bf16_mixed` the model stores bf16 weights: ZeRO-3 gathers the f32 masters and casts
/// them on use, ZeRO-2 casts them when it writes them back; the same bf16 values either way, so
/// the two runs are the same bits (stage 2 with checkpointing: every segment gathered).
#[test]
fn bf16_mixed_under_zero_3_gives_zero_2_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let init = format!("model.checkpoint={}", stage1_export(tmp.path()).display());
    let more = [init.as_str(), "train.activation_checkpointing=true", "precision=bf16_mixed"];
    let (two, three) = (tmp.path().join("zero2"), tmp.path().join("zero3"));
    ok(&launched(2, &tiny(2), &two, &refs(&sets(2, 2, &more)), &[]));
    ok(&launched(2, &tiny(2), &three, &refs(&zero3(2, 2, &more)), &[]));
    assert_eq!(losses(&two), losses(&three));
    let (a, b) = (tensors(&two.join("final/model.safetensors")), tensors(&three.join("final/model.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, (_, v)) in &a {
        assert!(v.iter().zip(&b[name].1).all(|(x, y)| x.to_bits() == y.to_bits()), "`{name}` differs");
    }
}

/// Stage 2, every module trained, on 2 ranks (and 4, checkpointed): without checkpointing the
/// step gathers the whole model; with it each segment gathers its own buckets (small ones here,
/// so segments have several), twice per layer. Uneven shards give one rank a step with fewer micro-batches: it still takes part in the
/// other rank's gathers.
#[test]
fn stage_2_with_and_without_checkpointing_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let init = format!("model.checkpoint={}", stage1_export(tmp.path()).display());
    let dir = |n: &str| tmp.path().join(n);
    for (name, more) in
        [("plain", vec![init.as_str()]), ("checkpointed", vec![init.as_str(), "train.activation_checkpointing=true", "distributed.bucket_elements=40000"])]
    {
        ok(&fila_train(&tiny(2), &dir(&format!("one-{name}")), &refs(&sets(2, 4, &more)), &[]));
        // Two ranks of two micro-batches, four of one.
        for (ranks, acc) in [(2, 2), (4, 1)] {
            let run = format!("{ranks}-{name}");
            ok(&launched(ranks, &tiny(2), &dir(&run), &refs(&zero3(2, acc, &more)), &[]));
            assert_same_run(&dir(&format!("one-{name}")), &dir(&run), &format!("stage 2 {name}, {ranks} ranks"));
        }
    }
    // One epoch of 9 records without even-shard cutting: rank 0 reads five, rank 1 four, so in
    // the second (last) step rank 1 has one micro-batch where rank 0 has two.
    let uneven = |acc: usize| -> Vec<String> {
        [init.as_str(), "train.activation_checkpointing=true", "distributed.bucket_elements=40000", "data.loader.even_shards=false", "batch.micro_batch_size=1"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("batch.accumulation_steps={acc}")])
            .collect()
    };
    ok(&fila_train(&tiny(2), &dir("one-uneven"), &refs(&uneven(6)), &[]));
    let mut two = uneven(3);
    two.push("distributed.zero_stage=3".into());
    ok(&launched(2, &tiny(2), &dir("two-uneven"), &refs(&two), &[]));
    assert_eq!(losses(&dir("two-uneven")).len(), 2);
    assert_same_run(&dir("one-uneven"), &dir("two-uneven"), "stage 2, uneven shards, 2 ranks");
}

/// Checkpoints are the same files under both stages: ZeRO-2 on 2 ranks stopped at step 2 and
/// resumed under ZeRO-3 on 4, and ZeRO-3 on 2 resumed as one ZeRO-2 process, end where an
/// uninterrupted run ends.
#[test]
fn checkpoints_resume_across_zero_stages_and_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let init = format!("model.checkpoint={}", stage1_export(tmp.path()).display());
    let more = [init.as_str(), "train.activation_checkpointing=true"];
    let dir = |n: &str| tmp.path().join(n);
    ok(&fila_train(&tiny(2), &dir("straight"), &refs(&sets(2, 4, &more)), &[]));

    ok(&launched(2, &tiny(2), &dir("2-then-3"), &refs(&sets(2, 2, &more)), &["--stop-after", "1"]));
    let text = ok(&launched(4, &tiny(2), &dir("2-then-3"), &refs(&zero3(2, 1, &more)), &["--resume"]));
    assert!(text.contains("at step 1"), "{text}");
    assert_same_run(&dir("straight"), &dir("2-then-3"), "ZeRO-2 on 2 ranks, then ZeRO-3 on 4");

    ok(&launched(2, &tiny(2), &dir("3-then-2"), &refs(&zero3(2, 2, &more)), &["--stop-after", "1"]));
    ok(&fila_train(&tiny(2), &dir("3-then-2"), &refs(&sets(2, 4, &more)), &["--resume"]));
    assert_same_run(&dir("straight"), &dir("3-then-2"), "ZeRO-3 on 2 ranks, then one process");
}

/// The peak resident set per rank falls with the world size as `--plan` says: one step of a
/// Llama 512 wide with 8 layers (23 M parameters, all trained in f32) under ZeRO-3 on 1, 2 and 4
/// ranks, each rank's peak RSS within the memory plan's band (−25 %/+10 % of its total,
/// `tests/memory_plan.rs`) and both the plan and the worst rank's peak lower at each larger world.
#[test]
fn the_peak_resident_set_per_rank_falls_with_the_world_size_as_planned() {
    const MIB: f64 = (1u64 << 20) as f64;
    let tmp = tempfile::tempdir().unwrap();
    let wide = [
        "model.llm.hidden_size=512",
        "model.llm.intermediate_size=1376",
        "model.llm.num_hidden_layers=8",
        "model.llm.num_attention_heads=8",
        "model.llm.head_dim=64",
        "trainable.modules=[\"all\"]",
        "train.activation_checkpointing=true",
    ];
    let mut points: Vec<(usize, f64, f64)> = Vec::new();
    for world in [1usize, 2, 4] {
        let sets = zero3(1, 4 / world, &wide);
        let loaded = fila_train::config::LoadedConfig::load(&tiny(1), &sets).unwrap();
        let planned = fila_train::plan::plan_of(&loaded, world).unwrap().total() / MIB;
        let text = ok(&launched(world, &tiny(1), &tmp.path().join(format!("w{world}")), &refs(&sets), &["--profile-memory"]));
        let peaks: Vec<f64> = text
            .lines()
            .filter_map(|l| l.split_once("memory run: peak RSS ").map(|(_, rest)| rest))
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(peaks.len(), world, "one peak per rank in\n{text}");
        let worst = peaks.iter().copied().fold(0.0, f64::max);
        eprintln!("{world} ranks: plan {planned:.1} MiB, peak RSS per rank {peaks:?} MiB, worst {:.3} of the plan", worst / planned);
        assert!((0.75..=1.1).contains(&(worst / planned)), "{world} ranks: peak RSS {worst:.1} MiB against a plan of {planned:.1} MiB");
        points.push((world, planned, worst));
    }
    for pair in points.windows(2) {
        let ((w0, plan0, rss0), (w1, plan1, rss1)) = (pair[0], pair[1]);
        assert!(plan1 < plan0 && rss1 < rss0, "{w0} → {w1} ranks: plan {plan0:.1} → {plan1:.1} MiB, peak RSS {rss0:.1} → {rss1:.1} MiB");
    }
}
