//! Strict loading: a missing, extra or wrong-shaped tensor is an error naming it and its file;
//! bf16 files load; FILA checkpoints round-trip.

mod common;

use common::*;
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::weights::{load_module, Checkpoint, KeyMap};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

/// Rewrites the `clip_gelu` weights into `dir`, letting `edit` change the list of
/// (name, dtype, shape, bytes) first.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(fixture("clip_gelu").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.dtype(), view.shape().to_vec(), view.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::create_dir_all(dir).unwrap();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn try_load(dir: &Path) -> Result<(), String> {
    let config = ClipVisionConfig::from_hf_file(&fixture("clip_gelu")).unwrap();
    let checkpoint = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    load_module(config.init::<Dev>(&Default::default()), &checkpoint, &KeyMap::clip_vision()).map(|_| ()).map_err(|e| e.to_string())
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fila-loading-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn unmodified_fixture_loads() {
    let dir = temp_dir("ok");
    rewrite(&dir, |_| {});
    try_load(&dir).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = temp_dir("missing");
    rewrite(&dir, |t| t.retain(|(n, ..)| n != "encoder.layers.1.mlp.fc2.bias"));
    let err = try_load(&dir).unwrap_err();
    assert!(err.contains("missing tensor `encoder.layers.1.mlp.fc2.bias`"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

#[test]
fn unused_tensor_is_named_with_its_file() {
    let dir = temp_dir("extra");
    rewrite(&dir, |t| t.push(("encoder.layers.7.surprise".into(), Dtype::F32, vec![2], vec![0; 8])));
    let err = try_load(&dir).unwrap_err();
    assert!(err.contains("unused tensor `encoder.layers.7.surprise`"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_is_named_in_pytorch_layout() {
    let dir = temp_dir("shape");
    rewrite(&dir, |t| {
        let entry = t.iter_mut().find(|(n, ..)| n == "encoder.layers.0.mlp.fc1.weight").unwrap();
        entry.2 = vec![24, 64]; // 48x32 → 24x64, same byte count
    });
    let err = try_load(&dir).unwrap_err();
    assert!(err.contains("tensor `encoder.layers.0.mlp.fc1.weight`"), "{err}");
    assert!(err.contains("[24, 64]") && err.contains("[48, 32]"), "{err}");
}

#[test]
fn bf16_and_f16_files_load_within_their_precision() {
    let reference = Reference::open("clip_gelu");
    let config = ClipVisionConfig::from_hf_file(&fixture("clip_gelu")).unwrap();
    for (name, dtype) in [("bf16", Dtype::BF16), ("f16", Dtype::F16)] {
        let dir = temp_dir(name);
        rewrite(&dir, |t| {
            for entry in t.iter_mut() {
                let values: Vec<f32> = entry.3.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                entry.1 = dtype;
                entry.3 = values
                    .iter()
                    .flat_map(|&v| match dtype {
                        Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
                        _ => half::f16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
            }
        });
        let vit = load_module(config.init::<Dev>(&Default::default()), &Checkpoint::open(&dir).unwrap(), &KeyMap::clip_vision()).unwrap();
        let out = vit.forward(reference.tensor("pixel_values"));
        // Weights rounded to 8 (bf16) or 11 (f16) mantissa bits; the error stays well below the signal (|x| ≈ 1).
        let tol = if dtype == Dtype::BF16 { 0.1 } else { 0.01 };
        let err = assert_close("last_hidden_state", out.hidden[2].to_data(), &reference.f32("last_hidden_state"), tol);
        assert!(err > 0.0, "{name}: rounding must show");
    }
}

#[test]
fn pickle_only_folder_is_refused_with_a_hint() {
    let dir = temp_dir("pickle");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(err.contains("safetensors only"), "{err}");
}

/// HF ConvNeXt names → timm / OpenCLIP names, written out independently of `KeyMap::convnext_timm`.
fn timm_name(hf: &str) -> Option<String> {
    let k = hf.strip_prefix("convnext.")?;
    if k.starts_with("layernorm.") {
        return Some(format!("visual.trunk.head.norm.{}", &k["layernorm.".len()..]));
    }
    let k = k
        .replace("embeddings.patch_embeddings.", "stem.0.")
        .replace("embeddings.layernorm.", "stem.1.")
        .replace("encoder.stages.", "stages.")
        .replace("downsampling_layer.", "downsample.")
        .replace(".layers.", ".blocks.")
        .replace(".dwconv.", ".conv_dw.")
        .replace(".layernorm.", ".norm.")
        .replace(".pwconv1.", ".mlp.fc1.")
        .replace(".pwconv2.", ".mlp.fc2.")
        .replace(".layer_scale_parameter", ".gamma");
    Some(format!("visual.trunk.{k}"))
}

#[test]
fn openclip_convnext_names_load_to_the_same_network() {
    use burn::tensor::TensorData;
    use fila_model::convnext::ConvNextConfig;
    let bytes = std::fs::read(fixture("convnext").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        // The classifier has no counterpart in a headless trunk; an OpenCLIP text tower is ignored.
        if let Some(timm) = timm_name(&name) {
            owned.push((timm, view.dtype(), view.shape().to_vec(), view.data().to_vec()));
        }
    }
    owned.push(("text.token_embedding.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
    let views: Vec<(String, TensorView)> = owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let dir = temp_dir("timm");
    std::fs::create_dir_all(&dir).unwrap();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();

    let config = ConvNextConfig::from_hf_file(&fixture("convnext")).unwrap();
    let model = load_module(config.init::<Dev>(&Default::default()), &Checkpoint::open(&dir).unwrap(), &KeyMap::convnext_timm()).unwrap();
    let reference = Reference::open("convnext");
    let out = model.forward(reference.tensor("pixel_values"));
    assert_close("stage.4", out.stages[3].to_data(), &reference.f32("stage.4"), TOL);
    let pooled: TensorData = model.pool(out.stages[3].clone()).into_data();
    assert_close("pooler_output", pooled, &reference.f32("pooler_output"), TOL);
}

#[test]
fn model_spec_rejects_unknown_inline_keys_and_resolves_folders() {
    use fila_model::spec::ModelSpec;
    let spec: ModelSpec = serde_json::from_value(serde_json::json!({
        "vision": { "hidden_size": 32, "num_hiden_layers": 2 },
        "convnext": fixture("convnext"),
        "llm": fixture("llama"),
        "image_token_id": 5,
    }))
    .unwrap();
    let err = spec.resolve(std::path::Path::new(".")).unwrap_err().to_string();
    assert!(err.contains("unknown key `model.vision.num_hiden_layers`"), "{err}");

    let spec: ModelSpec = serde_json::from_value(serde_json::json!({
        "vision": "clip",
        "convnext": "convnext",
        "llm": "llama",
        "image_token_id": 5,
        "hybrid": { "fusion_layers": [1, 2, 3, 4] },
    }))
    .unwrap();
    let (config, _) = spec.resolve(&fixture("")).unwrap();
    assert_eq!((config.vision.num_hidden_layers, config.llm.num_key_value_heads, config.convnext.hidden_sizes[3]), (5, 2, 32));
    assert_eq!(config.projector.to_string(), "mlp2x_gelu");
}

#[test]
fn model_spec_with_a_checkpoint_refuses_architecture_keys_it_would_ignore() {
    use fila_model::spec::ModelSpec;
    // A FILA checkpoint's config.json defines the architecture: a `model.hybrid` beside it (the
    // ViT-only ablation asked for at stage 2, say) would be silently ignored, so it is an error.
    let spec: ModelSpec = serde_json::from_value(serde_json::json!({
        "checkpoint": "checkpoints/stage1/final",
        "hybrid": { "use_convnext": false },
        "image_token_id": 5,
    }))
    .unwrap();
    let err = spec.resolve(std::path::Path::new(".")).unwrap_err().to_string();
    assert!(err.contains("remove `model.hybrid`, `model.image_token_id`"), "{err}");
    assert!(err.contains("use_convnext = false` in the run that makes the checkpoint"), "{err}");
    // The checkpoint alone goes on to read its folder.
    let spec: ModelSpec = serde_json::from_value(serde_json::json!({ "checkpoint": "/nonexistent/fila" })).unwrap();
    let err = spec.resolve(std::path::Path::new(".")).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/fila"), "{err}");
}
