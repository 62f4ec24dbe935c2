//! The whole FILA model on the fixture towers: visual tokens land exactly on the `<image>`
//! positions (in batch order), the loss is the masked next-token cross-entropy, and a FILA
//! checkpoint written from the model loads back to the same outputs.

mod common;

use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use common::*;
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::cvfm::TileGrid;
use fila_model::fila::{causal_lm_loss, ConvNextLayout, Fila, FilaConfig, FilaInput, ModelSource};
use fila_model::hybrid_encoder::{HybridConfig, ImageInput};
use fila_model::llama::LlamaConfig;
use fila_model::projector::ProjectorKind;
use fila_model::weights::write_safetensors;

const IMG: i64 = 95;

fn config() -> FilaConfig {
    FilaConfig {
        vision: ClipVisionConfig::from_hf_file(&fixture("clip")).unwrap(),
        convnext: ConvNextConfig::from_hf_file(&fixture("convnext")).unwrap(),
        hybrid: HybridConfig { fusion_layers: vec![1, 2, 3, 4], ..HybridConfig::default() },
        projector: "mlp2x_gelu".to_string().try_into().unwrap(),
        llm: LlamaConfig::from_hf_file(&fixture("llama")).unwrap(),
        image_token_id: IMG as u32,
    }
}

fn components() -> ModelSource {
    ModelSource::Components {
        vision: Some(fixture("clip")),
        convnext: Some(fixture("convnext")),
        convnext_layout: ConvNextLayout::Hf,
        llm: Some(fixture("llama")),
    }
}

fn images<B: Backend>() -> Vec<ImageInput<B>> {
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    vec![
        // Tiled 1×1: global + one tile = 2 views = 32 tokens.
        ImageInput {
            views: Tensor::random([2, 3, 56, 56], normal, &device),
            hires: Some(Tensor::random([1, 3, 128, 128], normal, &device)),
            grid: TileGrid::tiled(1, 1),
        },
        // Stage-1 style: one view = 16 tokens.
        ImageInput {
            views: Tensor::random([1, 3, 56, 56], normal, &device),
            hires: Some(Tensor::random([1, 3, 128, 128], normal, &device)),
            grid: TileGrid::untiled(),
        },
    ]
}

fn batch() -> (Vec<i64>, Vec<f32>, Vec<i64>, [usize; 2]) {
    let t = 38;
    let mut row0 = vec![1, 2];
    row0.extend(std::iter::repeat_n(IMG, 32));
    row0.extend([3, 4, 5, 6]);
    let mut row1 = vec![7];
    row1.extend(std::iter::repeat_n(IMG, 16));
    row1.extend([8, 9, 10]);
    let valid1 = row1.len();
    row1.resize(t, 0);
    let ids: Vec<i64> = row0.iter().chain(&row1).copied().collect();
    let mask: Vec<f32> = (0..2 * t).map(|i| if i < t || i - t < valid1 { 1.0 } else { 0.0 }).collect();
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &id)| if id == IMG || mask[i] == 0.0 || i % t < 2 { -100 } else { id }).collect();
    (ids, mask, labels, [2, t])
}

fn input<B: Backend>(images: Vec<ImageInput<B>>, with_labels: bool) -> FilaInput<B> {
    let device = Default::default();
    let (ids, mask, labels, shape) = batch();
    FilaInput {
        input_ids: Tensor::from_data(TensorData::new(ids, shape), &device),
        attention_mask: Tensor::from_data(TensorData::new(mask, shape), &device),
        labels: with_labels.then(|| Tensor::from_data(TensorData::new(labels, shape), &device)),
        images,
    }
}

#[test]
fn visual_tokens_replace_placeholders_in_order_and_loss_matches() {
    let _serial = autodiff_lock();
    let config = config();
    let model = Fila::<Dev>::load(&config, &components(), &Default::default()).unwrap();
    let images = images::<Dev>();
    let out = model.forward(input(images.clone(), true), None);

    // The same computation by hand: embed text, write visual rows at the placeholder positions.
    let (visual, _) = model.encode_images(&images, None); // [48, 64]
    assert_eq!(visual.dims(), [48, 64]);
    let (ids, mask, labels, [b, t]) = batch();
    let device = Default::default();
    let embeds = model.llm.embed(Tensor::from_data(TensorData::new(ids.clone(), [b, t]), &device));
    let mut rows = Vec::new();
    let mut k = 0;
    for (i, &id) in ids.iter().enumerate() {
        if id == IMG {
            rows.push(visual.clone().narrow(0, k, 1));
            k += 1;
        } else {
            rows.push(embeds.clone().reshape([b * t, 64]).narrow(0, i, 1));
        }
    }
    let manual = Tensor::cat(rows, 0).reshape([b, t, 64]);
    let expected = model.llm.forward_embeds(manual, Some(Tensor::from_data(TensorData::new(mask, [b, t]), &device)), false).logits;
    let expected_data = expected.to_data();
    assert_close("logits", out.logits.to_data(), &(vec![b, t, 96], expected_data.to_vec().unwrap()), 1e-6);

    let labels = Tensor::<Dev, 2, Int>::from_data(TensorData::new(labels, [b, t]), &device);
    let (loss, scored) = causal_lm_loss(expected, labels);
    // Row 0: positions 34..37 scored (4); row 1: 18..19 (2); position 2 / 1 follow unscored tokens.
    assert_eq!(out.scored_tokens, scored);
    assert_eq!(scored, 4 + 2 + 1);
    let diff = (out.loss.unwrap() - loss).abs().into_scalar();
    assert!(diff < 1e-6, "{diff}");
}

#[test]
#[should_panic(expected = "<image> placeholder tokens in the batch but 16 visual tokens")]
fn placeholder_count_must_match_the_images() {
    let model = Fila::<Dev>::load(&config(), &components(), &Default::default()).unwrap();
    let mut images = images::<Dev>();
    images.remove(0);
    model.forward(input(images, false), None);
}

#[test]
fn fila_checkpoint_round_trips() {
    let _serial = autodiff_lock();
    let config = config();
    let model = Fila::<Dev>::load(&config, &components(), &Default::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("fila-ckpt-{}", std::process::id()));
    write_checkpoint(&model.named_tensors(), &dir);
    let names: Vec<String> = model.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"vision_model.encoder.layers.0.self_attn.q_proj.weight".to_string()));
    assert!(names.contains(&"convnext.encoder.stages.1.downsampling_layer.0.weight".to_string()));
    assert!(names.contains(&"cvfm.3.fc_out.weight".to_string()));
    assert!(names.contains(&"projector.layers.1.bias".to_string()));
    assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()));

    let loaded_config = FilaConfig::from_checkpoint_dir(&dir).unwrap();
    assert_eq!(loaded_config, config);
    let loaded = Fila::<Dev>::load(&loaded_config, &ModelSource::Checkpoint(dir.clone()), &Default::default()).unwrap();
    let images = images::<Dev>();
    let a = model.forward(input(images.clone(), false), None).logits;
    let b = loaded.forward(input(images, false), None).logits;
    let diff: f32 = (a - b).abs().max().into_scalar();
    assert_eq!(diff, 0.0);
    let counts = config.num_params();
    assert_eq!(counts.total(), names.iter().map(|_| 0).sum::<usize>() + model_param_count(&loaded));
}

fn model_param_count(model: &Fila<Dev>) -> usize {
    use burn::module::Module;
    model.num_params()
}

#[test]
fn projector_names_parse() {
    let _serial = autodiff_lock();
    assert_eq!(ProjectorKind::try_from("linear".to_string()).unwrap(), ProjectorKind::Linear);
    assert_eq!(ProjectorKind::try_from("mlp3x_gelu".to_string()).unwrap(), ProjectorKind::Mlp { depth: 3 });
    assert!(ProjectorKind::try_from("mlp_relu".to_string()).unwrap_err().contains("mlp<N>x_gelu"));
}

fn values(t: &TensorData) -> Vec<f64> {
    t.clone().convert::<f32>().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn l2(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// L2 norm of the difference of two equally shaped tensors.
fn l2_distance(a: &TensorData, b: &TensorData) -> f64 {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    l2(&a.iter().zip(&b).map(|(x, y)| x - y).collect::<Vec<_>>())
}

#[test]
#[cfg_attr(all(feature = "wgpu", not(feature = "cuda")), ignore = "Burn's wgpu backend has no bf16")]
fn bf16_compute_stays_near_f32_and_gradients_reach_the_f32_weights() {
    let _serial = autodiff_lock();
    use fila_model::autocast::{with_compute, Compute};
    use fila_model::fila::fila_key_map;
    use fila_model::weights::named_gradients;
    let model = Fila::<DevAutodiff>::load(&config(), &components(), &Default::default()).unwrap();
    let images = images::<DevAutodiff>();
    let run = |mode| {
        let out = with_compute(mode, || model.forward(input(images.clone(), true), None));
        let loss = out.loss.unwrap();
        let value = loss.clone().into_scalar().elem::<f64>();
        let grads = loss.backward();
        (out.logits.into_data(), value, named_gradients(&model, &grads, &fila_key_map(), ""))
    };
    let (logits32, loss32, grads32) = run(Compute::F32);
    let (logits16, loss16, grads16) = run(Compute::Bf16);

    // bf16 has an 8-bit mantissa: the results move (so bf16 was used), but not far.
    assert_eq!(logits16.dtype, burn::tensor::DType::F32, "logits come back in f32");
    let logits_err = l2_distance(&logits16, &logits32) / l2(&values(&logits32));
    let loss_err = (loss16 - loss32).abs() / loss32.abs();
    eprintln!("bf16 vs f32: logits rel. L2 {logits_err:.2e}, loss rel. {loss_err:.2e} ({loss16} vs {loss32})");
    assert!(logits_err > 1e-5 && logits_err < 6e-2, "logits rel. L2 {logits_err:e}");
    assert!(loss_err > 0.0 && loss_err < 1e-2, "loss rel. {loss_err:e}");

    // Every parameter on the path to the loss gets an f32 gradient close to the f32 one. Errors
    // are relative to the gradient's norm, floored at 1e-4 of the largest. Attention key biases
    // are skipped: they cannot change a softmax, so their gradient is rounding noise in both.
    assert_eq!(grads16.len(), grads32.len());
    assert!(grads16.len() > 100);
    let floor = 1e-4 * grads32.iter().map(|(_, g)| l2(&values(g))).fold(0.0, f64::max);
    let mut worst = (String::new(), 0.0f64);
    for ((name, g16), (name32, g32)) in grads16.iter().zip(&grads32) {
        assert_eq!(name, name32);
        assert_eq!(g16.dtype, burn::tensor::DType::F32, "{name}: gradient dtype");
        if name.ends_with("k_proj.bias") {
            continue;
        }
        let err = l2_distance(g16, g32) / l2(&values(g32)).max(floor);
        if err > worst.1 {
            worst = (name.clone(), err);
        }
    }
    eprintln!("bf16 vs f32: worst gradient rel. L2 {:.2e} ({})", worst.1, worst.0);
    // On CUDA the f32 reference itself uses reduced-precision products (see common::TOL).
    let bound = if common::ON_CUDA { 0.2 } else { 0.1 };
    assert!(worst.1 < bound, "gradient `{}` rel. L2 {:e}", worst.0, worst.1);
}

/// `n` values spread uniformly over `[-half_width, half_width)` by a fixed linear congruential
/// generator.
fn uniform(n: usize, half_width: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
        })
        .collect()
}

/// Writes `tensors` and `config()` as a FILA checkpoint folder.
fn write_checkpoint(tensors: &[(String, TensorData)], dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors, None).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config()).unwrap()).unwrap();
}

/// Writes `tensors` as a FILA checkpoint folder and loads it on `B`.
fn load_tensors<B: Backend>(tensors: &[(String, TensorData)], dir: &std::path::Path) -> Fila<B> {
    write_checkpoint(tensors, dir);
    Fila::load(&config(), &ModelSource::Checkpoint(dir.to_path_buf()), &Default::default()).unwrap()
}

/// `images()` with fixed pseudo-random pixels, the same on every backend.
fn fixed_images<B: Backend>() -> Vec<ImageInput<B>> {
    let device = Default::default();
    let pixels = |shape: [usize; 4], seed| Tensor::<B, 4>::from_data(TensorData::new(uniform(shape.iter().product(), 1.7, seed), shape), &device);
    images::<B>()
        .into_iter()
        .enumerate()
        .map(|(i, im)| ImageInput { views: pixels(im.views.dims(), 2 * i as u64), hires: im.hires.map(|h| pixels(h.dims(), 2 * i as u64 + 1)), grid: im.grid })
        .collect()
}

/// Autodiff through the whole model (ConvNeXt → CVFM → ViT → projector → splice → LLaMA → loss),
/// on the tests' backend, agrees with central differences of the loss, one element per checked
/// tensor. The differences are taken on the CPU backend in every build: the loss is f32 (about
/// 4.6, in steps of 5e-7), so with ε = 1e-2 a difference quotient is good to about 5e-5, whereas
/// CUDA's reduced-precision products move the loss by about 1e-3, which would swamp it. The bound
/// is 5e-5 plus 1 % on CPU (measured: relative errors 5e-6 to 8e-3), plus 10 % on CUDA.
#[test]
fn gradients_through_the_whole_model_match_central_differences() {
    let _serial = autodiff_lock();
    type Exact = burn::backend::Flex;
    use fila_model::fila::fila_key_map;
    use fila_model::weights::named_gradients;
    // CVFM's `fc_out` starts at zero, which blocks every gradient behind it (`fc_in`, the
    // alignment convolutions): give it random weights so the whole fusion path is checked.
    let dir = std::env::temp_dir().join(format!("fila-fd-{}", std::process::id()));
    Dev::seed(&Default::default(), 11); // CVFM and the projector are initialised at random
    let base = Fila::<Dev>::load(&config(), &components(), &Default::default()).unwrap();
    let mut tensors: Vec<(String, TensorData)> = base
        .named_tensors()
        .into_iter()
        .map(|(name, data)| {
            if !(name.starts_with("cvfm.") && name.contains("fc_out.weight")) {
                return (name, data);
            }
            let values = uniform(data.num_elements(), 0.1, name.len() as u64);
            (name, TensorData::new(values, data.shape.clone()))
        })
        .collect();

    let model = load_tensors::<DevAutodiff>(&tensors, &dir);
    let loss = model.forward(input(fixed_images::<DevAutodiff>(), true), None).loss.unwrap();
    let grads = loss.backward();
    let grads = named_gradients(&model, &grads, &fila_key_map(), "");
    let exact_images = fixed_images::<Exact>();
    let loss_at = |tensors: &[(String, TensorData)]| -> f64 {
        let m = load_tensors::<Exact>(tensors, &dir);
        m.forward(input(exact_images.clone(), true), None).loss.unwrap().into_scalar().elem::<f64>()
    };

    // One element per tensor along the fusion path and into the LLM: the largest gradient.
    let checked = [
        "cvfm.0.align.weight",
        "cvfm.0.fc_in.weight",
        "cvfm.2.norm_conv.weight",
        "cvfm.3.fc_in.weight",
        "cvfm.3.fc_out.weight",
        "projector.layers.0.weight",
        "projector.layers.1.weight",
        "convnext.encoder.stages.3.layers.0.dwconv.weight",
        "vision_model.encoder.layers.2.mlp.fc1.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ];
    let eps = 1e-2f32;
    for name in checked {
        let g = values(&grads.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no gradient for {name}")).1);
        let (k, &analytic) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let slot = tensors.iter().position(|(n, _)| n == name).unwrap();
        let original = tensors[slot].1.clone();
        let mut shifted = |delta: f32| {
            let mut v = values(&original).into_iter().map(|x| x as f32).collect::<Vec<_>>();
            v[k] += delta;
            tensors[slot].1 = TensorData::new(v, original.shape.clone());
            loss_at(&tensors)
        };
        let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
        tensors[slot].1 = original;
        let err = (numeric - analytic).abs();
        eprintln!("{name}[{k}]: autodiff {analytic:.6e}, central difference {numeric:.6e}, rel. {:.1e}", err / analytic.abs());
        assert!(analytic.abs() > 1e-3, "{name}: largest gradient {analytic:e} is too small to check");
        // On CUDA the products themselves carry errors of about 1e-2 (see common::TOL).
        let relative = if common::ON_CUDA { 0.1 } else { 1e-2 };
        assert!(err < 5e-5 + relative * analytic.abs(), "{name}[{k}]: autodiff {analytic:e} against central difference {numeric:e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
