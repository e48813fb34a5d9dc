//! Where each knob of a call's [`Config`] comes from, first that says wins:
//! 1. an explicit value (API or command-line flag);
//! 2. the config file (`--config FILE` or `SWITCHYARD_CONFIG`): the entry that
//!    matches the call, then the file's top-level knobs;
//! 3. the tuned file `switchyard tune` wrote (`tuned.toml` in the cache dir), the same way;
//! 4. the analytic default ([`analytic_default`]).
//!
//! The merged config is validated before it is returned; an impossible value is
//! reported against the file and key it came from. The choice for each kind of
//! call is logged once, at info level, with the origin of every knob.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::file::{ConfigFile, ConfigKey, TunedOp};
use super::{Config, PartialConfig, KNOBS};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Name of the tuned file in the cache directory.
pub const TUNED_FILE: &str = "tuned.toml";

/// The `gpu` of a CPU-backend key.
pub const CPU_DEVICE: &str = "cpu";

/// Per-direction NVLink 4 bandwidth of one GPU, SM stores both ways at once
/// (2x H200, docs/perf-notes.md).
pub const LINK_GBPS: f64 = 347.0;
/// What one SM moves in the dispatch copy loop, BF16 rows: 16-byte stores to a
/// peer ran at 180 GB/s on 4 SMs (docs/perf-notes.md).
pub const DISPATCH_SM_GBPS: f64 = 45.0;
/// The same for FP8 rows (payload and scales): a warp's fixed cost per row weighs
/// twice as much on rows half as long; 30.2 MB in 320 us on 4 SMs (2x H200, HT-A,
/// `tune` of 2026-11-23, docs/perf-notes.md).
pub const DISPATCH_FP8_SM_GBPS: f64 = 23.5;
/// What one SM moves in the combine loop (loads from every holder, f32 sums,
/// one BF16 store): 58.5 MB in 232 us on 12 SMs (docs/perf-notes.md).
pub const COMBINE_SM_GBPS: f64 = 21.0;
/// Fewest tokens per channel worth a channel: below it each channel's fixed
/// cost (flags, metadata, launch of a block) outweighs the rows it moves.
pub const MIN_TOKENS_PER_CHANNEL: usize = 16;

/// The path of the tuned file (`None`: no cache directory can be named).
pub fn tuned_path() -> Option<PathBuf> {
    crate::backend::cuda::compile::cache_dir().map(|d| d.join(TUNED_FILE))
}

/// The config a call gets when nothing else says: on a GPU, enough channels (one
/// SM each) for the link (`LINK_GBPS` / the op's per-SM rate), but no more than
/// one per [`MIN_TOKENS_PER_CHANNEL`] tokens and at least 2; on the CPU backend,
/// [`Config::default`].
pub fn analytic_default(key: &ConfigKey) -> Config {
    let base = Config::default();
    if key.gpu == CPU_DEVICE {
        return base;
    }
    let per_sm = match (key.op, key.dtype) {
        (TunedOp::Dispatch, DType::Fp8) => DISPATCH_FP8_SM_GBPS,
        (TunedOp::Dispatch, _) => DISPATCH_SM_GBPS,
        (TunedOp::Combine, _) => COMBINE_SM_GBPS,
    };
    let for_link = (LINK_GBPS / per_sm).ceil() as usize;
    let for_tokens = key.tokens.div_ceil(MIN_TOKENS_PER_CHANNEL);
    Config { num_channels: for_link.min(for_tokens).max(2), ..base }
}

/// Where a knob's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An explicit value (API or flag).
    Explicit,
    /// The config file; `entry`: the index of the matching entry, `None`: top level.
    File {
        /// The file.
        path: PathBuf,
        /// Entry index, or `None` for the top-level knobs.
        entry: Option<usize>,
    },
    /// The tuned file in the cache directory.
    Tuned {
        /// The file.
        path: PathBuf,
        /// Entry index, or `None` for the top-level knobs.
        entry: Option<usize>,
    },
    /// [`analytic_default`].
    Analytic,
}

impl Origin {
    fn key_in_file(entry: Option<usize>, knob: &str) -> String {
        entry.map(|i| format!("entry[{i}].{knob}")).unwrap_or_else(|| knob.to_string())
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |entry: &Option<usize>| entry.map(|i| format!(" entry[{i}]")).unwrap_or_else(|| " (top level)".into());
        match self {
            Origin::Explicit => f.write_str("explicit"),
            Origin::File { path, entry } => write!(f, "file {}{}", path.display(), at(entry)),
            Origin::Tuned { path, entry } => write!(f, "tuned file {}{}", path.display(), at(entry)),
            Origin::Analytic => f.write_str("analytic default"),
        }
    }
}

/// A call's config and where each knob came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The config, validated.
    pub config: Config,
    /// Origin of each knob, in [`KNOBS`] order.
    pub origins: [Origin; 4],
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        let vals = [c.num_channels as u64, c.chunk_tokens as u64, c.buffer_tokens as u64, c.timeout_ms];
        let parts: Vec<String> = KNOBS.iter().zip(vals).zip(&self.origins).map(|((k, v), o)| format!("{k}={v} ({o})")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Chooses each call's config from the layers in the module docs.
#[derive(Debug)]
pub struct Resolver {
    explicit: PartialConfig,
    file: Option<(PathBuf, ConfigFile)>,
    tuned: Option<(PathBuf, ConfigFile)>,
    logged: Mutex<HashSet<ConfigKey>>,
}

impl Resolver {
    /// Layers: `explicit` values, the config file at `file` (must exist), the tuned
    /// file at `tuned` (skipped when it does not exist). Both files are read and
    /// checked here.
    pub fn new(explicit: PartialConfig, file: Option<&Path>, tuned: Option<&Path>) -> Result<Self> {
        let file = file.map(|p| ConfigFile::read(p).map(|f| (p.to_path_buf(), f))).transpose()?;
        let tuned = match tuned {
            Some(p) if p.exists() => Some((p.to_path_buf(), ConfigFile::read(p)?)),
            _ => None,
        };
        Ok(Self { explicit, file, tuned, logged: Mutex::new(HashSet::new()) })
    }

    /// [`Resolver::new`] with the tuned file at its usual place ([`tuned_path`]).
    pub fn with_tuned_file(explicit: PartialConfig, file: Option<&Path>) -> Result<Self> {
        Self::new(explicit, file, tuned_path().as_deref())
    }

    /// The config for calls like `key`, validated; logged at info the first time a key is asked for.
    pub fn resolve(&self, key: &ConfigKey) -> Result<Resolved> {
        let analytic = analytic_default(key);
        let mut layers: Vec<(PartialConfig, Origin)> = vec![(self.explicit, Origin::Explicit)];
        for (source, tuned) in [(&self.file, false), (&self.tuned, true)] {
            let Some((path, file)) = source else { continue };
            let origin = |entry| match tuned {
                false => Origin::File { path: path.clone(), entry },
                true => Origin::Tuned { path: path.clone(), entry },
            };
            if let Some((i, e)) = file.lookup(key) {
                check_fresh(path, i, e.kernels.as_deref())?;
                layers.push((e.knobs, origin(Some(i))));
            }
            layers.push((file.defaults, origin(None)));
        }
        layers.push((PartialConfig::full(&analytic), Origin::Analytic));

        let pick = |set: fn(&PartialConfig) -> bool| -> usize {
            layers.iter().position(|(p, _)| set(p)).expect("the analytic layer sets every knob")
        };
        let which = [
            pick(|p| p.num_channels.is_some()),
            pick(|p| p.chunk_tokens.is_some()),
            pick(|p| p.buffer_tokens.is_some()),
            pick(|p| p.timeout_ms.is_some()),
        ];
        let merged = layers.iter().rev().fold(PartialConfig::default(), |under, (p, _)| p.over(&under));
        let config = merged.apply_to(&analytic);
        let origins = which.map(|i| layers[i].1.clone());
        if let Err(e) = config.validate() {
            return Err(blame(e, &origins));
        }
        let resolved = Resolved { config, origins };
        if self.logged.lock().expect("log set").insert(key.clone()) {
            tracing::info!("config for {key}: {resolved}");
        }
        Ok(resolved)
    }
}

/// An entry timed with other kernel sources than this build's is stale.
fn check_fresh(path: &Path, entry: usize, kernels: Option<&str>) -> Result<()> {
    let current = crate::backend::cuda::compile::kernel_source_hash();
    match kernels {
        Some(k) if k != current => Err(Error::Config {
            path: path.into(),
            reason: format!(
                "key `entry[{entry}].kernels`: stale: timed with kernel sources {k}, this build's are {current}; \
                 run `switchyard tune` again or remove the entry"
            ),
        }),
        _ => Ok(()),
    }
}

/// Turn a validation error about knob `arg` into one against where that knob came from.
fn blame(e: Error, origins: &[Origin; 4]) -> Error {
    let Error::InvalidArgument { arg, reason } = e else { return e };
    let Some(i) = KNOBS.iter().position(|k| *k == arg) else { return Error::InvalidArgument { arg, reason } };
    match &origins[i] {
        Origin::File { path, entry } | Origin::Tuned { path, entry } => {
            Error::Config { path: path.clone(), reason: format!("key `{}`: {reason}", Origin::key_in_file(*entry, &arg)) }
        }
        Origin::Explicit | Origin::Analytic => Error::InvalidArgument { arg, reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn key(op: TunedOp, tokens: usize) -> ConfigKey {
        ConfigKey { gpu: "NVIDIA H200".into(), nodes: 1, ranks_per_node: 2, op, dtype: DType::Bf16, hidden: 7168, tokens }
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("switchyard-resolve-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
        fn file(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const DISPATCH_ENTRY: &str =
        "[[entry]]\ngpu = \"NVIDIA H200\"\nnodes = 1\nranks_per_node = 2\nop = \"dispatch\"\ndtype = \"bf16\"\nhidden = 7168\n";

    #[test]
    fn analytic_default_follows_the_link_and_the_batch() {
        // 347 / 45 -> 8 SMs for BF16 dispatch, 347 / 23.5 -> 15 for FP8, 347 / 21 -> 17 for
        // combine, at most one per 16 tokens.
        assert_eq!(analytic_default(&key(TunedOp::Dispatch, 4096)).num_channels, 8);
        let fp8 = ConfigKey { dtype: DType::Fp8, ..key(TunedOp::Dispatch, 4096) };
        assert_eq!(analytic_default(&fp8).num_channels, 15);
        assert_eq!(analytic_default(&key(TunedOp::Combine, 4096)).num_channels, 17);
        assert_eq!(analytic_default(&key(TunedOp::Combine, 128)).num_channels, 8);
        assert_eq!(analytic_default(&key(TunedOp::Dispatch, 1)).num_channels, 2);
        let cpu = ConfigKey { gpu: CPU_DEVICE.into(), ..key(TunedOp::Combine, 4096) };
        assert_eq!(analytic_default(&cpu), Config::default());
    }

    #[test]
    fn layers_take_precedence_in_order() {
        let d = Dir::new("order");
        let file = d.file("c.toml", &format!("chunk_tokens = 8\n{DISPATCH_ENTRY}num_channels = 5\n"));
        let tuned = d.file(
            "t.toml",
            &format!("buffer_tokens = 64\n{DISPATCH_ENTRY}num_channels = 7\nchunk_tokens = 16\ntimeout_ms = 900\n"),
        );
        let explicit = PartialConfig { timeout_ms: Some(123), ..Default::default() };
        let r = Resolver::new(explicit, Some(&file), Some(&tuned)).unwrap();
        let got = r.resolve(&key(TunedOp::Dispatch, 4096)).unwrap();
        assert_eq!(got.config, Config { num_channels: 5, chunk_tokens: 8, buffer_tokens: 64, timeout_ms: 123 });
        assert_eq!(got.origins[0], Origin::File { path: file.clone(), entry: Some(0) });
        assert_eq!(got.origins[1], Origin::File { path: file.clone(), entry: None });
        assert_eq!(got.origins[2], Origin::Tuned { path: tuned.clone(), entry: None });
        assert_eq!(got.origins[3], Origin::Explicit);
        // Combine matches no entry: top-level knobs, then the analytic default.
        let got = r.resolve(&key(TunedOp::Combine, 4096)).unwrap();
        assert_eq!(got.config.num_channels, 17);
        assert_eq!(got.origins[0], Origin::Analytic);
        assert_eq!(got.config.chunk_tokens, 8);
    }

    #[test]
    fn missing_tuned_file_is_skipped_but_a_missing_config_file_is_an_error() {
        let d = Dir::new("missing");
        let r = Resolver::new(PartialConfig::default(), None, Some(&d.0.join("none.toml"))).unwrap();
        let got = r.resolve(&key(TunedOp::Dispatch, 4096)).unwrap();
        assert!(got.origins.iter().all(|o| *o == Origin::Analytic));
        assert!(matches!(Resolver::new(PartialConfig::default(), Some(&d.0.join("none.toml")), None), Err(Error::Io { .. })));
    }

    #[test]
    fn impossible_merge_is_blamed_on_the_file_and_key() {
        let d = Dir::new("blame");
        // Each file is fine alone; together the chunk outgrows the buffer.
        let file = d.file("c.toml", "chunk_tokens = 512\n");
        let tuned = d.file("t.toml", &format!("{DISPATCH_ENTRY}buffer_tokens = 256\n"));
        let r = Resolver::new(PartialConfig::default(), Some(&file), Some(&tuned)).unwrap();
        let e = r.resolve(&key(TunedOp::Dispatch, 4096)).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, Error::Config { .. }) && text.contains("t.toml") && text.contains("entry[0].buffer_tokens"),
            "{text}"
        );
        // An explicit value stays an argument error.
        let r = Resolver::new(PartialConfig { buffer_tokens: Some(4), ..Default::default() }, Some(&file), None).unwrap();
        assert!(
            matches!(r.resolve(&key(TunedOp::Dispatch, 4096)), Err(Error::InvalidArgument { arg, .. }) if arg == "buffer_tokens")
        );
    }

    #[test]
    fn stale_entry_names_its_kernels_key() {
        let d = Dir::new("stale");
        let fresh = crate::backend::cuda::compile::kernel_source_hash();
        let tuned = d.file("t.toml", &format!("{DISPATCH_ENTRY}num_channels = 7\nkernels = \"0000\"\n{DISPATCH_ENTRY}tokens = 8\nnum_channels = 3\nkernels = \"{fresh}\"\n"));
        let r = Resolver::new(PartialConfig::default(), None, Some(&tuned)).unwrap();
        assert_eq!(r.resolve(&key(TunedOp::Dispatch, 8)).unwrap().config.num_channels, 3);
        let e = r.resolve(&key(TunedOp::Dispatch, 4096)).unwrap_err().to_string();
        assert!(e.contains("t.toml") && e.contains("entry[0].kernels") && e.contains("stale"), "{e}");
    }
}
