//! `fila eval`'s files and report: eval files (LLaVA records, or questions with several reference
//! answers as benchmarks ship them), prediction files for scoring without a model, and the report
//! with each benchmark metric overall and per question type. The format is in `docs/eval.md`.

use crate::metrics::{self, Metric};
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One question to ask, with its reference answers.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    pub id: String,
    /// Image path relative to the image folder; `None` for a text-only question.
    pub image: Option<String>,
    pub question: String,
    /// At least one.
    pub answers: Vec<String>,
    /// The record's own `metric` field, which replaces the command's selection for it.
    pub metrics: Option<Vec<Metric>>,
    pub qtype: String,
    /// Where the record is, for messages: `file:line` (JSONL) or `file item n` (JSON list).
    pub location: String,
}

const FORMAT_HINT: &str = "each record is {\"id\", \"image\", \"question\", \"answers\": [..]} or a LLaVA record with \
                           \"conversations\" (see docs/eval.md)";

fn bad(location: &str, message: impl std::fmt::Display, hint: &str) -> anyhow::Error {
    anyhow!("{location}: {message}\n  hint: {hint}")
}

/// The records of a JSON list or a JSONL file, each with where it is.
fn read_json_records(path: &Path) -> Result<Vec<(String, Value)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = path.display();
    let is_list = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => false,
        Some("json") => true,
        _ => text.trim_start().starts_with('['),
    };
    if is_list {
        let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            bad(&file.to_string(), format!("not a JSON list: {e}"), "a .json file holds one list of records; use .jsonl for one record per line")
        })?;
        Ok(items.into_iter().enumerate().map(|(i, v)| (format!("{file} item {}", i + 1), v)).collect())
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let location = format!("{file}:{}", i + 1);
            let value = serde_json::from_str(line).map_err(|e| bad(&location, format!("not JSON: {e}"), "one JSON object per line"))?;
            out.push((location, value));
        }
        Ok(out)
    }
}

fn string_field(record: &Value, key: &str, location: &str) -> Result<Option<String>> {
    match record.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(location, format!("`{key}` is {other}, not a string"), FORMAT_HINT)),
    }
}

/// The question type of a record without a `qtype` field: the last `-` segment of its id when
/// that is a word (`heldout-000042-colour`), else `all`.
pub fn question_type(id: &str) -> String {
    match id.rsplit('-').next() {
        Some(last) if !last.is_empty() && last.chars().all(|c| c.is_ascii_alphabetic() || c == '_') && last != id => last.to_string(),
        _ => "all".to_string(),
    }
}

/// The first question of a LLaVA record and the answer that follows it.
fn llava_question(record: &Value, location: &str) -> Result<(String, String)> {
    let hint = "a LLaVA record needs \"conversations\": [{\"from\": \"human\", \"value\": ..}, {\"from\": \"gpt\", \"value\": ..}]";
    let turns = record["conversations"].as_array().ok_or_else(|| bad(location, "`conversations` is not a list", hint))?;
    let mut question = None;
    for turn in turns {
        let from = turn["from"].as_str().ok_or_else(|| bad(location, "a turn without a string `from`", hint))?;
        let value = turn["value"].as_str().ok_or_else(|| bad(location, "a turn without a string `value`", hint))?;
        match (from, &question) {
            ("human" | "user", None) => question = Some(value.to_string()),
            ("gpt" | "assistant", Some(q)) => return Ok((q.clone(), value.to_string())),
            _ => {}
        }
    }
    Err(bad(location, "no question followed by an answer", hint))
}

fn parse_item(record: &Value, location: &str, stem: &str, index: usize) -> Result<EvalItem> {
    if !record.is_object() {
        return Err(bad(location, "not a JSON object", FORMAT_HINT));
    }
    let id = match record.get("id") {
        None | Some(Value::Null) => format!("{stem}-{index}"),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let image = match record.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) if list.len() == 1 && list[0].is_string() => list[0].as_str().map(str::to_string),
        Some(other) => return Err(bad(location, format!("`image` is {other}"), "one image path per question, relative to the image folder")),
    };
    let (question, answers) = if record.get("conversations").is_some() {
        let (q, a) = llava_question(record, location)?;
        (q, vec![a])
    } else {
        let question = string_field(record, "question", location)?.ok_or_else(|| bad(location, "no `question` and no `conversations`", FORMAT_HINT))?;
        let answers = match (record.get("answers"), string_field(record, "answer", location)?) {
            (Some(Value::Array(list)), _) => list
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(location, format!("answer {a} is not a string"), "write numbers as strings: \"answers\": [\"42\"]"))
                })
                .collect::<Result<Vec<_>>>()?,
            (Some(other), _) => return Err(bad(location, format!("`answers` is {other}, not a list"), "\"answers\": [\"first\", \"second\", ...]")),
            (None, Some(one)) => vec![one],
            (None, None) => return Err(bad(location, "no `answers`", "add the reference answers: \"answers\": [\"...\"] (or one \"answer\": \"...\")")),
        };
        if answers.is_empty() {
            return Err(bad(location, "`answers` is empty", "give at least one reference answer"));
        }
        (question, answers)
    };
    let metrics = match record.get("metric") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(Metric::parse_list(s).map_err(|e| bad(location, e, "`metric` is one of vqa, anls, relaxed, exact, all, or a list of them"))?)
        }
        Some(Value::Array(list)) => {
            let names: Option<Vec<&str>> = list.iter().map(Value::as_str).collect();
            let names = names.ok_or_else(|| bad(location, "`metric` holds a non-string", "\"metric\": [\"vqa\", \"exact\"]"))?;
            Some(Metric::parse_list(&names.join(",")).map_err(|e| bad(location, e, "`metric` is one of vqa, anls, relaxed, exact, all, or a list of them"))?)
        }
        Some(other) => return Err(bad(location, format!("`metric` is {other}"), "\"metric\": \"anls\" or a list of names")),
    };
    let qtype = string_field(record, "qtype", location)?.unwrap_or_else(|| question_type(&id));
    Ok(EvalItem { id, image, question, answers, metrics, qtype, location: location.to_string() })
}

/// Reads an eval file (JSONL, or a JSON list): benchmark records with several answers and LLaVA
/// records (first question, first answer) may be mixed. Errors name the file and line.
pub fn read_eval_file(path: &Path) -> Result<Vec<EvalItem>> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let records = read_json_records(path)?;
    if records.is_empty() {
        return Err(bad(&path.display().to_string(), "no records", FORMAT_HINT));
    }
    records.iter().enumerate().map(|(i, (location, value))| parse_item(value, location, &stem, i + 1)).collect()
}

/// Answers by record id, from a JSONL file of `{"id", "answer"}` or from an earlier `fila eval`
/// report (its `predictions`), so that a run can be re-scored with other metrics.
pub fn read_predictions(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let hint = "one {\"id\": .., \"answer\": ..} per line, or a report written by `fila eval`";
    let rows: Vec<(String, Value, &str)> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(report)) if report.contains_key("predictions") => {
            let list = report["predictions"].as_array().ok_or_else(|| bad(&path.display().to_string(), "`predictions` is not a list", hint))?;
            list.iter().enumerate().map(|(i, v)| (format!("{} prediction {}", path.display(), i + 1), v.clone(), "predicted")).collect()
        }
        _ => read_json_records(path)?.into_iter().map(|(location, v)| (location, v, "answer")).collect(),
    };
    let mut out = HashMap::new();
    for (location, row, key) in rows {
        let id = match row.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Number(_)) => v.to_string(),
            _ => return Err(bad(&location, "no `id`", hint)),
        };
        let answer = row.get(key).and_then(Value::as_str).ok_or_else(|| bad(&location, format!("no string `{key}`"), hint))?;
        if out.insert(id.clone(), answer.to_string()).is_some() {
            return Err(bad(&location, format!("a second prediction for `{id}`"), "give each record one prediction"));
        }
    }
    Ok(out)
}

/// `1 − edit distance / longer length` of two exact-match-normalised answers: ANLS without its
/// 0.5 cut-off, so a partly read code still counts for what it got right.
pub fn similarity(predicted: &str, expected: &str) -> f64 {
    let longest = predicted.chars().count().max(expected.chars().count());
    if longest == 0 {
        return 1.0;
    }
    1.0 - metrics::levenshtein(predicted, expected) as f64 / longest as f64
}

/// The mean of one metric over the questions it scored.
#[derive(Debug, Default, Clone, Serialize)]
pub struct MetricScore {
    pub mean: f64,
    pub count: usize,
    #[serde(skip)]
    sum: f64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
    /// Exact match after normalising, against any reference answer.
    pub accuracy: f64,
    /// Mean character similarity (see [`similarity`]), best reference answer.
    pub similarity: f64,
    /// Each benchmark metric by its report name (`vqa_accuracy`, `anls`, ...).
    pub metrics: BTreeMap<String, MetricScore>,
    #[serde(skip)]
    similarity_sum: f64,
}

impl Score {
    fn add(&mut self, ok: bool, similarity: f64, scores: &BTreeMap<String, f64>) {
        self.total += 1;
        self.correct += ok as usize;
        self.similarity_sum += similarity;
        self.accuracy = self.correct as f64 / self.total as f64;
        self.similarity = self.similarity_sum / self.total as f64;
        for (name, &value) in scores {
            let m = self.metrics.entry(name.clone()).or_default();
            m.count += 1;
            m.sum += value;
            m.mean = m.sum / m.count as f64;
        }
    }
}

/// One evaluated question.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub id: String,
    pub qtype: String,
    /// The first reference answer.
    pub expected: String,
    pub answers: Vec<String>,
    pub predicted: String,
    /// Exact match against any reference answer.
    pub correct: bool,
    /// This question's score under each metric applied to it.
    pub scores: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// `None` when the predictions came from a file.
    pub checkpoint: Option<PathBuf>,
    pub data: PathBuf,
    pub split: String,
    /// The metrics applied to records without a `metric` field of their own.
    pub default_metrics: Vec<String>,
    pub overall: Score,
    pub by_type: BTreeMap<String, Score>,
    /// Records that could not be evaluated (unreadable image), as `id: reason`.
    pub skipped: Vec<String>,
    /// Every evaluated question with the model's answer, in file order.
    pub predictions: Vec<Prediction>,
}

impl EvalReport {
    pub fn new(checkpoint: Option<&Path>, data: &Path, default_metrics: &[Metric]) -> Self {
        Self {
            checkpoint: checkpoint.map(Path::to_path_buf),
            data: data.to_path_buf(),
            split: data.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            default_metrics: default_metrics.iter().map(|m| m.name().to_string()).collect(),
            overall: Score::default(),
            by_type: BTreeMap::new(),
            skipped: Vec::new(),
            predictions: Vec::new(),
        }
    }

    /// Scores `predicted` for `item` with the item's metrics, else `default_metrics`.
    pub fn add(&mut self, item: &EvalItem, predicted: &str, default_metrics: &[Metric]) {
        let chosen = item.metrics.as_deref().unwrap_or(default_metrics);
        let scores: BTreeMap<String, f64> = chosen.iter().map(|m| (m.name().to_string(), m.score(predicted, &item.answers))).collect();
        let got = metrics::exact_normalise(predicted);
        let sim = item.answers.iter().map(|a| similarity(&got, &metrics::exact_normalise(a))).fold(0.0, f64::max);
        let ok = metrics::exact_match(predicted, &item.answers) == 1.0;
        self.overall.add(ok, sim, &scores);
        self.by_type.entry(item.qtype.clone()).or_default().add(ok, sim, &scores);
        self.predictions.push(Prediction {
            id: item.id.clone(),
            qtype: item.qtype.clone(),
            expected: item.answers[0].clone(),
            answers: item.answers.clone(),
            predicted: predicted.to_string(),
            correct: ok,
            scores,
        });
    }

    pub fn skip(&mut self, item: &EvalItem, reason: &str) {
        self.skipped.push(format!("{}: {reason}", item.id));
    }

    /// TensorBoard tags and values: accuracy and similarity, overall and per question type (as
    /// before the benchmark metrics), then each metric overall (`eval/<split>/<metric>`) and per
    /// type (`eval/<split>/<type>/<metric>`).
    pub fn scalars(&self) -> Vec<(String, f32)> {
        let split = &self.split;
        let mut out =
            vec![(format!("eval/{split}/accuracy"), self.overall.accuracy as f32), (format!("eval/{split}/similarity"), self.overall.similarity as f32)];
        for (kind, s) in &self.by_type {
            out.push((format!("eval/{split}/{kind}"), s.accuracy as f32));
            out.push((format!("eval/{split}/{kind}_similarity"), s.similarity as f32));
        }
        for (name, m) in &self.overall.metrics {
            out.push((format!("eval/{split}/{name}"), m.mean as f32));
        }
        for (kind, s) in &self.by_type {
            for (name, m) in &s.metrics {
                out.push((format!("eval/{split}/{kind}/{name}"), m.mean as f32));
            }
        }
        out
    }
}

/// Scores the answers of a predictions file (see [`read_predictions`]) against an eval file.
pub fn score_predictions(data: &Path, predictions: &Path, default_metrics: &[Metric]) -> Result<EvalReport> {
    let items = read_eval_file(data)?;
    let answers = read_predictions(predictions)?;
    let mut seen = HashMap::new();
    let mut report = EvalReport::new(None, data, default_metrics);
    for item in &items {
        if let Some(first) = seen.insert(item.id.clone(), item.location.clone()) {
            return Err(bad(&item.location, format!("id `{}` also at {first}", item.id), "predictions are matched by id: give each record its own"));
        }
        let predicted = answers.get(&item.id).ok_or_else(|| {
            bad(&item.location, format!("no prediction for `{}` in {}", item.id, predictions.display()), "the predictions file needs one answer per record id")
        })?;
        report.add(item, predicted, default_metrics);
    }
    let unused = answers.keys().filter(|id| !seen.contains_key(*id)).count();
    if unused > 0 {
        eprintln!("note: {unused} prediction(s) in {} match no record of {}", predictions.display(), data.display());
    }
    Ok(report)
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.overall;
        writeln!(f, "split {}: {}/{} correct ({:.1}%), character similarity {:.3}", self.split, o.correct, o.total, 100.0 * o.accuracy, o.similarity)?;
        let names: Vec<&String> = o.metrics.keys().collect();
        write!(f, "  {:<12} {:>5}", "type", "n")?;
        for name in &names {
            write!(f, " {name:>16}")?;
        }
        writeln!(f)?;
        let rows = std::iter::once(("(all)", o)).chain(self.by_type.iter().map(|(k, s)| (k.as_str(), s)));
        for (kind, s) in rows {
            write!(f, "  {kind:<12} {:>5}", s.total)?;
            for name in &names {
                match s.metrics.get(*name) {
                    Some(m) => write!(f, " {:>15.2}%", 100.0 * m.mean)?,
                    None => write!(f, " {:>16}", "-")?,
                }
            }
            writeln!(f)?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "  skipped: {} ({})", self.skipped.len(), self.skipped.iter().take(3).cloned().collect::<Vec<_>>().join("; "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fila-eval-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn question_type_from_id() {
        assert_eq!(question_type("heldout-000042-colour"), "colour");
        assert_eq!(question_type("heldout-000042"), "all");
    }

    #[test]
    fn both_formats_read_with_their_answers() {
        let path = write(
            "mixed.jsonl",
            concat!(
                r#"{"id": "q1", "image": "a.png", "question": "What?", "answers": ["x", "y"], "metric": "anls", "qtype": "doc"}"#,
                "\n\n",
                r#"{"id": 7, "question": "Which?", "answer": "z"}"#,
                "\n",
                r#"{"id": "heldout-3-colour", "image": ["b.png"], "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}"#,
                "\n"
            ),
        );
        let items = read_eval_file(&path).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(
            (items[0].answers.clone(), items[0].metrics.clone(), items[0].qtype.as_str()),
            (vec!["x".into(), "y".into()], Some(vec![Metric::Anls]), "doc")
        );
        assert_eq!((items[1].id.as_str(), items[1].image.clone(), items[1].answers.clone()), ("7", None, vec!["z".to_string()]));
        assert_eq!((items[2].question.as_str(), items[2].answers[0].as_str(), items[2].qtype.as_str()), ("<image>\nColour?", "Red.", "colour"));
        assert_eq!(items[2].location, format!("{}:4", path.display()));
    }

    #[test]
    fn bad_records_name_file_line_and_a_hint() {
        let cases = [
            (r#"{"id": "a", "question": "Q"}"#, "no `answers`"),
            (r#"{"id": "a", "question": "Q", "answers": []}"#, "`answers` is empty"),
            (r#"{"id": "a", "question": "Q", "answers": [3]}"#, "answer 3 is not a string"),
            (r#"{"id": "a", "question": "Q", "answers": ["x"], "metric": "bleu"}"#, "unknown metric `bleu`"),
            (r#"{"id": "a", "answers": ["x"]}"#, "no `question` and no `conversations`"),
            (r#"{"id": "a", "conversations": [{"from": "human", "value": "Q"}]}"#, "no question followed by an answer"),
            (r#"{"id": "a", "question": "Q", "answers": ["x"], "image": ["p", "q"]}"#, "`image` is"),
            ("not json", "not JSON"),
        ];
        for (line, expected) in cases {
            let path = write("bad.jsonl", &format!("{{\"id\": \"ok\", \"question\": \"Q\", \"answers\": [\"x\"]}}\n{line}\n"));
            let err = format!("{:#}", read_eval_file(&path).unwrap_err());
            assert!(err.contains(&format!("{}:2: ", path.display())), "{err}");
            assert!(err.contains(expected) && err.contains("hint:"), "{line}: {err}");
        }
    }

    #[test]
    fn records_take_their_own_metrics_and_scores_average() {
        let items = [
            EvalItem {
                id: "a".into(),
                image: None,
                question: "Q".into(),
                answers: vec!["Two".into()],
                metrics: None,
                qtype: "t".into(),
                location: "f:1".into(),
            },
            EvalItem {
                id: "b".into(),
                image: None,
                question: "Q".into(),
                answers: vec!["abcd".into()],
                metrics: Some(vec![Metric::Anls]),
                qtype: "u".into(),
                location: "f:2".into(),
            },
        ];
        let mut report = EvalReport::new(None, Path::new("d/split.jsonl"), &[Metric::Vqa, Metric::Exact]);
        report.add(&items[0], "2", &[Metric::Vqa, Metric::Exact]);
        report.add(&items[1], "abcx", &[Metric::Vqa, Metric::Exact]);
        let m = &report.overall.metrics;
        assert_eq!((m["vqa_accuracy"].mean, m["vqa_accuracy"].count), (1.0, 1));
        assert_eq!((m["exact_match"].mean, m["exact_match"].count), (0.0, 1));
        assert_eq!((m["anls"].mean, m["anls"].count), (0.75, 1));
        assert_eq!((report.overall.correct, report.overall.total), (0, 2));
        assert_eq!(report.overall.similarity, (0.0 + 0.75) / 2.0);
        let tags: Vec<String> = report.scalars().into_iter().map(|(t, _)| t).collect();
        assert!(tags.contains(&"eval/split/anls".to_string()) && tags.contains(&"eval/split/u/anls".to_string()), "{tags:?}");
        assert!(report.to_string().contains("vqa_accuracy"));
    }

    #[test]
    fn similarity_counts_the_characters_read() {
        assert_eq!(similarity("k7qz", "k7oz"), 0.75);
        assert_eq!(similarity("k7q", "k7qz"), 0.75);
        assert_eq!(similarity("ab", "ba"), 0.0);
        assert_eq!(similarity("", ""), 1.0);
    }

    #[test]
    fn predictions_from_jsonl_or_an_earlier_report() {
        let jsonl = write("p.jsonl", "{\"id\": \"a\", \"answer\": \"x\"}\n{\"id\": 2, \"answer\": \"y\"}\n");
        let got = read_predictions(&jsonl).unwrap();
        assert_eq!((got["a"].as_str(), got["2"].as_str()), ("x", "y"));
        let report = write("r.json", r#"{"split": "s", "predictions": [{"id": "a", "predicted": "z"}]}"#);
        assert_eq!(read_predictions(&report).unwrap()["a"], "z");
        let twice = write("t.jsonl", "{\"id\": \"a\", \"answer\": \"x\"}\n{\"id\": \"a\", \"answer\": \"y\"}\n");
        assert!(format!("{:#}", read_predictions(&twice).unwrap_err()).contains("t.jsonl:2: a second prediction for `a`"));
    }
}
