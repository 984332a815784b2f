//! Kernel sources and their NVRTC compilation.
//!
//! Every module is `common.cuh` + one `.cu` file, embedded with `include_str!`
//! (the binary carries its kernels; nothing is read from disk at run time).
//! NVRTC is asked for a CUBIN for a concrete `sm_XY[a]`, so ptxas runs inside
//! NVRTC and inline-PTX mistakes surface as compile errors with the full log,
//! not as module-load failures. NVRTC needs no GPU, so the same path compiles
//! every module for sm_80 and sm_90a in a host-side test wherever libnvrtc is
//! installed (`compile_all_archs`).

use std::ffi::{CStr, CString};

use cudarc::nvrtc::sys;

use crate::{Arch, Error, Result};

const COMMON: &str = include_str!("../kernels/common.cuh");

/// The kernel modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    Prefill,
    Decode,
    W4a16,
    Sampler,
    Elementwise,
}

impl Module {
    pub const ALL: [Module; 5] = [
        Module::Prefill,
        Module::Decode,
        Module::W4a16,
        Module::Sampler,
        Module::Elementwise,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Module::Prefill => "prefill",
            Module::Decode => "decode",
            Module::W4a16 => "w4a16",
            Module::Sampler => "sampler",
            Module::Elementwise => "elementwise",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Module::Prefill => include_str!("../kernels/prefill.cu"),
            Module::Decode => include_str!("../kernels/decode.cu"),
            Module::W4a16 => include_str!("../kernels/w4a16.cu"),
            Module::Sampler => include_str!("../kernels/sampler.cu"),
            Module::Elementwise => include_str!("../kernels/elementwise.cu"),
        }
    }

    /// The full translation unit handed to NVRTC.
    pub fn source(self) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", self.name(), self.body())
    }

    fn options(self, arch: Arch) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={}", arch.target()),
            "-std=c++17".to_string(),
            "--ptxas-options=-v".to_string(),
        ];
        if self == Module::Sampler {
            // bit-identical f32 sums and products: no fused multiply-add
            o.push("--fmad=false".to_string());
        }
        o
    }
}

/// A compiled module: the CUBIN and NVRTC's log (ptxas resource usage).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Whether libnvrtc can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

fn nvrtc_err(module: Module, arch: Arch, what: &str, r: sys::nvrtcResult) -> Error {
    Error::Compile {
        module: module.name().to_string(),
        arch: arch.target(),
        log: format!("{what} returned {r:?}"),
    }
}

/// Compile `module` for `arch` to a CUBIN. A rejected program returns
/// [`Error::Compile`] with NVRTC's log.
pub fn compile(module: Module, arch: Arch) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(Error::NoNvrtc {
            reason: "libnvrtc could not be loaded (set LD_LIBRARY_PATH to the CUDA 13 lib dir)"
                .into(),
        });
    }
    let src = CString::new(module.source()).expect("kernel sources contain no NUL");
    let name = CString::new(format!("{}.cu", module.name())).unwrap();
    let opts: Vec<CString> = module
        .options(arch)
        .into_iter()
        .map(|o| CString::new(o).unwrap())
        .collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    use sys::nvrtcResult::NVRTC_SUCCESS as OK;
    // SAFETY: FFI calls with valid NUL-terminated strings that outlive the program;
    // the program is destroyed on every path below.
    unsafe {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        let r = sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != OK {
            return Err(nvrtc_err(module, arch, "nvrtcCreateProgram", r));
        }
        let rc = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let mut log_size = 0usize;
        sys::nvrtcGetProgramLogSize(prog, &mut log_size);
        let mut log_buf = vec![0u8; log_size.max(1)];
        sys::nvrtcGetProgramLog(prog, log_buf.as_mut_ptr() as *mut _);
        let log = CStr::from_bytes_until_nul(&log_buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        if rc != OK {
            sys::nvrtcDestroyProgram(&mut prog);
            return Err(Error::Compile {
                module: module.name().to_string(),
                arch: arch.target(),
                log,
            });
        }
        let mut size = 0usize;
        let r = sys::nvrtcGetCUBINSize(prog, &mut size);
        if r != OK {
            sys::nvrtcDestroyProgram(&mut prog);
            return Err(nvrtc_err(module, arch, "nvrtcGetCUBINSize", r));
        }
        let mut cubin = vec![0u8; size];
        let r = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _);
        sys::nvrtcDestroyProgram(&mut prog);
        if r != OK {
            return Err(nvrtc_err(module, arch, "nvrtcGetCUBIN", r));
        }
        Ok(Compiled { cubin, log })
    }
}

/// FNV-1a 64 of a module's source and options: the key of a cached CUBIN
/// (stable across machines, so a cache filled elsewhere with the same NVRTC
/// inputs is found).
pub fn cache_key(module: Module, arch: Arch) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(module.source().as_bytes());
    for o in module.options(arch) {
        eat(&[0]);
        eat(o.as_bytes());
    }
    format!("{}-{}-{h:016x}.cubin", module.name(), arch.target())
}

/// [`compile`] through an on-disk cache in `dir` (`INFERLAB_CUBIN_DIR`): a
/// CUBIN whose key matches this source and options is loaded instead of
/// compiled; a fresh compile is stored (best effort). Saves the lent device
/// the NVRTC time of every process after the first.
pub fn compile_cached(module: Module, arch: Arch, dir: &std::path::Path) -> Result<Compiled> {
    let path = dir.join(cache_key(module, arch));
    if let Ok(cubin) = std::fs::read(&path) {
        let log = std::fs::read_to_string(path.with_extension("log")).unwrap_or_default();
        return Ok(Compiled { cubin, log });
    }
    let c = compile(module, arch)?;
    let tmp = path.with_extension("tmp");
    if std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, &c.cubin).is_ok() {
        let _ = std::fs::write(path.with_extension("log"), &c.log);
        let _ = std::fs::rename(&tmp, &path);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills the CUBIN cache in `INFERLAB_CUBIN_DIR` with every module for
    /// sm_90a on a machine with NVRTC and no GPU, so that a lent device's call
    /// (carrying that folder) loads them instead of spending NVRTC time. By hand:
    /// `cargo test --release -p inferlab-gpu fill_cubin_cache -- --ignored`.
    #[test]
    #[ignore]
    fn fill_cubin_cache() {
        let Some(dir) = std::env::var_os("INFERLAB_CUBIN_DIR") else {
            panic!("set INFERLAB_CUBIN_DIR");
        };
        for m in Module::ALL {
            let c = compile_cached(m, Arch::SM90A, std::path::Path::new(&dir))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(c.cubin.len() > 1000);
            eprintln!("{}", cache_key(m, Arch::SM90A));
        }
    }

    /// Every module compiles (through ptxas) for A100 and H100. Needs libnvrtc
    /// (no GPU): skipped, loudly, where it is absent.
    #[test]
    fn compile_all_archs() {
        if !nvrtc_present() {
            eprintln!("SKIP compile_all_archs: libnvrtc not found");
            return;
        }
        // INFERLAB_NVRTC_ONLY=prefill,w4a16 narrows the (slow) sweep while editing
        let only = std::env::var("INFERLAB_NVRTC_ONLY").unwrap_or_default();
        let arch_only = std::env::var("INFERLAB_NVRTC_ARCH").unwrap_or_default();
        for arch in [Arch::SM80, Arch::SM90A] {
            if !arch_only.is_empty() && arch.target() != arch_only {
                continue;
            }
            for m in Module::ALL {
                if !only.is_empty() && !only.split(',').any(|o| o == m.name()) {
                    continue;
                }
                let c = compile(m, arch).unwrap_or_else(|e| panic!("{e}"));
                assert!(c.cubin.len() > 1000, "{} {arch}: tiny cubin", m.name());
                // ptxas's resource report (registers, spills), shown with --nocapture
                for line in c.log.lines().filter(|l| {
                    l.contains("spill") || l.contains("Used") || l.contains("Compiling entry")
                }) {
                    eprintln!("{} {arch}: {line}", m.name());
                }
            }
        }
    }

    /// The cache key is FNV-1a 64 over the source, then NUL + each option
    /// (what an outside filler computes too); `INFERLAB_PRINT_CUBIN_KEY`
    /// prints the w4a16 sm_90a key.
    #[test]
    fn cache_key_names_module_arch_and_inputs() {
        let k = cache_key(Module::W4a16, Arch::SM90A);
        assert!(
            k.starts_with("w4a16-sm_90a-") && k.ends_with(".cubin"),
            "{k}"
        );
        assert_ne!(k, cache_key(Module::W4a16, Arch::SM80));
        assert_ne!(k, cache_key(Module::Decode, Arch::SM90A));
        if std::env::var_os("INFERLAB_PRINT_CUBIN_KEY").is_some() {
            eprintln!("{k}");
        }
    }

    #[test]
    fn compile_error_carries_log() {
        if !nvrtc_present() {
            eprintln!("SKIP compile_error_carries_log: libnvrtc not found");
            return;
        }
        // Not a Module: drive the same FFI path through a broken source.
        let err = compile_src(
            "broken",
            "extern \"C\" __global__ void f() { undeclared_thing(); }",
        );
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("undeclared_thing"), "{msg}");
    }

    fn compile_src(name: &str, src: &str) -> Result<()> {
        let src = CString::new(src).unwrap();
        let name_c = CString::new(name).unwrap();
        let opt = CString::new("--gpu-architecture=sm_80").unwrap();
        let opts = [opt.as_ptr()];
        unsafe {
            let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name_c.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            let rc = sys::nvrtcCompileProgram(prog, 1, opts.as_ptr());
            let mut n = 0usize;
            sys::nvrtcGetProgramLogSize(prog, &mut n);
            let mut buf = vec![0u8; n.max(1)];
            sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut _);
            sys::nvrtcDestroyProgram(&mut prog);
            if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(Error::Compile {
                    module: name.into(),
                    arch: "sm_80".into(),
                    log: String::from_utf8_lossy(&buf).into_owned(),
                });
            }
        }
        Ok(())
    }
}
