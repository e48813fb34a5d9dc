//! Every kernel variant we ship compiles for sm_90a with NVRTC and yields a CUBIN.
//!
//! Without libnvrtc the test prints why and passes, unless `SWITCHYARD_REQUIRE_NVRTC=1`
//! (CI sets it after `scripts/install-nvrtc.sh`), where it fails.

use switchyard::backend::cuda::compile::{compile_intranode, nvrtc_available, nvrtc_version, KernelSpec};

/// The variants the conformance suite and the bench use: every dtype path, the
/// DeepSeek-V3 shape on 2 and 8 ranks, and small odd shapes.
fn variants() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for &(world, hidden, topk, num_experts) in
        &[(2, 7168, 8, 256), (8, 7168, 8, 256), (2, 128, 2, 8), (4, 256, 3, 12), (3, 384, 4, 24), (2, 2048, 6, 64)]
    {
        for &(x_fp8, wire_fp8) in &[(false, false), (false, true), (true, true)] {
            v.push(KernelSpec { world, hidden, topk, num_experts, x_fp8, wire_fp8 });
        }
    }
    // BF16-only hidden sizes that are multiples of 8 but not of 128.
    v.push(KernelSpec { world: 2, hidden: 72, topk: 2, num_experts: 4, x_fp8: false, wire_fp8: false });
    v
}

#[test]
fn every_variant_compiles_for_sm_90a() {
    let required = std::env::var("SWITCHYARD_REQUIRE_NVRTC").map(|v| v == "1").unwrap_or(false);
    if !nvrtc_available() {
        assert!(!required, "SWITCHYARD_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)");
        eprintln!("SKIPPED: libnvrtc not found; run scripts/install-nvrtc.sh and set LD_LIBRARY_PATH (or SWITCHYARD_REQUIRE_NVRTC=1 to fail)");
        return;
    }
    // Compile for real every time: a private cache dir per run.
    let dir = std::env::temp_dir().join(format!("switchyard-kcache-{}", std::process::id()));
    std::env::set_var("SWITCHYARD_CACHE_DIR", &dir);
    eprintln!("NVRTC {:?}", nvrtc_version().unwrap());
    for spec in variants() {
        let c = compile_intranode(&spec, "sm_90a").unwrap_or_else(|e| panic!("{}: {e}", spec.name()));
        assert!(!c.from_cache);
        assert!(c.image.starts_with(b"\x7fELF"), "{}: not an ELF cubin", spec.name());
        if std::env::var_os("SWITCHYARD_SHOW_PTXAS").is_some() {
            eprintln!("{}", c.log);
        }
        let res = c.resources();
        for k in [
            "sy_notify",
            "sy_dispatch",
            "sy_dispatch_bulk",
            "sy_combine",
            "sy_combine_push",
            "sy_combine_bulk",
            "sy_gather_rows",
            "sy_gather_quantize",
            "sy_sum_rows",
        ] {
            let r = res
                .iter()
                .find(|r| r.name == k)
                .unwrap_or_else(|| panic!("{}: no ptxas report for {k}:\n{}", spec.name(), c.log));
            eprintln!(
                "{:30} {:11} {:3} regs {:4} B stack {:5} B smem  spill st/ld {}/{}  cubin {} B",
                spec.name(),
                k,
                r.registers,
                r.stack_bytes,
                r.smem_bytes,
                r.spill_stores,
                r.spill_loads,
                c.image.len()
            );
            // No spills and no stack frame: a regression here costs bandwidth on the GPU.
            assert!(r.spill_stores == 0 && r.spill_loads == 0, "{}: {k} spills: {r:?}", spec.name());
            assert!(r.stack_bytes == 0, "{}: {k} uses a {} byte stack frame", spec.name(), r.stack_bytes);
            // Dispatch/combine run 512 threads per block: at most 128 registers per thread.
            assert!(r.registers <= 128, "{}: {k} uses {} registers", spec.name(), r.registers);
        }
        // Second call comes from the cache, byte-identical.
        let again = compile_intranode(&spec, "sm_90a").unwrap();
        assert!(again.from_cache && again.image == c.image, "{}: cache miss or mismatch", spec.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
