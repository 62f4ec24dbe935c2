//! Every file in configs/ parses and validates; `--plan` prints without allocating and counts the
//! trainable parameters exactly.

mod common;

use common::*;
use fila_train::config::LoadedConfig;

#[test]
fn every_config_parses_and_validates() {
    let mut found = 0;
    for dir in [repo().join("configs"), repo().join("configs/tiny")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let loaded = LoadedConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.starts_with('#') && text.contains("cargo run"), "{}: no header with the command", path.display());
                // The resolved config parses again to the same thing (what a run saves).
                let again = LoadedConfig::from_table(toml::from_str(&loaded.to_toml()).unwrap(), &path).unwrap();
                assert_eq!(again.config, loaded.config);
                found += 1;
            }
        }
    }
    assert_eq!(found, 6);
}

#[test]
fn plan_counts_the_trainable_parameters() {
    let loaded = LoadedConfig::load(&tiny(1), &[]).unwrap();
    let text = fila_train::plan::plan(&loaded, 1).unwrap();
    let exact = fila_train::plan::trainable_elements_of(&loaded).unwrap();
    assert_eq!(exact, 115_424);
    assert!(text.contains(&format!("({exact} trainable")), "{text}");
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(&fila_train(&repo().join("configs/stage2.toml"), &tmp.path().join("x"), &[], &["--plan"]));
    assert!(out.contains("8571778688") && out.contains("optimizer state"), "{out}");
    assert!(!tmp.path().join("x").exists());
}
