//! FLOPs of one training step, counted from the shapes: every matrix product and convolution of
//! the model (2 FLOPs per multiply-add), for the benchmark's model FLOPs utilisation.
//! `scripts/bench/bench_torch.py` (`step_flops`) counts its twin by the same rules.
//!
//! - Forward: every product and convolution at the shapes the step runs (padded sequences
//!   included); attention's score and value products count the whole `S×S` square (the causal
//!   mask is not halved), the LM head only the scored positions (the loss projects only those).
//! - Backward: for each product, its forward once more for the weight gradient when the weight
//!   trains, and once more for the input gradient when anything upstream of the input trains;
//!   a product of two activations (attention) costs twice its forward when a gradient flows.
//! - Recomputation: with activation checkpointing the decoder layers' forward runs again in the
//!   backward pass (`fila_train::recompute`), and so do the vision encoder's pieces a gradient
//!   passes: every ConvNeXt piece when ConvNeXt trains, the patch embedding when the ViT trains,
//!   each ViT layer (with its fusion) once something at or below it trains; counted as that extra
//!   forward. The utilisation
//!   therefore includes it (what the hardware did), and [`StepFlops::model`] leaves it out.
//!
//! Norms, activations, softmax, pooling and the optimizer are not counted.

use fila_model::cvfm::{Alignment, TileGrid};
use fila_model::fila::FilaConfig;

/// One sample of a batch: its image's canvas and its text tokens (after the visual tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    pub grid: TileGrid,
    pub text_tokens: usize,
}

/// Which components have trainable weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trains {
    pub vit: bool,
    pub convnext: bool,
    pub cvfm: bool,
    pub projector: bool,
    pub llm: bool,
}

impl Trains {
    /// From a stage's `trainable.modules` (the names `fila_train::trainable` knows).
    pub fn from_modules(modules: &[String]) -> Self {
        let trains = |component: &str| modules.iter().any(|m| fila_train::trainable::trains_part_of(m, component));
        Self { vit: trains("vit"), convnext: trains("convnext"), cvfm: trains("cvfm"), projector: trains("projector"), llm: trains("llm") }
    }
}

/// FLOPs of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepFlops {
    pub forward: u64,
    pub backward: u64,
    /// The decoder layers' second forward under activation checkpointing.
    pub recompute: u64,
}

impl StepFlops {
    pub fn total(&self) -> u64 {
        self.forward + self.backward + self.recompute
    }

    /// Without the recomputation: the work the model itself needs.
    pub fn model(&self) -> u64 {
        self.forward + self.backward
    }

    /// A product with a weight: its backward computes the weight's gradient when it trains and
    /// the input's gradient when one is needed.
    fn weight_op(&mut self, forward: u64, weight_grad: bool, input_grad: bool) {
        self.forward += forward;
        self.backward += forward * (u64::from(weight_grad) + u64::from(input_grad));
    }

    /// A product of two activations: both operands' gradients when a gradient flows.
    fn activation_op(&mut self, forward: u64, grad: bool) {
        self.forward += forward;
        self.backward += 2 * forward * u64::from(grad);
    }

    fn add(&mut self, other: StepFlops) {
        self.forward += other.forward;
        self.backward += other.backward;
        self.recompute += other.recompute;
    }
}

/// FLOPs of one micro-batch's forward and backward: `samples` padded to `seq_len` tokens,
/// `scored` positions in the loss, `recompute` for activation checkpointing.
pub fn step_flops(config: &FilaConfig, samples: &[SampleShape], seq_len: usize, scored: usize, trains: Trains, recompute: bool) -> StepFlops {
    let u = |x: usize| x as u64;
    let mut f = StepFlops::default();
    let vit = &config.vision;
    let (d, ffn, g) = (u(vit.hidden_size), u(vit.intermediate_size), u(vit.grid()));
    let views: u64 = samples.iter().map(|s| u(s.grid.num_views())).sum();
    let s = g * g + 1; // tokens per view, the class token included
    let use_convnext = config.hybrid.use_convnext;
    let fusion: &[usize] = if use_convnext { &config.hybrid.fusion_layers } else { &[] };

    // ConvNeXt on each image's canvas × 32/14.
    let conv = &config.convnext;
    let strides = conv.stage_strides();
    if use_convnext {
        let before = f.forward;
        for sample in samples {
            let (h, w) = (u(sample.grid.rows) * g * 32, u(sample.grid.cols) * g * 32);
            let cells = |stride: usize| (h / u(stride)) * (w / u(stride));
            let p = u(conv.patch_size);
            let c = |k: usize| u(conv.hidden_sizes[k]);
            f.weight_op(2 * cells(conv.patch_size) * u(conv.num_channels) * p * p * c(0), trains.convnext, false);
            for (k, &depth) in conv.depths.iter().enumerate() {
                let n = cells(strides[k]);
                if k > 0 {
                    f.weight_op(2 * n * 4 * c(k - 1) * c(k), trains.convnext, trains.convnext);
                }
                for _ in 0..depth {
                    f.weight_op(2 * n * c(k) * 49, trains.convnext, trains.convnext); // depthwise 7×7
                    f.weight_op(2 * n * c(k) * 4 * c(k), trains.convnext, trains.convnext);
                    f.weight_op(2 * n * 4 * c(k) * c(k), trains.convnext, trains.convnext);
                }
            }
        }
        if recompute && trains.convnext {
            f.recompute += f.forward - before;
        }
    }

    // ViT: patch embedding, then the layers up to the feature layer with CVFM after the fusion layers.
    let p = u(vit.patch_size);
    f.weight_op(2 * views * g * g * u(vit.num_channels) * p * p * d, trains.vit, false);
    if recompute && trains.vit {
        f.recompute += 2 * views * g * g * u(vit.num_channels) * p * p * d;
    }
    let mut tracked = trains.vit; // whether the ViT states carry a gradient
    for layer in 1..=config.hybrid.feature_layer(vit.num_hidden_layers) {
        let before = f.forward;
        let rows = views * s;
        f.weight_op(2 * rows * d * 3 * d, trains.vit, tracked); // q, k, v
        f.activation_op(2 * views * s * s * d, tracked); // scores, all heads
        f.activation_op(2 * views * s * s * d, tracked); // weights × values
        f.weight_op(2 * rows * d * d, trains.vit, tracked);
        f.weight_op(2 * rows * d * ffn, trains.vit, tracked);
        f.weight_op(2 * rows * ffn * d, trains.vit, tracked);
        if let Some(k) = fusion.iter().position(|&l| l == layer) {
            let c = u(conv.hidden_sizes[k]);
            let ratio = u(strides[3] / strides[k]);
            if config.hybrid.alignment == Alignment::Conv {
                for sample in samples {
                    let cells = u(sample.grid.rows) * g * u(sample.grid.cols) * g;
                    f.weight_op(2 * cells * ratio * ratio * c * c, trains.cvfm, trains.convnext);
                }
            }
            let fused_in = tracked || trains.cvfm || trains.convnext;
            f.weight_op(2 * views * g * g * (d + c) * d, trains.cvfm, fused_in);
            f.weight_op(2 * views * g * g * d * d, trains.cvfm, fused_in);
            tracked = fused_in;
        }
        if recompute && tracked {
            f.recompute += f.forward - before;
        }
    }

    // Projector on the patch tokens.
    let visual = views * g * g;
    let text_dim = u(config.llm.hidden_size);
    for i in 0..config.projector.depth() {
        let inputs = if i == 0 { d } else { text_dim };
        f.weight_op(2 * visual * inputs * text_dim, trains.projector, tracked);
        tracked |= trains.projector;
    }

    // Decoder layers over the padded batch, then the LM head on the scored rows.
    let llm = &config.llm;
    let (rows, t) = (u(samples.len() * seq_len), u(seq_len));
    let (q_dim, kv_dim, inter) = (u(llm.num_attention_heads * llm.head_dim), u(llm.num_key_value_heads * llm.head_dim), u(llm.intermediate_size));
    tracked |= trains.llm;
    let mut layers = StepFlops::default();
    for _ in 0..llm.num_hidden_layers {
        layers.weight_op(2 * rows * text_dim * q_dim, trains.llm, tracked);
        layers.weight_op(2 * 2 * rows * text_dim * kv_dim, trains.llm, tracked); // k and v
        layers.activation_op(2 * u(samples.len()) * t * t * q_dim, tracked); // scores, all heads
        layers.activation_op(2 * u(samples.len()) * t * t * q_dim, tracked); // weights × values
        layers.weight_op(2 * rows * q_dim * text_dim, trains.llm, tracked);
        layers.weight_op(2 * 2 * rows * text_dim * inter, trains.llm, tracked); // gate and up
        layers.weight_op(2 * rows * inter * text_dim, trains.llm, tracked);
    }
    if recompute {
        layers.recompute = layers.forward;
    }
    f.add(layers);
    f.weight_op(2 * u(scored) * text_dim * u(llm.vocab_size), trains.llm, tracked);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use fila_model::clip_vit::ClipVisionConfig;
    use fila_model::convnext::ConvNextConfig;
    use fila_model::hybrid_encoder::HybridConfig;
    use fila_model::llama::LlamaConfig;
    use fila_model::projector::ProjectorKind;

    /// ViT: 28-pixel tiles of 14-pixel patches (g = 2, 5 tokens per view), width 8, MLP 16, 5
    /// layers of which 4 run (select −2), fusion after layers 1, 2, 3, 4. ConvNeXt: widths 1, 2,
    /// 3, 4, one block per stage, patch 4. Projector: 2 layers to width 4. LLM: width 4, 1 layer,
    /// 2 heads of 2 (q 4), 1 KV head (k, v 2), MLP 6, vocabulary 10.
    fn micro() -> FilaConfig {
        FilaConfig {
            vision: ClipVisionConfig {
                hidden_size: 8,
                intermediate_size: 16,
                num_hidden_layers: 5,
                num_attention_heads: 2,
                image_size: 28,
                patch_size: 14,
                ..ClipVisionConfig::default()
            },
            convnext: ConvNextConfig { hidden_sizes: vec![1, 2, 3, 4], depths: vec![1, 1, 1, 1], ..ConvNextConfig::default() },
            hybrid: HybridConfig { fusion_layers: vec![1, 2, 3, 4], ..HybridConfig::default() },
            projector: ProjectorKind::Mlp { depth: 2 },
            llm: LlamaConfig {
                vocab_size: 10,
                hidden_size: 4,
                intermediate_size: 6,
                num_hidden_layers: 1,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                head_dim: 2,
                ..LlamaConfig::llama3_8b()
            },
            image_token_id: 9,
        }
    }

    /// One untiled sample (1 view: 4 visual tokens) with 3 text tokens: sequence 7, 3 scored.
    fn one_view() -> [SampleShape; 1] {
        [SampleShape { grid: TileGrid::untiled(), text_tokens: 3 }]
    }

    // Hand counts for one untiled image (canvas 1×1: ConvNeXt input 2·32 = 64 pixels square).
    // ConvNeXt, cells per stage 16², 8², 4², 2² = 256, 64, 16, 4:
    //   stem 2·256·(3·16)·1 = 24576
    //   stage 1 block: dw 2·256·1·49 = 25088, pw 2·256·1·4 twice = 2048 + 2048
    //   stage 2: down 2·64·(4·1)·2 = 1024; dw 2·64·2·49 = 12544; pw 2·64·2·8 = 2048 twice
    //   stage 3: down 2·16·(4·2)·3 = 768; dw 2·16·3·49 = 4704; pw 2·16·3·12 = 1152 twice
    //   stage 4: down 2·4·(4·3)·4 = 384; dw 2·4·4·49 = 1568; pw 2·4·4·16 = 512 twice
    //   total 24576 + 29184 + 17664 + 7776 + 2976 = 82176
    const CONVNEXT: u64 = 82176;
    // ViT, 1 view, s = 5 tokens, d = 8, MLP 16: patch embed 2·4·(3·196)·8 = 37632.
    // Per layer: qkv 2·5·8·24 = 1920, scores 2·5·5·8 = 400, values 400, out 2·5·8·8 = 640,
    // MLP 2·5·8·16 = 1280 twice: 5920; 4 layers (feature layer 4 of 5): 23680.
    const VIT_EMBED: u64 = 37632;
    const VIT_LAYER: u64 = 5920;
    // CVFM k: align conv on the 2×2 cell map with ratio r = 8, 4, 2, 1 and width c = 1, 2, 3, 4:
    //   2·4·r²·c² = 512, 512, 288, 128; fc_in 2·4·(8 + c)·8 = 576, 640, 704, 768;
    //   fc_out 2·4·8·8 = 512 each.
    const ALIGN: [u64; 4] = [512, 512, 288, 128];
    const FC_IN: [u64; 4] = [576, 640, 704, 768];
    const FC_OUT: u64 = 512;
    // Projector: 2·4·8·4 = 256, then 2·4·4·4 = 128.
    const PROJECTOR: [u64; 2] = [256, 128];
    // LLM, 7 tokens, width 4, q 4, kv 2, MLP 6: q 2·7·4·4 = 224, k and v 2·2·7·4·2 = 224,
    // scores 2·7·7·4 = 392, values 392, o 224, gate and up 2·2·7·4·6 = 672, down 336: 2464.
    // Head on 3 rows: 2·3·4·10 = 240.
    const LLM_LAYER: u64 = 2464;
    const HEAD: u64 = 240;
    const LLM_ACTIVATION_PRODUCTS: u64 = 784;

    fn forward_total() -> u64 {
        CONVNEXT
            + VIT_EMBED
            + 4 * VIT_LAYER
            + ALIGN.iter().sum::<u64>()
            + FC_IN.iter().sum::<u64>()
            + 4 * FC_OUT
            + PROJECTOR.iter().sum::<u64>()
            + LLM_LAYER
            + HEAD
    }

    #[test]
    fn forward_flops_match_hand_counts() {
        let f = step_flops(&micro(), &one_view(), 7, 3, Trains::default(), false);
        assert_eq!(f.forward, 82176 + 37632 + 23680 + 1440 + 2688 + 2048 + 384 + 2464 + 240);
        assert_eq!(f.forward, forward_total());
        assert_eq!(f.backward, 0);
        assert_eq!(f.recompute, 0);
    }

    #[test]
    fn stage_two_backward_is_twice_forward_but_the_pixel_inputs() {
        let all = Trains { vit: true, convnext: true, cvfm: true, projector: true, llm: true };
        let f = step_flops(&micro(), &one_view(), 7, 3, all, true);
        assert_eq!(f.forward, forward_total());
        // Every product computes both gradients, except the stem and the patch embedding,
        // whose inputs are pixels (weight gradient only).
        assert_eq!(f.backward, 2 * forward_total() - 24576 - VIT_EMBED);
        // Checkpointing recomputes everything but the projector and the head: the decoder layer
        // and every piece of both towers.
        let recomputed = forward_total() - PROJECTOR.iter().sum::<u64>() - HEAD;
        assert_eq!(recomputed, LLM_LAYER + CONVNEXT + VIT_EMBED + 4 * VIT_LAYER + 1440 + 2688 + 2048);
        assert_eq!(f.recompute, recomputed);
        assert_eq!(f.total(), 3 * forward_total() - 24576 - VIT_EMBED + recomputed);
        assert_eq!(f.model(), f.total() - recomputed);
    }

    #[test]
    fn stage_one_backward_follows_the_trainable_cvfm_and_projector() {
        let stage1 = Trains { cvfm: true, projector: true, ..Trains::default() };
        let f = step_flops(&micro(), &one_view(), 7, 3, stage1, true);
        // No gradient for ConvNeXt, the patch embedding or ViT layer 1 (before the first fusion).
        // Align convs: weight gradient only (their ConvNeXt input is frozen). fc_in and fc_out:
        // both gradients. ViT layers 2-4: input gradients of the weight products (1920 + 640 +
        // 1280 + 1280 = 5120) and both of the attention products (2·800). Projector: both
        // gradients of both layers. LLM layer: input gradients only (2464 − 784 = 1680 of
        // weight products, 2·784 attention). Head: input gradient only.
        let cvfm = ALIGN.iter().sum::<u64>() + 2 * FC_IN.iter().sum::<u64>() + 2 * 4 * FC_OUT;
        let vit = 3 * (5120 + 2 * 800);
        let projector = 2 * (256 + 128);
        let llm = (LLM_LAYER - LLM_ACTIVATION_PRODUCTS) + 2 * LLM_ACTIVATION_PRODUCTS + HEAD;
        assert_eq!(f.backward, cvfm + vit + projector + llm);
        assert_eq!(f.backward, 1440 + 5376 + 4096 + 20160 + 768 + 1680 + 1568 + 240);
        // Recomputed: the decoder layer and the four ViT layers with their fusions (a gradient
        // reaches CVFM 1 after layer 1), not the frozen ConvNeXt or the patch embedding.
        assert_eq!(f.recompute, LLM_LAYER + 4 * VIT_LAYER + ALIGN.iter().sum::<u64>() + FC_IN.iter().sum::<u64>() + 4 * FC_OUT);
    }

    #[test]
    fn canvases_scale_the_towers_and_padding_the_llm() {
        // A 2×2 canvas: 5 views, ConvNeXt on 128², cells 4× those of one tile.
        let tiled = [SampleShape { grid: TileGrid::tiled(2, 2), text_tokens: 3 }, SampleShape { grid: TileGrid::untiled(), text_tokens: 3 }];
        let one = step_flops(&micro(), &one_view(), 7, 3, Trains::default(), false);
        let two = step_flops(&micro(), &tiled, 23, 6, Trains::default(), false);
        // ConvNeXt and align convs: 4× + 1× the cells; ViT, CVFM's fc and projector: 6 views.
        let towers = 5 * CONVNEXT + 6 * (VIT_EMBED + 4 * VIT_LAYER) + 5 * ALIGN.iter().sum::<u64>() + 6 * (FC_IN.iter().sum::<u64>() + 4 * FC_OUT) + 6 * 384;
        // LLM over 2 × 23 positions: weight products scale with rows, attention with T².
        let llm = (LLM_LAYER - LLM_ACTIVATION_PRODUCTS) * 46 / 7 + LLM_ACTIVATION_PRODUCTS * 2 * 23 * 23 / 49 + 2 * HEAD;
        assert_eq!(two.forward, towers + llm);
        assert!(two.forward > one.forward);
    }
}
