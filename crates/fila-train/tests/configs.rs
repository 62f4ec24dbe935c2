//! Every file in configs/ parses and validates; `--plan` prints without allocating and counts the
//! trainable parameters exactly.

mod common;

use common::*;
use fila_train::config::LoadedConfig;

#[test]
fn every_config_parses_and_validates() {
    let mut found = 0;
    for dir in [repo().join("configs"), repo().join("configs/tiny")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let loaded = LoadedConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.starts_with('#') && text.contains("cargo run"), "{}: no header with the command", path.display());
                // The resolved config parses again to the same thing (what a run saves).
                let again = LoadedConfig::from_table(toml::from_str(&loaded.to_toml()).unwrap(), &path).unwrap();
                assert_eq!(again.config, loaded.config);
                found += 1;
            }
        }
    }
    assert_eq!(found, 8);
}

/// A test binary built here and run from another checkout (a GPU machine's) finds the files
/// through `FILA_REPO_DIR`: the config test passes reading a checkout elsewhere, and fails when
/// that variable names a folder without configs (so the variable, not the build path, is used).
#[test]
fn the_checkout_is_found_through_fila_repo_dir() {
    if std::env::var_os("FILA_REPO_DIR").is_some() {
        return; // one of the runs below
    }
    let run = |dir: &std::path::Path| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "every_config_parses_and_validates"])
            .env("FILA_REPO_DIR", dir)
            .output()
            .unwrap()
    };
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("configs"), elsewhere.path().join("configs")).unwrap();
    let out = run(elsewhere.path());
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{out:?}");
    let empty = tempfile::tempdir().unwrap();
    let out = run(empty.path());
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 failed"), "{out:?}");
}

#[test]
fn plan_counts_the_trainable_parameters() {
    let loaded = LoadedConfig::load(&tiny(1), &[]).unwrap();
    let text = fila_train::plan::plan(&loaded, 1).unwrap();
    let exact = fila_train::plan::trainable_elements_of(&loaded).unwrap();
    assert_eq!(exact, 115_424);
    assert!(text.contains(&format!("({exact} trainable")), "{text}");
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(&fila_train(&repo().join("configs/stage2.toml"), &tmp.path().join("x"), &[], &["--plan"]));
    assert!(out.contains("8571778688") && out.contains("optimizer state"), "{out}");
    assert!(!tmp.path().join("x").exists());
}

/// The plan's total, in GiB.
fn planned_total(config: &str, world: usize, overrides: &[&str]) -> f64 {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let loaded = LoadedConfig::load(&repo().join(config), &overrides).unwrap();
    fila_train::plan::plan_of(&loaded, world).unwrap().total() / (1u64 << 30) as f64
}

#[test]
fn the_reference_recipe_plans_within_80_gb_gpus() {
    let gpu = 80e9 / (1u64 << 30) as f64; // 74.5 GiB
                                          // Stage 1 on one GPU at micro-batch 16, stage 2 on 8 ranks, both with activation checkpointing.
    let stage1 = planned_total("configs/stage1.toml", 1, &[]);
    let stage2 = planned_total("configs/stage2.toml", 8, &[]);
    assert!(stage1 < gpu, "stage 1 plans {stage1} GiB");
    assert!(stage2 < gpu, "stage 2 plans {stage2} GiB per rank on 8 ranks");
    // Without recomputation neither would fit; stage 2 does not fit one GPU even with it.
    assert!(planned_total("configs/stage1.toml", 1, &["train.activation_checkpointing=false"]) > gpu);
    assert!(planned_total("configs/stage2.toml", 8, &["train.activation_checkpointing=false"]) > gpu);
    assert!(planned_total("configs/stage2.toml", 1, &[]) > gpu);
}

/// ZeRO-3 (`distributed.zero_stage = 3`) shards the trainable weights too: full stage 2 plans
/// within an 80 GB card on 4 ranks (ZeRO-2 needs 8) and within a 40 GB card on 8, and below
/// ZeRO-2 on 8 ranks by more than the weights' and gradients' share it removes less what it
/// gathers.
#[test]
fn zero_3_plans_stage_2_on_four_80_gb_or_eight_40_gb_gpus() {
    let gpu = 80e9 / (1u64 << 30) as f64;
    let zero3 = |world| planned_total("configs/stage2.toml", world, &["distributed.zero_stage=3"]);
    assert!(zero3(4) < gpu, "ZeRO-3 on 4 ranks plans {} GiB", zero3(4));
    assert!(zero3(8) <= 37.0, "ZeRO-3 on 8 ranks plans {} GiB, over a 40 GB card", zero3(8));
    assert!(planned_total("configs/stage2.toml", 4, &[]) > gpu);
    // ZeRO-2 on 8 ranks holds 16 GiB of bf16 weights and 16 GiB of gradients; ZeRO-3 gathers
    // about 8 GiB of them and keeps the largest segment's 2 GiB of gradients.
    let saved = planned_total("configs/stage2.toml", 8, &[]) - zero3(8);
    assert!(saved > 20.0, "ZeRO-3 saves {saved} GiB on 8 ranks");
    let e = LoadedConfig::load(&repo().join("configs/stage2.toml"), &["distributed.zero_stage=4".to_string()]).unwrap_err();
    assert!(format!("{e:#}").contains("zero_stage"), "{e:#}");
}

/// `optimizer.offload = "cpu"` moves the f32 master slice, both moments and the gradient slice
/// (16 bytes per trainable element, sharded over the ranks) to host memory: full stage 2 then
/// fits one 80 GB GPU, with 128 GiB of host memory for the optimizer (64 GiB per rank on two).
#[test]
fn an_offloaded_optimizer_is_planned_in_host_memory() {
    let gpu = 80e9 / (1u64 << 30) as f64;
    let gib = (1u64 << 30) as f64;
    let overrides = vec!["optimizer.offload=cpu".to_string()];
    let loaded = LoadedConfig::load(&repo().join("configs/stage2.toml"), &overrides).unwrap();
    for world in [1usize, 2] {
        let plan = fila_train::plan::plan_of(&loaded, world).unwrap();
        let host = 16.0 * 8_571_778_688f64 / world as f64;
        assert!((plan.host_total() - host).abs() < 1e-6 * host, "{world} ranks: host {} GiB", plan.host_total() / gib);
        assert!(plan.total() / gib < gpu, "{world} ranks: {} GiB on the GPU", plan.total() / gib);
        // The device keeps the weights, a backward's gradients and the activations, not the state.
        let device_terms: Vec<&str> = plan.resident.iter().chain(&plan.phase.1).filter(|t| t.bytes > 0.0).map(|t| t.name).collect();
        assert!(!device_terms.contains(&"optimizer state") && !device_terms.contains(&"master slice"), "{device_terms:?}");
        assert!(plan.render().contains("host total"));
    }
    let plain = fila_train::plan::plan_of(&LoadedConfig::load(&repo().join("configs/stage2.toml"), &[]).unwrap(), 1).unwrap();
    assert_eq!(plain.host_total(), 0.0);
    assert!(!plain.render().contains("host total"));
}
