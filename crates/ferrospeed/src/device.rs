//! Where blocks compute: a CUDA device per local rank (with the `cuda` feature), or the CPU; and what
//! the GPU's memory pool has used at most.

/// Where blocks compute; `train.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU when this build has the cuda feature and a GPU is present, else the CPU.
    Auto,
    Cpu,
    /// The GPU of index LOCAL_RANK.
    Cuda,
}
crate::named_enum!(DeviceChoice { Auto => "auto", Cpu => "cpu", Cuda => "cuda" });

use candle_core::Device;

/// Set to 1 to let several local ranks share the GPUs round robin (tests on one GPU).
pub const ENV_SHARE_GPUS: &str = "FERROSPEED_SHARE_GPUS";

/// Pick the device for local rank `local_rank`: GPU `local_rank` (or `local_rank % count` when
/// `FERROSPEED_SHARE_GPUS=1`).
pub fn select(choice: DeviceChoice, local_rank: usize) -> Result<Device, String> {
    let local_rank = if std::env::var(ENV_SHARE_GPUS).is_ok_and(|v| v == "1") { local_rank % gpu_count().max(1) } else { local_rank };
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => Device::new_cuda(local_rank).map(prepared).map_err(|e| {
            format!(
                "train.device = \"cuda\" but CUDA device {local_rank} cannot be used ({e}); build with `--features cuda` \
                 on a machine with enough GPUs for the ranks of this node, or set train.device = \"cpu\""
            )
        }),
        DeviceChoice::Auto if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => {
            Device::new_cuda(local_rank).map(prepared).map_err(|e| format!("CUDA device {local_rank} for local rank {local_rank}: {e}"))
        }
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

/// A new CUDA device set up for training:
/// - its memory pool keeps what is freed (release threshold ∞): a step frees and re-allocates gigabytes
///   of activations, and with the default threshold every synchronisation handed them back to the
///   driver, so the next step paid to map them again;
/// - no per-buffer event tracking: cudarc creates two CUDA events for every allocation to order uses
///   across streams, but all our device work runs on candle's stream of the engine's thread (candle's
///   streams are per host thread: no other thread may create, use or drop device tensors), and the
///   NCCL stream is ordered with explicit events (`comm::nccl`), buffers outliving the collectives that
///   use them (`DeviceGather` and `DeviceGrads` make the compute stream wait before freeing).
fn prepared(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        use candle_core::cuda::cudarc::driver::sys;
        let ctx = d.cuda_stream().context().clone();
        // SAFETY: no buffer is used on two streams without the explicit events described above (cudarc
        // checks the flag at each use, so this covers buffers created before the call too).
        unsafe { ctx.disable_event_tracking() };
        if let Some(pool) = default_pool(&device) {
            let mut threshold = u64::MAX;
            // SAFETY: a valid pool and a u64 value, as the attribute requires. Failing only costs speed.
            unsafe { sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold as *mut u64).cast()) };
        }
    }
    device
}

/// The default memory pool of a CUDA device (the one candle allocates from).
#[cfg(feature = "cuda")]
fn default_pool(device: &Device) -> Option<candle_core::cuda::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda::cudarc::driver::sys;
    let Device::Cuda(d) = device else { return None };
    let ordinal = d.cuda_stream().context().ordinal();
    // SAFETY: plain driver queries on a device that candle has initialised.
    unsafe {
        let mut dev: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if sys::cuDeviceGet(&mut dev, ordinal as i32) != sys::CUresult::CUDA_SUCCESS || sys::cuDeviceGetDefaultMemPool(&mut pool, dev) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        Some(pool)
    }
}

/// Number of CUDA devices (0 without the `cuda` feature).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// The largest number of bytes the device's default memory pool (which candle allocates from) has
/// held since the process started; `None` on the CPU or without the `cuda` feature.
pub fn peak_device_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = default_pool(device) {
        use candle_core::cuda::cudarc::driver::sys;
        let mut value: u64 = 0;
        // SAFETY: a valid pool and a u64 out-value, as the attribute requires.
        let ok = unsafe { sys::cuMemPoolGetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut value as *mut u64).cast()) };
        return (ok == sys::CUresult::CUDA_SUCCESS).then_some(value);
    }
    let _ = device;
    None
}

/// Environment variable: `0` keeps gradient reductions of a CUDA run on the host collectives.
pub const ENV_NCCL: &str = "FERROSPEED_NCCL";

/// Whether a CUDA run of `world_size` ranks reduces gradients with NCCL: several ranks, each on its
/// own GPU (NCCL refuses two ranks on one GPU, so `FERROSPEED_SHARE_GPUS=1` keeps the host path; the
/// engine also checks that no two ranks picked the same GPU), and not switched off with `FERROSPEED_NCCL=0`.
pub fn use_nccl(device: &Device, world_size: usize) -> bool {
    device.is_cuda()
        && world_size > 1
        && !std::env::var(ENV_SHARE_GPUS).is_ok_and(|v| v == "1")
        && !std::env::var(ENV_NCCL).is_ok_and(|v| v == "0")
}

/// Free and total bytes of the device's memory (`None` on the CPU or without the `cuda` feature).
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let _ = d.cuda_stream().context().bind_to_thread();
        return candle_core::cuda::cudarc::driver::result::mem_get_info().ok().map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Bytes an unprivileged writer can still put on the file system of `path` (statvfs `f_bavail`).
pub fn disk_free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all zeros is a valid `statvfs` (plain integers) for the call to fill.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Host memory available to a new allocation (`MemAvailable` of /proc/meminfo), in bytes.
pub fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}
