//! Inference from a FILA checkpoint: `fila generate` (greedy decoding with a KV cache) and
//! `fila eval` (several questions per forward, scored with the benchmark metrics of `metrics`).

use crate::eval::{read_eval_file, EvalItem, EvalReport};
use crate::forward::image_input;
use crate::metrics::Metric;
use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use fila_data::{DataConfig, ImagePreprocessor, ImageViews, TextEncoder};
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use fila_model::llama::KvCache;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

type B = burn::backend::Flex;

/// A loaded checkpoint with the text and image settings it was trained with.
pub struct Inference {
    model: Fila<B>,
    text: TextEncoder,
    images: ImagePreprocessor,
    data: DataConfig,
    stop_ids: Vec<i64>,
    /// The language model's `max_position_embeddings`: prompt and answer together.
    context: usize,
    device: burn::tensor::Device<B>,
}

/// One question as token ids, with its preprocessed image.
pub struct Prompt {
    ids: Vec<i64>,
    image: Option<ImageViews>,
}

impl Prompt {
    /// Tokens in the prompt, visual tokens included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

/// One generated answer with how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    /// Tokens generated, an end token included.
    pub tokens: usize,
    /// Whether the answer ended with an end token (else it reached its token limit).
    pub stopped: bool,
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
        let stop_ids: Vec<i64> =
            [text.special.eot, text.special.plain_end].into_iter().flatten().chain(text.tokenizer.token_to_id("<|end_of_text|>").map(i64::from)).collect();
        let context = config.llm.max_position_embeddings;
        Ok(Self { model, images: ImagePreprocessor::new(&data), text, data, stop_ids, context, device })
    }

    /// The ids of `prompt` about `image` in the checkpoint's template; an `<image>` marker is put
    /// before the prompt when it has none.
    pub fn prepare(&self, image: Option<&image::RgbImage>, prompt: &str) -> Result<Prompt> {
        let views = image.map(|im| self.images.process(im));
        let marker = &self.data.image_marker;
        let prompt = if views.is_some() && !prompt.contains(marker.as_str()) { format!("{marker}\n{prompt}") } else { prompt.to_string() };
        let visual: Vec<usize> = views.iter().map(|v| v.visual_tokens).collect();
        let tokens = self.text.encode_prompt(&prompt, &visual).map_err(|(r, d)| anyhow::anyhow!("prompt: {} ({d})", r.as_str()))?;
        Ok(Prompt { ids: tokens.input_ids, image: views })
    }

    fn decode(&self, generated: &[i64]) -> Result<String> {
        let kept: Vec<u32> = generated.iter().filter(|id| !self.stop_ids.contains(id)).map(|&id| id as u32).collect();
        self.text.tokenizer.decode(&kept, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// The model's answer to `prompt` about `image` (greedy, one prompt at a time), as text.
    pub fn answer(&self, image: Option<&image::RgbImage>, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let prompt = self.prepare(image, prompt)?;
        let len = prompt.ids.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.ids, [1, len]), &self.device);
        let inputs: Vec<_> = prompt.image.iter().map(|v| image_input(v, &self.device)).collect();
        let generated = self.model.generate(ids, &inputs, max_new_tokens, &self.stop_ids);
        self.decode(&generated)
    }

    /// Greedy answers to several prompts in one batch. The prompts are right-padded to the longest
    /// and each row decodes at its own positions (its RoPE positions and key mask skip the
    /// padding), so every answer is the one [`Inference::answer`] gives for that prompt alone.
    pub fn answer_batch(&self, prompts: &[Prompt], max_new_tokens: usize) -> Result<Vec<String>> {
        let generated = self.generate_batch(prompts, &vec![max_new_tokens; prompts.len()]);
        generated.iter().map(|g| self.decode(g)).collect()
    }

    /// Greedy answers to several prompts in one batch, each with its own token limit: a row stops
    /// at its end token or its limit, and the batch runs until every row has stopped. Each answer
    /// is the one [`Inference::answer`] gives for that prompt and limit alone.
    pub fn answer_each(&self, prompts: &[Prompt], limits: &[usize]) -> Result<Vec<Answer>> {
        assert_eq!(prompts.len(), limits.len(), "one limit per prompt");
        let generated = self.generate_batch(prompts, limits);
        generated
            .iter()
            .map(|g| {
                let stopped = g.last().is_some_and(|id| self.stop_ids.contains(id));
                Ok(Answer { text: self.decode(g)?, tokens: g.len(), stopped })
            })
            .collect()
    }

    /// The most tokens a prompt and its answer may hold together (`max_position_embeddings`).
    pub fn context_len(&self) -> usize {
        self.context
    }

    /// The pixel limit of the checkpoint's `[data]` settings (`max_image_pixels`).
    pub fn max_image_pixels(&self) -> u64 {
        self.images.max_pixels
    }

    /// Generated ids per row; row `i` stops at an end token or after `limits[i]` tokens.
    fn generate_batch(&self, prompts: &[Prompt], limits: &[usize]) -> Vec<Vec<i64>> {
        let rows = prompts.len();
        let max_new_tokens = limits.iter().copied().max().unwrap_or(0);
        if rows == 0 || max_new_tokens == 0 {
            return vec![Vec::new(); rows];
        }
        let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
        let width = *lens.iter().max().expect("rows > 0");
        // Padding is masked out; it only must not be the placeholder that receives visual tokens.
        let pad = if self.model.image_token_id == 0 { 1 } else { 0 };
        let mut ids = Vec::with_capacity(rows * width);
        let mut prompt_mask = Vec::with_capacity(rows * width);
        for p in prompts {
            ids.extend(p.ids.iter().copied().chain(std::iter::repeat_n(pad, width - p.ids.len())));
            prompt_mask.extend((0..width).map(|j| if j < p.ids.len() { 1.0f32 } else { 0.0 }));
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, width]), &self.device);
        // Images in row order: `splice` fills the placeholders row by row.
        let inputs: Vec<_> = prompts.iter().filter_map(|p| p.image.as_ref()).map(|v| image_input(v, &self.device)).collect();
        let visual = (!inputs.is_empty()).then(|| self.model.encode_images(&inputs, None).0);
        let embeds = self.model.splice(ids, visual);
        let llm = &self.model.llm;
        let mut cache = KvCache::new(llm.model.layers.len());
        let valid = Tensor::<B, 2>::from_data(TensorData::new(prompt_mask.clone(), [rows, width]), &self.device);
        let hidden = llm.forward_cached_padded(embeds, &mut cache, &vec![0; rows], valid); // [rows, width, D]
        let d = hidden.dims()[2];
        let last: Vec<_> = lens.iter().enumerate().map(|(i, &n)| hidden.clone().slice([i..i + 1, n - 1..n, 0..d])).collect();
        let mut next = self.greedy(Tensor::cat(last, 0));
        let mut out = vec![Vec::new(); rows];
        // A row with a limit of 0 takes no token.
        let mut done: Vec<bool> = limits.iter().map(|&l| l == 0).collect();
        for step in 0..max_new_tokens {
            for (i, &token) in next.iter().enumerate() {
                if !done[i] {
                    out[i].push(token);
                    done[i] = self.stop_ids.contains(&token) || out[i].len() >= limits[i];
                }
            }
            if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
                break;
            }
            // Key columns: the padded prompt, then one generated token per step so far (all real).
            let columns = width + step + 1;
            let mut mask = Vec::with_capacity(rows * columns);
            for row in prompt_mask.chunks(width) {
                mask.extend_from_slice(row);
                mask.extend(std::iter::repeat_n(1.0f32, step + 1));
            }
            let valid = Tensor::<B, 2>::from_data(TensorData::new(mask, [rows, columns]), &self.device);
            let starts: Vec<usize> = lens.iter().map(|&n| n + step).collect();
            let fed = Tensor::<B, 2, Int>::from_data(TensorData::new(next.clone(), [rows, 1]), &self.device);
            let hidden = llm.forward_cached_padded(llm.embed(fed), &mut cache, &starts, valid);
            next = self.greedy(hidden);
        }
        out
    }

    /// The most likely next token of each row, from final-norm hidden states `[rows, 1, D]`.
    fn greedy(&self, hidden: Tensor<B, 3>) -> Vec<i64> {
        let logits = self.model.llm.logits(hidden); // [rows, 1, V]
        let [rows, _, v] = logits.dims();
        logits.reshape([rows, v]).argmax(1).to_data().convert::<i64>().to_vec().expect("integer ids")
    }

    pub fn load_image(&self, path: &Path) -> Result<image::RgbImage> {
        self.images.load(path).map_err(|(r, d)| anyhow::anyhow!("{}: {} ({d})", path.display(), r.as_str()))
    }
}

/// The image folder `fila eval` uses when none is given: the data file's folder. A bare file name
/// (`heldout.jsonl`) has an empty parent, which names no directory; that is the current one.
pub fn default_image_folder(data: &Path) -> PathBuf {
    match data.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What `evaluate` needs besides the model and the data file.
pub struct EvalOptions<'a> {
    pub checkpoint: &'a Path,
    pub image_folder: &'a Path,
    pub max_new_tokens: usize,
    /// Questions per forward.
    pub batch_size: usize,
    /// Metrics for records without a `metric` field.
    pub metrics: &'a [Metric],
}

/// Asks every question of the eval file `data` (batched greedy decoding) and scores the answers.
/// A record whose image cannot be read is skipped and listed; a prompt that cannot be built is an
/// error naming the record.
pub fn evaluate(inference: &Inference, data: &Path, options: &EvalOptions) -> Result<EvalReport> {
    let items = read_eval_file(data)?;
    let folder = options.image_folder.canonicalize().with_context(|| format!("image folder {} (pass --images DIR)", options.image_folder.display()))?;
    let mut report = EvalReport::new(Some(options.checkpoint), data, options.metrics);
    let terminal = std::io::stderr().is_terminal();
    let mut done = 0;
    for chunk in items.chunks(options.batch_size.max(1)) {
        let mut asked: Vec<&EvalItem> = Vec::new();
        let mut prompts = Vec::new();
        for item in chunk {
            let image = match &item.image {
                None => None,
                Some(relative) => match fila_data::pixels::resolve_image_path(&folder, relative).and_then(|p| inference.images.load(&p)) {
                    Ok(image) => Some(image),
                    Err((reason, detail)) => {
                        report.skip(item, &format!("{} ({detail})", reason.as_str()));
                        continue;
                    }
                },
            };
            prompts.push(inference.prepare(image.as_ref(), &item.question).with_context(|| format!("{}: record `{}`", item.location, item.id))?);
            asked.push(item);
        }
        let answers = inference.answer_batch(&prompts, options.max_new_tokens)?;
        for (item, answer) in asked.iter().zip(&answers) {
            // Decoded text often starts with the space of its first token.
            report.add(item, answer.trim(), options.metrics);
        }
        done += chunk.len();
        if terminal {
            eprint!("\r{done}/{} questions", items.len());
            let _ = std::io::stderr().flush();
        }
    }
    if terminal {
        eprintln!();
    }
    Ok(report)
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

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
    }

    /// A random tiny FILA (configs/tiny/stage1.toml's sizes) exported as `final/` with a stage-2
    /// `[data]` table: llama3 template and dynamic tiling, so prompts differ in length.
    fn tiny_checkpoint(dir: &Path) -> PathBuf {
        let root = repo();
        let spec = crate::forward::read_model_spec(&root.join("configs/tiny/stage1.toml")).unwrap();
        let (config, source) = spec.resolve(&root.join("configs/tiny")).unwrap();
        // Seeded, so the random model (and what the test sees of it) is the same on every run.
        let generator = crate::generator_lock();
        B::seed(&Default::default(), 0);
        let model = Fila::<B>::load(&config, &source, &Default::default()).unwrap();
        drop(generator);
        let tokenizer = root.join("crates/fila-data/tests/fixtures/tokenizer.json");
        let run = format!(
            "[data]\ntokenizer = \"{}\"\ntemplate = \"llama3\"\nimage_mode = \"tiled\"\n\n[data.geometry]\ntile_size = 28\n\
             square_vit_size = 28\nsquare_hires_size = 64\ncanvases = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]\n\n\
             [[data.sources]]\npath = \"{}\"\nimage_folder = \"{}\"\n",
            tokenizer.display(),
            root.join("datasets/tiny/instruct.json").display(),
            root.join("datasets/tiny/images").display()
        );
        fila_train::checkpoint::export_final(dir, &model, &config, &tokenizer, &run).unwrap()
    }

    /// Batched greedy decoding (right padding, per-row positions and key mask) gives, row by row,
    /// the answers of the one-prompt path (`Fila::generate`, no padding).
    #[test]
    fn batched_answers_equal_one_at_a_time() {
        let dir = std::env::temp_dir().join(format!("fila-cli-batch-{}", std::process::id()));
        let checkpoint = tiny_checkpoint(&dir);
        let inference = Inference::open(&checkpoint, None).unwrap();
        let images = repo().join("datasets/tiny/images");
        let load = |name: &str| inference.load_image(&images.join(name)).unwrap();
        let (wide, tall, square) = (load("00_red.png"), load("01_green.png"), load("06_white.png"));
        let questions: Vec<(Option<&image::RgbImage>, &str)> = vec![
            (Some(&wide), "What colour is the image?"),
            (None, "Say something long about nothing at all, please."),
            (Some(&tall), "Colour?"),
            (Some(&square), "Is it wider than it is tall? Answer in a word."),
            (None, "Hi"),
        ];
        let prompts: Vec<Prompt> = questions.iter().map(|(im, q)| inference.prepare(*im, q).unwrap()).collect();
        let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
        assert!(lens.iter().min() < lens.iter().max(), "prompt lengths {lens:?} need padding");
        let batched = inference.answer_batch(&prompts, 6).unwrap();
        let alone: Vec<String> = questions.iter().map(|(im, q)| inference.answer(*im, q, 6).unwrap()).collect();
        assert_eq!(batched, alone);
        let distinct: std::collections::BTreeSet<&String> = alone.iter().collect();
        assert!(distinct.len() > 1, "the random model answers everything alike ({alone:?}); the test would prove little");
        // A batch of one is the same again, and so is a batch in another order.
        assert_eq!(inference.answer_batch(&prompts[3..4], 6).unwrap(), alone[3..4].to_vec());
        let reversed: Vec<Prompt> = questions.iter().rev().map(|(im, q)| inference.prepare(*im, q).unwrap()).collect();
        let mut back = inference.answer_batch(&reversed, 6).unwrap();
        back.reverse();
        assert_eq!(back, alone);
        // Each row with its own limit: the answer alone with that limit, ended by its end token or
        // cut at the limit.
        let limits = [1, 6, 3, 0, 4];
        let each = inference.answer_each(&prompts, &limits).unwrap();
        for ((answer, &limit), (im, q)) in each.iter().zip(&limits).zip(&questions) {
            assert_eq!(answer.text, inference.answer(*im, q, limit).unwrap(), "limit {limit}");
            assert!(answer.tokens <= limit && (answer.stopped || answer.tokens == limit), "{answer:?} at limit {limit}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
