//! Loading with the language model's projections in NF4 (`Fila::load_quantized`) from a Hugging
//! Face Llama folder: exactly the seven projections of every decoder layer are quantised (not the
//! ViT's projections of the same names, nor embeddings, norms or the output projection), each
//! from its checkpoint values; the model computes what a plain model holding the de-quantised
//! weights computes, and its merged export is that model's weights.

mod common;

use burn::module::Param;
use burn::prelude::*;
use common::*;
use fila_model::fila::{Fila, FilaConfig, ModelSource};
use fila_model::nf4::Nf4Weight;
use fila_model::spec::ModelSpec;
use fila_model::weights::{with_value, Checkpoint};

fn fixture_model() -> (FilaConfig, ModelSource) {
    let spec: ModelSpec = serde_json::from_value(serde_json::json!({
        "vision": "clip",
        "convnext": "convnext",
        "llm": "llama",
        "image_token_id": 5,
        "hybrid": { "fusion_layers": [1, 2, 3, 4] },
    }))
    .unwrap();
    spec.resolve(&fixture("")).unwrap()
}

fn logits<B: Backend>(model: &Fila<B>, device: &B::Device) -> Vec<f32> {
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 7, 3, 9, 2, 4], [1, 6]), device);
    model.llm.forward_embeds(model.llm.embed(ids), None, false).logits.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn the_language_models_projections_load_as_nf4_from_a_hugging_face_folder() {
    let device = Default::default();
    let (config, source) = fixture_model();
    let ModelSource::Components { llm: Some(llm_dir), .. } = &source else { panic!("{source:?}") };
    let checkpoint = Checkpoint::open(llm_dir).unwrap();
    let quantized = Fila::<Dev>::load_quantized(&config, &source, &device).unwrap();
    let mut plain = Fila::<Dev>::load(&config, &source, &device).unwrap();

    for (index, (q, p)) in quantized.llm.model.layers.iter().zip(plain.llm.model.layers.iter_mut()).enumerate() {
        let (qa, qm) = (&q.self_attn, &q.mlp);
        let (pa, pm) = (&mut p.self_attn, &mut p.mlp);
        let pairs = [
            ("self_attn.q_proj", &qa.q_proj, &qa.q_nf4, &mut pa.q_proj),
            ("self_attn.k_proj", &qa.k_proj, &qa.k_nf4, &mut pa.k_proj),
            ("self_attn.v_proj", &qa.v_proj, &qa.v_nf4, &mut pa.v_proj),
            ("self_attn.o_proj", &qa.o_proj, &qa.o_nf4, &mut pa.o_proj),
            ("mlp.gate_proj", &qm.gate_proj, &qm.gate_nf4, &mut pm.gate_proj),
            ("mlp.up_proj", &qm.up_proj, &qm.up_nf4, &mut pm.up_proj),
            ("mlp.down_proj", &qm.down_proj, &qm.down_nf4, &mut pm.down_proj),
        ];
        for (name, placeholder, nf4, dense) in pairs {
            assert_eq!(placeholder.weight.dims(), [0, 0], "layer {index} {name}");
            let nf4 = nf4.as_ref().unwrap_or_else(|| panic!("layer {index} {name}: no NF4 weight"));
            // The checkpoint's values in PyTorch's layout, quantised on the host.
            let (shape, values) = checkpoint.read_f32(&format!("model.layers.{index}.{name}.weight")).unwrap();
            assert_eq!(nf4.shape, shape);
            let host = Nf4Weight::quantize(&values, &shape);
            assert_eq!(nf4.device_bytes(), host.stored_bytes() + fila_model::nf4::BYTE_TABLE_BYTES);
            let rounded = host.dequantize();
            let on_device: Vec<f32> = nf4.dequantize::<2>().into_data().to_vec().unwrap();
            assert_eq!(on_device, rounded);
            // The plain model gets the de-quantised weight, in Burn's [in, out] layout.
            let transposed: Vec<f32> = (0..shape[0] * shape[1]).map(|k| rounded[(k % shape[0]) * shape[1] + k / shape[0]]).collect();
            let weight = std::mem::replace(&mut dense.weight, Param::from_tensor(Tensor::zeros([1, 1], &device)));
            dense.weight = with_value(weight, transposed, vec![shape[1], shape[0]]);
        }
    }
    // Nothing else is quantised: the ViT's projections of the same names, the embeddings and the
    // output projection are loaded as they are.
    let vit_q = &quantized.encoder.vit.encoder.layers[0].self_attn.q_proj.weight;
    assert_eq!(vit_q.val().into_data(), plain.encoder.vit.encoder.layers[0].self_attn.q_proj.weight.val().into_data());
    assert_eq!(quantized.llm.model.embed_tokens.weight.val().into_data(), plain.llm.model.embed_tokens.weight.val().into_data());
    if let (Some(a), Some(b)) = (&quantized.llm.lm_head, &plain.llm.lm_head) {
        assert_eq!(a.weight.val().into_data(), b.weight.val().into_data());
    }

    // The NF4 model computes what the plain model with the de-quantised weights computes.
    let worst = max_diff(&logits(&quantized, &device), &logits(&plain, &device));
    assert!(worst <= 1e-5, "logits off by {worst}");
    // Its export reads the de-quantised weights under the usual names (the language model's
    // tensors; CVFM and the projector start fresh in each model).
    let language_model = |name: &str| name.starts_with("model.") || name.starts_with("lm_head.");
    let exported: Vec<(String, Vec<f32>)> =
        quantized.merged_sources().iter().filter(|s| language_model(&s.name)).map(|s| (s.name.clone(), s.read().convert::<f32>().to_vec().unwrap())).collect();
    let expected: Vec<(String, Vec<f32>)> =
        plain.named_tensors().into_iter().filter(|(n, _)| language_model(n)).map(|(n, d)| (n, d.convert::<f32>().to_vec().unwrap())).collect();
    let names = |v: &[(String, Vec<f32>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&exported), names(&expected));
    assert!(exported.len() > 7);
    for ((name, got), (_, want)) in exported.iter().zip(&expected) {
        assert!(got == want, "{name}: exported values differ by up to {}", max_diff(got, want));
    }
}

#[test]
fn quantising_needs_a_language_model_checkpoint() {
    let (config, source) = fixture_model();
    let ModelSource::Components { vision, convnext, convnext_layout, .. } = source else { panic!() };
    let random = ModelSource::Components { vision, convnext, convnext_layout, llm: None };
    let err = Fila::<Dev>::load_quantized(&config, &random, &Default::default()).expect_err("refused").to_string();
    assert!(err.contains("NF4") && err.contains("random initialisation"), "{err}");
}
