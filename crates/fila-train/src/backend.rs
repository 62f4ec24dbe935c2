//! The device of a run, parsed once, and the one function that picks the Burn backend for it
//! ([`dispatch`]), used by both binaries.

use anyhow::Result;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

/// `cpu`, `cuda:N` or `wgpu` / `wgpu:N` in configs and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
    /// Burn's wgpu backend (Vulkan, Metal, DX12): the `N`th discrete GPU, or with plain `wgpu` the
    /// default adapter wgpu picks (a software Vulkan driver when there is no GPU).
    Wgpu(Option<usize>),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let index = |prefix: &str| s.strip_prefix(prefix).and_then(|i| i.parse().ok());
        match s {
            "cpu" => Ok(Device::Cpu),
            "wgpu" => Ok(Device::Wgpu(None)),
            _ => index("cuda:")
                .map(Device::Cuda)
                .or_else(|| index("wgpu:").map(|i| Device::Wgpu(Some(i))))
                .ok_or_else(|| format!("`{s}`: expected \"cpu\", \"cuda:N\", \"wgpu\" or \"wgpu:N\"")),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(None) => write!(f, "wgpu"),
            Device::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
        }
    }
}

impl Device {
    /// One process per GPU: in a multi-process run, rank `local_rank` of a node takes
    /// `cuda:<local_rank>` whatever index the config names.
    pub fn for_local_rank(self, local_rank: usize, world_size: usize) -> Self {
        match self {
            Device::Cuda(_) if world_size > 1 => Device::Cuda(local_rank),
            d => d,
        }
    }
}

/// Work generic over the autodiff backend, run by [`dispatch`].
pub trait OnBackend {
    type Output;
    fn run<B: AutodiffBackend>(self, device: &B::Device) -> Result<Self::Output>;
}

/// Runs `job` on `device`'s backend (activation checkpointing is the trainer's own segmented
/// recomputation, [`crate::recompute`], not a backend setting).
pub fn dispatch<J: OnBackend>(device: Device, job: J) -> Result<J::Output> {
    match device {
        Device::Cpu => job.run::<Autodiff<Flex>>(&Default::default()),
        Device::Cuda(index) => on_cuda(index, job),
        Device::Wgpu(index) => on_wgpu(index, job),
    }
}

#[cfg(feature = "wgpu")]
fn on_wgpu<J: OnBackend>(index: Option<usize>, job: J) -> Result<J::Output> {
    use burn::backend::wgpu::WgpuDevice;
    let device = match index {
        Some(i) => WgpuDevice::DiscreteGpu(i),
        None => WgpuDevice::DefaultDevice,
    };
    job.run::<Autodiff<burn::backend::Wgpu>>(&device)
}

#[cfg(not(feature = "wgpu"))]
fn on_wgpu<J: OnBackend>(index: Option<usize>, _: J) -> Result<J::Output> {
    let name = Device::Wgpu(index);
    anyhow::bail!(
        "device `{name}` needs a build with `--features wgpu`; this build runs on `cpu`{}",
        if cfg!(feature = "cuda") { " and `cuda:N`" } else { " only" }
    )
}

#[cfg(feature = "cuda")]
fn on_cuda<J: OnBackend>(index: usize, job: J) -> Result<J::Output> {
    cuda_preflight(index)?;
    job.run::<Autodiff<burn::backend::Cuda>>(&burn::backend::cuda::CudaDevice::new(index))
}

/// What Burn's CUDA backend needs, checked before anything starts it (it otherwise panics deep
/// inside its runtime thread, and cudarc panics on a missing library): the driver library, a
/// driver at least as new as the CUDA version the bindings were built for, device `cuda:index`,
/// and the CUDA toolkit's NVRTC and headers, with which CubeCL compiles its kernels at run time.
#[cfg(feature = "cuda")]
pub fn cuda_preflight(index: usize) -> Result<()> {
    use cudarc::driver::{result, sys};
    let name = format!("device `cuda:{index}`");
    let drivers = cudarc::get_lib_name_candidates("cuda");
    if let Err(why) = crate::dylib::Library::open_first(&drivers) {
        anyhow::bail!(
            "{name}: the CUDA driver library (libcuda.so) could not be loaded ({}). Is this a machine with an NVIDIA GPU and its driver? Use `device = \"cpu\"` otherwise",
            why.last().map_or("", String::as_str)
        );
    }
    result::init().map_err(|e| anyhow::anyhow!("{name}: the CUDA driver failed to start ({e:?})"))?;
    let mut version = 0;
    // SAFETY: the driver writes one integer.
    unsafe { sys::cuDriverGetVersion(&mut version) };
    let built = sys::CUDA_VERSION as i32;
    if version < built {
        let v = |x: i32| format!("{}.{}", x / 1000, x % 1000 / 10);
        anyhow::bail!(
            "{name}: the NVIDIA driver supports CUDA {} and this build needs {} or newer (the CUDA version its bindings were built for, CUDARC_CUDA_VERSION in .cargo/config.toml): update the driver",
            v(version),
            v(built)
        );
    }
    let count = result::device::get_count().map_err(|e| anyhow::anyhow!("{name}: counting CUDA devices ({e:?})"))?.max(0) as usize;
    if index >= count {
        anyhow::bail!("{name}: this machine has {count} CUDA device(s){}", if count > 0 { format!(" (cuda:0 .. cuda:{})", count - 1) } else { String::new() });
    }
    if let Some(problem) = cuda_toolkit_problem(cubecl::cuda::install::cuda_path(), &cudarc::get_lib_name_candidates("nvrtc"), version) {
        anyhow::bail!("{name}: {problem}");
    }
    Ok(())
}

/// What is missing from the CUDA toolkit under `root` (CubeCL's choice: `$CUDA_PATH`, else
/// `/usr/local/cuda`, `/opt/cuda`, `/usr`) for CubeCL to compile kernels: the headers its
/// kernels include, an NVRTC library among `nvrtc_names`, or an NVRTC no newer than the driver
/// (`driver`, as `cuDriverGetVersion` gives it: the driver cannot load newer PTX). `None` when
/// nothing is.
#[cfg(feature = "cuda")]
pub fn cuda_toolkit_problem(root: Option<std::path::PathBuf>, nvrtc_names: &[String], driver: i32) -> Option<String> {
    const HINT: &str = "install the CUDA toolkit (or its NVRTC and headers) and set CUDA_PATH to its folder; the NVIDIA driver alone is not enough";
    let Some(root) = root else {
        return Some(format!("no CUDA toolkit found (CUDA_PATH is not set and /usr/local/cuda, /opt/cuda and /usr/bin/nvcc do not exist): CubeCL compiles its kernels with NVRTC against the toolkit's headers; {HINT}"));
    };
    let header = root.join("include/cuda_fp16.h");
    if !header.is_file() {
        return Some(format!(
            "{} is missing: CubeCL's kernels include the CUDA toolkit's headers from {}; {HINT}",
            header.display(),
            root.join("include").display()
        ));
    }
    let nvrtc = match crate::dylib::Library::open_first(nvrtc_names) {
        Ok(lib) => lib,
        Err(why) => {
            return Some(format!(
            "NVRTC, with which CubeCL compiles its kernels, could not be loaded (tried {}; {}): put the toolkit's lib64 folder ({}) on LD_LIBRARY_PATH; {HINT}",
            nvrtc_names.join(", "),
            why.last().map_or("", String::as_str),
            root.join("lib64").display()
        ))
        }
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: `nvrtcVersion(int*, int*)` writes two integers.
    match unsafe { nvrtc.function::<unsafe extern "C" fn(*mut i32, *mut i32) -> i32>("nvrtcVersion") } {
        Ok(version) => unsafe { version(&mut major, &mut minor) },
        Err(e) => return Some(format!("{e}: is it NVRTC?")),
    };
    if major * 1000 + minor * 10 > driver {
        return Some(format!(
            "{} is NVRTC {major}.{minor}, newer than the driver's CUDA {}.{}: the driver cannot load the code it compiles. Use a toolkit no newer than the driver (CUDA_PATH and LD_LIBRARY_PATH), or update the driver",
            nvrtc.name,
            driver / 1000,
            driver % 1000 / 10
        ));
    }
    None
}

#[cfg(not(feature = "cuda"))]
fn on_cuda<J: OnBackend>(index: usize, _: J) -> Result<J::Output> {
    anyhow::bail!("device `cuda:{index}` needs a build with `--features cuda`; this build runs on `cpu` only")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("cuda".parse::<Device>().unwrap_err().contains("expected \"cpu\", \"cuda:N\""));
        assert_eq!("wgpu".parse::<Device>(), Ok(Device::Wgpu(None)));
        assert_eq!("wgpu:1".parse::<Device>(), Ok(Device::Wgpu(Some(1))));
        assert!("wgpu:x".parse::<Device>().is_err());
        assert_eq!(Device::Wgpu(Some(1)).to_string(), "wgpu:1");
        assert!("gpu:0".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!(Device::Cuda(0).for_local_rank(5, 8), Device::Cuda(5));
        assert_eq!(Device::Cuda(1).for_local_rank(0, 1), Device::Cuda(1));
        assert_eq!(Device::Cpu.for_local_rank(3, 4), Device::Cpu);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_missing_cuda_toolkit_is_named() {
        let names = vec!["libnvrtc-none.so".to_string()];
        let driver = 12020;
        assert!(cuda_toolkit_problem(None, &names, driver).unwrap().contains("no CUDA toolkit found"));
        let dir = tempfile::tempdir().unwrap();
        let e = cuda_toolkit_problem(Some(dir.path().into()), &names, driver).unwrap();
        assert!(e.contains("include/cuda_fp16.h is missing") && e.contains("CUDA_PATH"), "{e}");
        std::fs::create_dir(dir.path().join("include")).unwrap();
        std::fs::write(dir.path().join("include/cuda_fp16.h"), "").unwrap();
        let e = cuda_toolkit_problem(Some(dir.path().into()), &names, driver).unwrap();
        assert!(e.contains("NVRTC") && e.contains("tried libnvrtc-none.so") && e.contains("lib64"), "{e}");
        // Headers and a library that loads but is not NVRTC.
        let e = cuda_toolkit_problem(Some(dir.path().into()), &["libc.so.6".to_string()], driver).unwrap();
        assert_eq!(e, "libc.so.6 has no `nvrtcVersion`: is it NVRTC?");
    }
}
