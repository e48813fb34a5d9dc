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
        "--backend", "--nodes", "--ranks-per-node", "--tokens", "--hidden", "--topk", "--experts", "--dtype", "--routing",
        "--max-nodes", "--seed", "--warmup", "--iters", "--check", "--json", "--config", "--channels", "--chunk-tokens",
        "--buffer-tokens", "SWITCHYARD_CONFIG",
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
        assert!(e.contains("error:") && e.contains("not built yet"), "{cmd}: {e}");
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
