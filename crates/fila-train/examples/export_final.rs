//! Writes a FILA checkpoint folder again as `OUT/final/` through the export `fila-train` runs at
//! the end of training (`checkpoint::export_final`): model, config, tokenizer, run config and
//! the Hugging Face files. For folders exported by an older `fila-train`.
//!
//!     cargo run --release -p fila-train --example export_final -- checkpoints/synth-stage2/final OUT

use anyhow::{Context, Result};
use burn::backend::Flex;
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use std::path::PathBuf;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, out] = <[String; 2]>::try_from(args).map_err(|_| anyhow::anyhow!("usage: export_final CHECKPOINT_DIR OUT_DIR"))?;
    let source = PathBuf::from(source);
    let config = FilaConfig::from_checkpoint_dir(&source)?;
    let model = Fila::<Flex>::load(&config, &ModelSource::Checkpoint(source.clone()), &Default::default())?;
    let run_config = std::fs::read_to_string(source.join("run.toml")).with_context(|| format!("reading {}/run.toml", source.display()))?;
    std::fs::create_dir_all(&out)?;
    let dest = fila_train::checkpoint::export_final(&PathBuf::from(out), &model, &config, &source.join("tokenizer.json"), &run_config)?;
    println!("wrote {}", dest.display());
    Ok(())
}
