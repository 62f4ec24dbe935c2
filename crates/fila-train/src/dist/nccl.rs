//! NCCL collectives on CUDA tensors (the `cuda` feature): all-reduce, reduce-scatter and
//! all-gather read and write the Burn tensors' device memory directly, never through the host.
//!
//! NCCL is opened at run time, so the build needs no CUDA toolkit: `FILA_NCCL_LIB` when set, else
//! `libnccl.so.2` (the name NCCL's packages and PyTorch's `nvidia-nccl` wheel install) or
//! `libnccl.so` on the loader's path ([`NcclLib`]; cudarc's own loader never tries `.so.2` and
//! panics when nothing loads). Rank 0 makes the NCCL id and sends it to the others over the TCP
//! link of [`super::Comm`]. The communicator is non-blocking: joining it and every collective
//! are polled, so a rank that dies or hangs ends this one within the timeout instead of blocking
//! forever. A collective runs on a stream of its own in Burn's (primary) context: Burn's queued
//! work is synchronised before it, the stream after it.

use super::engine::{Engine, Flat, InFlight, Op};
use crate::dylib::Library;
use anyhow::{anyhow, bail, Result};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::driver::{CudaContext, CudaStream, DevicePtr};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// NCCL's names tried when `FILA_NCCL_LIB` is not set.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// The oldest NCCL with the non-blocking communicator configuration (`ncclConfig_t`, 2.14.0).
const MIN_VERSION: c_int = 21400;

/// `ncclResult_t`, kept as the integer NCCL returns (a newer NCCL may return codes that an enum
/// written for an older one does not have).
type Status = c_uint;
const SUCCESS: Status = 0;
const IN_PROGRESS: Status = 7;
const FLOAT32: c_uint = 7;
const SUM: c_uint = 0;

type Comm = *mut c_void;
type Stream = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclConfig_t` as NCCL 2.14 laid it out. NCCL reads `size` bytes of it and keeps its defaults
/// for the fields later versions added.
#[repr(C)]
struct Config {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
}

impl Config {
    fn non_blocking() -> Self {
        Self { size: std::mem::size_of::<Self>(), magic: 0xcafe_beef, version: MIN_VERSION as c_uint, blocking: 0 }
    }
}

/// The NCCL functions this engine calls, taken from the library once per process.
#[derive(Clone, Copy)]
pub struct NcclLib {
    /// `NCCL_VERSION_CODE` of the library (21903 for 2.19.3).
    pub version: c_int,
    pub path: &'static str,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    comm_init_rank_config: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut Config) -> Status,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut Status) -> Status,
    comm_finalize: unsafe extern "C" fn(Comm) -> Status,
    comm_destroy: unsafe extern "C" fn(Comm) -> Status,
    comm_abort: unsafe extern "C" fn(Comm) -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_uint, c_uint, Comm, Stream) -> Status,
    reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_uint, c_uint, Comm, Stream) -> Status,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_uint, Comm, Stream) -> Status,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_uint, c_int, Comm, Stream) -> Status,
}

impl NcclLib {
    /// This process's NCCL, opened on first use from `FILA_NCCL_LIB` (a path or a file name) or
    /// [`LIBRARY_NAMES`].
    pub fn get() -> Result<&'static NcclLib> {
        static LIB: OnceLock<Result<NcclLib, String>> = OnceLock::new();
        LIB.get_or_init(|| Self::load(std::env::var("FILA_NCCL_LIB").ok().as_deref())).as_ref().map_err(|e| anyhow::Error::msg(e.clone()))
    }

    /// Opens NCCL from `explicit` (the value of `FILA_NCCL_LIB`) or [`LIBRARY_NAMES`] and takes
    /// its functions; the error says what was tried and how to point the run at NCCL.
    pub fn load(explicit: Option<&str>) -> Result<NcclLib, String> {
        let names: Vec<&str> = explicit.map_or_else(|| LIBRARY_NAMES.to_vec(), |p| vec![p]);
        let lib = Library::open_first(&names).map_err(|why| match explicit {
            Some(p) => format!("NCCL could not be loaded from FILA_NCCL_LIB={p}: {}. Point FILA_NCCL_LIB at NCCL's libnccl.so.2", why.join("; ")),
            None => format!(
                "NCCL could not be loaded (tried {}: {}). Install NCCL (the libnccl2 package, or `pip install nvidia-nccl-cu12`) and put its lib folder on LD_LIBRARY_PATH, or set FILA_NCCL_LIB=/path/to/libnccl.so.2",
                names.join(", "),
                why.join("; ")
            ),
        })?;
        let too_old = |e: String| format!("{e}: is it NCCL {}.{} or newer?", MIN_VERSION / 10000, MIN_VERSION / 100 % 100);
        // SAFETY: each type is the C signature of the NCCL function of that name (nccl.h).
        let nccl = unsafe {
            let get_version: unsafe extern "C" fn(*mut c_int) -> Status = lib.function("ncclGetVersion").map_err(too_old)?;
            let mut version = 0;
            get_version(&mut version);
            NcclLib {
                version,
                path: lib.name,
                get_unique_id: lib.function("ncclGetUniqueId").map_err(too_old)?,
                comm_init_rank_config: lib.function("ncclCommInitRankConfig").map_err(too_old)?,
                comm_get_async_error: lib.function("ncclCommGetAsyncError").map_err(too_old)?,
                comm_finalize: lib.function("ncclCommFinalize").map_err(too_old)?,
                comm_destroy: lib.function("ncclCommDestroy").map_err(too_old)?,
                comm_abort: lib.function("ncclCommAbort").map_err(too_old)?,
                get_error_string: lib.function("ncclGetErrorString").map_err(too_old)?,
                all_reduce: lib.function("ncclAllReduce").map_err(too_old)?,
                reduce_scatter: lib.function("ncclReduceScatter").map_err(too_old)?,
                all_gather: lib.function("ncclAllGather").map_err(too_old)?,
                broadcast: lib.function("ncclBroadcast").map_err(too_old)?,
            }
        };
        if nccl.version < MIN_VERSION {
            return Err(format!("{} is NCCL version code {}; the non-blocking communicator needs {MIN_VERSION} (2.14) or newer", lib.name, nccl.version));
        }
        Ok(nccl)
    }

    fn describe(&self, status: Status) -> String {
        // SAFETY: NCCL returns a static C string for any code.
        let text = unsafe { (self.get_error_string)(status) };
        let text = if text.is_null() { "unknown".into() } else { unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned() };
        format!("{text} (ncclResult {status})")
    }
}

/// A live NCCL communicator. `ncclCommAbort` frees it, so an aborted one is never touched again:
/// it is neither used nor destroyed on drop (which would be a use after free hiding the error).
struct Communicator {
    lib: &'static NcclLib,
    comm: Comm,
    aborted: Cell<bool>,
    timeout: Duration,
}

impl Communicator {
    /// NCCL's state of the communicator: [`SUCCESS`], [`IN_PROGRESS`] or an error.
    fn state(&self) -> Status {
        let mut s = SUCCESS;
        // SAFETY: `comm` is live (not aborted; checked by every caller).
        let r = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut s) };
        if r != SUCCESS {
            r
        } else {
            s
        }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: a live communicator, aborted once; the flag keeps it from being used again.
            unsafe { (self.lib.comm_abort)(self.comm) };
        }
    }

    /// Polls until NCCL has finished what was enqueued on the communicator and `done()` holds,
    /// aborting it on an error or after the timeout. `what` names the operation in the error.
    fn wait(&self, what: &dyn Fn() -> String, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        if self.aborted.get() {
            bail!("{}: the NCCL communicator was aborted after an earlier failure", what());
        }
        let started = Instant::now();
        loop {
            let state = self.state();
            if state == SUCCESS && done()? {
                return Ok(());
            }
            if state != SUCCESS && state != IN_PROGRESS {
                self.abort();
                bail!("{}: NCCL reported {}: another rank failed or the network broke", what(), self.lib.describe(state));
            }
            if started.elapsed() > self.timeout {
                self.abort();
                bail!(
                    "{} did not finish within {} s: another rank died or hangs (raise FILA_DIST_TIMEOUT if it is only slow)",
                    what(),
                    self.timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Checks the status an NCCL call returned (`IN_PROGRESS` is how a non-blocking communicator
    /// says it is still enqueueing).
    fn check(&self, status: Status, what: &dyn Fn() -> String) -> Result<()> {
        if status != SUCCESS && status != IN_PROGRESS {
            self.abort();
            bail!("{}: {}", what(), self.lib.describe(status));
        }
        Ok(())
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if self.aborted.get() {
            return;
        }
        // SAFETY: a live communicator: finalized (waiting for its work, bounded), then destroyed.
        let finalized = unsafe { (self.lib.comm_finalize)(self.comm) };
        let clean = (finalized == SUCCESS || finalized == IN_PROGRESS) && self.wait(&|| "finalizing the NCCL communicator".into(), || Ok(true)).is_ok();
        if clean {
            unsafe { (self.lib.comm_destroy)(self.comm) };
        } else {
            self.abort();
        }
    }
}

/// The CubeCL CUDA tensor behind `t`; an error when the backend is another one (Burn's
/// `fusion` wraps CubeCL's tensors, the CPU backend has none): NCCL was asked for, so falling
/// back to the host path would hide that it is not used.
fn cuda_tensor(t: &dyn Flat) -> Result<CubeTensor<CudaRuntime>> {
    let not_cuda = || {
        anyhow!(
            "NCCL collectives need CubeCL's CUDA tensors, and this run's backend is {} (Burn's `fusion` feature wraps them; build fila without it)",
            t.backend_name()
        )
    };
    let primitive = t.primitive();
    let cube = primitive.downcast_ref::<CubeTensor<CudaRuntime>>().ok_or_else(not_cuda)?.clone();
    if cube.dtype != burn::tensor::DType::F32 || cube.meta.strides().first().is_some_and(|&s| s != 1) {
        bail!("NCCL collectives take contiguous f32 tensors (got {:?})", cube.dtype);
    }
    Ok(cube)
}

/// Calls `f` with the device address of `t`'s memory, kept allocated until it returns.
fn with_device_ptr<R>(t: &CubeTensor<CudaRuntime>, f: impl FnOnce(u64) -> Result<R>) -> Result<R> {
    let resource = t.client.get_resource(t.handle.clone()).map_err(|e| anyhow!("locating a CUDA tensor's memory: {e:?}"))?;
    let out = f(resource.resource().ptr)?;
    drop(resource);
    Ok(out)
}

pub struct Nccl {
    // Dropped first: the communicator goes before the stream and context it uses.
    comm: Communicator,
    stream: Arc<CudaStream>,
    _context: Arc<CudaContext>,
    rank: usize,
    size: usize,
}

impl Nccl {
    /// Joins the NCCL communicator of `size` ranks on GPU `ordinal`; `share_id` sends rank 0's
    /// id to every rank (the TCP exchange) and returns rank 0's bytes. Ends with an all-reduce of
    /// one value per rank, checked: NCCL sets up its buffers at the first collective, which
    /// should happen before CubeCL's memory pool has taken the GPU.
    pub fn connect(rank: usize, size: usize, ordinal: usize, timeout: Duration, share_id: impl FnOnce(Vec<u8>) -> Result<Vec<u8>>) -> Result<Self> {
        let lib = NcclLib::get()?;
        let context = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let stream = context.new_stream().map_err(|e| anyhow!("a CUDA stream on device {ordinal}: {e:?}"))?;
        let mine = if rank == 0 {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: NCCL writes the 128-byte id.
            let s = unsafe { (lib.get_unique_id)(&mut id) };
            if s != SUCCESS {
                bail!("ncclGetUniqueId ({}): {}", lib.path, lib.describe(s));
            }
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let bytes = share_id(mine)?;
        if bytes.len() != 128 {
            bail!("rank 0 sent an NCCL id of {} bytes, expected 128", bytes.len());
        }
        let mut id = UniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as c_char;
        }
        let mut raw: Comm = std::ptr::null_mut();
        let mut config = Config::non_blocking();
        // SAFETY: NCCL writes the communicator handle; the id is rank 0's.
        let started = unsafe { (lib.comm_init_rank_config)(&mut raw, size as c_int, id, rank as c_int, &mut config) };
        let joining = move || format!("ncclCommInitRankConfig (rank {rank} of {size}, GPU {ordinal})");
        if raw.is_null() {
            bail!("{}: {}", joining(), lib.describe(started));
        }
        let comm = Communicator { lib, comm: raw, aborted: Cell::new(false), timeout };
        comm.check(started, &joining)?;
        comm.wait(&joining, || Ok(true))?;
        let nccl = Self { comm, stream, _context: context, rank, size };
        nccl.check_with_one_value()?;
        Ok(nccl)
    }

    /// All-reduces `rank + 1` from every rank and checks the sum.
    fn check_with_one_value(&self) -> Result<()> {
        let what = || format!("the first NCCL all-reduce on rank {}", self.rank);
        let buffer = self.stream.clone_htod(&[self.rank as f32 + 1.0][..]).map_err(|e| anyhow!("{}: {e:?}", what()))?;
        {
            let (ptr, _in_use) = buffer.device_ptr(&self.stream);
            let ptr = ptr as *mut c_void;
            // SAFETY: an in-place all-reduce of one f32 on this rank's stream.
            let s = unsafe { (self.comm.lib.all_reduce)(ptr, ptr, 1, FLOAT32, SUM, self.comm.comm, self.stream.cu_stream() as Stream) };
            self.comm.check(s, &what)?;
            self.wait_stream(&what)?;
        }
        let sum = self.stream.clone_dtoh(&buffer).map_err(|e| anyhow!("{}: {e:?}", what()))?[0];
        let expected = (self.size * (self.size + 1) / 2) as f32;
        if sum != expected {
            bail!("{}: got {sum}, expected {expected} (the sum of 1..={})", what(), self.size);
        }
        Ok(())
    }

    /// Enqueues `op` on this communicator's stream, reading `input` and writing a new tensor;
    /// the collective runs while the caller goes on, and [`NcclInFlight::wait`] waits for the
    /// stream. Burn's queued kernels that write `input` finish before NCCL reads it; the input
    /// and output stay allocated (held by the operation) until it has been waited for.
    fn enqueue(self: &Rc<Self>, op: Op, input: Box<dyn Flat>) -> Result<NcclInFlight> {
        let n = input.len();
        let what = format!("NCCL {} of {n} elements on rank {}", op.name(), self.rank);
        let out_len = op.out_len(n, self.size);
        let output = input.empty_like(out_len);
        let (src, dst) = (cuda_tensor(input.as_ref())?, cuda_tensor(output.as_ref())?);
        input.sync()?;
        let stream = self.stream.cu_stream() as Stream;
        let (comm, lib) = (self.comm.comm, self.comm.lib);
        let per_rank = n / self.size;
        with_device_ptr(&src, |src| {
            with_device_ptr(&dst, |dst| {
                let (src, dst) = (src as *const c_void, dst as *mut c_void);
                // SAFETY: both buffers are live CUDA allocations of the lengths NCCL is told
                // (`out_len` for the output), held until the stream has run the collective.
                let status = unsafe {
                    match op {
                        Op::AllReduce => (lib.all_reduce)(src, dst, n, FLOAT32, SUM, comm, stream),
                        Op::ReduceScatter => (lib.reduce_scatter)(src, dst, per_rank, FLOAT32, SUM, comm, stream),
                        Op::AllGather => (lib.all_gather)(src, dst, n, FLOAT32, comm, stream),
                        Op::Broadcast { root } => (lib.broadcast)(src, dst, n, FLOAT32, root as c_int, comm, stream),
                    }
                };
                self.comm.check(status, &|| what.clone())
            })
        })?;
        Ok(NcclInFlight { nccl: self.clone(), what, _input: input, _buffers: (src, dst), output })
    }

    /// Waits until NCCL has enqueued its work and the stream has run it.
    fn wait_stream(&self, what: &dyn Fn() -> String) -> Result<()> {
        let stream = self.stream.cu_stream();
        self.comm.wait(what, || {
            // SAFETY: the stream belongs to `self` and lives as long as it.
            match unsafe { cudarc::driver::sys::cuStreamQuery(stream) } {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(true),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                e => bail!("CUDA error while waiting for {}: {e:?}", what()),
            }
        })
    }
}

/// The engine is shared with its collectives in flight, which wait on its stream.
impl Engine for Rc<Nccl> {
    fn start(&self, op: Op, t: Box<dyn Flat>) -> Result<Box<dyn InFlight>> {
        Ok(Box::new(self.enqueue(op, t)?))
    }
}

/// An NCCL collective enqueued on the communicator's stream.
struct NcclInFlight {
    nccl: Rc<Nccl>,
    what: String,
    _input: Box<dyn Flat>,
    _buffers: (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>),
    output: Box<dyn Flat>,
}

impl InFlight for NcclInFlight {
    /// Waits for the stream (and with it for every collective enqueued before this one).
    fn wait(self: Box<Self>) -> Result<Box<dyn Flat>> {
        let what = self.what.clone();
        self.nccl.wait_stream(&move || what.clone())?;
        Ok(self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::prelude::Tensor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_missing_nccl_is_an_error_that_says_what_to_do() {
        let e = NcclLib::load(Some("/nonexistent/libnccl.so.2")).err().unwrap();
        assert!(e.contains("FILA_NCCL_LIB=/nonexistent/libnccl.so.2") && e.contains("No such file"), "{e}");
        // A library that loads but is not NCCL.
        let e = NcclLib::load(Some("libc.so.6")).err().unwrap();
        assert!(e.contains("libc.so.6 has no `ncclGetVersion`") && e.contains("2.14 or newer"), "{e}");
        // The default names, on this machine (an NCCL install makes it load).
        match NcclLib::load(None) {
            Ok(lib) => assert!(lib.version >= MIN_VERSION),
            Err(e) => assert!(e.contains("tried libnccl.so.2, libnccl.so") && e.contains("FILA_NCCL_LIB"), "{e}"),
        }
    }

    #[test]
    fn a_cpu_tensor_is_refused_rather_than_sent_over_tcp() {
        let t = Tensor::<burn::backend::Flex, 1>::zeros([4], &Default::default());
        let e = cuda_tensor(&t as &dyn Flat).err().unwrap().to_string();
        assert!(e.contains("need CubeCL's CUDA tensors") && e.contains("Flex"), "{e}");
    }

    // NCCL stand-ins that count the teardown calls, for the drop logic alone.
    static FINALIZED: AtomicUsize = AtomicUsize::new(0);
    static DESTROYED: AtomicUsize = AtomicUsize::new(0);
    static ABORTED: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C" fn finalize(_: Comm) -> Status {
        FINALIZED.fetch_add(1, Ordering::SeqCst);
        SUCCESS
    }
    unsafe extern "C" fn destroy(_: Comm) -> Status {
        DESTROYED.fetch_add(1, Ordering::SeqCst);
        SUCCESS
    }
    unsafe extern "C" fn abort(_: Comm) -> Status {
        ABORTED.fetch_add(1, Ordering::SeqCst);
        SUCCESS
    }
    unsafe extern "C" fn remote_error(_: Comm, s: *mut Status) -> Status {
        *s = 6; // ncclRemoteError
        SUCCESS
    }
    unsafe extern "C" fn error_string(_: Status) -> *const c_char {
        c"remote process exited or there was a network error".as_ptr()
    }
    unsafe extern "C" fn unused1(_: *mut UniqueId) -> Status {
        unreachable!()
    }
    unsafe extern "C" fn unused2(_: *mut Comm, _: c_int, _: UniqueId, _: c_int, _: *mut Config) -> Status {
        unreachable!()
    }
    unsafe extern "C" fn unused3(_: *const c_void, _: *mut c_void, _: usize, _: c_uint, _: c_uint, _: Comm, _: Stream) -> Status {
        unreachable!()
    }
    unsafe extern "C" fn unused4(_: *const c_void, _: *mut c_void, _: usize, _: c_uint, _: Comm, _: Stream) -> Status {
        unreachable!()
    }
    unsafe extern "C" fn unused5(_: *const c_void, _: *mut c_void, _: usize, _: c_uint, _: c_int, _: Comm, _: Stream) -> Status {
        unreachable!()
    }

    /// A failure seen while waiting aborts the communicator, once; dropping it afterwards does
    /// not destroy it (`ncclCommAbort` freed it), and it refuses further use. A healthy one is
    /// finalized and destroyed on drop.
    #[test]
    fn an_aborted_communicator_is_not_destroyed_again() {
        const STAND_IN: NcclLib = NcclLib {
            version: 21903,
            path: "test",
            get_unique_id: unused1,
            comm_init_rank_config: unused2,
            comm_get_async_error: remote_error,
            comm_finalize: finalize,
            comm_destroy: destroy,
            comm_abort: abort,
            get_error_string: error_string,
            all_reduce: unused3,
            reduce_scatter: unused3,
            all_gather: unused4,
            broadcast: unused5,
        };
        static LIB: NcclLib = STAND_IN;
        let comm = Communicator { lib: &LIB, comm: std::ptr::dangling_mut(), aborted: Cell::new(false), timeout: Duration::from_secs(5) };
        let e = comm.wait(&|| "NCCL all-reduce on rank 1".into(), || Ok(true)).unwrap_err().to_string();
        assert!(e.contains("remote process exited") && e.contains("ncclResult 6"), "{e}");
        let e = comm.wait(&|| "the next all-reduce".into(), || Ok(true)).unwrap_err().to_string();
        assert!(e.contains("aborted after an earlier failure"), "{e}");
        drop(comm);
        let counts = || [&FINALIZED, &DESTROYED, &ABORTED].map(|c| c.load(Ordering::SeqCst));
        assert_eq!(counts(), [0, 0, 1]);
        static HEALTHY: NcclLib = NcclLib { comm_get_async_error: healthy, ..STAND_IN };
        unsafe extern "C" fn healthy(_: Comm, s: *mut Status) -> Status {
            *s = SUCCESS;
            SUCCESS
        }
        drop(Communicator { lib: &HEALTHY, comm: std::ptr::dangling_mut(), aborted: Cell::new(false), timeout: Duration::from_secs(5) });
        assert_eq!(counts(), [1, 1, 1]);
    }
}
