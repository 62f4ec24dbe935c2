//! How a `--features cuda` build starts, on any machine: without an NVIDIA driver it ends with the
//! error that names what is missing (exit 1, never a panic), plain and with the collectives on
//! NCCL (`FILA_NCCL=1`, which sets NCCL up before the backend starts); on a GPU machine
//! (scripts/gpu/check.sh runs this binary there) each trains two tiny steps, whose losses agree
//! within what two CUDA runs can differ by (atomics in CUDA reductions: not bit-reproducible).
//! The variants: plain; NCCL; NCCL under ZeRO-3 with checkpointing (each segment's weights
//! all-gathered asynchronously on NCCL's stream, the next one prefetched, on one rank); the
//! optimizer offloaded to the CPU.
#![cfg(feature = "cuda")]

mod common;

use common::*;

#[test]
fn a_cuda_run_trains_or_names_what_is_missing() {
    let driver = fila_train::dylib::Library::open_first(&["libcuda.so.1", "libcuda.so"]).is_ok();
    let sets = ["device=\"cuda:0\"", "train.max_steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=0"];
    let variants: [(&str, bool, &[&str]); 4] = [
        ("plain", false, &[]),
        ("NCCL", true, &[]),
        ("ZeRO-3 over NCCL", true, &["distributed.zero_stage=3", "train.activation_checkpointing=true"]),
        ("the optimizer on the CPU", false, &["optimizer.offload=\"cpu\""]),
    ];
    let mut runs = Vec::new();
    for (name, nccl, more) in variants {
        let out = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(binary());
        cmd.arg("--config").arg(tiny(1)).arg("--set").arg(format!("checkpoint.output_dir={}", out.path().display()));
        for s in sets.iter().chain(more) {
            cmd.arg("--set").arg(s);
        }
        if nccl {
            cmd.env("FILA_NCCL", "1");
        }
        let output = cmd.output().unwrap();
        if driver {
            ok(&output);
            runs.push((name, losses(out.path())));
        } else {
            let e = failed(&output);
            assert!(e.contains("device `cuda:0`: the CUDA driver library (libcuda.so) could not be loaded") && e.contains("device = \"cpu\""), "{e}");
            assert!(!e.contains("panicked"), "{e}");
        }
    }
    if let [(_, plain), others @ ..] = &runs[..] {
        assert_eq!(plain.len(), 2);
        for (name, other) in others {
            assert_eq!(plain.keys().collect::<Vec<_>>(), other.keys().collect::<Vec<_>>(), "{name}");
            for (step, a) in plain {
                let b = other[step];
                assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "step {step}: loss {a} plain, {b} with {name}");
            }
        }
    }
}
