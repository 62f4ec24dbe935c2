//! The models the tiny configs build: the synthetic quick start starts from the committed tiny
//! towers, stage 1 trains what `trainable.modules` lists (CVFM and projector by default), and a
//! stage-2 trainable list written for the full model applies to the ViT-only
//! ablation. (Own test binary: building models seeds Burn's global RNG, which `frozen.rs` relies on.)

mod common;

use burn::backend::{Autodiff, Flex};
use common::*;
use fila_train::config::LoadedConfig;
use fila_train::trainer::build_model;

#[test]
fn the_synthetic_quick_start_starts_from_the_committed_tiny_towers() {
    let _serial = autodiff_lock();
    let loaded = LoadedConfig::load(&repo().join("configs/tiny/synth-stage1.toml"), &[]).unwrap();
    let (model, _, set) = build_model::<Autodiff<Flex>>(&loaded, &Default::default()).unwrap();
    // The towers stay frozen; the random tiny LLM trains with CVFM and the projector.
    assert!(set.params.keys().all(|p| ["encoder.cvfm.", "projector.", "llm."].iter().any(|m| p.starts_with(m))));
    assert!(set.params.keys().any(|p| p.starts_with("llm.")));
    let towers = repo().join("datasets/synth/towers");
    let clip = tensors(&towers.join("clip/model.safetensors"));
    let convnext = tensors(&towers.join("convnext/model.safetensors"));
    let (mut vit, mut conv) = (0, 0);
    for (name, data) in model.named_tensors() {
        // FILA names: CLIPVisionModel's own for the ViT, `convnext.` + ConvNextModel's for ConvNeXt.
        let (file, key, count) = match name.strip_prefix("convnext.") {
            Some(rest) => (&convnext, rest.to_string(), &mut conv),
            // transformers writes a bare CLIPVisionModel without its `vision_model.` prefix.
            None => match name.strip_prefix("vision_model.") {
                Some(rest) => (&clip, rest.to_string(), &mut vit),
                None => continue,
            },
        };
        let expected = &file.get(&key).unwrap_or_else(|| panic!("`{key}` missing from the committed tower")).1;
        assert!(data.convert::<f32>().to_vec::<f32>().unwrap() == *expected, "`{name}` is not the committed tower's");
        *count += 1;
    }
    // Every tensor of both files is one of FILA's, and every tower tensor of FILA comes from them.
    assert_eq!((vit, conv), (clip.len(), convnext.len()), "tower tensors compared");
    assert_eq!((vit, conv), (87, 63));
}

#[test]
fn a_stage2_list_naming_the_convnext_branch_applies_to_the_vit_only_ablation() {
    let _serial = autodiff_lock();
    use fila_train::config::TrainableConfig;
    use fila_train::trainable::apply_trainable;
    let loaded = LoadedConfig::load(&tiny(1), &["model.hybrid.use_convnext=false".to_string()]).unwrap();
    let list = |names: &[&str]| TrainableConfig {
        modules: Some(names.iter().map(|s| s.to_string()).collect()),
        lr_multipliers: [("convnext".to_string(), 0.1), ("vit".to_string(), 0.1)].into(),
    };
    let (model, _, _) = build_model::<Autodiff<Flex>>(&loaded, &Default::default()).unwrap();
    let (_, set) = apply_trainable(model.clone(), 2, &list(&["cvfm", "projector", "llm"])).unwrap();
    assert!(set.params.keys().all(|p| p.starts_with("projector.") || p.starts_with("llm.")));
    assert!(set.params.keys().any(|p| p.starts_with("llm.")) && set.params.keys().any(|p| p.starts_with("projector.")));
    // A misspelt module is still an error.
    let err = apply_trainable(model, 2, &list(&["cvfn"])).unwrap_err().to_string();
    assert!(err.contains("`cvfn` matches no parameter"), "{err}");
}

#[test]
fn stage1_trains_cvfm_and_projector_unless_the_config_lists_modules() {
    let _serial = autodiff_lock();
    let prefixes = |overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let loaded = LoadedConfig::load(&tiny(1), &overrides).unwrap();
        let (_, _, set) = build_model::<Autodiff<Flex>>(&loaded, &Default::default()).unwrap();
        let mut p: Vec<String> = set.params.keys().map(|k| k.split('.').take(2).collect::<Vec<_>>().join(".")).collect();
        p.dedup();
        p
    };
    assert_eq!(prefixes(&[]), ["encoder.cvfm", "projector.layers"]);
    assert_eq!(prefixes(&["trainable.modules=[\"cvfm\", \"projector\", \"llm\"]"]), ["encoder.cvfm", "llm.lm_head", "llm.model", "projector.layers"]);
}
