//! How a `--features cuda` build starts, on any machine: without an NVIDIA driver it ends with the
//! error that names what is missing (exit 1, never a panic), plain and with the collectives on
//! NCCL (`FILA_NCCL=1`, which sets NCCL up before the backend starts); on a GPU machine
//! (scripts/gpu/check.sh runs this binary there) both train two tiny steps, whose losses agree
//! within what two CUDA runs can differ by (atomics in CUDA reductions: not bit-reproducible).
#![cfg(feature = "cuda")]

mod common;

use common::*;

#[test]
fn a_cuda_run_trains_or_names_what_is_missing() {
    let driver = fila_train::dylib::Library::open_first(&["libcuda.so.1", "libcuda.so"]).is_ok();
    let sets = ["device=\"cuda:0\"", "train.max_steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=0"];
    let mut runs = Vec::new();
    for nccl in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(binary());
        cmd.arg("--config").arg(tiny(1)).arg("--set").arg(format!("checkpoint.output_dir={}", out.path().display()));
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        if nccl {
            cmd.env("FILA_NCCL", "1");
        }
        let output = cmd.output().unwrap();
        if driver {
            ok(&output);
            runs.push(losses(out.path()));
        } else {
            let e = failed(&output);
            assert!(e.contains("device `cuda:0`: the CUDA driver library (libcuda.so) could not be loaded") && e.contains("device = \"cpu\""), "{e}");
            assert!(!e.contains("panicked"), "{e}");
        }
    }
    if let [plain, nccl] = &runs[..] {
        assert_eq!(plain.len(), 2);
        assert_eq!(plain.keys().collect::<Vec<_>>(), nccl.keys().collect::<Vec<_>>());
        for (step, a) in plain {
            let b = nccl[step];
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "step {step}: loss {a} plain, {b} over NCCL");
        }
    }
}
