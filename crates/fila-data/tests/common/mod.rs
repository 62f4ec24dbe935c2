//! Shared test helpers: a tiny geometry, datasets written into temporary folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fila_data::DataConfig;

/// This crate's folder, in the checkout `FILA_REPO_DIR` when set (test binaries built in one
/// checkout and run from another).
pub fn crate_dir() -> PathBuf {
    std::env::var_os("FILA_REPO_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), |d| PathBuf::from(d).join("crates/fila-data"))
}

pub fn fixtures() -> PathBuf {
    crate_dir().join("tests/fixtures")
}

pub fn tokenizer_path() -> PathBuf {
    fixtures().join("tokenizer.json")
}

/// `[data]` for a dataset at `dir/data.jsonl` with images in `dir/images`, tiny geometry
/// (tile 28 → 2×2 grid, 4 tokens per view; ConvNeXt 64 per tile), plus `extra` TOML lines.
pub fn config(dir: &Path, extra: &str) -> DataConfig {
    let text = format!(
        r#"
[model]
ignored = "other tables are not the data crate's business"

[data]
tokenizer = "{tok}"
{max_len}{extra}

[data.geometry]
tile_size = 28
square_vit_size = 28
square_hires_size = 64

[[data.sources]]
path = "{dir}/data.jsonl"
image_folder = "{dir}/images"
"#,
        tok = tokenizer_path().display(),
        dir = dir.display(),
        max_len = if extra.contains("max_len") { "" } else { "max_len = 256\n" },
    );
    DataConfig::from_toml_str(&text, Path::new("test.toml")).expect("test config parses")
}

/// A deterministic RGB test pattern.
pub fn pattern(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([((x * 7 + y * 3 + seed * 11) % 256) as u8, ((x * x + y + seed) % 256) as u8, (((x / 4 + y / 4) % 2) * 200 + seed % 50) as u8])
    })
}

pub fn write_image(dir: &Path, name: &str, w: u32, h: u32) {
    let path = dir.join("images").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    pattern(w, h, w + h).save(&path).unwrap();
}

pub fn write_jsonl(dir: &Path, lines: &[String]) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("data.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// A LLaVA record line.
pub fn record(id: &str, image: Option<&str>, turns: &[(&str, &str)]) -> String {
    let conv: Vec<_> = turns.iter().map(|(f, v)| serde_json::json!({"from": f, "value": v})).collect();
    let mut r = serde_json::json!({"id": id, "conversations": conv});
    if let Some(i) = image {
        r["image"] = serde_json::json!(i);
    }
    r.to_string()
}
