//! The loader end to end: sampler order, skipped records, resume, stage-2 view counts, collation,
//! the burn-dataset view, config parsing and `inspect`.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{record, write_image, write_jsonl};
use fila_data::{inspect, BadReason, DataConfig, DataCursor, DataLoader, LoaderOptions, Pipeline, Record, RecordSet, SampleDataset, IGNORE_INDEX};

/// 20 records: image sizes cycle through shapes that pick different canvases; every 7th is bad.
fn dataset(dir: &Path) {
    let sizes = [(56, 24), (24, 56), (60, 60), (90, 28), (28, 90)];
    let mut lines = vec![];
    for i in 0..20 {
        let (w, h) = sizes[i % sizes.len()];
        let name = format!("{i}.png");
        if i % 7 != 3 {
            write_image(dir, &name, w, h);
        }
        let answer = "The image shows two people walking along a beach.".repeat(1 + i % 3);
        lines.push(record(&format!("r{i}"), Some(&name), &[("human", "<image>\nWhat is in the image?"), ("gpt", &answer)]));
    }
    write_jsonl(dir, &lines);
}

fn open(dir: &Path, extra: &str) -> (Arc<Pipeline>, Arc<RecordSet>) {
    let cfg = common::config(dir, extra);
    let records = Arc::new(RecordSet::load(&cfg).unwrap());
    (Arc::new(Pipeline::new(cfg).unwrap()), records)
}

fn opts(start: DataCursor, batch: usize, rank: usize, world: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size: batch,
        seed: 5,
        shuffle: true,
        rank,
        world,
        even_shards: true,
        drop_last: false,
        workers: 2,
        prefetch_batches: 2,
        start,
        end_epoch: 2,
    }
}

fn run(p: &Arc<Pipeline>, r: &Arc<RecordSet>, o: LoaderOptions) -> Vec<fila_data::Batch> {
    let records: Arc<dyn burn_dataset::Dataset<Record>> = r.clone();
    DataLoader::start(records, p.clone(), o).unwrap().map(|b| b.unwrap()).collect()
}

#[test]
fn batches_follow_the_sampler_and_skip_bad_records() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let (p, r) = open(d.path(), "template = \"llama3\"\nimage_mode = \"tiled\"");
    let batches = run(&p, &r, opts(DataCursor::default(), 4, 0, 1));
    let sampler = opts(DataCursor::default(), 4, 0, 1).sampler(20);
    for epoch in 0..2u64 {
        let want: Vec<String> = sampler.epoch_order(epoch).into_iter().filter(|i| i % 7 != 3).map(|i| format!("r{i}")).collect();
        // 17 good records per epoch in batches of 4 → 5 batches per epoch.
        let e = epoch as usize;
        let got: Vec<String> = batches[5 * e..5 * e + 5].iter().flat_map(|b| b.record_ids.clone()).collect();
        assert_eq!(got, want, "epoch {epoch}");
    }
    // 17 good records per epoch in batches of 4 → 4 full + 1 of one.
    let sizes: Vec<usize> = batches.iter().map(|b| b.batch_size).collect();
    assert_eq!(sizes, vec![4, 4, 4, 4, 1, 4, 4, 4, 4, 1]);
    let skipped: usize = batches.iter().map(|b| b.skipped.len()).sum();
    assert_eq!(skipped, 6, "3 missing images per epoch");
    assert!(batches.iter().flat_map(|b| &b.skipped).all(|s| s.reason == BadReason::MissingImage));
    assert_eq!(batches[4].cursor, DataCursor { epoch: 1, position: 0 });
}

#[test]
fn bad_records_no_batch_carries_are_still_counted() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    for i in 0..20 {
        let _ = std::fs::remove_file(d.path().join("images").join(format!("{i}.png")));
    }
    let (p, r) = open(d.path(), "template = \"llama3\"\nimage_mode = \"tiled\"");
    // Every record is bad: no batch is made to carry them, and the loader still counts them all.
    let records: Arc<dyn burn_dataset::Dataset<Record>> = r.clone();
    let mut loader = DataLoader::start(records, p.clone(), opts(DataCursor::default(), 4, 0, 1)).unwrap();
    assert_eq!(loader.by_ref().count(), 0);
    assert_eq!(loader.bad_counts().count(BadReason::MissingImage), 40, "20 records × 2 epochs");
}

#[test]
fn resumed_loader_continues_exactly() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let (p, r) = open(d.path(), "template = \"llama3\"\nimage_mode = \"tiled\"");
    let full = run(&p, &r, opts(DataCursor::default(), 3, 0, 1));
    for k in [1, 2, 5, 6] {
        let resumed = run(&p, &r, opts(full[k - 1].cursor, 3, 0, 1));
        assert_eq!(resumed.len(), full.len() - k, "resume after batch {k}");
        for (a, b) in resumed.iter().zip(&full[k..]) {
            assert_eq!(a, b, "resume after batch {k}: batch differs");
        }
    }
}

#[test]
fn shards_read_disjoint_records() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let (p, r) = open(d.path(), "");
    let mut o0 = opts(DataCursor::default(), 2, 0, 2);
    let mut o1 = opts(DataCursor::default(), 2, 1, 2);
    o0.end_epoch = 1;
    o1.end_epoch = 1;
    let ids = |bs: Vec<fila_data::Batch>| bs.into_iter().flat_map(|b| b.record_ids).collect::<Vec<_>>();
    let (a, b) = (ids(run(&p, &r, o0)), ids(run(&p, &r, o1)));
    assert!(a.iter().all(|x| !b.contains(x)));
    assert_eq!(a.len() + b.len(), 17);
}

#[test]
fn stage2_collation_keeps_per_sample_view_counts() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let (p, r) = open(d.path(), "template = \"llama3\"\nimage_mode = \"tiled\"\npad_token_id = 7");
    let mut o = opts(DataCursor::default(), 5, 0, 1);
    o.shuffle = false;
    o.end_epoch = 1;
    let b = run(&p, &r, o).remove(0);
    // r0..r5 without r3 (missing): 56x24 → 2x1, 24x56 → 1x2, 60x60 → 2x2, 28x90 → 1x3, 56x24 → 2x1.
    assert_eq!(b.record_ids, vec!["r0", "r1", "r2", "r4", "r5"]);
    assert_eq!(b.views_per_sample, vec![3, 3, 5, 4, 3]);
    assert_eq!(b.views_per_image, b.views_per_sample);
    assert_eq!(b.views.shape, vec![18, 3, 28, 28]);
    assert_eq!(b.hires[2].shape, vec![3, 128, 128]);
    assert_eq!(b.hires[3].shape, vec![3, 192, 64]);
    // Right padding: pad id, mask false, label −100 after each sample's length.
    for (i, &len) in b.lengths.iter().enumerate() {
        let row = i * b.seq_len;
        assert!(b.attention_mask[row..row + len].iter().all(|&m| m));
        assert!(b.attention_mask[row + len..row + b.seq_len].iter().all(|&m| !m));
        assert!(b.input_ids[row + len..row + b.seq_len].iter().all(|&t| t == 7));
        assert!(b.labels[row + len..row + b.seq_len].iter().all(|&l| l == IGNORE_INDEX));
        // Visual tokens per sample = views × 4 (tile 28, patch 14).
        let visual = b.input_ids[row..row + len].iter().filter(|&&t| t == 649).count();
        assert_eq!(visual, b.views_per_sample[i] * 4);
    }
    assert_eq!(b.seq_len, *b.lengths.iter().max().unwrap());
}

#[test]
fn batches_pad_to_sequence_length_buckets() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let base = "template = \"llama3\"\nimage_mode = \"tiled\"\npad_token_id = 7";
    let (p, r) = open(d.path(), base);
    let (pb, rb) = open(d.path(), &format!("{base}\nloader = {{ seq_len_buckets = [40, 64, 96] }}"));
    let mut o = opts(DataCursor::default(), 3, 0, 1);
    o.end_epoch = 1;
    let (plain, bucketed) = (run(&p, &r, o.clone()), run(&pb, &rb, o));
    assert_eq!(plain.len(), bucketed.len());
    let mut seen = std::collections::BTreeSet::new();
    for (a, b) in plain.iter().zip(&bucketed) {
        let longest = *a.lengths.iter().max().unwrap();
        let expected = [40, 64, 96].into_iter().find(|&k| k >= longest).unwrap_or(longest);
        assert_eq!((a.seq_len, b.seq_len), (longest, expected), "records {:?}", a.record_ids);
        seen.insert(b.seq_len);
        // The same tokens, labels and mask, with more right padding.
        assert_eq!(a.lengths, b.lengths);
        for i in 0..a.batch_size {
            let (ra, rb) = (i * a.seq_len, i * b.seq_len);
            assert_eq!(a.input_ids[ra..ra + a.seq_len], b.input_ids[rb..rb + a.seq_len]);
            assert_eq!(a.labels[ra..ra + a.seq_len], b.labels[rb..rb + a.seq_len]);
            assert!(b.input_ids[rb + a.seq_len..rb + b.seq_len].iter().all(|&t| t == 7));
            assert!(b.labels[rb + a.seq_len..rb + b.seq_len].iter().all(|&l| l == IGNORE_INDEX));
            assert!(b.attention_mask[rb + a.lengths[i]..rb + b.seq_len].iter().all(|&m| !m));
        }
    }
    assert!(seen.len() < plain.iter().map(|b| b.seq_len).collect::<std::collections::BTreeSet<_>>().len(), "buckets give fewer shapes");
    let bad = fila_data::config::DataConfig { loader: fila_data::config::LoaderConfig { seq_len_buckets: vec![0], ..Default::default() }, ..p.config.clone() };
    assert!(bad.validate().unwrap_err().contains("seq_len_buckets"));
}

#[test]
fn burn_dataset_view_processes_on_get() {
    use burn_dataset::Dataset;
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let (p, r) = open(d.path(), "");
    let ds = SampleDataset { records: r.clone(), pipeline: p };
    assert_eq!(ds.len(), 20);
    assert_eq!(ds.get(0).unwrap().unwrap().record_id, "r0");
    assert_eq!(ds.get(3).unwrap().unwrap_err().reason, BadReason::MissingImage);
    assert!(ds.get(20).is_none());
}

#[test]
fn config_rejects_unknown_keys_and_ignores_other_tables() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::config(d.path(), "");
    assert_eq!(cfg.geometry.tile_size, 28);
    assert_eq!(cfg.square_fill(), [122, 116, 104], "LLaVA's int(255 * CLIP mean)");
    let text = "[train]\nlr = 1\n[data]\ntokenizer = \"t.json\"\nsources = []\nbatch = 3\n";
    let err = DataConfig::from_toml_str(text, Path::new("stage1.toml")).unwrap_err().to_string();
    assert!(err.contains("stage1.toml") && err.contains("unknown field `batch`"), "{err}");
    let text = "[data]\ntokenizer = \"t.json\"\n[[data.sources]]\npath = \"a.json\"\nimage_folder = \"i\"\nfirst = 1\nrandom = 2\n";
    let err = DataConfig::from_toml_str(text, Path::new("c.toml")).unwrap_err().to_string();
    assert!(err.contains("at most one of"), "{err}");
    let text = "[data]\ntokenizer = \"t.json\"\n[[data.sources]]\npath = \"a.json\"\nimage_folder = \"i\"\n[data.geometry]\ntile_size = 30\n";
    let err = DataConfig::from_toml_str(text, Path::new("c.toml")).unwrap_err().to_string();
    assert!(err.contains("tile_size = 30"), "{err}");
}

#[test]
fn sources_sampling_rules_and_json_lists() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("images")).unwrap();
    let recs: Vec<serde_json::Value> =
        (0..50).map(|i| serde_json::json!({"id": i, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})).collect();
    std::fs::write(d.path().join("list.json"), serde_json::to_string(&recs).unwrap()).unwrap();
    let src = |rule: &str| format!("[[data.sources]]\npath = \"{0}/list.json\"\nimage_folder = \"{0}/images\"\n{rule}\n", d.path().display());
    let text = format!(
        "[data]\ntokenizer = \"{}\"\n{}{}{}{}",
        common::tokenizer_path().display(),
        src(""),
        src("first = 5"),
        src("random = 10\nseed = 1"),
        src("percent = 20.0\nseed = 2")
    );
    let cfg = DataConfig::from_toml_str(&text, Path::new("c.toml")).unwrap();
    let set = RecordSet::load(&cfg).unwrap();
    assert_eq!(set.per_source, vec![50, 5, 10, 10]);
    let ids: Vec<&str> = set.records[50..55].iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4"]);
    // Random picks keep file order and depend on the seed only.
    let picked: Vec<usize> = set.records[55..65].iter().map(|r| r.line).collect();
    assert!(picked.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(RecordSet::load(&cfg).unwrap().records, set.records);
}

#[test]
fn inspect_prints_and_writes_tensors() {
    let d = tempfile::tempdir().unwrap();
    dataset(d.path());
    let (p, r) = open(d.path(), "template = \"llama3\"\nimage_mode = \"tiled\"");
    let ins = inspect(&p, &r, 2).unwrap();
    let text = ins.to_string();
    assert!(text.contains("60x60 -> canvas 56x56 (2x2 tiles), 5 views, 20 visual tokens"), "{text}");
    assert!(text.contains("[\"<image>\"x20]"), "{text}");
    let out = d.path().join("r2.safetensors");
    ins.write_safetensors(&out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("global").unwrap().shape(), &[3, 28, 28]);
    assert_eq!(st.tensor("tiles").unwrap().shape(), &[4, 3, 28, 28]);
    assert_eq!(st.tensor("hires").unwrap().shape(), &[3, 128, 128]);
    assert_eq!(st.tensor("canvas").unwrap().data(), [56i64, 56].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    assert_eq!(st.tensor("labels").unwrap().shape(), st.tensor("input_ids").unwrap().shape());
    assert!(matches!(inspect(&p, &r, 3), Err(fila_data::DataError::BadRecord(_))));
    assert!(matches!(inspect(&p, &r, 99), Err(fila_data::DataError::IndexOutOfRange { .. })));
}

#[test]
fn tiny_dataset_configs_are_clean() {
    let root = common::crate_dir().join("../../datasets/tiny");
    for (file, records, images) in [("stage1.toml", 8, 8), ("stage2.toml", 13, 12)] {
        let (p, r) = Pipeline::open(&root.join(file)).unwrap();
        let report = fila_data::check(&p, &r);
        assert_eq!((report.records, report.good, report.images), (records, records, images), "{file}:\n{report}");
        assert_eq!(report.bad.total(), 0, "{file}:\n{report}");
    }
}
