//! The hybrid vision encoder: CLIP-ViT on the global view and the tiles, ConvNeXt on the whole
//! image at canvas × 32/14, fused by CVFM after the configured ViT layers (deep fusion: the fused
//! states are the input of the next ViT layer).

use crate::clip_vit::{ClipVisionConfig, ClipVisionTransformer};
use crate::convnext::{ConvNextConfig, ConvNextModel};
use crate::cvfm::{Alignment, CvfmBlock, TileGrid};
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

/// Fusion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HybridConfig {
    /// ViT layers (1-based) after which ConvNeXt stages 1..4 are fused.
    pub fusion_layers: Vec<usize>,
    /// Hidden state the projector reads, in transformers' `hidden_states` indexing
    /// (negative counts from the end: −2 is the penultimate layer, LLaVA's default).
    pub select_layer: i64,
    pub alignment: Alignment,
    /// Run the ConvNeXt branch (off = ViT tiles only, the ablation baseline).
    pub use_convnext: bool,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self { fusion_layers: vec![2, 6, 12, 20], select_layer: -2, alignment: Alignment::Conv, use_convnext: true }
    }
}

impl HybridConfig {
    /// The hidden-state index (= number of ViT layers to run) the projector reads.
    pub fn feature_layer(&self, num_layers: usize) -> usize {
        if self.select_layer < 0 {
            (num_layers as i64 + 1 + self.select_layer) as usize
        } else {
            self.select_layer as usize
        }
    }

    /// Checks the fusion points against the towers; returns a message naming the bad value.
    pub fn validate(&self, vit: &ClipVisionConfig, convnext: &ConvNextConfig) -> Result<(), String> {
        let layers = vit.num_hidden_layers;
        let feature = self.feature_layer(layers);
        if feature == 0 || feature > layers {
            return Err(format!("select_layer {} is outside the ViT's {layers} layers", self.select_layer));
        }
        if self.use_convnext {
            if self.fusion_layers.len() != 4 {
                return Err(format!("fusion_layers needs 4 entries (one per ConvNeXt stage), got {:?}", self.fusion_layers));
            }
            if !self.fusion_layers.windows(2).all(|w| w[0] < w[1]) || self.fusion_layers[0] == 0 {
                return Err(format!("fusion_layers must be increasing and 1-based, got {:?}", self.fusion_layers));
            }
            if self.fusion_layers[3] > feature {
                return Err(format!("fusion layer {} comes after the feature layer {feature} the projector reads", self.fusion_layers[3]));
            }
            let strides = convnext.stage_strides();
            if strides[3] != 32 {
                return Err(format!("ConvNeXt stage-4 stride must be 32 (32/14 geometry), got {}", strides[3]));
            }
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, vit: &ClipVisionConfig, convnext: &ConvNextConfig, device: &B::Device) -> HybridEncoder<B> {
        let strides = convnext.stage_strides();
        let (convnext_model, cvfm) = if self.use_convnext {
            let blocks = (0..4).map(|k| CvfmBlock::new(vit.hidden_size, convnext.hidden_sizes[k], strides[3] / strides[k], self.alignment, device)).collect();
            (Some(convnext.init(device)), blocks)
        } else {
            (None, Vec::new())
        };
        HybridEncoder {
            vit: vit.init(device),
            convnext: convnext_model,
            cvfm,
            fusion_layers: if self.use_convnext { self.fusion_layers.clone() } else { Vec::new() },
            feature_layer: self.feature_layer(vit.num_hidden_layers),
            grid: vit.grid(),
            tile: vit.image_size,
        }
    }
}

/// One image as the encoder takes it.
#[derive(Debug, Clone)]
pub struct ImageInput<B: Backend> {
    /// `[views, 3, t, t]`: the global view, then the tiles row-major.
    pub views: Tensor<B, 4>,
    /// `[1, 3, rows·g·32, cols·g·32]`: the ConvNeXt input rendered from the original pixels.
    pub hires: Option<Tensor<B, 4>>,
    pub grid: TileGrid,
}

/// Named intermediate tensors recorded for `fila forward` (`vit.hidden.{i}`, `convnext.stage.{i}`).
#[derive(Default)]
pub struct Trace {
    pub tensors: Vec<(String, TensorData)>,
}

#[derive(Module, Debug)]
pub struct HybridEncoder<B: Backend> {
    pub vit: ClipVisionTransformer<B>,
    pub convnext: Option<ConvNextModel<B>>,
    pub cvfm: Vec<CvfmBlock<B>>,
    #[module(skip)]
    pub fusion_layers: Vec<usize>,
    pub feature_layer: usize,
    /// ViT cells per tile side.
    pub grid: usize,
    /// Tile side in pixels.
    pub tile: usize,
}

impl<B: Backend> HybridEncoder<B> {
    /// Patch tokens of the feature layer for all images, `[Σ views·g², D]`, in image order, each
    /// image's global view first and then its tiles row-major (CLS tokens dropped).
    pub fn forward(&self, images: &[ImageInput<B>], mut trace: Option<&mut Trace>) -> Tensor<B, 2> {
        // ConvNeXt stage maps per batch of images, `[batch][stage]`.
        let maps: Vec<Vec<Tensor<B, 4>>> = match &self.convnext {
            None => Vec::new(),
            Some(convnext) => self.convnext_batches(images).into_iter().map(|x| convnext.forward_channels_last(x).stages).collect(),
        };
        if let Some(trace) = trace.as_deref_mut() {
            for k in 0..maps.first().map_or(0, Vec::len) {
                let batch: Vec<Tensor<B, 4>> = maps.iter().map(|m| m[k].clone()).collect();
                let nchw = Self::image_map(&batch, 0).permute([0, 3, 1, 2]);
                trace.tensors.push((format!("convnext.stage.{}", k + 1), nchw.to_data()));
            }
        }
        let mut h = self.vit_input(images);
        for index in 0..self.feature_layer {
            h = self.layer(index, h, images, &|k| maps.iter().map(|m| m[k].clone()).collect());
            if let Some(trace) = trace.as_deref_mut() {
                trace.tensors.push((format!("vit.hidden.{}", index + 1), h.to_data()));
            }
        }
        Self::features(h)
    }

    /// The ConvNeXt inputs, channels-first: one batch of all images when they have the same size,
    /// else one batch per image.
    pub fn convnext_batches(&self, images: &[ImageInput<B>]) -> Vec<Tensor<B, 4>> {
        let g = self.grid;
        let hires: Vec<Tensor<B, 4>> =
            images.iter().enumerate().map(|(i, im)| im.hires.clone().unwrap_or_else(|| panic!("image {i} has no ConvNeXt input"))).collect();
        for (i, (im, x)) in images.iter().zip(&hires).enumerate() {
            let [_, _, h, w] = x.dims();
            assert_eq!(
                [h, w],
                [im.grid.rows * g * 32, im.grid.cols * g * 32],
                "image {i}: ConvNeXt input {h}x{w} is not canvas x 32/14 for a {}x{} grid of {}-pixel tiles",
                im.grid.rows,
                im.grid.cols,
                self.tile
            );
        }
        if hires.len() > 1 && hires.windows(2).all(|w| w[0].dims() == w[1].dims()) {
            vec![Tensor::cat(hires, 0)]
        } else {
            hires
        }
    }

    /// Image `i`'s channels-last map `[1, H, W, C]` among one stage's maps of the
    /// [`Self::convnext_batches`].
    pub fn image_map(batches: &[Tensor<B, 4>], i: usize) -> Tensor<B, 4> {
        match batches {
            [one] if one.dims()[0] > 1 => one.clone().narrow(0, i, 1),
            _ => batches[i].clone(),
        }
    }

    /// The input of the first ViT layer for every view of every image, `[Σ views, 1+g², D]`.
    pub fn vit_input(&self, images: &[ImageInput<B>]) -> Tensor<B, 3> {
        for (i, image) in images.iter().enumerate() {
            let [v, _, h, w] = image.views.dims();
            assert_eq!(v, image.grid.num_views(), "image {i}: {v} views for grid {:?}", image.grid);
            assert_eq!([h, w], [self.tile, self.tile], "image {i}: views are {h}x{w}, the ViT tile is {}", self.tile);
        }
        let views: Vec<Tensor<B, 4>> = images.iter().map(|im| im.views.clone()).collect();
        self.vit.embed(Tensor::cat(views, 0))
    }

    /// The ConvNeXt stage fused after ViT layer `index` (0-based), if any.
    pub fn fused_stage(&self, index: usize) -> Option<usize> {
        self.fusion_layers.iter().position(|&l| l == index + 1)
    }

    /// ViT layer `index` (0-based), then CVFM when a ConvNeXt stage is fused after it; `maps(k)`
    /// gives stage `k`'s channels-last maps, one per ConvNeXt batch.
    pub fn layer(&self, index: usize, h: Tensor<B, 3>, images: &[ImageInput<B>], maps: &dyn Fn(usize) -> Vec<Tensor<B, 4>>) -> Tensor<B, 3> {
        let h = self.vit.encoder.layers[index].forward(h);
        let Some(k) = self.fused_stage(index) else { return h };
        let block = &self.cvfm[k];
        let batches = maps(k);
        let conv: Vec<Tensor<B, 3>> =
            images.iter().enumerate().map(|(i, im)| block.view_features_channels_last(Self::image_map(&batches, i), im.grid, self.grid)).collect();
        block.fuse(h, Tensor::cat(conv, 0))
    }

    /// The patch tokens of the feature layer's states `[V, 1+g², D]` → `[V·g², D]`.
    pub fn features(h: Tensor<B, 3>) -> Tensor<B, 2> {
        let [v, t, d] = h.dims();
        h.slice([0..v, 1..t, 0..d]).reshape([v * (t - 1), d])
    }
}
