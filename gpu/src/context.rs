//! The device context and the kernel registry.
//!
//! [`Gpu`] holds one CUDA context and stream, the device's [`Arch`], and a cache
//! `(Module, Arch) -> loaded module`: each module is compiled by NVRTC the first
//! time one of its functions is asked for and never again in this process.
//! Functions that take dynamic shared memory get their limit raised to the
//! requested size when fetched. Fetched functions are cached with the limit
//! already set, so a launch costs no driver call but the launch itself
//! (setting the attribute before every launch serialized short kernels).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::compile::{self, Module};
use crate::error::DrvExt;
use crate::{Arch, Error, Result};

/// Whether libcuda can be loaded on this machine (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: Arch,
    pub name: String,
    pub sm_count: i32,
    /// Shared memory one CTA may opt in to (bytes).
    pub smem_optin: usize,
    modules: Mutex<BTreeMap<(Module, Arch), Arc<CudaModule>>>,
    /// Loaded functions and the dynamic shared-memory limit set on each.
    functions: Mutex<BTreeMap<(Module, String), (CudaFunction, usize)>>,
    /// ptxas reports of the modules compiled so far.
    logs: Mutex<BTreeMap<Module, String>>,
    /// Split-K scratch: f32 partials and per-tile arrival counters (see
    /// [`Gpu::with_scratch`]).
    scratch: Mutex<Scratch>,
}

/// Device scratch shared by the launches of this context's one stream.
/// Counters are zero when allocated and every kernel that uses them leaves
/// them zero again, so they are never cleared between launches.
#[derive(Default)]
struct Scratch {
    f32s: Option<CudaSlice<f32>>,
    ctrs: Option<CudaSlice<u32>>,
}

impl Gpu {
    /// Open device `ordinal`. On a machine without libcuda or without a device
    /// this is [`Error::NoDevice`], never a panic.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDevice {
                reason: "libcuda.so could not be loaded (no NVIDIA driver on this machine)".into(),
            });
        }
        let count = std::panic::catch_unwind(CudaContext::device_count)
            .map_err(|_| Error::NoDevice {
                reason: "the CUDA driver library is missing required symbols".into(),
            })?
            .map_err(|e| Error::NoDevice {
                reason: format!("cuInit/cuDeviceGetCount failed: {e}"),
            })?;
        if count <= ordinal as i32 {
            return Err(Error::NoDevice {
                reason: format!("{count} CUDA device(s) visible, asked for ordinal {ordinal}"),
            });
        }
        if !compile::nvrtc_present() {
            return Err(Error::NoNvrtc {
                reason: "libnvrtc.so.13 could not be loaded".into(),
            });
        }
        let ctx = CudaContext::new(ordinal).drv("cuCtxCreate")?;
        let (major, minor) = ctx.compute_capability().drv("compute capability")?;
        let arch = Arch::for_capability(major, minor)?;
        let name = ctx.name().drv("device name")?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .drv("SM count")?;
        let smem_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .drv("shared memory per block (opt-in)")? as usize;
        // One stream, no cross-stream hazards: skip cudarc's per-argument event
        // records, which would otherwise sit inside every timed launch.
        // SAFETY: all work goes to `stream` below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            arch,
            name,
            sm_count,
            smem_optin,
            modules: Mutex::new(BTreeMap::new()),
            functions: Mutex::new(BTreeMap::new()),
            logs: Mutex::new(BTreeMap::new()),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// The loaded module, compiling it on first use.
    pub fn module(&self, m: Module) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().expect("module cache poisoned");
        if let Some(md) = mods.get(&(m, self.arch)) {
            return Ok(md.clone());
        }
        let c = match std::env::var_os("INFERLAB_CUBIN_DIR") {
            Some(dir) => compile::compile_cached(m, self.arch, std::path::Path::new(&dir))?,
            None => compile::compile(m, self.arch)?,
        };
        let md = self
            .ctx
            .load_module(Ptx::from_binary(c.cubin))
            .drv(&format!("loading module {}", m.name()))?;
        mods.insert((m, self.arch), md.clone());
        self.logs
            .lock()
            .expect("log cache poisoned")
            .insert(m, c.log);
        Ok(md)
    }

    /// A kernel function; `smem` > 0 sets its dynamic shared-memory limit to `smem`.
    pub fn function(&self, m: Module, name: &str, smem: usize) -> Result<CudaFunction> {
        let key = (m, name.to_string());
        if let Some((f, limit)) = self
            .functions
            .lock()
            .expect("function cache poisoned")
            .get(&key)
        {
            if *limit >= smem {
                return Ok(f.clone());
            }
        }
        let f = self
            .module(m)?
            .load_function(name)
            .drv(&format!("function {name} in {}", m.name()))?;
        // static + dynamic above 48 KiB needs the opt-in; the static part is not
        // known here, so any dynamic request raises the limit to what it asks
        if smem > 0 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .drv(&format!("raising shared memory of {name}"))?;
        }
        self.functions
            .lock()
            .expect("function cache poisoned")
            .insert(key, (f.clone(), smem));
        Ok(f)
    }

    /// ptxas's resource report for a compiled module (empty until compiled).
    pub fn compile_log(&self, m: Module) -> String {
        self.logs
            .lock()
            .expect("log cache poisoned")
            .get(&m)
            .cloned()
            .unwrap_or_default()
    }

    /// Run `f` with at least `nf` f32s and `nc` zeroed counters of scratch,
    /// grown (never shrunk) on demand. Everything goes to the one stream, so
    /// launches that share the scratch are ordered.
    pub fn with_scratch<R>(
        &self,
        nf: usize,
        nc: usize,
        f: impl FnOnce(&mut CudaSlice<f32>, &mut CudaSlice<u32>) -> Result<R>,
    ) -> Result<R> {
        let mut s = self.scratch.lock().expect("scratch poisoned");
        if s.f32s.as_ref().is_none_or(|b| b.len() < nf) {
            s.f32s = Some(self.stream.alloc_zeros(nf.max(1)).drv("scratch")?);
        }
        if s.ctrs.as_ref().is_none_or(|b| b.len() < nc) {
            s.ctrs = Some(self.stream.alloc_zeros(nc.max(1)).drv("scratch counters")?);
        }
        let Scratch { f32s, ctrs } = &mut *s;
        match (f32s.as_mut(), ctrs.as_mut()) {
            (Some(a), Some(c)) => f(a, c),
            _ => Err(Error::invalid("scratch", "not allocated".to_string())),
        }
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().drv("stream synchronize")
    }
}
