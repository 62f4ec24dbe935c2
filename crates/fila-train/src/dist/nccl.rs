//! NCCL collectives on CUDA tensors (the `cuda` feature): all-reduce, reduce-scatter and
//! all-gather read and write the Burn tensors' device memory directly, never through the host.
//!
//! NCCL is loaded at run time (cudarc's dynamic loading), so the build needs no CUDA toolkit.
//! Rank 0 makes the NCCL id and sends it to the others over the TCP link of [`super::Comm`]. A
//! collective runs on a stream of its own in Burn's (primary) context: Burn's queued work is
//! synchronised before it, the stream after it, polling so that a rank that dies or hangs ends
//! this one within the timeout instead of blocking forever.

use anyhow::{anyhow, bail, Result};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result, sys};
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Nccl {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    _context: Arc<CudaContext>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: `comm` came from `ncclCommInitRank` and is destroyed once, here.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

/// A tensor's device address, with the resource that keeps it allocated while NCCL uses it.
fn with_device_ptr<I: Backend, R>(t: &Tensor<I, 1>, f: impl FnOnce(u64) -> Result<R>) -> Result<Option<R>> {
    let TensorPrimitive::Float(primitive) = t.clone().into_primitive() else {
        return Ok(None);
    };
    let any: &dyn Any = &primitive;
    let Some(cube) = any.downcast_ref::<CubeTensor<CudaRuntime>>() else {
        return Ok(None);
    };
    if cube.dtype != burn::tensor::DType::F32 || cube.meta.strides().first().is_some_and(|&s| s != 1) {
        bail!("NCCL collectives take contiguous f32 tensors (got {:?})", cube.dtype);
    }
    let resource = cube.client.get_resource(cube.handle.clone()).map_err(|e| anyhow!("locating a CUDA tensor's memory: {e:?}"))?;
    let out = f(resource.resource().ptr)?;
    drop(resource);
    Ok(Some(out))
}

impl Nccl {
    /// Joins the NCCL communicator of `size` ranks on GPU `ordinal`; `share_id` sends rank 0's
    /// id to every rank (the TCP exchange) and returns rank 0's bytes.
    pub fn connect(rank: usize, size: usize, ordinal: usize, timeout: Duration, share_id: impl FnOnce(Vec<u8>) -> Result<Vec<u8>>) -> Result<Self> {
        let context = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let stream = context.new_stream().map_err(|e| anyhow!("a CUDA stream on device {ordinal}: {e:?}"))?;
        let mine = if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId: {e:?} (is libnccl.so.2 on the library path?)"))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let bytes = share_id(mine)?;
        if bytes.len() != 128 {
            bail!("rank 0 sent an NCCL id of {} bytes, expected 128", bytes.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read; the id is rank 0's.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), size as i32, sys::ncclUniqueId { internal }, rank as i32)
                .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {size}, GPU {ordinal}): {e:?}"))?;
            comm.assume_init()
        };
        Ok(Self { comm, stream, _context: context, rank, size, timeout })
    }

    /// Sum over ranks; `None` when `t` is not a CUDA tensor (the caller uses the TCP path).
    pub fn all_reduce<I: Backend>(&self, t: &Tensor<I, 1>) -> Result<Option<Tensor<I, 1>>> {
        let n = t.dims()[0];
        self.run(t, n, |src, dst, stream| unsafe {
            result::all_reduce(src as _, dst as _, n, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, self.comm, stream as _)
        })
    }

    /// Sum over ranks, this rank's `1/size` slice kept.
    pub fn reduce_scatter<I: Backend>(&self, t: &Tensor<I, 1>) -> Result<Option<Tensor<I, 1>>> {
        let k = t.dims()[0] / self.size;
        self.run(t, k, |src, dst, stream| unsafe {
            result::reduce_scatter(src as _, dst as _, k, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, self.comm, stream as _)
        })
    }

    /// Every rank's slice, in rank order.
    pub fn all_gather<I: Backend>(&self, t: &Tensor<I, 1>) -> Result<Option<Tensor<I, 1>>> {
        let k = t.dims()[0];
        self.run(t, k * self.size, |src, dst, stream| unsafe {
            result::all_gather(src as _, dst as _, k, sys::ncclDataType_t::ncclFloat32, self.comm, stream as _)
        })
    }

    /// Rank `root`'s values on every rank.
    pub fn broadcast<I: Backend>(&self, t: &Tensor<I, 1>, root: usize) -> Result<Option<Tensor<I, 1>>> {
        let n = t.dims()[0];
        self.run(t, n, |src, dst, stream| unsafe {
            result::broadcast(src as _, dst as _, n, sys::ncclDataType_t::ncclFloat32, root as i32, self.comm, stream as _)
        })
    }

    /// Runs one collective from `input` into a new tensor of `out_len` elements.
    fn run<I: Backend>(
        &self,
        input: &Tensor<I, 1>,
        out_len: usize,
        op: impl FnOnce(u64, u64, cudarc::driver::sys::CUstream) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<Option<Tensor<I, 1>>> {
        let device = input.device();
        let output = Tensor::<I, 1>::empty([out_len], &device);
        // Burn's queued kernels that write `input` finish before NCCL reads it.
        I::sync(&device).map_err(|e| anyhow!("synchronising the device before a collective: {e:?}"))?;
        let stream = self.stream.cu_stream();
        let launched = with_device_ptr(input, |src| {
            with_device_ptr(&output, |dst| op(src, dst, stream).map_err(|e| anyhow!("NCCL collective on rank {}: {e:?}", self.rank)))?
                .ok_or_else(|| anyhow!("the output of a collective is not a CUDA tensor"))
        })?;
        if launched.is_none() {
            return Ok(None);
        }
        self.wait()?;
        Ok(Some(output))
    }

    /// Waits for the stream, checking NCCL's asynchronous errors; aborts the communicator after
    /// the timeout (a peer died or hangs).
    fn wait(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            // SAFETY: the stream belongs to `self` and lives as long as it.
            let status = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match status {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => bail!("CUDA error while waiting for a collective on rank {}: {e:?}", self.rank),
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live; NCCL writes one status value.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_error) };
            let failed = !matches!(async_error, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress);
            if failed || started.elapsed() > self.timeout {
                // SAFETY: aborting a live communicator; it is not used again (the run ends).
                unsafe {
                    let _ = result::comm_abort(self.comm);
                }
                if failed {
                    bail!("NCCL reported {async_error:?} on rank {}: another rank failed or the network broke", self.rank);
                }
                bail!(
                    "a collective did not finish within {} s on rank {}: another rank died or hangs (raise FILA_DIST_TIMEOUT if it is only slow)",
                    self.timeout.as_secs_f64(),
                    self.rank
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
