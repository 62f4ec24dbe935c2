//! What the `fila` tests share: the checkout, temporary folders, and a random tiny checkpoint.
#![allow(dead_code)]

use fila_model::fila::Fila;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The checkout: `FILA_REPO_DIR` when set (test binaries run from another checkout), else the
/// one they were built in.
pub fn root() -> PathBuf {
    std::env::var_os("FILA_REPO_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."), PathBuf::from).canonicalize().unwrap()
}

/// A fresh folder `fila-cli-<suite>-<pid>-<name>` under the system's temporary folder.
pub fn temp(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fila-cli-{suite}-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A random tiny FILA (configs/tiny/stage1.toml's sizes) exported as `<dir>/final` with a stage-2
/// `[data]` table (llama3 template, dynamic tiling on 28-pixel tiles), the same in every test.
pub fn tiny_checkpoint(dir: &Path) -> PathBuf {
    // flex's generator is global to the process: seeding and drawing happen under one lock.
    static GENERATOR: Mutex<()> = Mutex::new(());
    let r = root();
    let text = std::fs::read_to_string(r.join("configs/tiny/stage1.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let spec: fila_model::spec::ModelSpec = table["model"].clone().try_into().unwrap();
    let (config, source) = spec.resolve(&r.join("configs/tiny")).unwrap();
    let generator = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    <burn::backend::Flex as burn::tensor::backend::Backend>::seed(&Default::default(), 0);
    let model = Fila::<burn::backend::Flex>::load(&config, &source, &Default::default()).unwrap();
    drop(generator);
    let tokenizer = r.join("crates/fila-data/tests/fixtures/tokenizer.json");
    let run = format!(
        "[data]\ntokenizer = \"{}\"\ntemplate = \"llama3\"\nimage_mode = \"tiled\"\n\n[data.geometry]\ntile_size = 28\n\
         square_vit_size = 28\nsquare_hires_size = 64\ncanvases = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]\n\n\
         [[data.sources]]\npath = \"{}\"\nimage_folder = \"{}\"\n",
        tokenizer.display(),
        r.join("datasets/tiny/instruct.json").display(),
        r.join("datasets/tiny/images").display()
    );
    fila_train::checkpoint::export_final(dir, &model, &config, &tokenizer, &run).unwrap()
}
