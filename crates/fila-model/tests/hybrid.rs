//! The hybrid encoder against the CLIP reference: with CVFM's output projection at zero the fused
//! ViT equals the pretrained ViT; with it non-zero the ConvNeXt branch changes the tokens; the
//! geometry (views, windows, 32/14 input) is enforced.

mod common;

use burn::module::Param;
use burn::prelude::*;
use common::*;
use fila_model::clip_vit::ClipVisionConfig;
use fila_model::convnext::ConvNextConfig;
use fila_model::cvfm::TileGrid;
use fila_model::hybrid_encoder::{HybridConfig, HybridEncoder, ImageInput};
use fila_model::weights::{load_module, Checkpoint, KeyMap};

fn encoder() -> HybridEncoder<Dev> {
    let device = Default::default();
    let vit_config = ClipVisionConfig::from_hf_file(&fixture("clip")).unwrap();
    let conv_config = ConvNextConfig::from_hf_file(&fixture("convnext")).unwrap();
    // 5 ViT layers; the projector reads layer 4 (select −2), fusion after layers 1-4.
    let hybrid = HybridConfig { fusion_layers: vec![1, 2, 3, 4], ..HybridConfig::default() };
    hybrid.validate(&vit_config, &conv_config).unwrap();
    let mut encoder = hybrid.init::<Dev>(&vit_config, &conv_config, &device);
    encoder.vit = load_module(encoder.vit, &Checkpoint::open(&fixture("clip")).unwrap(), &KeyMap::clip_vision()).unwrap();
    encoder.convnext = Some(load_module(encoder.convnext.take().unwrap(), &Checkpoint::open(&fixture("convnext")).unwrap(), &KeyMap::convnext_hf()).unwrap());
    encoder
}

/// The fixture's two 56×56 images as one image with a 1×1 tiled canvas (global view + 1 tile),
/// with a random 128×128 ConvNeXt input (g = 4 cells × 32).
fn one_tiled_image() -> (ImageInput<Dev>, Reference) {
    let reference = Reference::open("clip");
    let views = reference.tensor::<Dev, 4>("pixel_values");
    let hires = Tensor::<Dev, 4>::random([1, 3, 128, 128], burn::tensor::Distribution::Normal(0.0, 1.0), &Default::default());
    (ImageInput { views, hires: Some(hires), grid: TileGrid::tiled(1, 1) }, reference)
}

#[test]
fn zero_initialised_cvfm_leaves_clip_unchanged() {
    let encoder = encoder();
    let (image, reference) = one_tiled_image();
    let features = encoder.forward(&[image], None); // [2·16, 32]
    let (shape, values) = reference.f32("hidden.4");
    assert_eq!(shape, vec![2, 17, 32]);
    // Drop the CLS rows of the reference: patch tokens of the penultimate layer.
    let patches: Vec<f32> = values.chunks(17 * 32).flat_map(|view| view[32..].to_vec()).collect();
    assert_close("features", features.to_data(), &(vec![32, 32], patches), TOL);
}

#[test]
fn trained_cvfm_changes_tokens_and_reads_each_tile_window() {
    let mut encoder = encoder();
    let device = Default::default();
    for block in encoder.cvfm.iter_mut() {
        let w = block.fc_out.weight.val();
        block.fc_out.weight = Param::from_tensor(Tensor::random(w.dims(), burn::tensor::Distribution::Normal(0.0, 0.2), &device));
    }
    let (image, _) = one_tiled_image();
    let base = encoder.forward(std::slice::from_ref(&image), None);
    // Changing the ConvNeXt input moves the tokens: the branch is live.
    let other = ImageInput { hires: Some(image.hires.clone().unwrap() * 2.0), ..image.clone() };
    let moved = encoder.forward(&[other], None);
    let diff: f32 = (base.clone() - moved).abs().max().into_scalar();
    assert!(diff > 1e-3, "ConvNeXt input had no effect ({diff})");
}

#[test]
fn view_features_cut_tile_windows_and_pool_the_global_view() {
    use fila_model::cvfm::{Alignment, CvfmBlock};
    let device = Default::default();
    // g = 2 cells per tile, ratio 2, canvas 1 row × 2 cols → map 4 × 8, value = 10·row + col.
    let block = CvfmBlock::<Dev>::new(8, 1, 2, Alignment::Pool, &device);
    let values: Vec<f32> = (0..4).flat_map(|r| (0..8).map(move |c| (10 * r + c) as f32)).collect();
    let map = Tensor::<Dev, 4>::from_data(burn::tensor::TensorData::new(values, [1, 1, 4, 8]), &device);
    let out = block.view_features(map, TileGrid::tiled(1, 2), 2); // [3, 4, 1]
    let got: Vec<f32> = out.into_data().to_vec().unwrap();
    // Cells after 2×2 pooling: row r, col c holds 10·(2r+0.5) + (2c+0.5).
    let cell = |r: usize, c: usize| 10.0 * (2 * r) as f32 + 5.0 + (2 * c) as f32 + 0.5;
    let left = [cell(0, 0), cell(0, 1), cell(1, 0), cell(1, 1)];
    let right = [cell(0, 2), cell(0, 3), cell(1, 2), cell(1, 3)];
    // Global: the 2×4 cell map pooled to 2×2 → mean of horizontal pairs.
    let global = [(cell(0, 0) + cell(0, 1)) / 2.0, (cell(0, 2) + cell(0, 3)) / 2.0, (cell(1, 0) + cell(1, 1)) / 2.0, (cell(1, 2) + cell(1, 3)) / 2.0];
    let expected: Vec<f32> = global.iter().chain(&left).chain(&right).copied().collect();
    assert_eq!(got, expected);
}

#[test]
#[should_panic(expected = "is not canvas x 32/14")]
fn wrong_convnext_resolution_is_rejected() {
    let encoder = encoder();
    let (image, _) = one_tiled_image();
    let wrong = Tensor::<Dev, 4>::zeros([1, 3, 96, 96], &Default::default());
    encoder.forward(&[ImageInput { hires: Some(wrong), ..image }], None);
}

#[test]
fn fusion_config_is_validated() {
    let vit = ClipVisionConfig::from_hf_file(&fixture("clip")).unwrap();
    let conv = ConvNextConfig::from_hf_file(&fixture("convnext")).unwrap();
    let bad = HybridConfig { fusion_layers: vec![1, 2, 3, 5], ..HybridConfig::default() };
    let err = bad.validate(&vit, &conv).unwrap_err();
    assert!(err.contains("fusion layer 5 comes after the feature layer 4"), "{err}");
    let bad = HybridConfig { fusion_layers: vec![1, 3, 2, 4], ..HybridConfig::default() };
    assert!(bad.validate(&vit, &conv).unwrap_err().contains("increasing"));
}
