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
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(name, view)| (name, view.dtype(), view.shape().to_vec(), view.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
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
    if let Some(rest) = k.strip_prefix("layernorm.") {
        return Some(format!("visual.trunk.head.norm.{rest}"));
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

type Owned = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// The tensors of the tiny OpenCLIP fixture (a whole open_clip `CLIP`, trunk under `visual.trunk.`).
fn openclip_tensors() -> Owned {
    let bytes = std::fs::read(fixture("openclip_convnext").join("open_clip_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(name, view)| (name, view.dtype(), view.shape().to_vec(), view.data().to_vec())).collect()
}

fn write_safetensors(dir: &Path, file: &str, tensors: &Owned) {
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::create_dir_all(dir).unwrap();
    safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
}

#[test]
fn openclip_convnext_large_d_320_real_key_names_map_one_to_one() {
    use fila_model::convnext::ConvNextConfig;
    use fila_model::weights::parameter_paths;
    use std::collections::BTreeMap;
    // Every tensor name and shape of the real `convnext_large_d_320` state dict, listed by
    // scripts/fixtures/gen_openclip_convnext_fixture.py from open_clip itself (no 1.4 GB download).
    let text = std::fs::read_to_string(fixture("openclip_convnext").join("convnext_large_d_320.keys.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = serde_json::from_value(json["tensors"].clone()).unwrap();
    assert_eq!(shapes.len(), 543);

    // The sizes read from the shapes are ConvNeXt-L's (dims 192..1536, depths 3-3-27-3, patch 4).
    let config = ConvNextConfig::from_timm_shapes(&|k: &str| shapes.get(k).cloned()).unwrap();
    let large = ConvNextConfig::large();
    assert_eq!((&config.hidden_sizes, &config.depths, config.patch_size), (&large.hidden_sizes, &large.depths, 4));
    assert!(config.layer_scale_init_value > 0.0);

    // Names do not depend on the widths: a narrow net with ConvNeXt-L's depths has the same paths.
    let narrow = ConvNextConfig { hidden_sizes: vec![4, 4, 4, 4], ..config.clone() };
    let map = KeyMap::convnext_timm();
    let mut used = std::collections::BTreeSet::new();
    for ours in parameter_paths::<Dev, _>(&narrow.init::<Dev>(&Default::default())) {
        let key = format!("visual.trunk.{}", map.file_key(&ours));
        assert!(shapes.contains_key(&key), "our `{ours}` maps to `{key}`, which the real file lacks");
        used.insert(key);
    }
    let ignored: Vec<&String> = shapes.keys().filter(|k| !used.contains(*k)).collect();
    for key in &ignored {
        assert!(map.is_ignored(key, "visual.trunk."), "`{key}` is neither loaded nor ignored on purpose");
    }
    // What is left out: the projection head and the text tower, never a trunk tensor.
    assert!(ignored.iter().all(|k| !k.starts_with("visual.trunk.")), "{ignored:?}");
    assert!(ignored.iter().any(|k| k.starts_with("visual.head.mlp.")) && ignored.iter().any(|k| k.starts_with("transformer.resblocks.15.")));
    // And the loaded tensors hold exactly ConvNeXt-L's parameters (the pooler norm `head.norm` included).
    let loaded: usize = used.iter().map(|k| shapes[k].iter().product::<usize>()).sum();
    assert_eq!(loaded, large.num_params());
    assert_eq!(loaded, 196_230_336);
}

#[test]
fn timm_hub_copy_and_headless_trunk_load_by_detection() {
    use fila_model::convnext::{ConvNextConfig, ConvNextLayout};
    let reference = Reference::open("openclip_convnext");
    let want = reference.f32("stage.4");
    // timm's own hub copy: bare trunk names, the CLIP projection as `head.pre_logits.fc` + `head.fc`.
    let mut bare: Owned = openclip_tensors().into_iter().filter_map(|(n, d, s, b)| n.strip_prefix("visual.trunk.").map(|k| (k.to_string(), d, s, b))).collect();
    bare.push(("head.pre_logits.fc.weight".into(), Dtype::F32, vec![2, 32], vec![0; 256]));
    bare.push(("head.fc.weight".into(), Dtype::F32, vec![2, 2], vec![0; 16]));
    // Mini-Gemini drops the trunk's head: a file without `head.norm` loads too (the pooler keeps its init).
    let headless: Owned = bare.iter().filter(|(n, ..)| !n.starts_with("head.")).cloned().collect();
    for (name, tensors) in [("timm", &bare), ("headless", &headless)] {
        let dir = temp_dir(&format!("convnext-{name}"));
        write_safetensors(&dir, "model.safetensors", tensors);
        let (config, layout) = ConvNextConfig::from_pretrained(&dir, ConvNextLayout::Auto).unwrap();
        assert_eq!(layout, ConvNextLayout::Timm, "{name}");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let model = load_module(config.init::<Dev>(&Default::default()), &checkpoint, &KeyMap::convnext_timm()).unwrap();
        let out = model.forward(reference.tensor("pixel_values"));
        assert_close(&format!("{name} stage.4"), out.stages[3].to_data(), &want, TOL);
    }
    // A trunk tensor that is neither loaded nor known stays an error naming it.
    let mut extra = bare.clone();
    extra.push(("norm_pre.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
    let dir = temp_dir("convnext-timm-extra");
    write_safetensors(&dir, "model.safetensors", &extra);
    let (config, _) = ConvNextConfig::from_pretrained(&dir, ConvNextLayout::Timm).unwrap();
    let err = load_module(config.init::<Dev>(&Default::default()), &Checkpoint::open(&dir).unwrap(), &KeyMap::convnext_timm()).unwrap_err();
    assert!(err.to_string().contains("unused tensor `norm_pre.weight`"), "{err}");
}

#[test]
fn openclip_pickle_only_folder_names_the_conversion_script() {
    let dir = temp_dir("openclip-pickle");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("open_clip_pytorch_model.bin"), b"not read").unwrap();
    std::fs::copy(fixture("openclip_convnext").join("open_clip_config.json"), dir.join("open_clip_config.json")).unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(err.contains("scripts/convert_openclip_to_safetensors.py") && err.contains("open_clip_model.safetensors"), "{err}");
    // The same message reaches a user who points `model.convnext` at the folder.
    let err = fila_model::convnext::ConvNextConfig::from_pretrained(&dir, Default::default()).unwrap_err().to_string();
    assert!(err.contains("convert_openclip_to_safetensors.py"), "{err}");
}

#[test]
fn model_spec_settles_the_convnext_layout_from_the_folder() {
    use fila_model::fila::{ConvNextLayout, ModelSource};
    use fila_model::spec::ModelSpec;
    let resolve = |convnext: &str, layout: Option<&str>| {
        let mut spec = serde_json::json!({
            "vision": "clip", "convnext": convnext, "llm": "llama", "image_token_id": 5,
            "hybrid": { "fusion_layers": [1, 2, 3, 4] },
        });
        if let Some(layout) = layout {
            spec["convnext_layout"] = layout.into();
        }
        let spec: ModelSpec = serde_json::from_value(spec).unwrap();
        spec.resolve(&fixture("")).map(|(config, source)| match source {
            ModelSource::Components { convnext_layout, .. } => (config.convnext.hidden_sizes.clone(), convnext_layout),
            other => panic!("{other:?}"),
        })
    };
    // `auto` (the default): an OpenCLIP folder is timm, a Hugging Face folder is hf.
    assert_eq!(resolve("openclip_convnext", None).unwrap(), (vec![8, 16, 24, 32], ConvNextLayout::Timm));
    // ... and the whole model loads from it strictly, the tower's weights being the file's.
    let spec: ModelSpec = serde_json::from_value(serde_json::json!({
        "vision": "clip", "convnext": "openclip_convnext", "llm": "llama", "image_token_id": 5,
        "hybrid": { "fusion_layers": [1, 2, 3, 4] },
    }))
    .unwrap();
    let (config, source) = spec.resolve(&fixture("")).unwrap();
    let fila = fila_model::fila::Fila::<Dev>::load(&config, &source, &Default::default()).unwrap();
    let stem = fila.encoder.convnext.as_ref().unwrap().embeddings.patch_embeddings.weight.val();
    let want = Checkpoint::open(&fixture("openclip_convnext")).unwrap().read_f32("visual.trunk.stem.0.weight").unwrap();
    assert_close("stem.0.weight", stem.into_data(), &want, 0.0);
    assert_eq!(resolve("convnext", None).unwrap(), (vec![8, 16, 24, 32], ConvNextLayout::Hf));
    assert_eq!(resolve("openclip_convnext", Some("open_clip")).unwrap().1, ConvNextLayout::Timm);
    // Asking for the Hugging Face layout of an OpenCLIP folder names the config it lacks.
    let err = resolve("openclip_convnext", Some("hf")).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    // A folder of another model is refused with what was looked for.
    let err = resolve("llama", Some("auto")).unwrap_err().to_string();
    assert!(err.contains("not a ConvNeXt checkpoint") && err.contains("stem.0.weight"), "{err}");
}
