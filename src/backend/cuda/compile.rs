//! NVRTC compilation of `kernels/*.cu` to a CUBIN for the device present, with the
//! shape and topology baked in as `-D` constants, and an on-disk cache.
//!
//! No nvcc and no CUDA headers are needed: the kernels define every type they use.
//! Extra include directories may be given in `SWITCHYARD_CUDA_INCLUDE` (colon separated).
//! The cache lives in `SWITCHYARD_CACHE_DIR`, else `$XDG_CACHE_HOME/switchyard`, else
//! `~/.cache/switchyard`; entries are keyed by a hash of source, options, arch and NVRTC version.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys;

use crate::error::{Error, Result};

/// Environment variable naming the kernel cache directory.
pub const CACHE_DIR_ENV: &str = "SWITCHYARD_CACHE_DIR";
/// Environment variable with extra include directories for NVRTC (colon separated).
pub const INCLUDE_ENV: &str = "SWITCHYARD_CUDA_INCLUDE";

/// Extra `-D` definitions for the kernels, space separated (`SY_CUNROLL=8 SY_DUNROLL=4`): a
/// knob for kernel experiments, part of the cache key like every other option.
pub const DEFINES_ENV: &str = "SWITCHYARD_NVRTC_DEFINES";

/// `-D` options from `SWITCHYARD_NVRTC_DEFINES`.
pub fn extra_defines_from_env() -> Vec<String> {
    std::env::var(DEFINES_ENV).map(|v| v.split_whitespace().map(|d| format!("-D{d}")).collect()).unwrap_or_default()
}

/// The shared device header, handed to NVRTC as an in-memory header.
pub const COMMON_CUH: &str = include_str!("../../../kernels/common.cuh");
/// The intra-node kernels (notify, dispatch, combine).
pub const INTRANODE_CU: &str = include_str!("../../../kernels/intranode.cu");

/// Upper bound of channels (blocks) per dispatch/combine launch: sizes the flag slots.
pub const MAX_CHANNELS: usize = 256;
/// Threads per block of dispatch and combine.
pub const THREADS: usize = 512;
/// Threads of the single notify block.
pub const NOTIFY_THREADS: usize = 512;
/// Largest expert count the notify kernel supports (per-expert counts live in shared memory).
pub const MAX_EXPERTS: usize = 4096;

/// Everything a kernel build is specialized on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// Ranks in the node (2..=8; 1 compiles too).
    pub world: usize,
    /// Elements per row.
    pub hidden: usize,
    /// Top-k slots per token.
    pub topk: usize,
    /// Experts over all ranks.
    pub num_experts: usize,
    /// Dispatch input is FP8 with scales.
    pub x_fp8: bool,
    /// Rows travel (and land) as FP8 with scales.
    pub wire_fp8: bool,
}

impl KernelSpec {
    /// Reject specs the kernels cannot be built for, naming the argument.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &str, reason: String| Err(Error::InvalidArgument { arg: arg.into(), reason });
        if !(1..=8).contains(&self.world) {
            return bad("world", format!("{} ranks: the intra-node kernels take 1..=8", self.world));
        }
        if self.hidden == 0 || self.hidden % 8 != 0 {
            return bad("hidden", format!("{} is not a positive multiple of 8 (rows move as 16-byte vectors)", self.hidden));
        }
        if (self.x_fp8 || self.wire_fp8) && self.hidden % 128 != 0 {
            return Err(Error::HiddenNotMultipleOf128 { arg: "x", hidden: self.hidden });
        }
        if self.x_fp8 && !self.wire_fp8 {
            return bad("wire_fp8", "FP8 input travels as FP8".into());
        }
        // k may exceed the expert count when some slots are -1: a node-local dispatch of the
        // hierarchical route keeps all k slots of a token, with only this node's experts set.
        if self.topk == 0 {
            return bad("topk", "k must be >= 1".into());
        }
        if self.num_experts == 0 || self.num_experts % self.world != 0 || self.num_experts > MAX_EXPERTS {
            return bad(
                "num_experts",
                format!("{} must split evenly over {} ranks and be at most {MAX_EXPERTS}", self.num_experts, self.world),
            );
        }
        Ok(())
    }

    /// The `-D` definitions of this spec.
    pub fn defines(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SY_WORLD", self.world.to_string()),
            ("SY_HIDDEN", self.hidden.to_string()),
            ("SY_TOPK", self.topk.to_string()),
            ("SY_NUM_EXPERTS", self.num_experts.to_string()),
            ("SY_X_FP8", u8::from(self.x_fp8).to_string()),
            ("SY_WIRE_FP8", u8::from(self.wire_fp8).to_string()),
            ("SY_MAX_CHANNELS", MAX_CHANNELS.to_string()),
            ("SY_THREADS", THREADS.to_string()),
        ]
    }

    /// Short name for logs and cache file names, e.g. `w2_h7168_k8_e256_bf16-fp8`.
    pub fn name(&self) -> String {
        let t = |b: bool| if b { "fp8" } else { "bf16" };
        format!("w{}_h{}_k{}_e{}_{}-{}", self.world, self.hidden, self.topk, self.num_experts, t(self.x_fp8), t(self.wire_fp8))
    }
}

/// NVRTC options for a spec and an arch such as `sm_90a`.
///
/// IEEE division and no flush-to-zero are required: the in-kernel FP8 cast must
/// match `quant.rs` bit for bit, and that rule divides and multiplies in plain f32.
pub fn nvrtc_options(spec: &KernelSpec, arch: &str, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
        "--fmad=false".to_string(),
        "--device-as-default-execution-space".to_string(),
        // ptxas resource report (registers, spills, shared memory) lands in the program log.
        "--ptxas-options=--verbose".to_string(),
    ];
    o.extend(spec.defines().into_iter().map(|(k, v)| format!("-D{k}={v}")));
    o.extend(include_dirs.iter().map(|d| format!("-I{}", d.display())));
    o
}

/// Include directories from `SWITCHYARD_CUDA_INCLUDE`.
pub fn include_dirs_from_env() -> Vec<PathBuf> {
    std::env::var_os(INCLUDE_ENV)
        .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default()
}

/// Whether libnvrtc can be loaded. Check this before any other NVRTC call:
/// cudarc panics when the library is missing.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library under its candidate names.
    unsafe { sys::is_culib_present() }
}

fn nvrtc_err(what: &str, r: sys::nvrtcResult) -> Error {
    Error::Cuda(format!("NVRTC {what} failed: {r:?}"))
}

/// NVRTC version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(unavailable());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: library present (checked); out-pointers are valid.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcVersion", r));
    }
    Ok((major, minor))
}

fn unavailable() -> Error {
    Error::BackendUnavailable {
        backend: "cuda",
        reason:
            "libnvrtc not found (install nvidia-cuda-nvrtc or put libnvrtc.so on LD_LIBRARY_PATH; see scripts/install-nvrtc.sh)"
                .into(),
    }
}

/// A compiled kernel image.
#[derive(Debug, Clone)]
pub struct Cubin {
    /// The ELF image, ready for `cuModuleLoadData`.
    pub image: Vec<u8>,
    /// NVRTC's log (warnings and the ptxas resource report).
    pub log: String,
    /// Cache key (hex).
    pub key: String,
    /// Whether it came from the disk cache.
    pub from_cache: bool,
}

impl Cubin {
    /// Registers, stack, spills and shared memory of each kernel (from the ptxas report,
    /// which the cache keeps beside the image).
    pub fn resources(&self) -> Vec<KernelResources> {
        parse_ptxas_report(&self.log)
    }
}

/// Compile `INTRANODE_CU` for `spec` and `arch`, through the disk cache.
pub fn compile_intranode(spec: &KernelSpec, arch: &str) -> Result<Cubin> {
    spec.validate()?;
    let includes = include_dirs_from_env();
    let mut opts = nvrtc_options(spec, arch, &includes);
    opts.extend(extra_defines_from_env());
    let version = nvrtc_version()?;
    let key = cache_key(&[INTRANODE_CU, COMMON_CUH], &opts, arch, version);
    let dir = cache_dir();
    let path = dir.as_ref().map(|d| d.join(format!("{}-{key}.cubin", spec.name())));
    if let Some(p) = &path {
        if let Ok(image) = std::fs::read(p) {
            if image.starts_with(b"\x7fELF") {
                tracing::debug!(path = %p.display(), "kernel cache hit");
                let log = std::fs::read_to_string(p.with_extension("log")).unwrap_or_default();
                return Ok(Cubin { image, log, key, from_cache: true });
            }
            tracing::warn!(path = %p.display(), "ignoring a corrupt kernel cache entry");
        }
    }
    let start = std::time::Instant::now();
    let (image, log) = nvrtc_compile_cubin(INTRANODE_CU, "intranode.cu", &[("common.cuh", COMMON_CUH)], &opts)?;
    tracing::info!(spec = %spec.name(), arch, ms = start.elapsed().as_millis() as u64, bytes = image.len(), "compiled kernels");
    if let Some(p) = &path {
        let stored = store_atomically(&p.with_extension("log"), log.as_bytes()).and_then(|_| store_atomically(p, &image));
        if let Err(e) = stored {
            tracing::warn!(path = %p.display(), error = %e, "could not write the kernel cache");
        }
    }
    Ok(Cubin { image, log, key, from_cache: false })
}

fn store_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Write then rename: concurrent processes never see a half-written cubin.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// The kernel cache directory: `SWITCHYARD_CACHE_DIR`, `$XDG_CACHE_HOME/switchyard`
/// or `~/.cache/switchyard`; `None` when none can be named.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(
        std::env::var_os(CACHE_DIR_ENV).map(PathBuf::from),
        std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn cache_dir_from(explicit: Option<PathBuf>, xdg: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    let nonempty = |p: &PathBuf| !p.as_os_str().is_empty();
    explicit
        .filter(nonempty)
        .or_else(|| xdg.filter(nonempty).map(|x| x.join("switchyard")))
        .or_else(|| home.filter(nonempty).map(|h| h.join(".cache").join("switchyard")))
}

/// Hex key of sources, options, arch and NVRTC version: two independent 64-bit
/// FNV-1a hashes (stable across Rust versions, unlike `DefaultHasher`).
pub fn cache_key(sources: &[&str], options: &[String], arch: &str, nvrtc: (i32, i32)) -> String {
    let mut a = Fnv(0xcbf2_9ce4_8422_2325);
    let mut b = Fnv(0x6c62_272e_07bb_0142);
    let mut feed = |bytes: &[u8]| {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        a.write(&(bytes.len() as u64).to_le_bytes());
        a.write(bytes);
        b.write(&(bytes.len() as u64).to_le_bytes());
        b.write(bytes);
    };
    for s in sources {
        feed(s.as_bytes());
    }
    for o in options {
        feed(o.as_bytes());
    }
    feed(arch.as_bytes());
    feed(format!("nvrtc{}.{}", nvrtc.0, nvrtc.1).as_bytes());
    format!("{:016x}{:016x}", a.0, b.0)
}

/// Hash of the code of the kernel sources this build carries (no options, arch or NVRTC
/// version): a tuned config records it, so timings taken with other kernels are recognised as
/// stale. Comments and the spacing within lines do not count ([`code_of`]): editing them
/// changes no timing, so it need not send anyone back to the GPU machine to re-tune.
pub fn kernel_source_hash() -> String {
    let code = [code_of(COMMON_CUH), code_of(INTRANODE_CU)];
    cache_key(&[&code[0], &code[1]], &[], "", (0, 0))[..16].to_string()
}

/// `src` (C / CUDA) without its comments, each line trimmed with runs of spaces and tabs
/// inside it made one space, and with no blank lines. A `//` or `/*` inside a string or
/// character literal (inline PTX lives in them) is not a comment; the literals' spaces shrink
/// like the rest. Line breaks between code stay, as the preprocessor sees them.
fn code_of(src: &str) -> String {
    let mut text = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => while chars.next_if(|&n| n != '\n').is_some() {},
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                // A block comment counts as a space, as in C; its line breaks go with it.
                for n in chars.by_ref() {
                    if last == '*' && n == '/' {
                        break;
                    }
                    last = n;
                }
                text.push(' ');
            }
            '"' | '\'' => {
                text.push(c);
                while let Some(n) = chars.next() {
                    text.push(n);
                    if n == '\\' {
                        text.extend(chars.next());
                    } else if n == c || n == '\n' {
                        break;
                    }
                }
            }
            _ => text.push(c),
        }
    }
    let lines = text.lines().map(|l| l.split([' ', '\t']).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" "));
    lines.filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
}

struct Fnv(u64);
impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &x in bytes {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Owns an `nvrtcProgram` so every exit path destroys it.
struct Program(sys::nvrtcProgram);
impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// Compile `source` with in-memory `headers` to a CUBIN; returns the image and the log.
/// The arch in `options` must be a real one (`sm_*`), not `compute_*`, for a CUBIN to exist.
pub fn nvrtc_compile_cubin(source: &str, name: &str, headers: &[(&str, &str)], options: &[String]) -> Result<(Vec<u8>, String)> {
    if !nvrtc_available() {
        return Err(unavailable());
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| Error::Cuda(format!("NVRTC input `{name}` contains a NUL byte")));
    let src = cstr(source)?;
    let cname = cstr(name)?;
    let hdr_src: Vec<CString> = headers.iter().map(|(_, s)| cstr(s)).collect::<Result<_>>()?;
    let hdr_name: Vec<CString> = headers.iter().map(|(n, _)| cstr(n)).collect::<Result<_>>()?;
    let hdr_src_p: Vec<*const c_char> = hdr_src.iter().map(|c| c.as_ptr()).collect();
    let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = options.iter().map(|o| cstr(o)).collect::<Result<_>>()?;
    let opts_p: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut raw = std::mem::MaybeUninit::uninit();
    // SAFETY: all pointers point into CStrings that outlive the program.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            raw.as_mut_ptr(),
            src.as_ptr(),
            cname.as_ptr(),
            headers.len() as i32,
            hdr_src_p.as_ptr(),
            hdr_name_p.as_ptr(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcCreateProgram", r));
    }
    // SAFETY: creation succeeded.
    let prog = Program(unsafe { raw.assume_init() });
    // SAFETY: program valid, options valid C strings.
    let compiled = unsafe { sys::nvrtcCompileProgram(prog.0, opts_p.len() as i32, opts_p.as_ptr()) };
    let log = program_log(&prog);
    if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Cuda(format!("NVRTC failed to compile {name} ({compiled:?}):\n{log}")));
    }
    let mut size = 0usize;
    // SAFETY: program compiled.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBINSize", r));
    }
    if size == 0 {
        return Err(Error::Cuda(format!("NVRTC produced no CUBIN for {name} (is the arch a real sm_* one?)")));
    }
    let mut image = vec![0u8; size];
    // SAFETY: buffer has the size NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(prog.0, image.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBIN", r));
    }
    Ok((image, log))
}

fn program_log(prog: &Program) -> String {
    let mut size = 0usize;
    // SAFETY: valid program.
    if unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: buffer of the reported size.
    if unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) } != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    while buf.last() == Some(&0) {
        buf.pop();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Resource use of one kernel, as ptxas reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// Kernel (entry function) name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Stack frame bytes per thread.
    pub stack_bytes: u32,
    /// Spill store bytes.
    pub spill_stores: u32,
    /// Spill load bytes.
    pub spill_loads: u32,
    /// Static shared memory bytes.
    pub smem_bytes: u32,
}

/// Parse the `ptxas --verbose` report in an NVRTC log into per-kernel resources
/// (no cuobjdump needed). Non-entry functions are skipped.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    fn num_before(line: &str, unit: &str) -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    }
    let mut out: Vec<KernelResources> = Vec::new();
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources { name, ..Default::default() });
            current = Some(out.len() - 1);
        } else if line.contains("Function properties for ") {
            // Properties of a callee, or of the entry just announced.
            let name = line.rsplit("Function properties for ").next().unwrap_or("").trim();
            current = out.iter().position(|k| k.name == name);
        } else if let Some(k) = current.map(|i| &mut out[i]) {
            if line.contains("bytes stack frame") {
                k.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                k.registers = num_before(line, "registers").unwrap_or(0);
                k.smem_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// The CUDA arch name NVRTC wants for a compute capability: `sm_90a` for 9.0 (the
/// arch-specific variant, for the Hopper-only instructions), `sm_XY` otherwise.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KernelSpec {
        KernelSpec { world: 2, hidden: 7168, topk: 8, num_experts: 256, x_fp8: false, wire_fp8: true }
    }

    #[test]
    fn options_carry_every_define_and_the_arch() {
        let o = nvrtc_options(&spec(), "sm_90a", &[PathBuf::from("/inc")]);
        for want in [
            "--gpu-architecture=sm_90a",
            "-DSY_WORLD=2",
            "-DSY_HIDDEN=7168",
            "-DSY_TOPK=8",
            "-DSY_NUM_EXPERTS=256",
            "-DSY_X_FP8=0",
            "-DSY_WIRE_FP8=1",
            "-I/inc",
            "--ftz=false",
            "--prec-div=true",
        ] {
            assert!(o.iter().any(|x| x == want), "missing {want} in {o:?}");
        }
    }

    #[test]
    fn the_kernel_hash_ignores_comments_and_spacing_but_not_code() {
        let src = "#define A 1 // one\n/* a\n   block */ int  f() {\n\n  return \"//x\"[0] + '/';\n}\n";
        let same = "#define A 1\n int f() { // reflowed\n\treturn \"//x\"[0]  + '/';\n}";
        assert_eq!(code_of(src), "#define A 1\nint f() {\nreturn \"//x\"[0] + '/';\n}");
        assert_eq!(code_of(src), code_of(same));
        for changed in [
            "#define A 2\nint f() {\nreturn \"//x\"[0] + '/';\n}",
            "#define A 1\nint f() {\nreturn \"// x\"[0] + '/';\n}",
            "#define A\n1\nint f() {\nreturn \"//x\"[0] + '/';\n}",
            "#define A 1\nint f() {\nreturn \"\\\"//x\"[0] + '/';\n}",
        ] {
            assert_ne!(code_of(src), code_of(changed), "{changed}");
        }
        // An escaped quote does not end the literal, so what follows it stays code.
        assert_eq!(code_of("s = \"a\\\" // b\"; // c"), "s = \"a\\\" // b\";");
        // The shipped sources keep their inline PTX strings whole.
        assert!(code_of(COMMON_CUH).contains(r#"asm volatile("fence.acq_rel.sys;" : : : "memory");"#));
        for code in [code_of(COMMON_CUH), code_of(INTRANODE_CU)] {
            assert!(code.lines().all(|l| !l.contains("//") && !l.contains("/*")), "a comment survived");
        }
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let o = nvrtc_options(&spec(), "sm_90a", &[]);
        let k = cache_key(&["src", "hdr"], &o, "sm_90a", (13, 0));
        assert_eq!(k.len(), 32);
        assert_eq!(k, cache_key(&["src", "hdr"], &o, "sm_90a", (13, 0)), "deterministic");
        assert_ne!(k, cache_key(&["src!", "hdr"], &o, "sm_90a", (13, 0)));
        assert_ne!(k, cache_key(&["sr", "chdr"], &o, "sm_90a", (13, 0)), "boundaries matter");
        assert_ne!(k, cache_key(&["src", "hdr"], &o, "sm_100a", (13, 0)));
        assert_ne!(k, cache_key(&["src", "hdr"], &o, "sm_90a", (13, 1)));
        let o2 = nvrtc_options(&KernelSpec { hidden: 4096, ..spec() }, "sm_90a", &[]);
        assert_ne!(k, cache_key(&["src", "hdr"], &o2, "sm_90a", (13, 0)));
    }

    #[test]
    fn cache_dir_resolution_order() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(cache_dir_from(p("/x"), p("/xdg"), p("/home/u")), p("/x"));
        assert_eq!(cache_dir_from(None, p("/xdg"), p("/home/u")), p("/xdg/switchyard"));
        assert_eq!(cache_dir_from(p(""), None, p("/home/u")), p("/home/u/.cache/switchyard"));
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    #[test]
    fn specs_the_kernels_cannot_take_are_rejected() {
        assert!(spec().validate().is_ok());
        assert!(KernelSpec { world: 9, ..spec() }.validate().is_err());
        assert!(KernelSpec { hidden: 100, wire_fp8: false, ..spec() }.validate().is_err());
        assert!(matches!(KernelSpec { hidden: 136, ..spec() }.validate(), Err(Error::HiddenNotMultipleOf128 { .. })));
        assert!(KernelSpec { hidden: 136, wire_fp8: false, ..spec() }.validate().is_ok());
        assert!(KernelSpec { num_experts: 255, ..spec() }.validate().is_err());
        assert!(KernelSpec { x_fp8: true, wire_fp8: false, ..spec() }.validate().is_err());
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 9), "sm_89");
        assert_eq!(arch_for(10, 0), "sm_100");
    }

    #[test]
    fn ptxas_report_is_parsed_per_entry() {
        let log = "ptxas info    : Compiling entry function 'sy_combine' for 'sm_90a'
ptxas info    : Function properties for sy_combine
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 58 registers, used 1 barriers, 8 bytes cumulative stack size, 4 bytes smem
ptxas info    : Function properties for _Z17helper
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'sy_notify' for 'sm_90a'
ptxas info    : Function properties for sy_notify
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 5132 bytes smem
";
        let r = parse_ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                name: "sy_combine".into(),
                registers: 58,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12,
                smem_bytes: 4
            }
        );
        assert_eq!((r[1].name.as_str(), r[1].registers, r[1].smem_bytes, r[1].stack_bytes), ("sy_notify", 40, 5132, 0));
    }
}
