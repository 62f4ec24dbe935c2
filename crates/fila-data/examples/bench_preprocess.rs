//! Preprocessing throughput, images per second on one core (and on all cores), stage 1 and
//! stage 2, on generated JPEGs of 1024x768 and 2000x1500. Compare with scripts/bench/bench_data_pil.py.
//!
//!     cargo run --release -p fila-data --example bench_preprocess -- [--dir D] [--iters N]

use std::path::{Path, PathBuf};
use std::time::Instant;

use fila_data::pixels::decode_rgb;
use fila_data::{DataConfig, ImageMode, ImagePreprocessor};
use rayon::prelude::*;

const SIZES: [(u32, u32); 2] = [(1024, 768), (2000, 1500)];
const IMAGES_PER_SIZE: u32 = 4;

/// A photo-like deterministic image: smooth gradients, texture and an xorshift noise floor,
/// so JPEG sizes resemble real photos rather than flat colour.
fn synthetic(w: u32, h: u32, seed: u32) -> image::RgbImage {
    let mut state = 0x9E37_79B9u32 ^ seed.wrapping_mul(0x85EB_CA6B);
    image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 24) as f32;
        let fx = x as f32 / w as f32;
        let fy = y as f32 / h as f32;
        let r = 120.0 + 90.0 * (fx * 9.0 + seed as f32).sin() * (fy * 5.0).cos() + n;
        let g = 255.0 * fx * fy + n;
        let b = 128.0 + 100.0 * ((x / 37 + y / 23 + seed) % 3) as f32 / 2.0 - n;
        image::Rgb([r.clamp(0.0, 255.0) as u8, g.clamp(0.0, 255.0) as u8, b.clamp(0.0, 255.0) as u8])
    })
}

fn ensure_images(dir: &Path) -> Vec<(String, Vec<PathBuf>)> {
    std::fs::create_dir_all(dir).unwrap();
    SIZES
        .iter()
        .map(|&(w, h)| {
            let paths = (0..IMAGES_PER_SIZE)
                .map(|i| {
                    let p = dir.join(format!("bench_{w}x{h}_{i}.jpg"));
                    if !p.exists() {
                        let img = synthetic(w, h, i);
                        let mut out = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
                        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
                    }
                    p
                })
                .collect();
            (format!("{w}x{h}"), paths)
        })
        .collect()
}

fn preprocessor(mode: ImageMode) -> ImagePreprocessor {
    // The real model's geometry (tile 336, ConvNeXt 768 per tile, stage-1 336/768).
    let text = "[data]\ntokenizer = \"unused\"\n[[data.sources]]\npath = \"unused\"\nimage_folder = \"unused\"\n";
    let mut cfg = DataConfig::from_toml_str(text, Path::new("bench")).unwrap();
    cfg.image_mode = mode;
    ImagePreprocessor::new(&cfg)
}

/// Whole preprocessing of one file: read, decode, resize, pad, tile, normalise.
fn one(pre: &ImagePreprocessor, path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let img = decode_rgb(&bytes, u64::MAX).unwrap();
    let out = pre.process(&img);
    out.views.data.len() + out.hires.data.len()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let dir = PathBuf::from(arg("--dir").unwrap_or_else(|| "/tmp/fila_bench_images".into()));
    let iters: usize = arg("--iters").map_or(5, |s| s.parse().unwrap());
    let sets = ensure_images(&dir);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("images in {}, {iters} passes over {IMAGES_PER_SIZE} images per size", dir.display());
    for (stage, mode) in [("stage1", ImageMode::Square), ("stage2", ImageMode::Tiled)] {
        let pre = preprocessor(mode);
        for (size, paths) in &sets {
            // Warm-up: page cache, resizer buffers.
            one(&pre, &paths[0]);
            let t = Instant::now();
            let mut floats = 0;
            for _ in 0..iters {
                for p in paths {
                    floats += one(&pre, p);
                }
            }
            let n = iters * paths.len();
            let single = n as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            let work: Vec<&PathBuf> = (0..iters).flat_map(|_| paths.iter()).collect();
            let _: usize = work.par_iter().map(|p| one(&pre, p)).sum();
            let all = n as f64 / t.elapsed().as_secs_f64();
            println!(
                "{stage} {size}: {single:7.1} images/s on 1 core   {all:7.1} images/s on {cores} cores   ({:.1} MB f32 out per image)",
                floats as f64 * 4.0 / n as f64 / 1e6
            );
        }
    }
    // Where the time goes on one core (2000x1500 stage 1): padding and each resize on their own.
    let img = decode_rgb(&std::fs::read(&sets[1].1[0]).unwrap(), u64::MAX).unwrap();
    let (w, h) = img.dimensions();
    let time = |what: &str, f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        println!("  {what}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / iters as f64);
    };
    let side = w.max(h);
    let mut square = vec![0u8; (side * side * 3) as usize];
    time("pad to square", &mut || {
        square = fila_data::pixels::pad_to_canvas(img.as_raw(), (w, h), (side, side), (0, (side - h) / 2), [122, 116, 104]);
    });
    time("resize square -> 336", &mut || {
        std::hint::black_box(fila_data::pixels::resize_rgb(&square, side, side, 336, 336));
    });
    time("resize square -> 768", &mut || {
        std::hint::black_box(fila_data::pixels::resize_rgb(&square, side, side, 768, 768));
    });
    let pre = preprocessor(ImageMode::Square);
    time("whole stage 1 after decode", &mut || {
        std::hint::black_box(pre.process(&img));
    });
    // Decode alone.
    for (size, paths) in &sets {
        let t = Instant::now();
        for _ in 0..iters {
            for p in paths {
                let bytes = std::fs::read(p).unwrap();
                std::hint::black_box(decode_rgb(&bytes, u64::MAX).unwrap());
            }
        }
        let n = iters * paths.len();
        println!("decode only {size}: {:7.1} images/s on 1 core", n as f64 / t.elapsed().as_secs_f64());
    }
}
