//! `fila forward`: run a model on one image and prompt and write named intermediate tensors to a
//! safetensors file, to check a conversion against another implementation.
//!
//! Output names (stable): `vit.hidden.{i}` (ViT layer i, 1-based, after fusion; `[views, 1+g², D]`),
//! `convnext.stage.{i}` (i = 1..4, `[1, C_i, H_i, W_i]`), `image_features` (projector input,
//! `[tokens, D_vit]`), `visual_tokens` (projector output, `[tokens, D_llm]`), `input_ids` (`[1, T]`,
//! stored as f32), `logits` (`[1, T, vocab]`).
//!
//! It runs on the config's `device` (or `--device`): the same file from `cpu` and from a GPU
//! backend shows what the GPU kernels change.

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use fila_data::{DataConfig, ImageViews, TextEncoder};
use fila_model::fila::Fila;
use fila_model::hybrid_encoder::{ImageInput, Trace};
use fila_model::spec::ModelSpec;
use fila_model::weights::write_safetensors;
use fila_train::backend::{dispatch, Device, OnBackend};
use std::path::{Path, PathBuf};

/// Reads the `[model]` table of a run config.
pub fn read_model_spec(path: &Path) -> Result<ModelSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let model = value.get("model").cloned().with_context(|| format!("{} has no [model] table", path.display()))?;
    model.try_into().map_err(|e| anyhow::anyhow!("{}: [model]: {e}", path.display()))
}

/// The top-level `device` of a run config (`cpu` when it has none).
fn read_device(path: &Path) -> Result<Device> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    match value.get("device") {
        None => Ok(Device::Cpu),
        Some(d) => d.as_str().context("a string")?.parse().map_err(|e: String| anyhow::anyhow!(e)).with_context(|| format!("{}: `device`", path.display())),
    }
}

/// One preprocessed image as the model takes it.
pub fn image_input<B: Backend>(image: &ImageViews, device: &B::Device) -> ImageInput<B> {
    let s = &image.views.shape;
    fila_train::batch::image_input(&image.views.data, [s[0], s[1], s[2], s[3]], &image.hires, image.grid, device)
}

/// `fila forward` on `device` (default: the config's).
pub fn run(config_path: &Path, image: Option<&Path>, prompt: &str, out: &Path, device: Option<Device>) -> Result<()> {
    let device = match device {
        Some(d) => d,
        None => read_device(config_path)?,
    };
    let job = Forward { config: config_path.into(), image: image.map(Into::into), prompt: prompt.into(), out: out.into() };
    dispatch(device, job)
}

struct Forward {
    config: PathBuf,
    image: Option<PathBuf>,
    prompt: String,
    out: PathBuf,
}

impl OnBackend for Forward {
    type Output = ();
    fn run<A: burn::tensor::backend::AutodiffBackend>(self, device: &A::Device) -> Result<()> {
        forward_on::<A::InnerBackend>(&self.config, self.image.as_deref(), &self.prompt, &self.out, device)
    }
}

fn forward_on<B: Backend>(config_path: &Path, image: Option<&Path>, prompt: &str, out: &Path, device: &B::Device) -> Result<()> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let (config, source) = read_model_spec(config_path)?.resolve(base)?;
    let data = DataConfig::from_toml_file(config_path)?;
    fila_train::trainer::check_geometry(&data, &config).with_context(|| config_path.display().to_string())?;
    let device = device.clone();
    let model = Fila::<B>::load(&config, &source, &device)?;
    let text = TextEncoder::from_config(&data)?;
    let preprocessor = fila_data::ImagePreprocessor::new(&data);
    let views = match image {
        Some(path) => {
            let decoded = preprocessor.load(path).map_err(|(reason, detail)| anyhow::anyhow!("{}: {} ({detail})", path.display(), reason.as_str()))?;
            Some(preprocessor.process(&decoded))
        }
        None => None,
    };
    let prompt = match (&views, prompt.contains(&data.image_marker)) {
        (Some(_), false) => format!("{}\n{prompt}", data.image_marker),
        _ => prompt.to_string(),
    };
    let visual: Vec<usize> = views.iter().map(|v| v.visual_tokens).collect();
    let tokens = text.encode_prompt(&prompt, &visual).map_err(|(reason, detail)| anyhow::anyhow!("prompt: {} ({detail})", reason.as_str()))?;
    let len = tokens.input_ids.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.input_ids.clone(), [1, len]), &device);

    let mut trace = Trace::default();
    let mut spliced_visual = None;
    if let Some(views) = &views {
        let (visual_tokens, features) = model.encode_images(&[image_input::<B>(views, &device)], Some(&mut trace));
        trace.tensors.push(("image_features".into(), features.to_data()));
        trace.tensors.push(("visual_tokens".into(), visual_tokens.to_data()));
        spliced_visual = Some(visual_tokens);
    }
    let embeds = model.splice(ids, spliced_visual);
    let logits = model.llm.forward_embeds(embeds, None, false).logits;
    let ids_f32: Vec<f32> = tokens.input_ids.iter().map(|&i| i as f32).collect();
    trace.tensors.push(("input_ids".into(), TensorData::new(ids_f32, [1, len])));
    trace.tensors.push(("logits".into(), logits.to_data()));
    write_safetensors(out, &trace.tensors, None)?;
    println!("wrote {} tensors to {}:", trace.tensors.len(), out.display());
    for (name, data) in &trace.tensors {
        println!("  {name:<20} {:?}", data.shape);
    }
    Ok(())
}
