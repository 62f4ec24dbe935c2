//! CVFM, the ConvNeXt-ViT fusion module (FILA, <https://arxiv.org/abs/2412.08378>), as defined in
//! `docs/model.md` ("CVFM"). For interaction point k:
//!
//! - align the ConvNeXt stage-k map of the whole canvas `[C_k, rows·g·r_k, cols·g·r_k]` to the
//!   ViT cell grid `[C_k, rows·g, cols·g]` (a learned `r_k×r_k` conv with stride `r_k`, or
//!   average pooling);
//! - cut one `g×g` window per tile and adaptive-average-pool the whole map to `g×g` for the
//!   global view;
//! - fuse each patch token: `h' = h + W_out · GELU(W_in · [LN(h) ; LN(ĉ)])`; the class token
//!   passes unchanged. `W_out` starts at zero, so an untrained CVFM leaves the ViT unchanged.

use crate::autocast;
use crate::kernels;
use crate::nn::{linear, zero_linear, LayerNorm};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::module::{adaptive_avg_pool2d, avg_pool2d};
use serde::{Deserialize, Serialize};

/// How a ConvNeXt map is brought to the ViT cell grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Alignment {
    /// Learned `r×r` convolution with stride `r`.
    #[default]
    Conv,
    /// `r×r` average pooling, no parameters.
    Pool,
}

/// The view layout of one image: a `rows × cols` canvas of tiles plus the global view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileGrid {
    pub rows: usize,
    pub cols: usize,
    /// Stage-1 images have only the global view (rows = cols = 1, no tiles).
    pub tiled: bool,
}

impl TileGrid {
    pub fn untiled() -> Self {
        Self { rows: 1, cols: 1, tiled: false }
    }

    pub fn tiled(rows: usize, cols: usize) -> Self {
        Self { rows, cols, tiled: true }
    }

    /// Global view plus tiles.
    pub fn num_views(&self) -> usize {
        1 + if self.tiled { self.rows * self.cols } else { 0 }
    }
}

/// One CVFM block (one interaction point).
#[derive(Module, Debug)]
pub struct CvfmBlock<B: Backend> {
    /// `None` with [`Alignment::Pool`].
    pub align: Option<Conv2d<B>>,
    pub norm_vit: LayerNorm<B>,
    pub norm_conv: LayerNorm<B>,
    pub fc_in: Linear<B>,
    pub fc_out: Linear<B>,
    /// ConvNeXt cells per ViT cell along each axis at this stage.
    pub ratio: usize,
}

impl<B: Backend> CvfmBlock<B> {
    pub fn new(vit_dim: usize, conv_dim: usize, ratio: usize, alignment: Alignment, device: &B::Device) -> Self {
        Self {
            align: (alignment == Alignment::Conv).then(|| Conv2dConfig::new([conv_dim, conv_dim], [ratio, ratio]).with_stride([ratio, ratio]).init(device)),
            norm_vit: LayerNorm::new(vit_dim, 1e-5, device),
            norm_conv: LayerNorm::new(conv_dim, 1e-5, device),
            fc_in: linear(vit_dim + conv_dim, vit_dim, true, device),
            fc_out: zero_linear(vit_dim, vit_dim, device),
            ratio,
        }
    }

    /// ConvNeXt features per ViT patch for every view of one image.
    ///
    /// `map`: `[1, C, rows·g·r, cols·g·r]` → `[views, g², C]`, global view first, then tiles
    /// row-major.
    pub fn view_features(&self, map: Tensor<B, 4>, grid: TileGrid, g: usize) -> Tensor<B, 3> {
        self.view_features_channels_last(kernels::nchw_to_nhwc(map), grid, g)
    }

    /// [`Self::view_features`] of a channels-last map `[1, rows·g·r, cols·g·r, C]`.
    pub fn view_features_channels_last(&self, map: Tensor<B, 4>, grid: TileGrid, g: usize) -> Tensor<B, 3> {
        let [_, h, w, c] = map.dims();
        assert_eq!(
            [h, w],
            [grid.rows * g * self.ratio, grid.cols * g * self.ratio],
            "ConvNeXt map {h}x{w} does not land on the {}x{} tile grid of {g}x{g} cells at ratio {}",
            grid.rows,
            grid.cols,
            self.ratio
        );
        let nchw = |x: Tensor<B, 4>| x.permute([0, 3, 1, 2]);
        let nhwc = |x: Tensor<B, 4>| x.permute([0, 2, 3, 1]);
        let aligned = match &self.align {
            Some(conv) => kernels::patchify_conv_nhwc(map, conv),
            None if self.ratio == 1 => map,
            None => nhwc(avg_pool2d(nchw(map), [self.ratio, self.ratio], [self.ratio, self.ratio], [0, 0], true, false)),
        }; // [1, rows·g, cols·g, C]
        let mut views = vec![if grid.rows == 1 && grid.cols == 1 { aligned.clone() } else { nhwc(adaptive_avg_pool2d(nchw(aligned.clone()), [g, g])) }];
        if grid.tiled {
            for i in 0..grid.rows {
                for j in 0..grid.cols {
                    views.push(aligned.clone().slice([0..1, i * g..(i + 1) * g, j * g..(j + 1) * g, 0..c]));
                }
            }
        }
        let v = views.len();
        Tensor::cat(views, 0).reshape([v, g * g, c])
    }

    /// `h`: `[V, 1+g², D]` ViT states, `conv`: `[V, g², C]` → `[V, 1+g², D]`.
    pub fn fuse(&self, h: Tensor<B, 3>, conv: Tensor<B, 3>) -> Tensor<B, 3> {
        let [v, t, d] = h.dims();
        let cls = h.clone().slice([0..v, 0..1, 0..d]);
        let patches = h.slice([0..v, 1..t, 0..d]);
        let norm = |ln: &LayerNorm<B>, x| kernels::layer_norm(x, ln.weight.val(), ln.bias.val(), ln.eps);
        let joined = Tensor::cat(vec![norm(&self.norm_vit, patches.clone()), norm(&self.norm_conv, conv)], 2);
        // One row per patch token: a single matrix product per layer rather than one per view.
        let width = joined.dims()[2];
        let rows = joined.reshape([v * (t - 1), width]);
        let delta = autocast::linear(&self.fc_out, kernels::gelu(autocast::linear(&self.fc_in, rows)));
        Tensor::cat(vec![cls, patches + delta.reshape([v, t - 1, d])], 1)
    }
}
