//! Strict loading and saving of safetensors checkpoints.
//!
//! Every model parameter must be found with the right shape, every tensor in the files must be
//! used or deliberately ignored by the family's [`KeyMap`], and errors name the tensor and the
//! file. Only safetensors is read (no pickle). Sharded checkpoints are read through
//! `model.safetensors.index.json`; f32, f16 and bf16 files are converted to the model's float type.

pub mod keys;

pub use keys::{ConvNextLayout, KeyMap};

use crate::nf4::{Nf4Tensor, Nf4Weight};
use crate::ModelError;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// One or more memory-mapped safetensors files seen as a single key → tensor map.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// key → index into `files`.
    index: BTreeMap<String, usize>,
    description: String,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, or a folder with `model.safetensors.index.json` (shards),
    /// `model.safetensors`, or `open_clip_model.safetensors` (OpenCLIP's name on the hub).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            let single = ["model.safetensors", "open_clip_model.safetensors"].map(|name| path.join(name)).into_iter().find(|f| f.exists());
            if index.exists() {
                let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint { path: index.clone(), message: format!("not valid JSON: {e}") })?;
                let map = json
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| ModelError::Checkpoint { path: index.clone(), message: "no `weight_map` object".into() })?;
                let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
                shards.into_iter().map(|s| path.join(s)).collect()
            } else if let Some(single) = single {
                vec![single]
            } else {
                return Err(ModelError::Checkpoint { path: path.to_path_buf(), message: no_safetensors_message(path) });
            }
        } else {
            vec![path.to_path_buf()]
        };
        let mut mapped = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, file) in files.into_iter().enumerate() {
            let handle = std::fs::File::open(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
            // SAFETY: checkpoints are read-only inputs; a file changed under the map is a user error
            // that safetensors' own bounds checks still catch as a parse failure.
            let mmap = unsafe { Mmap::map(&handle) }.map_err(|source| ModelError::Io { path: file.clone(), source })?;
            let tensors = SafeTensors::deserialize(&mmap)
                .map_err(|e| ModelError::Checkpoint { path: file.clone(), message: format!("not a valid safetensors file: {e}") })?;
            for name in tensors.names() {
                if let Some(prev) = index.insert(name.to_string(), i) {
                    return Err(ModelError::Checkpoint {
                        path: file.clone(),
                        message: format!("tensor `{name}` also appears in {}", mapped_path(&mapped, prev).display()),
                    });
                }
            }
            mapped.push((file, mmap));
        }
        Ok(Self { files: mapped, index, description: path.display().to_string() })
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|k| k.as_str())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Shape of `key`, read from the header alone.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let (_, mmap) = &self.files[*self.index.get(key)?];
        let tensors = SafeTensors::deserialize(mmap).ok()?;
        Some(tensors.tensor(key).ok()?.shape().to_vec())
    }

    /// The file that holds `key`.
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        self.index.get(key).map(|&i| self.files[i].0.as_path())
    }

    /// Shape and f32 values of `key`, converting f16/bf16.
    pub fn read_f32(&self, key: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let &i = self.index.get(key).ok_or_else(|| ModelError::Checkpoint { path: PathBuf::from(&self.description), message: format!("no tensor `{key}`") })?;
        let (path, mmap) = &self.files[i];
        let tensors = SafeTensors::deserialize(mmap).map_err(|e| ModelError::Checkpoint { path: path.clone(), message: e.to_string() })?;
        let view = tensors.tensor(key).map_err(|e| ModelError::Checkpoint { path: path.clone(), message: e.to_string() })?;
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect(),
            other => {
                return Err(ModelError::Checkpoint {
                    path: path.clone(),
                    message: format!("tensor `{key}` has dtype {other:?}; expected a float type (f32, f16, bf16)"),
                })
            }
        };
        Ok((view.shape().to_vec(), values))
    }

    /// Reads a tensor as a Burn tensor of rank `D`.
    pub fn tensor<B: Backend, const D: usize>(&self, key: &str, device: &B::Device) -> Result<Tensor<B, D>, ModelError> {
        let (shape, values) = self.read_f32(key)?;
        if shape.len() != D {
            return Err(ModelError::Checkpoint {
                path: self.file_of(key).unwrap_or(Path::new("")).to_path_buf(),
                message: format!("tensor `{key}` has shape {shape:?}, expected rank {D}"),
            });
        }
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// Why a folder has nothing to load, with the fix for the pickle files that hubs still ship.
fn no_safetensors_message(dir: &Path) -> String {
    if dir.join("open_clip_pytorch_model.bin").exists() {
        return format!(
            "only open_clip_pytorch_model.bin found; FILA loads safetensors only (no pickle). Convert it once with \
             `python scripts/convert_openclip_to_safetensors.py {}` (writes open_clip_model.safetensors beside it)",
            dir.display()
        );
    }
    if dir.join("pytorch_model.bin").exists() {
        return "only pytorch_model.bin found; FILA loads safetensors only (no pickle). Convert it, or download the `*.safetensors` files of the same repository".into();
    }
    "no model.safetensors, model.safetensors.index.json or open_clip_model.safetensors in this folder".into()
}

fn mapped_path(files: &[(PathBuf, Mmap)], i: usize) -> &Path {
    &files[i].0
}

/// Where a walk over a module's parameters is: the dotted path of the current parameter
/// (`encoder.layers.3.self_attn.q_proj.weight`) and the Burn containers around it.
#[derive(Debug, Default)]
pub struct ParamPath {
    stack: Vec<(String, String)>,
}

impl ParamPath {
    pub fn path(&self) -> String {
        self.stack.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(".")
    }

    /// Whether the parameter is the weight of a Burn `Linear`, stored `[in, out]`: the transpose
    /// of PyTorch's layout.
    pub fn is_linear_weight(&self) -> bool {
        matches!(self.stack.last(), Some((name, container)) if name == "weight" && container == "Struct:Linear")
    }
}

/// Reads each float parameter of a module together with its path (see [`visit_params`]).
pub trait PathVisitor<B: Backend> {
    fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>);
}

/// Replaces each float parameter of a module, told its path (see [`map_params`]).
pub trait PathMapper<B: Backend> {
    fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>>;
}

/// Burn's visitor/mapper interface with the path kept up to date around a [`PathVisitor`] or
/// [`PathMapper`].
struct Walk<'a, V> {
    at: ParamPath,
    inner: &'a mut V,
}

impl<B: Backend, V: PathVisitor<B>> ModuleVisitor<B> for Walk<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.at.stack.push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.at.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.inner.visit(&self.at, param);
    }
}

impl<B: Backend, V: PathMapper<B>> ModuleMapper<B> for Walk<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.at.stack.push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.at.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.inner.map(&self.at, param)
    }
}

/// Calls `visitor` with every float parameter of `module` and its path, in visiting order.
pub fn visit_params<B: Backend, M: Module<B>, V: PathVisitor<B>>(module: &M, visitor: &mut V) {
    module.visit(&mut Walk { at: ParamPath::default(), inner: visitor });
}

/// Rebuilds `module` with every float parameter passed through `mapper` with its path.
pub fn map_params<B: Backend, M: Module<B>, V: PathMapper<B>>(module: M, mapper: &mut V) -> M {
    module.map(&mut Walk { at: ParamPath::default(), inner: mapper })
}

/// `param` with its value replaced by `values` of `shape` (on the same device, keeping its id and
/// whether it requires a gradient).
pub fn with_value<B: Backend, const D: usize>(param: Param<Tensor<B, D>>, values: Vec<f32>, shape: Vec<usize>) -> Param<Tensor<B, D>> {
    let (id, old, mapper) = param.consume();
    let require_grad = old.is_require_grad();
    let tensor = Tensor::<B, D>::from_data(TensorData::new(values, shape), &old.device()).set_require_grad(require_grad);
    Param::from_mapped_value(id, tensor, mapper)
}

struct Loader<'a, B: Backend> {
    checkpoint: &'a Checkpoint,
    map: &'a KeyMap,
    prefix: String,
    used: BTreeSet<String>,
    problems: Vec<String>,
    /// Which `Linear` weights to store as NF4 instead (by path).
    nf4: &'a dyn Fn(&str) -> bool,
    quantized: Quantized<B>,
}

impl<B: Backend> PathMapper<B> for Loader<'_, B> {
    fn map<const D: usize>(&mut self, at: &ParamPath, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let ours = at.path();
        let key = format!("{}{}", self.prefix, self.map.file_key(&ours));
        let transpose = D == 2 && at.is_linear_weight();
        if transpose && (self.nf4)(&ours) {
            return self.quantize(ours, key, param);
        }
        let expected = param.lazy_shape().as_slice().to_vec();
        let file_shape = if transpose { vec![expected[1], expected[0]] } else { expected.clone() };
        let Some(values) = self.read(&ours, &key, &file_shape, false) else { return param };
        let values = if transpose { transpose_2d(&values, file_shape[0], file_shape[1]) } else { values };
        with_value(param, values, expected)
    }
}

impl<B: Backend> Loader<'_, B> {
    /// A `Linear` weight stored as NF4: quantised on the host from the checkpoint's values in
    /// their PyTorch layout `[out, in]` (blocks of 64 along each row, as bitsandbytes cuts them),
    /// moved to the parameter's device, and kept aside; the parameter becomes an empty `[0, 0]`
    /// placeholder. The parameter's own (lazy) initial value is never created.
    fn quantize<const D: usize>(&mut self, ours: String, key: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let expected = param.lazy_shape().as_slice().to_vec();
        let device = param.lazy_device();
        let file_shape = [expected[1], expected[0]];
        if let Some(values) = self.read(&ours, &key, &file_shape, true) {
            let weight = Nf4Weight::quantize(&values, &file_shape);
            drop(values);
            self.quantized.push((ours, weight.to_device(&device)));
        }
        Param::initialized(param.id, Tensor::<B, D>::from_data(TensorData::new(Vec::<f32>::new(), [0; D]), &device))
    }

    /// The checkpoint's values of parameter `ours` (file key `key`) when the tensor is there with
    /// `file_shape` (the file's layout); otherwise the problem is recorded (a missing tensor only
    /// when `required` or not optional in the key map) and there are none.
    fn read(&mut self, ours: &str, key: &str, file_shape: &[usize], required: bool) -> Option<Vec<f32>> {
        if !self.checkpoint.contains(key) {
            if required || !self.map.is_optional(ours) {
                self.problems.push(format!("  missing tensor `{key}` (model parameter `{ours}`)"));
            }
            return None;
        }
        self.used.insert(key.to_string());
        let (shape, values) = match self.checkpoint.read_f32(key) {
            Ok(read) => read,
            Err(e) => {
                self.problems.push(format!("  {e}"));
                return None;
            }
        };
        if shape != file_shape {
            let file = self.checkpoint.file_of(key).map(|p| p.display().to_string()).unwrap_or_default();
            self.problems.push(format!("  tensor `{key}` in {file} has shape {shape:?}, the model expects {file_shape:?}"));
            return None;
        }
        Some(values)
    }
}

fn transpose_2d(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Parameter paths of a module (`layers.0.mlp.fc1.weight`, ...), in visiting order.
pub fn parameter_paths<B: Backend, M: Module<B>>(module: &M) -> Vec<String> {
    struct Paths(Vec<String>);
    impl<B: Backend> PathVisitor<B> for Paths {
        fn visit<const D: usize>(&mut self, at: &ParamPath, _: &Param<Tensor<B, D>>) {
            self.0.push(at.path());
        }
    }
    let mut paths = Paths(Vec::new());
    visit_params(module, &mut paths);
    paths.0
}

/// Loads every parameter of `module` from `checkpoint` through `map`; fails listing every missing,
/// wrong-shaped and unused tensor with its file.
pub fn load_module<B: Backend, M: Module<B>>(module: M, checkpoint: &Checkpoint, map: &KeyMap) -> Result<M, ModelError> {
    load_module_nf4(module, checkpoint, map, &|_| false).map(|(module, _)| module)
}

/// NF4 weights by parameter path, as [`load_module_nf4`] returns them.
pub type Quantized<B> = Vec<(String, Nf4Tensor<B>)>;

/// [`load_module`], with the `Linear` weights whose path `nf4` accepts stored as NF4 (QLoRA):
/// each is read and quantised on the host one at a time and only its NF4 form goes to the device;
/// the returned module holds an empty `[0, 0]` placeholder in its place, and the NF4 weights
/// (`[out, in]`, PyTorch's layout) come back by path.
pub fn load_module_nf4<B: Backend, M: Module<B>>(
    module: M,
    checkpoint: &Checkpoint,
    map: &KeyMap,
    nf4: &dyn Fn(&str) -> bool,
) -> Result<(M, Quantized<B>), ModelError> {
    let paths = parameter_paths::<B, M>(&module);
    let prefix = map.detect_prefix(checkpoint, paths.first().map(String::as_str).unwrap_or(""));
    let mut loader = Loader { checkpoint, map, prefix: prefix.clone(), used: BTreeSet::new(), problems: Vec::new(), nf4, quantized: Vec::new() };
    let module = map_params(module, &mut loader);
    let quantized = loader.quantized;
    let mut problems = loader.problems;
    for key in checkpoint.keys() {
        if !loader.used.contains(key) && !map.is_ignored(key, &prefix) {
            let file = checkpoint.file_of(key).map(|p| p.display().to_string()).unwrap_or_default();
            problems.push(format!("  unused tensor `{key}` in {file}"));
        }
    }
    if problems.is_empty() {
        return Ok((module, quantized));
    }
    let shown = problems.len().min(20);
    let mut text = problems[..shown].join("\n");
    if problems.len() > shown {
        text.push_str(&format!("\n  ... and {} more", problems.len() - shown));
    }
    Err(ModelError::Weights {
        family: map.family.to_string(),
        source_desc: checkpoint.description().to_string(),
        problems: text,
        hint: format!("check that the folder holds a {} checkpoint whose config.json matches the weights (key prefix used: `{prefix}`)", map.family),
    })
}

/// Float parameters of `module` under the checkpoint names of `map`, in PyTorch layout (Linear
/// weights transposed back to `[out, in]`), ready to be written with [`write_safetensors`].
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M, map: &KeyMap, prefix: &str) -> Vec<(String, TensorData)> {
    named_sources::<B, M>(module, map, prefix, &|_| true).into_iter().map(|s| (s.name.clone(), s.read())).collect()
}

/// A tensor to be written: its name and shape now, its values when the writer reaches it
/// ([`write_safetensors_from`]), so a file of many tensors is written holding one at a time.
pub struct TensorSource<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    values: Box<dyn Fn() -> TensorData + 'a>,
}

impl<'a> TensorSource<'a> {
    pub fn new(name: String, shape: Vec<usize>, values: impl Fn() -> TensorData + 'a) -> Self {
        Self { name, shape, values: Box::new(values) }
    }

    /// The values, read now (from the device, for a GPU tensor).
    pub fn read(&self) -> TensorData {
        (self.values)()
    }
}

/// [`named_tensors`] as sources for [`write_safetensors_from`], for the parameters whose Burn
/// path `keep` accepts: each holds a handle on its parameter (no copy) until it is written.
pub fn named_sources<B: Backend, M: Module<B>>(module: &M, map: &KeyMap, prefix: &str, keep: &dyn Fn(&str) -> bool) -> Vec<TensorSource<'static>> {
    struct Sources<'a> {
        map: &'a KeyMap,
        prefix: &'a str,
        keep: &'a dyn Fn(&str) -> bool,
        out: Vec<TensorSource<'static>>,
    }
    impl<B: Backend> PathVisitor<B> for Sources<'_> {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            let path = at.path();
            if !(self.keep)(&path) {
                return;
            }
            let key = format!("{}{}", self.prefix, self.map.file_key(&path));
            let value = param.val();
            let mut shape = value.dims().to_vec();
            let linear = D == 2 && at.is_linear_weight();
            if linear {
                shape.reverse();
            }
            self.out.push(TensorSource::new(key, shape, move || pytorch_layout(linear, value.clone())));
        }
    }
    let mut sources = Sources { map, prefix, keep, out: Vec::new() };
    visit_params(module, &mut sources);
    sources.out
}

/// A parameter (or its gradient) in PyTorch layout: Linear weights transposed back to `[out, in]`.
fn pytorch_layout<B: Backend, const D: usize>(linear_weight: bool, value: Tensor<B, D>) -> TensorData {
    if linear_weight {
        value.transpose().into_data()
    } else {
        value.into_data()
    }
}

/// Parameter ids by path, for code that addresses parameters by name (freezing, optimizer groups).
pub fn parameter_ids<B: Backend, M: Module<B>>(module: &M) -> HashMap<String, ParamId> {
    struct Ids(HashMap<String, ParamId>);
    impl<B: Backend> PathVisitor<B> for Ids {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            self.0.insert(at.path(), param.id);
        }
    }
    let mut ids = Ids(HashMap::new());
    visit_params(module, &mut ids);
    ids.0
}

/// Writes named tensors as one f32 safetensors file (with optional string metadata), through a
/// temporary file renamed into place so a crash never leaves a truncated file at `path`.
pub fn write_safetensors(path: &Path, tensors: &[(String, TensorData)], metadata: Option<HashMap<String, String>>) -> Result<(), ModelError> {
    let sources = tensors.iter().map(|(name, data)| TensorSource::new(name.clone(), data.shape.to_vec(), move || data.clone())).collect();
    write_safetensors_from(path, sources, metadata)
}

/// [`write_safetensors`] from sources read one at a time as the file is written: besides the
/// tensors themselves, one tensor's values and their f32 bytes are held at once.
pub fn write_safetensors_from(path: &Path, sources: Vec<TensorSource<'_>>, metadata: Option<HashMap<String, String>>) -> Result<(), ModelError> {
    struct F32View<'s, 'a> {
        source: &'s TensorSource<'a>,
        path: &'s Path,
    }
    impl safetensors::View for F32View<'_, '_> {
        fn dtype(&self) -> Dtype {
            Dtype::F32
        }
        fn shape(&self) -> &[usize] {
            &self.source.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            let data = self.source.read();
            assert_eq!(data.shape.to_vec(), self.source.shape, "{}: tensor `{}` changed shape while being written", self.path.display(), self.source.name);
            let values = data.convert::<f32>().into_vec::<f32>().unwrap_or_else(|e| panic!("{}: tensor `{}`: {e:?}", self.path.display(), self.source.name));
            std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        fn data_len(&self) -> usize {
            4 * self.source.shape.iter().product::<usize>()
        }
    }
    let tmp = path.with_extension("safetensors.tmp");
    let views = sources.iter().map(|source| (source.name.clone(), F32View { source, path }));
    safetensors::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| ModelError::Checkpoint { path: tmp.clone(), message: format!("could not write: {e}") })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

/// Gradients of the float parameters of `module` that received one, under checkpoint names.
pub fn named_gradients<B: burn::tensor::backend::AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &B::Gradients,
    map: &KeyMap,
    prefix: &str,
) -> Vec<(String, TensorData)> {
    struct Collector<'a, B: burn::tensor::backend::AutodiffBackend> {
        grads: &'a B::Gradients,
        map: &'a KeyMap,
        prefix: &'a str,
        out: Vec<(String, TensorData)>,
    }
    impl<B: burn::tensor::backend::AutodiffBackend> PathVisitor<B> for Collector<'_, B> {
        fn visit<const D: usize>(&mut self, at: &ParamPath, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = param.val().grad(self.grads) {
                let key = format!("{}{}", self.prefix, self.map.file_key(&at.path()));
                self.out.push((key, pytorch_layout(D == 2 && at.is_linear_weight(), grad)));
            }
        }
    }
    let mut collector = Collector::<B> { grads, map, prefix, out: Vec::new() };
    visit_params(module, &mut collector);
    collector.out
}
