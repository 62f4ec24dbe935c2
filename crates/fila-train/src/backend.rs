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
    let count = cuda_device_count().map_err(|why| {
        anyhow::anyhow!("device `cuda:{index}`: {why}. Is this a machine with an NVIDIA GPU and its driver? Use `device = \"cpu\"` otherwise")
    })?;
    if index >= count {
        anyhow::bail!(
            "device `cuda:{index}`: this machine has {count} CUDA device(s){}",
            if count > 0 { format!(" (cuda:0 .. cuda:{})", count - 1) } else { String::new() }
        );
    }
    job.run::<Autodiff<burn::backend::Cuda>>(&burn::backend::cuda::CudaDevice::new(index))
}

/// The number of CUDA devices, asked of the driver before the backend starts (which otherwise
/// fails deep inside its runtime thread). cudarc loads the driver library at run time and panics
/// when it is missing; that panic becomes an error here.
#[cfg(feature = "cuda")]
fn cuda_device_count() -> std::result::Result<usize, String> {
    use cudarc::driver::result;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let count = std::panic::catch_unwind(|| result::init().and_then(|_| result::device::get_count()));
    std::panic::set_hook(hook);
    match count {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(format!("the CUDA driver failed to start ({e:?})")),
        Err(_) => Err("the CUDA driver library (libcuda) could not be loaded".into()),
    }
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
}
