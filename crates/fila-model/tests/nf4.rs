//! NF4 weights against `scripts/fixtures/nf4_reference.py` (PyTorch restatement of the code book,
//! blocks and double-quantised scales): the same codes, scale codes and de-quantised values, on
//! the host and on the device.

use burn::backend::Flex;
use fila_model::nf4::{Nf4Weight, BLOCK, SCALE_BLOCK};
use safetensors::SafeTensors;
use std::path::Path;

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

#[test]
fn quantisation_equals_the_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4/nf4.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures/nf4_reference.py)", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, weight) = f32s(&st, "weight");
    let w = Nf4Weight::quantize(&weight, &shape);

    let codes = st.tensor("codes").unwrap().data().to_vec();
    assert_eq!(codes.len(), weight.len());
    let mismatched: Vec<usize> = (0..codes.len()).filter(|&i| w.code(i) != codes[i]).collect();
    assert!(mismatched.is_empty(), "{} codes differ, first at {:?}", mismatched.len(), &mismatched[..mismatched.len().min(5)]);
    assert_eq!(w.scale_codes, st.tensor("scale_codes").unwrap().data().to_vec());
    assert_eq!(w.scale_max, f32s(&st, "scale_max").1);
    assert_eq!(vec![w.scale_mean], f32s(&st, "scale_mean").1);
    // 17,160 values: 269 blocks (the last of 8 values) in 2 scale groups.
    assert_eq!((w.scale_codes.len(), w.scale_max.len(), w.packed.len()), (269, 2, 8580));

    let (_, expected) = f32s(&st, "dequantized");
    let host = w.dequantize();
    let worst = host.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-7, "host de-quantisation off by {worst}");
    let device: Vec<f32> = w.to_device::<Flex>(&Default::default()).dequantize::<2>().into_data().to_vec().unwrap();
    assert_eq!(device, host);

    // About 4.13 bits a value. Each value is off by at most half the widest code gap (0.152 of
    // its block's largest magnitude) plus half a step of its scale's 8-bit code.
    let bits = 8.0 * w.stored_bytes() as f64 / weight.len() as f64;
    assert!((4.0..4.2).contains(&bits), "{bits} bits per value");
    for (i, (&v, &q)) in weight.iter().zip(&host).enumerate() {
        let block = i / BLOCK;
        let absmax = weight[block * BLOCK..((block + 1) * BLOCK).min(weight.len())].iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale_step = w.scale_max[block / SCALE_BLOCK] / 127.0;
        assert!((v - q).abs() <= 0.152 * absmax + 0.5 * scale_step + 1e-6, "value {i}: {v} → {q}");
    }
}
