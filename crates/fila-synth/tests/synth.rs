//! The built-in synthetic dataset: determinism, every record through the real pipeline, question
//! balance, the fine split's glyph sizes in both views, and the tokenizer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fila_data::{check, DataConfig, Pipeline, RecordSet};
use fila_synth::{self as synth, QuestionType, SynthOptions, CODE_ALPHABET, COLOURS, INK_MAX};
use serde_json::Value;
use tokenizers::Tokenizer;

fn small(seed: u64) -> SynthOptions {
    SynthOptions { seed, stage1: 24, stage2: 40, heldout: 20, fine: 12, ..SynthOptions::default() }
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in [dir.to_path_buf(), dir.join("images")] {
        for e in std::fs::read_dir(&sub).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The image of a generated record.
fn image_of(dir: &Path, record: &Value) -> image::RgbImage {
    image::open(dir.join(record["image"].as_str().unwrap())).unwrap().to_rgb8()
}

fn records(dir: &Path, split: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("{split}.jsonl"))).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn data_config(dir: &Path, stage: u8, splits: &[&str]) -> DataConfig {
    let (template, mode) = if stage == 1 { ("plain", "square") } else { ("llama3", "tiled") };
    let mut text = format!(
        "[data]\ntokenizer = \"{tok}\"\ntemplate = \"{template}\"\nimage_mode = \"{mode}\"\nmax_len = 1024\n\
         on_bad_record = \"skip\"\n[data.geometry]\ntile_size = 112\nsquare_vit_size = 112\nsquare_hires_size = 256\n",
        tok = dir.join("tokenizer.json").display()
    );
    for s in splits {
        text += &format!("[[data.sources]]\npath = \"{}\"\nimage_folder = \"{}\"\n", dir.join(format!("{s}.jsonl")).display(), dir.display());
    }
    DataConfig::from_toml_str(&text, Path::new("synth-test.toml")).unwrap()
}

#[test]
fn same_seed_gives_identical_files() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sa = synth::generate(a.path(), &small(7)).unwrap();
    synth::generate(b.path(), &small(7)).unwrap();
    synth::generate(c.path(), &small(8)).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    // 96 images + 4 JSONL files + tokenizer.json
    assert_eq!(fa.len(), 24 + 40 + 20 + 12 + 5);
    assert_eq!(sa.images, 96);
    assert_eq!(sa.bytes, fa.values().map(|v| v.len() as u64).sum::<u64>());
    assert!(fa == fb, "same seed, different bytes");
    assert_ne!(fa[Path::new("stage2_train.jsonl")], fc[Path::new("stage2_train.jsonl")]);
    assert_ne!(fa[Path::new("images/fine-000000.png")], fc[Path::new("images/fine-000000.png")]);
    // The tokenizer does not depend on the seed.
    assert_eq!(fa[Path::new("tokenizer.json")], fc[Path::new("tokenizer.json")]);
}

#[test]
fn every_record_passes_the_data_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let summary = synth::generate(dir.path(), &small(1)).unwrap();
    for (stage, splits, expected) in [(1, vec!["stage1"], 24), (2, vec!["stage2_train", "heldout", "fine"], 40 + 20 + 12)] {
        let cfg = data_config(dir.path(), stage, &splits);
        let recs = RecordSet::load(&cfg).unwrap();
        let pipeline = Pipeline::new(cfg).unwrap();
        let report = check(&pipeline, &recs);
        assert_eq!(report.bad.total(), 0, "stage {stage}:\n{report}");
        assert_eq!((report.records, report.good, report.truncated), (expected, expected, 0), "{report}");
        if stage == 2 {
            // The pipeline's canvas choice agrees with the generator's summary.
            let mut ours = BTreeMap::new();
            for s in &splits {
                for (k, n) in &summary.split(s).unwrap().canvases {
                    *ours.entry(*k).or_insert(0) += n;
                }
            }
            assert_eq!(report.canvases, ours);
        }
        // A sample goes all the way through pixels and labels.
        let sample = pipeline.process(&recs.records[0]).unwrap();
        assert!(sample.labels.iter().any(|&l| l >= 0));
    }
}

#[test]
fn stage2_canvases_cover_all_five() {
    let dir = tempfile::tempdir().unwrap();
    let s = synth::generate(dir.path(), &SynthOptions { stage1: 0, stage2: 200, heldout: 0, fine: 0, ..Default::default() }).unwrap();
    let canvases = &s.split("stage2_train").unwrap().canvases;
    for c in [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)] {
        assert!(canvases.get(&c).copied().unwrap_or(0) >= 10, "canvas {c:?} rare: {canvases:?}");
    }
}

#[test]
fn question_types_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let summary = synth::generate(dir.path(), &small(2)).unwrap();
    let colour_names: Vec<&str> = COLOURS.iter().map(|c| c.0).collect();
    for split in ["stage2_train", "heldout", "fine"] {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in records(dir.path(), split) {
            let types: Vec<String> = match (&r["qtype"], &r["qtypes"]) {
                (Value::String(q), Value::Null) => {
                    assert!(r["id"].as_str().unwrap().ends_with(&format!("-{q}")));
                    vec![q.clone()]
                }
                (Value::Null, Value::Array(qs)) => qs.iter().map(|q| q.as_str().unwrap().to_string()).collect(),
                other => panic!("{split}: {other:?}"),
            };
            let turns = r["conversations"].as_array().unwrap();
            assert_eq!(turns.len(), 2 * types.len());
            assert!(turns[0]["value"].as_str().unwrap().starts_with("<image>\n"));
            if split == "stage2_train" && r["layout"] == "fine" {
                assert!(types.iter().any(|q| q == "code"), "fine-layout image without a code question");
            }
            for (q, pair) in types.iter().zip(turns.chunks(2)) {
                let answer = pair[1]["value"].as_str().unwrap();
                let ok = match q.as_str() {
                    "colour" => colour_names.contains(&answer),
                    "shape" => ["square", "circle", "triangle"].contains(&answer),
                    "count" => ["1", "2", "3", "4", "5"].contains(&answer),
                    "code" => (3..=4).contains(&answer.len()) && answer.bytes().all(|b| CODE_ALPHABET.contains(&b)),
                    _ => false,
                };
                assert!(ok, "{split} {q}: answer {answer:?}");
                *counts.entry(q.clone()).or_default() += 1;
            }
        }
        let expected: BTreeMap<String, usize> = summary.split(split).unwrap().questions.iter().map(|(q, n)| (q.to_string(), *n)).collect();
        assert_eq!(counts, expected, "{split}");
    }
    let s = |name| &summary.split(name).unwrap().questions;
    assert_eq!(s("heldout").values().copied().collect::<Vec<_>>(), vec![5, 5, 5, 5]);
    assert_eq!(s("fine").get(&QuestionType::Code), Some(&12));
    assert_eq!(s("fine").len(), 1);
    // 2-4 questions per stage-2 record.
    let total: usize = s("stage2_train").values().sum();
    assert!((80..=160).contains(&total), "{total}");
    assert!(summary.split("stage1").unwrap().questions.is_empty());
    let captions = records(dir.path(), "stage1");
    let code = captions[0]["conversations"][1]["value"].as_str().unwrap();
    assert!(code.contains(" code "), "{code}");
}

#[test]
fn held_out_codes_never_appear_in_training() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), &small(3)).unwrap();
    let code_of = |r: &Value| {
        let img = r["image"].as_str().unwrap().to_string();
        let ans: Vec<String> = r["conversations"].as_array().unwrap().iter().map(|t| t["value"].as_str().unwrap().to_string()).collect();
        (img, ans)
    };
    let mut train_text = String::new();
    for split in ["stage1", "stage2_train"] {
        for r in records(dir.path(), split) {
            train_text += &code_of(&r).1.join(" ");
        }
    }
    for r in records(dir.path(), "heldout").iter().chain(&records(dir.path(), "fine")) {
        if r["qtype"] == "code" {
            let answer = r["conversations"][1]["value"].as_str().unwrap();
            assert!(!train_text.contains(answer), "held-out code {answer} in training text");
        }
    }
}

/// Height of the code's ink (dark pixels; shapes and noisy backgrounds never get that dark).
fn ink_rows(img: &image::RgbImage) -> u32 {
    let rows: Vec<u32> = (0..img.height()).filter(|&y| (0..img.width()).any(|x| img.get_pixel(x, y).0.iter().all(|&c| c < INK_MAX))).collect();
    rows.last().unwrap() - rows.first().unwrap() + 1
}

#[test]
fn code_box_bounds_the_ink_of_every_split() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), &small(6)).unwrap();
    for split in ["stage1", "stage2_train", "heldout", "fine"] {
        for r in records(dir.path(), split).iter().take(12) {
            let img = image_of(dir.path(), r);
            let b: Vec<u32> = r["code_box"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let (x0, y0, w, h) = (b[0], b[1], b[2], b[3]);
            let k = r["glyph_px"].as_u64().unwrap() as u32 / 7;
            assert_eq!(h, 7 * k, "{}", r["id"]);
            // Every ink pixel lies in the box; the ink reaches its top and bottom rows and its
            // first and last characters' cells (a glyph may leave its cell's outer columns blank).
            let (mut min_x, mut max_x, mut min_y, mut max_y) = (u32::MAX, 0, u32::MAX, 0);
            for (x, y, p) in img.enumerate_pixels() {
                if p.0.iter().all(|&c| c < INK_MAX) {
                    assert!((x0..x0 + w).contains(&x) && (y0..y0 + h).contains(&y), "{}: ink at ({x}, {y}) outside {b:?}", r["id"]);
                    (min_x, max_x, min_y, max_y) = (min_x.min(x), max_x.max(x), min_y.min(y), max_y.max(y));
                }
            }
            assert_eq!((min_y, max_y), (y0, y0 + h - 1), "{}", r["id"]);
            assert!(min_x < x0 + 5 * k && max_x >= x0 + w - 5 * k, "{}: ink x {min_x}..{max_x} in {b:?}", r["id"]);
        }
    }
}

#[test]
fn fine_codes_are_sub_pixel_in_the_global_view_and_readable_at_convnext_resolution() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), &small(4)).unwrap();
    let tile = 112.0;
    let geo = synth::geometry_for(112);
    let mut seen = BTreeMap::new();
    for r in records(dir.path(), "fine") {
        let img = image_of(dir.path(), &r);
        let (w, h) = img.dimensions();
        let glyph = r["glyph_px"].as_u64().unwrap() as u32;
        assert_eq!(glyph, 7);
        assert_eq!(ink_rows(&img), glyph, "{}: measured glyph height", r["id"]);
        let grid = geo.select_canvas(w, h);
        // Canvas (cw, ch) in ViT pixels; the image is fitted into it by scale s.
        let (cw, ch) = (grid.cols as f64 * tile, grid.rows as f64 * tile);
        let s = (cw / w as f64).min(ch / h as f64);
        let global = glyph as f64 * s * tile / ch; // padded canvas resized to tile × tile
        let hires = glyph as f64 * s * 32.0 / 14.0; // original pixels onto canvas × 32/14
        assert!(global < 1.5 && hires >= 5.0, "{}: {global} px global, {hires} px ConvNeXt", r["id"]);
        seen.insert((grid.cols, grid.rows), ((global * 100.0).round() / 100.0, (hires * 10.0).round() / 10.0));
        let (_, g2, h2) = synth::view_glyph_heights(&geo, w, h, glyph);
        assert!((g2 - global).abs() < 1e-9 && (h2 - hires).abs() < 1e-9);
    }
    // The layout table's numbers (FINE_CANVASES): 2.8 px on 1×2 and 2×2 canvases, 3.5 on 1×3.
    for (canvas, views) in &seen {
        let expected = match canvas {
            (1, 2) | (2, 2) => (1.4, 6.4),
            (1, 3) => (1.17, 8.0),
            other => panic!("fine image on canvas {other:?}"),
        };
        assert_eq!(*views, expected, "canvas {canvas:?}");
    }
    assert!(seen.len() >= 2, "{seen:?}");
    // A normal-layout caption image has codes several pixels tall even after stage-1 squaring.
    let r = &records(dir.path(), "stage1")[0];
    let img = image_of(dir.path(), r);
    let glyph = r["glyph_px"].as_u64().unwrap() as u32;
    assert_eq!(ink_rows(&img), glyph);
    assert!(glyph >= 14);
}

#[test]
fn tokenizer_is_small_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let summary = synth::generate(dir.path(), &small(5)).unwrap();
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), summary.vocab_size);
    assert!((263..600).contains(&summary.vocab_size), "{}", summary.vocab_size);
    for (id, s) in synth::SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(s), Some(id as u32), "{s}");
    }
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    // The template pieces the data crate writes are one token each.
    for piece in ["user", "assistant", "\n\n", "<|eot_id|>", "<image>"] {
        assert_eq!(ids(piece).len(), 1, "{piece:?} → {:?}", tok.encode(piece, false).unwrap().get_tokens());
    }
    // Codes and counts are one token per character; lowercase template words are whole:
    // W·hat·Ġcolour·Ġare·Ġthe·Ġshapes·? (merges never touch capitals).
    assert_eq!(ids("K7QZ").len(), 4);
    assert_eq!(ids("What colour are the shapes?").len(), 7);
    for split in ["stage1", "stage2_train", "heldout", "fine"] {
        for r in records(dir.path(), split) {
            for t in r["conversations"].as_array().unwrap() {
                let text = t["value"].as_str().unwrap();
                let decoded = tok.decode(&ids(text), false).unwrap();
                assert_eq!(decoded, text);
            }
        }
    }
    let answer = tok.decode(&ids("K7QZ"), true).unwrap();
    assert_eq!(answer, "K7QZ");
}

#[test]
fn glyph_table_is_complete_and_distinct() {
    let mut seen = std::collections::HashSet::new();
    for c in ('A'..='Z').chain('0'..='9') {
        let rows = synth::glyph(c).unwrap_or_else(|| panic!("no glyph {c}"));
        assert!(rows.iter().all(|r| r.len() == 5), "{c}");
        assert!(rows[0].contains('#') && rows[6].contains('#'), "{c} must span 7 rows");
        assert!(seen.insert(rows.join("")), "{c} duplicates another glyph");
    }
    assert_eq!(synth::text_size("K7QZ", 3), (69, 21));
}

#[test]
fn bad_tile_size_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = synth::generate(dir.path(), &SynthOptions { tile_size: 100, ..small(0) }).unwrap_err();
    assert!(err.to_string().contains("multiple of 14"), "{err}");
}

/// `cargo test -p fila-synth --test synth -- --ignored --nocapture`: default sizes and timing
/// (`FILA_SYNTH_OUT=DIR` keeps the files).
#[test]
#[ignore]
fn default_sizes_and_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("FILA_SYNTH_OUT").map_or(tmp.path().to_path_buf(), PathBuf::from);
    let t = std::time::Instant::now();
    let s = synth::generate(&dir, &SynthOptions::default()).unwrap();
    println!("{s}generated in {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn smallest_tile_size_fits_codes_into_small_images() {
    let dir = tempfile::tempdir().unwrap();
    let options = synth::SynthOptions { tile_size: 56, stage1: 40, stage2: 40, heldout: 20, fine: 10, ..Default::default() };
    let summary = synth::generate(dir.path(), &options).unwrap();
    assert_eq!(summary.images, 110);
}
