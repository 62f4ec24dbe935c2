//! Inference from a FILA checkpoint: `fila generate` (greedy decoding with a KV cache) and
//! `fila eval` (exact-match accuracy and character similarity per question type).

use crate::forward::image_input;
use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use fila_data::{DataConfig, ImagePreprocessor, RecordSet, Role, SourceConfig, TextEncoder};
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type B = burn::backend::Flex;

/// A loaded checkpoint with the text and image settings it was trained with.
pub struct Inference {
    model: Fila<B>,
    text: TextEncoder,
    images: ImagePreprocessor,
    data: DataConfig,
    stop_ids: Vec<i64>,
    device: burn::tensor::Device<B>,
}

impl Inference {
    /// `checkpoint` is a FILA checkpoint folder (`final/`); the `[data]` settings come from its
    /// `run.toml` (the training run's resolved config), or from `data_config` when given.
    pub fn open(checkpoint: &Path, data_config: Option<&Path>) -> Result<Self> {
        let config = FilaConfig::from_checkpoint_dir(checkpoint)?;
        let device = Default::default();
        let model = Fila::<B>::load(&config, &ModelSource::Checkpoint(checkpoint.to_path_buf()), &device)?;
        let data_file = data_config.map(Path::to_path_buf).unwrap_or_else(|| checkpoint.join("run.toml"));
        let mut data = DataConfig::from_toml_file(&data_file)
            .with_context(|| format!("reading the [data] settings (pass --config RUN.toml if {} is missing)", data_file.display()))?;
        let tokenizer = checkpoint.join("tokenizer.json");
        if data_config.is_none() && tokenizer.exists() {
            data.tokenizer = tokenizer;
        }
        let text = TextEncoder::from_config(&data)?;
        let stop_ids: Vec<i64> = [text.special.eot, text.special.plain_end]
            .into_iter()
            .flatten()
            .chain(text.tokenizer.token_to_id("<|end_of_text|>").map(i64::from))
            .collect();
        Ok(Self { model, images: ImagePreprocessor::new(&data), text, data, stop_ids, device })
    }

    /// The model's answer to `prompt` about `image` (greedy), as text.
    pub fn answer(&self, image: Option<&image::RgbImage>, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let views = image.map(|im| self.images.process(im));
        let marker = &self.data.image_marker;
        let prompt = if views.is_some() && !prompt.contains(marker.as_str()) { format!("{marker}\n{prompt}") } else { prompt.to_string() };
        let visual: Vec<usize> = views.iter().map(|v| v.visual_tokens).collect();
        let tokens = self.text.encode_prompt(&prompt, &visual).map_err(|(r, d)| anyhow::anyhow!("prompt: {} ({d})", r.as_str()))?;
        let len = tokens.input_ids.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.input_ids, [1, len]), &self.device);
        let inputs: Vec<_> = views.iter().map(|v| image_input(v, &self.device)).collect();
        let generated = self.model.generate(ids, &inputs, max_new_tokens, &self.stop_ids);
        let kept: Vec<u32> = generated.iter().filter(|id| !self.stop_ids.contains(id)).map(|&id| id as u32).collect();
        self.text.tokenizer.decode(&kept, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn load_image(&self, path: &Path) -> Result<image::RgbImage> {
        self.images.load(path).map_err(|(r, d)| anyhow::anyhow!("{}: {} ({d})", path.display(), r.as_str()))
    }
}

/// Answers compared after trimming, lower-casing and dropping a final full stop.
fn normalise(answer: &str) -> String {
    answer.trim().trim_end_matches('.').trim().to_lowercase()
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + (ca != cb) as usize);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// `1 − edit distance / length of the longer answer` of two normalised answers: 1 for an exact
/// match, 0.75 for one wrong character in four. This is ANLS without its 0.5 cut-off, so a partly
/// read code still counts for what it got right.
fn similarity(predicted: &str, expected: &str) -> f64 {
    let longest = predicted.chars().count().max(expected.chars().count());
    if longest == 0 {
        return 1.0;
    }
    1.0 - edit_distance(predicted, expected) as f64 / longest as f64
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
    /// Exact match after normalising.
    pub accuracy: f64,
    /// Mean character similarity (see [`similarity`]).
    pub similarity: f64,
    #[serde(skip)]
    similarity_sum: f64,
}

impl Score {
    fn add(&mut self, ok: bool, similarity: f64) {
        self.total += 1;
        self.correct += ok as usize;
        self.similarity_sum += similarity;
        self.accuracy = self.correct as f64 / self.total as f64;
        self.similarity = self.similarity_sum / self.total as f64;
    }
}

/// One evaluated question.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub id: String,
    pub qtype: String,
    pub expected: String,
    pub predicted: String,
    pub correct: bool,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub split: String,
    pub overall: Score,
    pub by_type: BTreeMap<String, Score>,
    /// Records that could not be evaluated (bad image, no question/answer), by id.
    pub skipped: Vec<String>,
    /// Every evaluated question with the model's answer, in file order.
    pub predictions: Vec<Prediction>,
}

/// The question type of a record: its `qtype` field when the file has one, else the last `-`
/// segment of its id when that is a word (`heldout-000042-colour`), else `all`.
fn question_type(id: &str, qtypes: &BTreeMap<String, String>) -> String {
    if let Some(t) = qtypes.get(id) {
        return t.clone();
    }
    match id.rsplit('-').next() {
        Some(last) if !last.is_empty() && last.chars().all(|c| c.is_ascii_alphabetic() || c == '_') && last != id => last.to_string(),
        _ => "all".to_string(),
    }
}

/// `qtype` fields of a LLaVA JSON/JSONL file, by record id.
fn read_qtypes(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let values: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).unwrap_or_default()
    } else {
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    values
        .iter()
        .filter_map(|v| Some((v.get("id")?.as_str()?.to_string(), v.get("qtype")?.as_str()?.to_string())))
        .collect()
}

/// The image folder `fila eval` uses when none is given: the data file's folder. A bare file name
/// (`heldout.jsonl`) has an empty parent, which names no directory; that is the current one.
pub fn default_image_folder(data: &Path) -> PathBuf {
    match data.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Exact-match evaluation of the first question of every record in `data` (images relative to
/// `image_folder`).
pub fn evaluate(inference: &Inference, checkpoint: &Path, data: &Path, image_folder: &Path, max_new_tokens: usize) -> Result<EvalReport> {
    let mut config = inference.data.clone();
    config.sources = vec![SourceConfig {
        path: data.to_path_buf(),
        image_folder: image_folder.to_path_buf(),
        first: None,
        random: None,
        percent: None,
        seed: 0,
    }];
    let records = RecordSet::load(&config)?;
    let qtypes = read_qtypes(data);
    let mut report = EvalReport {
        checkpoint: checkpoint.to_path_buf(),
        split: data.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        overall: Score::default(),
        by_type: BTreeMap::new(),
        skipped: records.load_bad.counts().keys().map(|k| format!("<load: {k}>")).collect(),
        predictions: Vec::new(),
    };
    for record in &records.records {
        let question = record.turns.iter().find(|t| t.role == Role::User);
        let answer = record.turns.iter().find(|t| t.role == Role::Assistant);
        let (Some(question), Some(answer)) = (question, answer) else {
            report.skipped.push(record.id.clone());
            continue;
        };
        let image = match record.images.first() {
            Some(rel) => match inference.load_image(&record.image_folder.join(rel)) {
                Ok(im) => Some(im),
                Err(_) => {
                    report.skipped.push(record.id.clone());
                    continue;
                }
            },
            None => None,
        };
        let predicted = inference.answer(image.as_ref(), &question.text, max_new_tokens)?;
        let (got, expected) = (normalise(&predicted), normalise(&answer.text));
        let (ok, sim) = (got == expected, similarity(&got, &expected));
        let qtype = question_type(&record.id, &qtypes);
        report.overall.add(ok, sim);
        report.by_type.entry(qtype.clone()).or_default().add(ok, sim);
        report.predictions.push(Prediction { id: record.id.clone(), qtype, expected: answer.text.clone(), predicted, correct: ok });
    }
    Ok(report)
}

impl EvalReport {
    /// TensorBoard tags and values: accuracy and similarity, overall and per question type.
    pub fn scalars(&self) -> Vec<(String, f32)> {
        let split = &self.split;
        let mut out = vec![
            (format!("eval/{split}/accuracy"), self.overall.accuracy as f32),
            (format!("eval/{split}/similarity"), self.overall.similarity as f32),
        ];
        for (kind, s) in &self.by_type {
            out.push((format!("eval/{split}/{kind}"), s.accuracy as f32));
            out.push((format!("eval/{split}/{kind}_similarity"), s.similarity as f32));
        }
        out
    }
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.overall;
        writeln!(f, "split {}: {}/{} correct ({:.1}%), character similarity {:.3}", self.split, o.correct, o.total, 100.0 * o.accuracy, o.similarity)?;
        for (kind, s) in &self.by_type {
            writeln!(f, "  {kind:<10} {:>4}/{:<4} {:>5.1}%   similarity {:.3}", s.correct, s.total, 100.0 * s.accuracy, s.similarity)?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "  skipped: {}", self.skipped.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_default_to_the_data_files_folder() {
        assert_eq!(default_image_folder(Path::new("data/heldout.jsonl")), PathBuf::from("data"));
        assert_eq!(default_image_folder(Path::new("/d/heldout.jsonl")), PathBuf::from("/d"));
        assert_eq!(default_image_folder(Path::new("heldout.jsonl")), PathBuf::from("."));
    }

    #[test]
    fn answers_match_after_normalising() {
        assert_eq!(normalise(" Red. "), "red");
        assert_ne!(normalise("K7Q"), normalise("K7O"));
    }

    #[test]
    fn similarity_counts_the_characters_read() {
        assert_eq!(edit_distance("k7qz", "k7oz"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(similarity("k7qz", "k7oz"), 0.75);
        assert_eq!(similarity("k7q", "k7qz"), 0.75);
        assert_eq!(similarity("red", "red"), 1.0);
        assert_eq!(similarity("ab", "ba"), 0.0);
        let mut score = Score::default();
        score.add(true, 1.0);
        score.add(false, 0.5);
        assert_eq!((score.correct, score.total, score.accuracy, score.similarity), (1, 2, 0.5, 0.75));
    }

    #[test]
    fn question_type_from_field_or_id() {
        let mut fields = BTreeMap::new();
        fields.insert("x1".to_string(), "count".to_string());
        assert_eq!(question_type("x1", &fields), "count");
        assert_eq!(question_type("heldout-000042-colour", &fields), "colour");
        assert_eq!(question_type("heldout-000042", &fields), "all");
    }
}
