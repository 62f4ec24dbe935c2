//! `fila eval` end to end: the benchmark metrics of a fixture eval file equal what the Python
//! restatement (`scripts/fixtures/eval_metrics_reference.py`) computed for the same predictions; with a
//! tiny checkpoint, the report's scores are its own predictions scored by the metrics module, and
//! the batch size does not change the answers.

mod common;
#[allow(dead_code)]
#[path = "../src/metrics.rs"]
mod metrics;

use common::{root, s, temp, tiny_checkpoint};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    root().join("crates/fila-cli/tests/fixtures/eval")
}

fn fila(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fila")).args(args).output().unwrap()
}

fn ok(output: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "fila eval failed:\n{text}");
    text
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn tensorboard_has(dir: &Path, tag: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let bytes = std::fs::read(e.path()).unwrap();
        bytes.windows(tag.len()).any(|w| w == tag.as_bytes())
    })
}

#[test]
fn fixture_predictions_score_as_the_python_restatement() {
    let dir = temp("eval", "fixture");
    let (data, predictions, out, logs) = (fixtures().join("benchmark.jsonl"), fixtures().join("predictions.jsonl"), dir.join("report.json"), dir.join("tb"));
    let text = ok(&fila(&["eval", "--data", s(&data), "--predictions", s(&predictions), "--out", s(&out), "--logdir", s(&logs)]));
    assert!(text.contains("vqa_accuracy") && text.contains("relaxed_accuracy"), "{text}");
    let report = read_json(&out);
    let expected = read_json(&fixtures().join("expected_report.json"));
    // The same double operations in the same order as the Python script: equal to the last bit,
    // and JSON round-trips doubles exactly; the tolerance only keeps the message readable.
    let close = |got: &Value, want: &Value, what: &str| {
        let (g, w) = (got["mean"].as_f64().unwrap(), want["mean"].as_f64().unwrap());
        assert!((g - w).abs() < 1e-12, "{what}: {g} != {w}");
        assert_eq!(got["count"], want["count"], "{what}: count");
    };
    let names = ["vqa_accuracy", "anls", "relaxed_accuracy", "exact_match"];
    for name in names {
        close(&report["overall"]["metrics"][name], &expected["overall"][name], name);
    }
    let kinds = expected["by_type"].as_object().unwrap();
    assert_eq!(report["by_type"].as_object().unwrap().len(), kinds.len());
    for (kind, table) in kinds {
        for (name, want) in table.as_object().unwrap() {
            close(&report["by_type"][kind]["metrics"][name], want, &format!("{kind}/{name}"));
        }
    }
    // Records with a `metric` field are scored with those metrics only.
    let half = report["predictions"].as_array().unwrap().iter().find(|p| p["id"] == "case-30").unwrap();
    assert_eq!(half["scores"].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["anls"]);
    // `correct` (behind the older `accuracy` field, over every record) is exact match.
    for p in report["predictions"].as_array().unwrap() {
        if let Some(exact) = p["scores"].get("exact_match") {
            assert_eq!(p["correct"].as_bool().unwrap(), exact.as_f64().unwrap() == 1.0, "{}", p["id"]);
        }
    }
    for tag in ["eval/benchmark/vqa_accuracy", "eval/benchmark/anls", "eval/benchmark/relaxed_accuracy", "eval/benchmark/vqa/anls", "eval/benchmark/accuracy"] {
        assert!(tensorboard_has(&logs, tag), "no TensorBoard scalar {tag}");
    }
    // A report re-scores: its own predictions with one metric give the same ANLS.
    let rescored = dir.join("rescored.json");
    ok(&fila(&["eval", "--data", s(&data), "--predictions", s(&out), "--metric", "anls", "--out", s(&rescored)]));
    let again = read_json(&rescored);
    close(&again["overall"]["metrics"]["anls"], &expected["overall"]["anls"], "re-scored anls");
    // `case-40` names relaxed and exact match itself; no record asks for VQA accuracy now.
    let names: Vec<&String> = again["overall"]["metrics"].as_object().unwrap().keys().collect();
    assert_eq!(names, vec!["anls", "exact_match", "relaxed_accuracy"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_names_the_file_and_line() {
    let dir = temp("eval", "bad");
    let data = dir.join("eval.jsonl");
    std::fs::write(&data, "{\"id\": \"a\", \"question\": \"Q\", \"answers\": [\"x\"]}\n{\"id\": \"b\", \"question\": \"Q\", \"answers\": \"x\"}\n").unwrap();
    let predictions = dir.join("p.jsonl");
    std::fs::write(&predictions, "{\"id\": \"a\", \"answer\": \"x\"}\n").unwrap();
    let out = fila(&["eval", "--data", s(&data), "--predictions", s(&predictions)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{}:2: `answers` is \"x\", not a list", data.display())) && err.contains("hint:"), "{err}");

    std::fs::write(&data, "{\"id\": \"a\", \"question\": \"Q\", \"answers\": [\"x\"]}\n{\"id\": \"b\", \"question\": \"Q\", \"answers\": [\"y\"]}\n").unwrap();
    let out = fila(&["eval", "--data", s(&data), "--predictions", s(&predictions)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:2: no prediction for `b`", data.display())), "{err}");

    let out = fila(&["eval", "--data", s(&data), "--predictions", s(&predictions), "--metric", "bleu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metric bleu: unknown metric `bleu` (expected vqa, anls, relaxed, exact or all)"), "{err}");
}

#[test]
fn a_checkpoints_report_scores_its_own_predictions() {
    let dir = temp("eval", "checkpoint");
    let checkpoint = tiny_checkpoint(&dir);
    std::fs::create_dir_all(dir.join("tensorboard")).unwrap();
    let data = fixtures().join("benchmark.jsonl");
    let images = root().join("datasets/tiny/images");
    let run = |batch: &str, out: &Path| {
        ok(&fila(&[
            "eval",
            "--checkpoint",
            s(&checkpoint),
            "--data",
            s(&data),
            "--images",
            s(&images),
            "--max-new-tokens",
            "4",
            "--batch-size",
            batch,
            "--out",
            s(out),
        ]))
    };
    let (batched, single) = (dir.join("batched.json"), dir.join("single.json"));
    run("8", &batched);
    run("1", &single);
    let report = read_json(&batched);
    let predictions = report["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 67);
    let answers = |r: &Value| r["predictions"].as_array().unwrap().iter().map(|p| p["predicted"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(answers(&report), answers(&read_json(&single)), "batch size changed the answers");

    // Every score is the metrics module applied to the report's own prediction.
    let mut sums = std::collections::BTreeMap::<String, (f64, usize)>::new();
    for p in predictions {
        let refs: Vec<String> = p["answers"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        for (name, value) in p["scores"].as_object().unwrap() {
            let metric = metrics::Metric::parse_list(name).unwrap()[0];
            let want = metric.score(p["predicted"].as_str().unwrap(), &refs);
            assert_eq!(value.as_f64().unwrap(), want, "{} {name}", p["id"]);
            let e = sums.entry(name.clone()).or_default();
            e.0 += want;
            e.1 += 1;
        }
    }
    assert_eq!(sums.len(), 4);
    for (name, (sum, count)) in sums {
        let got = &report["overall"]["metrics"][&name];
        assert_eq!(got["count"].as_u64().unwrap() as usize, count, "{name}");
        assert!((got["mean"].as_f64().unwrap() - sum / count as f64).abs() < 1e-12, "{name}");
    }
    // No --logdir: the scores go to the training run's TensorBoard folder beside `final/`.
    assert!(tensorboard_has(&dir.join("tensorboard"), "eval/benchmark/anls"));
    std::fs::remove_dir_all(&dir).ok();
}
