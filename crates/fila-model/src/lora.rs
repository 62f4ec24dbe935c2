//! Low-rank adapters (LoRA, Hu et al., 2021) for linear layers: `y = x·W + b + s·(x·Aᵀ)·Bᵀ`
//! with `A: [r, in]`, `B: [out, r]` and `s = alpha / r`, the layout and initialisation of PEFT
//! (`lora_A` Kaiming-uniform with `a = √5`, i.e. uniform in `±1/√in`; `lora_B` zeros, so a fresh
//! adapter leaves the layer unchanged). Merging adds `s·B·A` to the weight (in Burn's `[in, out]`
//! layout: `s·Aᵀ·Bᵀ`), after which the layer alone computes what layer plus adapter did.

use crate::autocast;
use crate::llama::{LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM};
use crate::nf4::Nf4Tensor;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;

/// The Llama projections an adapter can target, named as in Hugging Face checkpoints and PEFT's
/// `target_modules`; all of them by default (LLaVA's `--lora_enable`: every linear layer of the
/// language model).
pub const LLAMA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The adapters to attach: rank `r`, `alpha` (scale `alpha / r`), the dropout on the adapter's
/// input while training, and the targeted projections (names of [`LLAMA_TARGETS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

/// One adapter: `lora_a` `[r, in]`, `lora_b` `[out, r]`, scaled by `scale = alpha / r`; `dropout`
/// drops adapter inputs while gradients are recorded (training), as PEFT's `lora_dropout`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter of rank `r` for a layer `in → out` (PEFT's initialisation).
    pub fn new(d_in: usize, d_out: usize, r: usize, alpha: f64, device: &B::Device) -> Self {
        assert!(r > 0, "LoRA rank must be at least 1");
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            lora_a: Param::from_tensor(Tensor::random([r, d_in], Distribution::Uniform(-bound, bound), device)),
            lora_b: Param::from_tensor(Tensor::zeros([d_out, r], device)),
            scale: alpha / r as f64,
            dropout: 0.0,
        }
    }

    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// `s·(x·Aᵀ)·Bᵀ` for `x: [..., in]` (two thin products, in the current compute dtype).
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let mut x = x.reshape([rows, dims[D - 1]]);
        if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            x = x.clone() * x.random_like(Distribution::Bernoulli(keep)).div_scalar(keep);
        }
        let down = autocast::matmul(x, self.lora_a.val().transpose());
        let up = autocast::matmul(down, self.lora_b.val().transpose()).mul_scalar(self.scale);
        let mut out = dims;
        out[D - 1] = up.dims()[1];
        up.reshape(out)
    }

    /// `s·Aᵀ·Bᵀ`, the adapter as a change of a Burn `[in, out]` weight.
    pub fn weight_delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().transpose().matmul(self.lora_b.val().transpose()).mul_scalar(self.scale)
    }

    /// `layer(x)` plus this adapter's update of it.
    pub fn forward<const D: usize>(&self, layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        autocast::linear(layer, x.clone()) + self.delta(x)
    }

    /// `layer` with the adapter added into its weight (summed in f32, stored in the weight's
    /// dtype; a new parameter with no gradient history).
    pub fn merge_into(&self, layer: Linear<B>) -> Linear<B> {
        let weight = layer.weight.val();
        let dtype = weight.dtype();
        let f32 = burn::tensor::FloatDType::F32;
        let weight = (weight.cast(f32) + self.weight_delta().cast(f32)).cast(dtype).detach();
        Linear { weight: Param::initialized(layer.weight.id, weight), bias: layer.bias }
    }
}

/// `layer(x)`, plus `adapter`'s update when there is one. With an NF4 `base` (QLoRA) the weight is
/// that one, de-quantised for this product: `x · dequantize(W)ᵀ` (+ the layer's bias), and the
/// layer's own weight (an empty placeholder then) is not read.
pub fn project<B: Backend, const D: usize>(layer: &Linear<B>, base: Option<&Nf4Tensor<B>>, adapter: Option<&LoraAdapter<B>>, x: Tensor<B, D>) -> Tensor<B, D> {
    let y = match base {
        Some(w) => nf4_linear(layer, w, x.clone()),
        None => autocast::linear(layer, x.clone()),
    };
    match adapter {
        Some(adapter) => y + adapter.delta(x),
        None => y,
    }
}

/// `x · Wᵀ + b` for an NF4 weight `W` `[out, in]` (PyTorch's layout, as quantised from the
/// checkpoint) and the layer's bias, in the current compute dtype. Under autodiff no gradient
/// reaches `W` (a constant); the product keeps the de-quantised weight for the input's gradient.
pub fn nf4_linear<B: Backend, const D: usize>(layer: &Linear<B>, w: &Nf4Tensor<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let weight = w.dequantize::<2>().transpose();
    let mut y = autocast::matmul(x.reshape([rows, dims[D - 1]]), weight);
    if let Some(bias) = &layer.bias {
        y = y + bias.val().unsqueeze();
    }
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// The projection slots of one decoder layer by target name: the layer, its NF4 base (QLoRA) and
/// its adapter.
type Slot<'a, B> = (&'static str, &'a mut Linear<B>, &'a mut Option<Nf4Tensor<B>>, &'a mut Option<LoraAdapter<B>>);

fn slots<B: Backend>(layer: &mut LlamaDecoderLayer<B>) -> [Slot<'_, B>; 7] {
    let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
    [
        ("q_proj", &mut a.q_proj, &mut a.q_nf4, &mut a.q_lora),
        ("k_proj", &mut a.k_proj, &mut a.k_nf4, &mut a.k_lora),
        ("v_proj", &mut a.v_proj, &mut a.v_nf4, &mut a.v_lora),
        ("o_proj", &mut a.o_proj, &mut a.o_nf4, &mut a.o_lora),
        ("gate_proj", &mut m.gate_proj, &mut m.gate_nf4, &mut m.gate_lora),
        ("up_proj", &mut m.up_proj, &mut m.up_nf4, &mut m.up_lora),
        ("down_proj", &mut m.down_proj, &mut m.down_nf4, &mut m.down_lora),
    ]
}

/// `(layer index, target)` of a decoder-layer projection weight given its path below the language
/// model (`model.layers.3.mlp.up_proj.weight` → `(3, "up_proj")`).
pub fn projection_weight(path: &str) -> Option<(usize, &'static str)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let (group, rest) = rest.split_once('.')?;
    let (name, leaf) = rest.split_once('.')?;
    let target = LLAMA_TARGETS.iter().copied().find(|t| *t == name)?;
    let group_ok = if name.starts_with(['q', 'k', 'v', 'o']) { group == "self_attn" } else { group == "mlp" };
    (leaf == "weight" && group_ok).then_some(())?;
    Some((index.parse().ok()?, target))
}

/// Stores `weight` as the NF4 base of the decoder-layer projection whose weight is at `path`
/// below the language model ([`projection_weight`]).
pub fn install_nf4<B: Backend>(llm: &mut LlamaForCausalLM<B>, path: &str, weight: Nf4Tensor<B>) {
    let (layer, target) = projection_weight(path).unwrap_or_else(|| panic!("`{path}` is not a decoder-layer projection weight"));
    for (name, _, base, _) in slots(&mut llm.model.layers[layer]) {
        if name == target {
            *base = Some(weight);
            return;
        }
    }
    unreachable!("every projection target has a slot");
}

/// `llm` with fresh adapters on the targeted projections of every decoder layer (drawn from the
/// backend's generator, layer by layer in target order). Fails on an unknown target.
pub fn attach<B: Backend>(mut llm: LlamaForCausalLM<B>, spec: &LoraSpec, device: &B::Device) -> Result<LlamaForCausalLM<B>, String> {
    if spec.r == 0 {
        return Err("LoRA rank `r` must be at least 1".into());
    }
    if !(0.0..1.0).contains(&spec.dropout) {
        return Err(format!("LoRA `dropout` = {} must be in [0, 1)", spec.dropout));
    }
    if let Some(bad) = spec.targets.iter().find(|t| !LLAMA_TARGETS.contains(&t.as_str())) {
        return Err(format!("unknown LoRA target `{bad}`; the language model's projections are {LLAMA_TARGETS:?}"));
    }
    if spec.targets.is_empty() {
        return Err(format!("LoRA `targets` is empty; name some of {LLAMA_TARGETS:?}"));
    }
    for layer in &mut llm.model.layers {
        for (name, linear, base, slot) in slots(layer) {
            if spec.targets.iter().any(|t| t == name) {
                let [d_in, d_out] = match base {
                    Some(w) => [w.shape[1], w.shape[0]],
                    None => linear.weight.dims(),
                };
                let mut adapter = LoraAdapter::new(d_in, d_out, spec.r, spec.alpha, device);
                adapter.dropout = spec.dropout;
                *slot = Some(adapter);
            }
        }
    }
    Ok(llm)
}

/// `llm` with every adapter added into its projection's weight and removed: the same function,
/// the plain architecture (and parameter names) again. An NF4 base (QLoRA) is de-quantised into
/// the weight first, so the merged weight is the NF4-rounded base plus the adapter (as QLoRA's
/// merge computes it), stored in the dtype of the layer's placeholder weight.
pub fn merge<B: Backend>(mut llm: LlamaForCausalLM<B>) -> LlamaForCausalLM<B> {
    for layer in &mut llm.model.layers {
        for (_, linear, base, slot) in slots(layer) {
            merge_slot(linear, base, slot);
        }
    }
    llm
}

/// A projection's merged weight, computed when called.
pub type MergedWeight<B> = Box<dyn Fn() -> Tensor<B, 2>>;

/// What [`merge`] would make of each projection that has an NF4 base or an adapter, without
/// making it: the path of its weight below the language model (`model.layers.0.self_attn.q_proj.weight`),
/// the weight's Burn shape `[in, out]`, and a function computing the merged weight (the same
/// operations as [`merge`]) when called. An export reads them one at a time, so the merged
/// language model never exists on the device as a whole.
pub fn merged_weights<B: Backend>(llm: &LlamaForCausalLM<B>) -> Vec<(String, [usize; 2], MergedWeight<B>)> {
    let mut out = Vec::new();
    for (index, layer) in llm.model.layers.iter().enumerate() {
        let mut layer = layer.clone();
        for (name, linear, base, slot) in slots(&mut layer) {
            if base.is_none() && slot.is_none() {
                continue;
            }
            let shape = match base {
                Some(w) => [w.shape[1], w.shape[0]],
                None => linear.weight.dims(),
            };
            let group = if name.starts_with(['q', 'k', 'v', 'o']) { "self_attn" } else { "mlp" };
            let (linear, base, slot) = (linear.clone(), base.clone(), slot.clone());
            let merged: MergedWeight<B> = Box::new(move || {
                let (mut linear, mut base, mut slot) = (linear.clone(), base.clone(), slot.clone());
                merge_slot(&mut linear, &mut base, &mut slot);
                linear.weight.val()
            });
            out.push((format!("model.layers.{index}.{group}.{name}.weight"), shape, merged));
        }
    }
    out
}

/// One projection of [`merge`]: the de-quantised base and the adapter are summed in f32, then
/// stored in the placeholder's dtype (bf16 when the frozen weights are stored so).
fn merge_slot<B: Backend>(linear: &mut Linear<B>, base: &mut Option<Nf4Tensor<B>>, slot: &mut Option<LoraAdapter<B>>) {
    let stored = base.take().map(|w| {
        let dtype = linear.weight.val().dtype();
        let weight = w.dequantize::<2>().transpose().detach();
        *linear = Linear { weight: Param::initialized(linear.weight.id, weight), bias: linear.bias.clone() };
        dtype
    });
    if let Some(adapter) = slot.take() {
        *linear = adapter.merge_into(linear.clone());
    }
    if let Some(dtype) = stored {
        let weight = linear.weight.val().cast(dtype).detach();
        *linear = Linear { weight: Param::initialized(linear.weight.id, weight), bias: linear.bias.clone() };
    }
}

/// `(in, out)` of a target projection of `config`'s decoder layers.
pub fn target_dims(config: &LlamaConfig, target: &str) -> Option<(usize, usize)> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
    Some(match target {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        "down_proj" => (i, h),
        _ => return None,
    })
}

/// Elements of all adapters `spec` attaches to a language model of `config` (`r·(in + out)` per
/// targeted projection and layer).
pub fn adapter_elements(config: &LlamaConfig, spec: &LoraSpec) -> usize {
    let per_layer: usize = spec.targets.iter().filter_map(|t| target_dims(config, t)).map(|(i, o)| spec.r * (i + o)).sum();
    per_layer * config.num_hidden_layers
}

/// Whether a model parameter path is part of an adapter.
pub fn is_adapter_param(path: &str) -> bool {
    path.ends_with(".lora_a") || path.ends_with(".lora_b")
}

/// PEFT's name of an adapter parameter given ours, below the same prefix:
/// `….self_attn.q_lora.lora_a` → `….self_attn.q_proj.lora_A.weight`.
pub fn peft_name(path: &str) -> Option<String> {
    let (module, matrix) = path.rsplit_once('.')?;
    let (parent, slot) = module.rsplit_once('.')?;
    let target = format!("{}_proj", slot.strip_suffix("_lora")?);
    let matrix = match matrix {
        "lora_a" => "lora_A",
        "lora_b" => "lora_B",
        _ => return None,
    };
    LLAMA_TARGETS.contains(&target.as_str()).then(|| format!("{parent}.{target}.{matrix}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::LinearConfig;
    use burn::tensor::TensorData;

    type A = Autodiff<Flex>;

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// `a` equals `b` within 1e-5 of `b`'s largest magnitude (at least 1): products summed in
    /// another order differ by a few f32 roundings of their terms.
    fn assert_close<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) {
        let scale = b.clone().abs().max().into_scalar().max(1.0);
        let diff = max_diff(a, b);
        assert!(diff <= 1e-5 * scale, "differ by {diff} at magnitude {scale}");
    }

    /// The adapter's output and gradients (input, layer weight, A, B) equal those of the explicit
    /// `x·(W + s·(B·A)ᵀ) + b` within 1e-5 (relative to each result's largest magnitude).
    #[test]
    fn gradients_equal_the_explicit_formulation() {
        let _lock = crate::autodiff_lock();
        let device = Default::default();
        let layer: Linear<A> = LinearConfig::new(24, 16).init(&device);
        let mut adapter = LoraAdapter::<A>::new(24, 16, 4, 8.0, &device);
        // A non-zero B, as after some training (a fresh one has A's gradient identically zero).
        adapter.lora_b = Param::from_tensor(Tensor::random([16, 4], Distribution::Normal(0.0, 0.5), &device));
        let x_data = Tensor::<Flex, 3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<Flex, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);

        let x = Tensor::<A, 3>::from_inner(x_data.clone()).require_grad();
        let y = adapter.forward(&layer, x.clone());
        let grads = (y.clone() * Tensor::from_inner(probe.clone())).sum().backward();
        let got = (
            y.inner(),
            x.grad(&grads).unwrap(),
            layer.weight.grad(&grads).unwrap(),
            adapter.lora_a.grad(&grads).unwrap(),
            adapter.lora_b.grad(&grads).unwrap(),
        );

        // The explicit formulation over fresh leaves holding the same values.
        let leaf = |t: Tensor<A, 2>| Tensor::<A, 2>::from_inner(t.inner()).require_grad();
        let (w, a, b) = (leaf(layer.weight.val()), leaf(adapter.lora_a.val()), leaf(adapter.lora_b.val()));
        let bias = layer.bias.as_ref().unwrap().val();
        let x2 = Tensor::<A, 3>::from_inner(x_data).require_grad();
        let full = w.clone() + b.clone().matmul(a.clone()).transpose().mul_scalar(adapter.scale);
        let y2 = x2.clone().matmul(full.unsqueeze()) + bias.unsqueeze();
        let grads2 = (y2.clone() * Tensor::from_inner(probe)).sum().backward();
        assert_close(got.0, y2.inner());
        assert_close(got.1, x2.grad(&grads2).unwrap());
        assert_close(got.2, w.grad(&grads2).unwrap());
        assert_close(got.3, a.grad(&grads2).unwrap());
        assert_close(got.4, b.grad(&grads2).unwrap());
    }

    /// The NF4 product (QLoRA) and its gradients (input, A, B) equal those of the explicit
    /// `x·dequantize(W)ᵀ + s·(x·Aᵀ)·Bᵀ` within 1e-5 (relative to each result's largest magnitude),
    /// and merging gives a plain layer computing the
    /// same.
    #[test]
    fn the_nf4_product_and_its_gradients_equal_the_explicit_formulation() {
        let _lock = crate::autodiff_lock();
        let device = Default::default();
        // A weight `[out 16, in 40]` in PyTorch's layout: 640 values, 10 blocks.
        let values: Vec<f32> = Tensor::<Flex, 1>::random([640], Distribution::Normal(0.0, 0.3), &device).into_data().to_vec().unwrap();
        let host = crate::nf4::Nf4Weight::quantize(&values, &[16, 40]);
        let nf4 = host.to_device::<A>(&device);
        let placeholder = Linear::<A> { weight: Param::from_tensor(Tensor::zeros([0, 0], &device)), bias: None };
        let mut adapter = LoraAdapter::<A>::new(40, 16, 4, 8.0, &device);
        adapter.lora_b = Param::from_tensor(Tensor::random([16, 4], Distribution::Normal(0.0, 0.5), &device));
        let x_data = Tensor::<Flex, 3>::random([2, 5, 40], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<Flex, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);

        let x = Tensor::<A, 3>::from_inner(x_data.clone()).require_grad();
        let y = project(&placeholder, Some(&nf4), Some(&adapter), x.clone());
        let grads = (y.clone() * Tensor::from_inner(probe.clone())).sum().backward();
        let got = (y.inner(), x.grad(&grads).unwrap(), adapter.lora_a.grad(&grads).unwrap(), adapter.lora_b.grad(&grads).unwrap());

        let w = Tensor::<A, 2>::from_data(TensorData::new(host.dequantize(), [16, 40]), &device);
        let leaf = |t: Tensor<A, 2>| Tensor::<A, 2>::from_inner(t.inner()).require_grad();
        let (a, b) = (leaf(adapter.lora_a.val()), leaf(adapter.lora_b.val()));
        let x2 = Tensor::<A, 3>::from_inner(x_data.clone()).require_grad();
        let y2 = x2.clone().matmul(w.transpose().unsqueeze())
            + x2.clone().matmul(a.clone().transpose().unsqueeze()).matmul(b.clone().transpose().unsqueeze()).mul_scalar(adapter.scale);
        let grads2 = (y2.clone() * Tensor::from_inner(probe)).sum().backward();
        assert_close(got.0.clone(), y2.inner());
        assert_close(got.1, x2.grad(&grads2).unwrap());
        assert_close(got.2, a.grad(&grads2).unwrap());
        assert_close(got.3, b.grad(&grads2).unwrap());

        // Merged: the de-quantised weight plus the adapter in a plain layer.
        let (mut merged, mut base, mut slot) = (placeholder, Some(nf4), Some(adapter));
        merge_slot(&mut merged, &mut base, &mut slot);
        assert!(base.is_none() && slot.is_none());
        assert_eq!(merged.weight.dims(), [40, 16]);
        let plain = merged.forward(Tensor::<A, 3>::from_inner(x_data));
        assert!(max_diff(plain.inner(), got.0) < 1e-5);
    }

    #[test]
    fn a_merged_layer_computes_layer_plus_adapter_and_a_fresh_adapter_changes_nothing() {
        let device = Default::default();
        let layer: Linear<Flex> = LinearConfig::new(12, 8).init(&device);
        let x = Tensor::<Flex, 2>::random([3, 12], Distribution::Normal(0.0, 1.0), &device);
        let mut adapter = LoraAdapter::<Flex>::new(12, 8, 2, 4.0, &device);
        assert_eq!(adapter.rank(), 2);
        assert_eq!(max_diff(adapter.forward(&layer, x.clone()), layer.forward(x.clone())), 0.0);
        adapter.lora_b = Param::from_tensor(Tensor::random([8, 2], Distribution::Normal(0.0, 1.0), &device));
        let with_adapter = adapter.forward(&layer, x.clone());
        let merged = adapter.merge_into(layer);
        assert!(max_diff(merged.forward(x), with_adapter) < 1e-5);
    }

    #[test]
    fn attach_and_merge_keep_the_language_models_function() {
        use crate::llama::LlamaConfig;
        let device = Default::default();
        let config: LlamaConfig = serde_json::from_str(
            r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "rope_scaling": null, "tie_word_embeddings": false}"#,
        )
        .unwrap();
        let llm = config.init::<Flex>(&device);
        let ids = Tensor::<Flex, 2, Int>::from_data(burn::tensor::TensorData::new(vec![1i64, 5, 9, 3, 7, 2], [1, 6]), &device);
        let logits = |m: &LlamaForCausalLM<Flex>| m.forward_embeds(m.embed(ids.clone()), None, false).logits;
        let plain = logits(&llm);
        let spec = LoraSpec { r: 4, alpha: 8.0, dropout: 0.1, targets: vec!["q_proj".into(), "down_proj".into()] };
        let mut adapted = attach(llm, &spec, &device).unwrap();
        // A fresh adapter (B = 0) changes nothing; dropout is off without autodiff.
        assert_eq!(max_diff(logits(&adapted), plain.clone()), 0.0);
        let layer = &mut adapted.model.layers[1];
        assert!(layer.self_attn.k_lora.is_none() && layer.mlp.up_lora.is_none());
        for slot in [&mut layer.self_attn.q_lora, &mut layer.mlp.down_lora] {
            let adapter = slot.as_mut().unwrap();
            assert_eq!(adapter.scale, 2.0);
            let [out, r] = adapter.lora_b.dims();
            adapter.lora_b = Param::from_tensor(Tensor::random([out, r], Distribution::Normal(0.0, 0.5), &device));
        }
        let with_adapters = logits(&adapted);
        assert!(max_diff(with_adapters.clone(), plain) > 1e-3);
        let paths = crate::weights::parameter_paths(&adapted);
        let names: Vec<String> = paths.iter().filter(|p| is_adapter_param(p)).cloned().collect();
        assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
        let counted: usize = adapted.num_params() - config.init::<Flex>(&device).num_params();
        assert_eq!(counted, adapter_elements(&config, &spec));
        assert_eq!(peft_name("model.layers.1.self_attn.q_lora.lora_a").as_deref(), Some("model.layers.1.self_attn.q_proj.lora_A.weight"));
        assert_eq!(peft_name("model.layers.0.mlp.down_lora.lora_b").as_deref(), Some("model.layers.0.mlp.down_proj.lora_B.weight"));
        assert_eq!(peft_name("model.layers.0.mlp.down_proj.weight"), None);
        let merged = merge(adapted);
        assert!(crate::weights::parameter_paths(&merged).iter().all(|p| !is_adapter_param(p)));
        assert!(max_diff(logits(&merged), with_adapters) < 1e-5);
        assert!(attach(merged, &LoraSpec { targets: vec!["lm_head".into()], ..spec }, &device).unwrap_err().contains("unknown LoRA target `lm_head`"));
    }
}
