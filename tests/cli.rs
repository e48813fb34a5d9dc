//! End-to-end tests of the `switchyard` binary.

use std::process::{Command, Output};

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_CONFIG")
        .env("RUST_LOG", "info")
        .output()
        .expect("run switchyard")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_lists_the_subcommands_and_bench_flags() {
    let out = switchyard(&["--help"]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    for word in ["bench", "check", "info", "Exit status"] {
        assert!(s.contains(word), "--help lacks {word}:\n{s}");
    }
    let out = switchyard(&["bench", "--help"]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    for flag in [
        "--backend",
        "--nodes",
        "--ranks-per-node",
        "--tokens",
        "--hidden",
        "--topk",
        "--experts",
        "--dtype",
        "--routing",
        "--max-nodes",
        "--seed",
        "--warmup",
        "--iters",
        "--check",
        "--json",
        "--config",
        "--channels",
        "--chunk-tokens",
        "--buffer-tokens",
        "--launch",
        "SWITCHYARD_CONFIG",
    ] {
        assert!(s.contains(flag), "bench --help lacks {flag}:\n{s}");
    }
    let s = text(&switchyard(&["check", "--help"]).stdout);
    assert!(s.contains("--filter") && s.contains("--backend"), "{s}");
}

#[test]
fn info_runs_without_cuda_and_reports_the_libraries() {
    let out = switchyard(&["info"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for word in ["switchyard", "libcuda", "libnvrtc", "libnccl", "CUDA usable:", "cpu"] {
        assert!(s.contains(word), "info lacks {word}:\n{s}");
    }
}

#[test]
fn cuda_backend_is_a_clear_error() {
    for cmd in ["bench", "check"] {
        let out = switchyard(&[cmd, "--backend", "cuda"]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let e = text(&out.stderr);
        assert!(e.contains("error:") && e.contains("CUDA is not usable here"), "{cmd}: {e}");
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let out = switchyard(&["bench", "--backend", "cpu", "--experts", "63"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("num_experts"), "{}", text(&out.stderr));

    let out = switchyard(&["bench", "--backend", "cpu", "--chunk-tokens", "64", "--buffer-tokens", "32"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("buffer_tokens"), "{}", text(&out.stderr));

    let out = switchyard(&["bench", "--backend", "cpu", "--config", "/nonexistent/switchyard.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/switchyard.toml"));

    let out = switchyard(&["check", "--backend", "cpu", "--filter", "no-such-case-name-xyz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no-such-case-name-xyz"));
}

#[test]
fn launcher_variables_are_checked_and_the_cpu_backend_refuses_them() {
    let run = |vars: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["bench", "--backend", "cpu", "--tokens", "4", "--hidden", "128", "--iters", "1", "--warmup", "0"])
            .env_remove("SWITCHYARD_CONFIG")
            .envs(vars.iter().copied())
            .output()
            .expect("run switchyard")
    };
    let out = run(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("launcher"), "{}", text(&out.stderr));
    let out = run(&[("RANK", "zero"), ("WORLD_SIZE", "2")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("RANK"), "{}", text(&out.stderr));
}

#[test]
fn tiny_bench_check_writes_valid_json_with_nothing_wrong() {
    let dir = std::env::temp_dir().join(format!("switchyard-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let cfg = dir.join("cfg.toml");
    // The file sets channels and chunk; the flag overrides the chunk.
    std::fs::write(&cfg, "num_channels = 3\nchunk_tokens = 8\nbuffer_tokens = 16\n").unwrap();
    let out = switchyard(&[
        "bench",
        "--backend",
        "auto",
        "--nodes",
        "2",
        "--ranks-per-node",
        "2",
        "--tokens",
        "48",
        "--hidden",
        "256",
        "--topk",
        "4",
        "--experts",
        "16",
        "--dtype",
        "fp8",
        "--routing",
        "node-limited",
        "--max-nodes",
        "1",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--check",
        "--config",
        cfg.to_str().unwrap(),
        "--chunk-tokens",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("auto chose cpu"), "{stderr}");
    let rows: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 3, "{stdout}");

    let report = switchyard::bench::Report::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report.results.len(), 3);
    for r in &report.results {
        assert_eq!(r.wrong, Some(0), "{:?}", r.op);
        assert_eq!(r.backend, "cpu");
        assert_eq!((r.config.num_channels, r.config.chunk_tokens, r.config.buffer_tokens), (3, 4, 16));
        assert!(r.time_us.median > 0.0 && r.logical_gbps > 0.0);
        assert!(r.physical_gbps.inter_node > 0.0 && r.physical_gbps.intra_node > 0.0, "{:?}", r.physical_gbps);
    }
    assert!(report.memcpy_gbps > 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_runs_the_conformance_cases() {
    let out = switchyard(&["check", "--backend", "cpu", "--filter", "2x1-"]);
    let s = text(&out.stdout);
    let last = s.lines().last().unwrap_or("");
    assert!(last.ends_with(" failed") && last.contains(" passed, "), "{s}");
    assert!(out.status.success(), "{s}");
}
