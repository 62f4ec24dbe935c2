//! 4-bit NormalFloat (NF4) weights with double-quantised scales, the storage of QLoRA (Dettmers et
//! al., 2023): a frozen linear weight kept at about 4.13 bits per value and de-quantised on the
//! device for each product.
//!
//! - **Code book**: the 16 values of [`NF4_CODE`], quantiles of a standard normal distribution
//!   scaled to `[-1, 1]`, with an exact zero (the paper's §3 construction; these are the values
//!   bitsandbytes ships, so weights quantised there and here agree).
//! - **Blocks**: the flat weight (row-major) is cut into blocks of [`BLOCK`] = 64 values; each block
//!   is divided by its largest magnitude (its *scale*) and every value takes the nearest code
//!   (ties to the lower code: a value goes up only when it is above the midpoint). Two codes
//!   share a byte, the even-indexed value in the low four bits.
//! - **Double quantisation**: the per-block scales (f32) have their mean subtracted and are
//!   quantised again in groups of [`SCALE_BLOCK`] = 256 to 8 bits: `q = round(s / m · 127)` (ties
//!   to even) with `m` the group's largest magnitude, stored as `q + 128`. The paper uses an 8-bit
//!   float code for this second level; a symmetric linear code has the same size (0.127 bit per
//!   weight for both levels) and a simpler de-quantisation.
//!
//! `scripts/fixtures/nf4_reference.py` restates all of it in PyTorch; `tests/nf4.rs` compares.

use burn::prelude::*;
use burn::tensor::{DType, IntDType, TensorData};

/// Values per first-level block.
pub const BLOCK: usize = 64;
/// First-level scales per second-level group.
pub const SCALE_BLOCK: usize = 256;

/// The NF4 code book, ascending (index 7 is the exact zero). The literals carry the digits of the
/// published table; each rounds to the f32 it names.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// A weight in NF4 on the host: what is stored and loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    /// The weight's shape (any rank; values flattened row-major).
    pub shape: Vec<usize>,
    /// Two codes per byte, `numel.div_ceil(2)` bytes (a last odd value's high half is 0).
    pub packed: Vec<u8>,
    /// The second-level codes of the block scales, `q + 128`, one per block.
    pub scale_codes: Vec<u8>,
    /// Each group's largest |scale − mean|, one per [`SCALE_BLOCK`] blocks.
    pub scale_max: Vec<f32>,
    /// The mean of the block scales, subtracted before the second level.
    pub scale_mean: f32,
}

/// The code nearest to `x` (already divided by its block's scale), ties to the lower code.
pub fn nearest_code(x: f32) -> u8 {
    let mut code = 0u8;
    for i in 0..15 {
        let midpoint = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        if x > midpoint {
            code = i as u8 + 1;
        }
    }
    code
}

/// Device bytes of an NF4 weight of `numel` values as [`Nf4Tensor`] holds it, the same as
/// [`Nf4Weight::stored_bytes`]: the packed codes, an 8-bit code per block scale, an f32 maximum
/// per group of scales and their mean (the byte table is left out): ≈ 4.127 bits per
/// value.
pub fn device_bytes_of(numel: usize) -> usize {
    let blocks = numel.div_ceil(BLOCK);
    numel.div_ceil(2) + blocks + 4 * blocks.div_ceil(SCALE_BLOCK) + 4
}

/// Device bytes of [`Nf4Tensor`]'s byte table: the two f32 values of each of the 256 bytes.
pub const BYTE_TABLE_BYTES: usize = 256 * 2 * 4;

/// Transient device bytes of [`Nf4Tensor::dequantize`] for a weight of `numel` values beyond its
/// f32 result: the 32-bit indices of the bytes (2 bytes per value), then the looked-up values
/// before they are scaled (4 bytes per value).
pub fn dequantize_transient_bytes(numel: usize) -> usize {
    4 * numel
}

impl Nf4Weight {
    /// Quantises `values` (row-major, `shape`). A last block shorter than [`BLOCK`] takes its own
    /// scale. An all-zero block has scale 0 and zero codes.
    pub fn quantize(values: &[f32], shape: &[usize]) -> Self {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "NF4: {} values for shape {shape:?}", values.len());
        let scales: Vec<f32> = values.chunks(BLOCK).map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
        let mut packed = vec![0u8; values.len().div_ceil(2)];
        for (block, (chunk, &scale)) in values.chunks(BLOCK).zip(&scales).enumerate() {
            for (j, &v) in chunk.iter().enumerate() {
                let code = if scale > 0.0 { nearest_code(v / scale) } else { 7 };
                let i = block * BLOCK + j;
                packed[i / 2] |= code << (4 * (i % 2));
            }
        }
        let scale_mean = (scales.iter().map(|&s| f64::from(s)).sum::<f64>() / scales.len().max(1) as f64) as f32;
        let centred: Vec<f32> = scales.iter().map(|s| s - scale_mean).collect();
        let scale_max: Vec<f32> = centred.chunks(SCALE_BLOCK).map(|g| g.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
        let scale_codes = centred
            .chunks(SCALE_BLOCK)
            .zip(&scale_max)
            .flat_map(|(group, &max)| group.iter().map(move |&s| if max > 0.0 { (s / max * 127.0).round_ties_even() as i32 + 128 } else { 128 } as u8))
            .collect();
        Self { shape: shape.to_vec(), packed, scale_codes, scale_max, scale_mean }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The first-level scales as de-quantised from their 8-bit codes.
    pub fn scales(&self) -> Vec<f32> {
        self.scale_codes.iter().enumerate().map(|(b, &q)| (f32::from(q) - 128.0) / 127.0 * self.scale_max[b / SCALE_BLOCK] + self.scale_mean).collect()
    }

    /// The 4-bit code of value `i`.
    pub fn code(&self, i: usize) -> u8 {
        (self.packed[i / 2] >> (4 * (i % 2))) & 15
    }

    /// The de-quantised values on the host (code × de-quantised scale).
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.scales();
        (0..self.numel()).map(|i| NF4_CODE[self.code(i) as usize] * scales[i / BLOCK]).collect()
    }

    /// Bytes stored: codes, second-level codes, group maxima and the mean.
    pub fn stored_bytes(&self) -> usize {
        self.packed.len() + self.scale_codes.len() + 4 * self.scale_max.len() + 4
    }

    /// The weight on `device`, ready to de-quantise for each product.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> Nf4Tensor<B> {
        let bytes = |v: &[u8]| Tensor::<B, 1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), (device, DType::U8));
        Nf4Tensor {
            shape: self.shape.clone(),
            packed: bytes(&self.packed),
            scale_codes: bytes(&self.scale_codes),
            scale_max: Tensor::from_data(TensorData::new(self.scale_max.clone(), [self.scale_max.len()]), device),
            scale_mean: self.scale_mean,
            byte_values: Tensor::from_data(
                TensorData::new((0..256).flat_map(|b| [NF4_CODE[b & 15], NF4_CODE[b >> 4]]).collect::<Vec<f32>>(), [256, 2]),
                device,
            ),
        }
    }
}

/// An NF4 weight on a device as stored on the host: the packed codes and the block scales' 8-bit
/// codes as bytes, the groups' maxima, the scales' mean and the code book (≈ 4.127 bits per
/// value). [`Nf4Tensor::dequantize`] builds the f32 weight from them with tensor operations (the
/// block scales first, by the host's formula), so every backend runs it on its own device.
///
/// A module of constants: its tensors move with the model (`to_device`, `valid`) but are not
/// parameters, so parameter walks, optimizers and checkpoints never see them.
#[derive(Module, Debug)]
pub struct Nf4Tensor<B: Backend> {
    #[module(skip)]
    pub shape: Vec<usize>,
    packed: Tensor<B, 1, Int>,
    scale_codes: Tensor<B, 1, Int>,
    scale_max: Tensor<B, 1>,
    #[module(skip)]
    scale_mean: f32,
    /// The code book's values for each byte: row `b` is the pair (low four bits, high four bits).
    byte_values: Tensor<B, 2>,
}

impl<B: Backend> Nf4Tensor<B> {
    /// Bytes held between products (the scales' mean and the byte table included).
    pub fn device_bytes(&self) -> usize {
        self.packed.dims()[0] + self.scale_codes.dims()[0] + 4 * self.scale_max.dims()[0] + 4 + BYTE_TABLE_BYTES
    }

    /// The first-level block scales, de-quantised as [`Nf4Weight::scales`] does: `[blocks]`.
    pub fn scales(&self) -> Tensor<B, 1> {
        let blocks = self.scale_codes.dims()[0];
        let groups = self.scale_max.dims()[0];
        let maxima = self.scale_max.clone().reshape([groups, 1]).expand([groups, SCALE_BLOCK]).reshape([groups * SCALE_BLOCK]).slice(0..blocks);
        let q = self.scale_codes.clone().cast(IntDType::I32).float();
        q.sub_scalar(128.0).div_scalar(127.0).mul(maxima).add_scalar(self.scale_mean)
    }

    /// Values of the weight.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The weight as f32 `[D]` with the stored shape.
    pub fn dequantize<const D: usize>(&self) -> Tensor<B, D> {
        let numel: usize = self.shape.iter().product();
        let pairs = self.packed.dims()[0];
        // Each byte looks up its two values at once (the low four bits first).
        let values = self.byte_values.clone().select(0, self.packed.clone().cast(IntDType::I32)).reshape([2 * pairs]).slice(0..numel);
        let blocks = numel.div_ceil(BLOCK);
        let padded = blocks * BLOCK;
        let values = if padded > numel { Tensor::cat(vec![values, Tensor::zeros([padded - numel], &self.byte_values.device())], 0) } else { values };
        let scaled = values.reshape([blocks, BLOCK]) * self.scales().reshape([blocks, 1]);
        let flat = scaled.reshape([padded]).slice(0..numel);
        let dims: [usize; D] = self.shape.clone().try_into().unwrap_or_else(|s| panic!("NF4 weight of shape {s:?} read as rank {D}"));
        flat.reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_ties_go_down() {
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nearest_code(c), i as u8);
        }
        let mid = (NF4_CODE[7] + NF4_CODE[8]) / 2.0;
        assert_eq!(nearest_code(mid), 7);
        assert_eq!(nearest_code(f32::from_bits(mid.to_bits() + 1)), 8);
        assert_eq!(nearest_code(-2.0), 0);
        assert_eq!(nearest_code(2.0), 15);
    }

    #[test]
    fn the_device_dequantizes_as_the_host() {
        let device = Default::default();
        // 3 rows of 50: a last short block, an all-zero block (values 64..128 are zero).
        let values: Vec<f32> = (0..150).map(|i| if (64..128).contains(&i) { 0.0 } else { ((i * 37 % 101) as f32 - 50.0) / 7.0 }).collect();
        let w = Nf4Weight::quantize(&values, &[3, 50]);
        assert_eq!(w.packed.len(), 75);
        assert_eq!(w.scale_codes.len(), 3);
        let host = w.dequantize();
        assert!(host[64..128].iter().all(|&v| v.abs() < 1e-6 * 8.0), "zero block: {:?}", &host[64..70]);
        let t = w.to_device::<burn::backend::Flex>(&device).dequantize::<2>();
        assert_eq!(t.dims(), [3, 50]);
        let dev: Vec<f32> = t.into_data().to_vec().unwrap();
        assert_eq!(dev, host);
        assert_eq!(w.to_device::<burn::backend::Flex>(&device).device_bytes(), w.stored_bytes() + BYTE_TABLE_BYTES);
        // Several groups of block scales, the last one short: 600 blocks.
        let many: Vec<f32> = (0..600 * BLOCK).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * (1.0 + (i / BLOCK) as f32 * 0.01)).collect();
        let big = Nf4Weight::quantize(&many, &[600, BLOCK]);
        assert_eq!(big.scale_max.len(), 3);
        let on_device = big.to_device::<burn::backend::Flex>(&device);
        assert_eq!(on_device.device_bytes(), big.stored_bytes() + BYTE_TABLE_BYTES);
        assert_eq!(device_bytes_of(many.len()), big.stored_bytes());
        let dev: Vec<f32> = on_device.dequantize::<2>().into_data().to_vec().unwrap();
        assert_eq!(dev, big.dequantize());
        // Every value within half a code step (at most 0.16 of its block's scale) plus the scale's
        // own 8-bit error.
        let scales = w.scales();
        for (i, (&v, &q)) in values.iter().zip(&host).enumerate() {
            assert!((v - q).abs() <= 0.16 * scales[i / BLOCK].abs() + 0.02, "value {i}: {v} → {q}");
        }
    }
}
