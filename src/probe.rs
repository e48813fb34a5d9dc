//! What CUDA this machine offers: which of libcuda / libnvrtc / libnccl can be
//! loaded (and where the files are), the GPUs the driver sees, and their peer
//! access matrix. Used by `switchyard info` and `--backend auto`.
//!
//! Never panics on a machine without CUDA: cudarc's safe constructors panic when
//! a library is missing, so every driver call here is made only after
//! `is_culib_present()` said the library loads, and inside `catch_unwind` in
//! case a symbol is missing from an old driver.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One CUDA library the runtime loads at run time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LibraryStatus {
    /// Short name: "libcuda", "libnvrtc", "libnccl" or "libcublas".
    pub name: String,
    /// What it is for.
    pub purpose: String,
    /// Whether the dynamic loader can open it (cudarc's `is_culib_present`).
    pub loadable: bool,
    /// Files named `lib<name>.so*` in `LD_LIBRARY_PATH` and the usual system
    /// library directories ([`SYSTEM_LIB_DIRS`]). May be empty even when
    /// loadable (found through the loader cache elsewhere), and non-empty when
    /// not (e.g. only `libnccl.so.2`, a name cudarc does not ask for).
    pub paths: Vec<PathBuf>,
}

/// One GPU the CUDA driver reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuInfo {
    /// Device ordinal.
    pub index: usize,
    /// Device name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// Device memory in bytes.
    pub total_mem_bytes: u64,
}

/// Everything [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    /// libcuda, libnvrtc, libnccl, libcublas, in that order.
    pub libraries: Vec<LibraryStatus>,
    /// GPUs the driver reports (empty without a driver).
    pub gpus: Vec<GpuInfo>,
    /// `peer_access[i][j]`: GPU `i` can map GPU `j`'s memory (`cuDeviceCanAccessPeer`);
    /// the diagonal is true.
    pub peer_access: Vec<Vec<bool>>,
    /// The driver loads, initialises and reports at least one GPU, and NVRTC loads.
    /// (Whether a CUDA *backend* exists is a separate question: see [`resolve_backend`].)
    pub cuda_usable: bool,
    /// Why CUDA is or is not usable, in one sentence.
    pub reason: String,
}

impl Probe {
    /// One line: each library loadable or not, and the GPU count.
    pub fn summary(&self) -> String {
        let libs: Vec<String> = self
            .libraries
            .iter()
            .map(|l| {
                format!(
                    "{} {}",
                    l.name,
                    if l.loadable {
                        "loads"
                    } else if l.paths.is_empty() {
                        "missing"
                    } else {
                        "present but not loadable"
                    }
                )
            })
            .collect();
        format!("{}, {} GPU(s)", libs.join(", "), self.gpus.len())
    }

    /// The status of the library with this short name ("libcuda", ...), if probed.
    pub fn library(&self, name: &str) -> Option<&LibraryStatus> {
        self.libraries.iter().find(|l| l.name == name)
    }
}

/// Library directories searched for the files (after `LD_LIBRARY_PATH`).
pub const SYSTEM_LIB_DIRS: &[&str] = &[
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib64",
    "/lib",
    "/usr/lib/wsl/lib",
];

/// Directories to search: `LD_LIBRARY_PATH` entries, then [`SYSTEM_LIB_DIRS`], without duplicates.
pub fn library_search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    dirs.extend(SYSTEM_LIB_DIRS.iter().map(PathBuf::from));
    let mut seen = Vec::new();
    dirs.retain(|d| {
        if seen.contains(d) {
            false
        } else {
            seen.push(d.clone());
            true
        }
    });
    dirs
}

/// Files in `dirs` whose name starts with `<stem>.so` (e.g. `libnccl.so`, `libnccl.so.2`),
/// in search order. cudarc opens only some of these names (see
/// `cudarc::get_lib_name_candidates`); the others are listed to explain a miss.
pub fn find_library_files(dirs: &[PathBuf], stem: &str) -> Vec<PathBuf> {
    let prefix = format!("{stem}.so");
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut here: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
            .map(|e| e.path())
            .collect();
        here.sort();
        for p in here {
            if !found.contains(&p) {
                found.push(p);
            }
        }
    }
    found
}

fn library_status(name: &str, cudarc_name: &str, purpose: &str, loadable: bool, dirs: &[PathBuf]) -> LibraryStatus {
    LibraryStatus {
        name: name.into(),
        purpose: purpose.into(),
        loadable,
        paths: find_library_files(dirs, &format!("lib{cudarc_name}")),
    }
}

/// Probe the machine. Cheap (a few `dlopen`s, and with a driver a few device
/// queries); never panics.
pub fn probe() -> Probe {
    let dirs = library_search_dirs();
    // SAFETY: these only try `dlopen` on fixed library names and close them again.
    let cuda = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false);
    let nvrtc = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false);
    let nccl = std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }).unwrap_or(false);
    let cublas = crate::backend::cuda::gemm::cublas_available();
    let libraries = vec![
        library_status("libcuda", "cuda", "CUDA driver", cuda, &dirs),
        library_status("libnvrtc", "nvrtc", "run-time kernel compiler", nvrtc, &dirs),
        library_status("libnccl", "nccl", "inter-node transport", nccl, &dirs),
        library_status("libcublas", "cublas", "GEMM of bench --interference", cublas, &dirs),
    ];
    let mut gpus = Vec::new();
    let mut peer_access = Vec::new();
    let reason;
    if !cuda {
        reason = "libcuda (the CUDA driver) cannot be loaded".to_string();
    } else {
        match std::panic::catch_unwind(query_driver) {
            Ok(Ok((g, p))) => {
                gpus = g;
                peer_access = p;
                reason = if gpus.is_empty() {
                    "the CUDA driver reports no GPU".into()
                } else if !nvrtc {
                    format!("{} GPU(s) found, but libnvrtc (needed to compile the kernels) cannot be loaded", gpus.len())
                } else {
                    format!("{} GPU(s) found, libcuda and libnvrtc load", gpus.len())
                };
            }
            Ok(Err(e)) => reason = format!("the CUDA driver loads but fails: {e}"),
            Err(_) => reason = "the CUDA driver loads but a driver call panicked (missing symbol?)".into(),
        }
    }
    let cuda_usable = cuda && nvrtc && !gpus.is_empty();
    Probe { libraries, gpus, peer_access, cuda_usable, reason }
}

/// Device list and peer matrix. Only call when libcuda is present.
fn query_driver() -> std::result::Result<(Vec<GpuInfo>, Vec<Vec<bool>>), String> {
    use cudarc::driver::{result, sys};
    result::init().map_err(|e| format!("cuInit: {e:?}"))?;
    let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?.max(0) as usize;
    let mut devs = Vec::with_capacity(n);
    let mut gpus = Vec::with_capacity(n);
    for i in 0..n {
        let dev = result::device::get(i as i32).map_err(|e| format!("cuDeviceGet({i}): {e:?}"))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "<unknown>".into());
        // SAFETY: `dev` was returned by cuDeviceGet.
        let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap_or(-1);
        let cc = (
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
        // SAFETY: as above.
        let total_mem_bytes = unsafe { result::device::total_mem(dev) }.unwrap_or(0) as u64;
        devs.push(dev);
        gpus.push(GpuInfo { index: i, name, compute_capability: cc, sm_count, total_mem_bytes });
    }
    let mut peer = vec![vec![false; n]; n];
    for i in 0..n {
        for j in 0..n {
            if i == j {
                peer[i][j] = true;
                continue;
            }
            let mut can: std::ffi::c_int = 0;
            // SAFETY: both devices come from cuDeviceGet; `can` is a valid out pointer.
            let r = unsafe { sys::cuDeviceCanAccessPeer(&mut can, devs[i], devs[j]) };
            peer[i][j] = r == sys::CUresult::CUDA_SUCCESS && can != 0;
        }
    }
    Ok((gpus, peer))
}

/// Backend the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The CPU reference backend (threads as ranks).
    Cpu,
    /// The CUDA backend (peer-mapped buffers over NVLink inside a node; several nodes through the two-hop route).
    Cuda,
    /// CUDA if it is usable here, else CPU.
    Auto,
}

/// A backend that can actually run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend.
    Cuda,
}

impl BackendKind {
    /// Lower-case name, as in results.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// Turn a choice into a runnable backend plus a one-line reason for the choice.
/// `probe` is consulted only for `Cuda` and `Auto` (pass a closure so `Cpu` costs nothing).
pub fn resolve_backend(choice: BackendChoice, probe: impl FnOnce() -> Probe) -> Result<(BackendKind, String)> {
    match choice {
        BackendChoice::Cpu => Ok((BackendKind::Cpu, "--backend cpu was asked for".into())),
        BackendChoice::Cuda => {
            let p = probe();
            if p.cuda_usable {
                Ok((BackendKind::Cuda, format!("--backend cuda was asked for; {}", p.summary())))
            } else {
                Err(Error::BackendUnavailable { backend: "cuda", reason: format!("CUDA is not usable here: {}", p.reason) })
            }
        }
        BackendChoice::Auto => {
            let p = probe();
            if p.cuda_usable {
                Ok((BackendKind::Cuda, format!("auto chose cuda: {}", p.summary())))
            } else {
                Ok((
                    BackendKind::Cpu,
                    format!("auto chose cpu: CUDA is not usable here: {}; probe found: {}", p.reason, p.summary()),
                ))
            }
        }
    }
}

/// Read this machine's host name (`/proc/sys/kernel/hostname`, `/etc/hostname`, `$HOSTNAME`).
pub fn hostname() -> String {
    for p in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(Path::new(p)) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_is_consistent() {
        let p = probe();
        assert_eq!(p.libraries.len(), 4);
        assert!(p.library("libcuda").is_some() && p.library("libnvrtc").is_some() && p.library("libnccl").is_some());
        assert!(p.library("libcublas").is_some());
        assert_eq!(p.peer_access.len(), p.gpus.len());
        assert!(!p.reason.is_empty());
        if !p.library("libcuda").unwrap().loadable {
            assert!(!p.cuda_usable && p.gpus.is_empty());
        }
        // Serializable for `info --json`-style use.
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Probe>(&s).unwrap(), p);
    }

    #[test]
    fn backend_resolution() {
        let fake = |usable: bool| {
            move || Probe { libraries: vec![], gpus: vec![], peer_access: vec![], cuda_usable: usable, reason: "test".into() }
        };
        assert_eq!(resolve_backend(BackendChoice::Cpu, || unreachable!()).unwrap().0, BackendKind::Cpu);
        assert_eq!(resolve_backend(BackendChoice::Cuda, fake(true)).unwrap().0, BackendKind::Cuda);
        let e = resolve_backend(BackendChoice::Cuda, fake(false)).unwrap_err();
        assert!(e.to_string().contains("not usable") && e.to_string().contains("test"), "{e}");
        let (k, why) = resolve_backend(BackendChoice::Auto, fake(false)).unwrap();
        assert_eq!(k, BackendKind::Cpu);
        assert!(why.contains("not usable") && why.contains("test"), "{why}");
        assert_eq!(resolve_backend(BackendChoice::Auto, fake(true)).unwrap().0, BackendKind::Cuda);
    }

    #[test]
    fn finds_files_by_candidate_name() {
        let dir = std::env::temp_dir().join(format!("switchyard-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libnccl.so.2"), b"").unwrap();
        std::fs::write(dir.join("libnccl-net.so"), b"").unwrap();
        std::fs::write(dir.join("libnvrtc.so.13"), b"").unwrap();
        let found = find_library_files(&[dir.clone(), dir.clone()], "libnccl");
        assert_eq!(found, vec![dir.join("libnccl.so.2")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
