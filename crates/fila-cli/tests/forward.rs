//! `fila forward` end to end: a config naming the CLIP and ConvNeXt parity checkpoints and a small
//! inline Llama, a real PNG and a prompt; the output file holds the documented tensors with
//! consistent shapes and values.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The checkout: `FILA_REPO_DIR` when set (test binaries run from another checkout), else the
/// one they were built in.
fn root() -> PathBuf {
    std::env::var_os("FILA_REPO_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."), PathBuf::from).canonicalize().unwrap()
}

fn write_config(dir: &Path, tile: u32) -> PathBuf {
    let r = root();
    let fixtures = r.join("crates/fila-model/tests/fixtures");
    let text = format!(
        r#"
[model]
vision = "{clip}"
convnext = "{convnext}"
image_token_id = 649
llm = {{ vocab_size = 650, hidden_size = 64, intermediate_size = 128, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16, max_position_embeddings = 512, rms_norm_eps = 1e-5, rope_theta = 500000.0, rope_scaling = {{ rope_type = "llama3", factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 64 }}, tie_word_embeddings = false }}

[model.hybrid]
fusion_layers = [1, 2, 3, 4]

[data]
tokenizer = "{tokenizer}"
template = "llama3"
image_mode = "square"

[data.geometry]
tile_size = {tile}
square_vit_size = {tile}
square_hires_size = {hires}

[[data.sources]]
path = "{records}"
image_folder = "{images}"
"#,
        clip = fixtures.join("clip").display(),
        convnext = fixtures.join("convnext").display(),
        tokenizer = r.join("crates/fila-data/tests/fixtures/tokenizer.json").display(),
        hires = tile * 32 / 14,
        records = r.join("datasets/tiny/instruct.json").display(),
        images = r.join("datasets/tiny/images").display(),
    );
    let path = dir.join("forward.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fila-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `fila forward` on the fixture image with `config`, written to `out`; `extra` more arguments.
fn forward(config: &Path, out: &Path, extra: &[&str]) {
    let image = root().join("crates/fila-data/tests/fixtures/pil/big_150x100.png");
    let status = Command::new(env!("CARGO_BIN_EXE_fila"))
        .args(["forward", "--config"])
        .arg(config)
        .arg("--image")
        .arg(&image)
        .args(["--prompt", "What is written here?", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}

#[test]
fn forward_writes_the_documented_tensors() {
    let dir = temp("forward");
    let config = write_config(&dir, 56);
    let out = dir.join("out.safetensors");
    forward(&config, &out, &[]);

    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |name: &str| st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`")).shape().to_vec();
    let values = |name: &str| -> Vec<f32> { st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect() };
    // Stage 1: one 56-pixel view, 4×4 cells, 5 ViT layers of which 4 run (select −2).
    for i in 1..=4 {
        assert_eq!(shape(&format!("vit.hidden.{i}")), vec![1, 17, 32]);
    }
    assert!(st.tensor("vit.hidden.5").is_err(), "the last layer is not run");
    assert_eq!(shape("convnext.stage.1"), vec![1, 8, 32, 32]);
    assert_eq!(shape("convnext.stage.4"), vec![1, 32, 4, 4]);
    assert_eq!(shape("image_features"), vec![16, 32]);
    assert_eq!(shape("visual_tokens"), vec![16, 64]);
    let t = shape("input_ids")[1];
    assert_eq!(shape("logits"), vec![1, t, 650]);
    // The projector reads the penultimate layer's patch tokens (CLS dropped).
    let hidden = values("vit.hidden.4");
    assert_eq!(values("image_features"), hidden[32..].to_vec());
    // 16 placeholders for the 16 visual tokens.
    assert_eq!(values("input_ids").iter().filter(|&&id| id == 649.0).count(), 16);
}

#[test]
fn forward_refuses_mismatched_geometry() {
    let dir = temp("geometry");
    let config = write_config(&dir, 28);
    let out = Command::new(env!("CARGO_BIN_EXE_fila"))
        .args(["forward", "--config"])
        .arg(&config)
        .args(["--prompt", "hi", "--out"])
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tile_size 28 / patch_size 14 differ from the ViT's image_size 56 / patch_size 14"), "{err}");
}

/// Every tensor of a `fila forward` file as f32, by name.
#[cfg(feature = "wgpu")]
fn read_all(file: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, (v.shape().to_vec(), v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())))
        .collect()
}

/// The same forward on Burn's wgpu backend (CI: Mesa's software Vulkan driver) gives the CPU's
/// named tensors within 1e-4 of each tensor's largest value: both compute in f32, the GPU kernels
/// in another summation order. The whole model comes from one FILA checkpoint (fresh parameters
/// are drawn by each backend's own generator, so the config's random projector and LLM would
/// differ between devices).
#[cfg(feature = "wgpu")]
#[test]
fn forward_on_wgpu_gives_the_cpu_tensors() {
    use fila_model::fila::Fila;
    let dir = temp("wgpu");
    let components = write_config(&dir, 56);
    let text = std::fs::read_to_string(&components).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let spec: fila_model::spec::ModelSpec = table["model"].clone().try_into().unwrap();
    let (config, source) = spec.resolve(&dir).unwrap();
    let model = Fila::<burn::backend::Flex>::load(&config, &source, &Default::default()).unwrap();
    let tokenizer = root().join("crates/fila-data/tests/fixtures/tokenizer.json");
    let final_dir = fila_train::checkpoint::export_final(&dir, &model, &config, &tokenizer, &text).unwrap();
    let data = &text[text.find("[data]").unwrap()..];
    let whole = dir.join("whole.toml");
    std::fs::write(&whole, format!("[model]\ncheckpoint = \"{}\"\n\n{data}", final_dir.display())).unwrap();

    let (cpu, gpu) = (dir.join("cpu.safetensors"), dir.join("wgpu.safetensors"));
    forward(&whole, &cpu, &["--device", "cpu"]);
    forward(&whole, &gpu, &["--device", "wgpu"]);
    let (cpu, gpu) = (read_all(&cpu), read_all(&gpu));
    assert_eq!(cpu.keys().collect::<Vec<_>>(), gpu.keys().collect::<Vec<_>>());
    for (name, (shape, expected)) in &cpu {
        let (gpu_shape, actual) = &gpu[name];
        assert_eq!(shape, gpu_shape, "{name}: shape");
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = expected.iter().zip(actual).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{name}: max abs difference {diff:.2e} (largest value {scale:.2e})");
        assert!(diff <= 1e-4 * scale, "{name}: wgpu differs from cpu by {diff:e} (largest value {scale:e})");
    }
}
