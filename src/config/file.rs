//! The config file (TOML, version 1): knobs for every call, and entries for
//! calls of one kind on one machine shape, which `switchyard tune` writes.
//!
//! ```toml
//! version = 1
//! timeout_ms = 10000       # top-level knobs: any call no entry matches
//!
//! [[entry]]
//! gpu = "NVIDIA H200"      # GPU name as the driver reports it, or "cpu"
//! nodes = 1
//! ranks_per_node = 2
//! op = "dispatch"          # dispatch (also cached dispatch) | combine
//! dtype = "bf16"           # row type on the wire: bf16 | fp8 (combine: bf16)
//! hidden = 7168
//! tokens = 4096            # optional: serves calls of up to this many tokens per rank
//! num_channels = 12        # alias num_sms: on the GPU one SM runs one channel
//! chunk_tokens = 32
//! buffer_tokens = 128
//! timeout_ms = 10000
//! median_us = 207.4        # optional, informational: what the tuner measured
//! kernels = "3f2a..."      # optional (the tuner writes it for GPUs): hash of the kernel
//!                          # sources timed; an entry for other kernels is stale
//! ```
//!
//! The file is read by walking its TOML table, so every error names the key
//! (`entry[2].num_channels`) as well as the file.

use std::path::Path;

use toml::{Table, Value};

use super::PartialConfig;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The file version this build reads and writes.
pub const FILE_VERSION: i64 = 1;

/// The op an entry serves. Cached dispatch uses the dispatch entry: it reuses
/// the handle of a dispatch, and with it that dispatch's channel split on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunedOp {
    /// Dispatch and cached dispatch.
    Dispatch,
    /// Combine.
    Combine,
}

impl TunedOp {
    /// Name as in files.
    pub fn name(self) -> &'static str {
        match self {
            TunedOp::Dispatch => "dispatch",
            TunedOp::Combine => "combine",
        }
    }
}

/// What a call is, as far as choosing its config goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ConfigKey {
    /// GPU name as the driver reports it (`"NVIDIA H200"`), or `"cpu"` for the CPU backend.
    pub gpu: String,
    /// Nodes of the group.
    pub nodes: usize,
    /// Ranks per node.
    pub ranks_per_node: usize,
    /// The op.
    pub op: TunedOp,
    /// Row type on the wire (combine: BF16).
    pub dtype: DType,
    /// Elements per row.
    pub hidden: usize,
    /// Tokens per rank of the call.
    pub tokens: usize,
}

impl std::fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} hidden {} tokens {} on {} x {} ({})",
            self.op.name(),
            self.dtype,
            self.hidden,
            self.tokens,
            self.nodes,
            self.ranks_per_node,
            self.gpu
        )
    }
}

/// One `[[entry]]`: knobs for calls that match its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// GPU name, or `"cpu"`.
    pub gpu: String,
    /// Nodes.
    pub nodes: usize,
    /// Ranks per node.
    pub ranks_per_node: usize,
    /// Op.
    pub op: TunedOp,
    /// Row type on the wire.
    pub dtype: DType,
    /// Elements per row.
    pub hidden: usize,
    /// Serves calls of up to this many tokens per rank (`None`: any number).
    pub tokens: Option<usize>,
    /// The knobs it sets.
    pub knobs: PartialConfig,
    /// What the tuner measured with these knobs (informational).
    pub median_us: Option<f64>,
    /// Hash of the kernel sources these knobs were timed with (see
    /// [`kernel_source_hash`](crate::backend::cuda::compile::kernel_source_hash)).
    pub kernels: Option<String>,
}

impl Entry {
    /// Whether this entry is for calls like `key`, tokens aside.
    fn matches_shape(&self, key: &ConfigKey) -> bool {
        self.gpu == key.gpu
            && self.nodes == key.nodes
            && self.ranks_per_node == key.ranks_per_node
            && self.op == key.op
            && self.dtype == key.dtype
            && self.hidden == key.hidden
    }

    /// Whether `other` is for the same calls (so one replaces the other).
    fn same_key(&self, other: &Entry) -> bool {
        (&self.gpu, self.nodes, self.ranks_per_node, self.op, self.dtype, self.hidden, self.tokens)
            == (&other.gpu, other.nodes, other.ranks_per_node, other.op, other.dtype, other.hidden, other.tokens)
    }
}

/// A parsed config file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigFile {
    /// Top-level knobs: calls that no entry matches.
    pub defaults: PartialConfig,
    /// The entries, in file order.
    pub entries: Vec<Entry>,
}

/// A parse failure: the key (dotted path) and what is wrong with it.
type KeyError = (String, String);

fn key_err(key: &str, reason: impl Into<String>) -> KeyError {
    (key.to_string(), reason.into())
}

fn positive(t: &Table, name: &str, at: &str) -> std::result::Result<Option<usize>, KeyError> {
    match t.get(name) {
        None => Ok(None),
        Some(Value::Integer(v)) if *v >= 1 => Ok(Some(*v as usize)),
        Some(Value::Integer(v)) => Err(key_err(&format!("{at}{name}"), format!("must be >= 1, got {v}"))),
        Some(other) => Err(key_err(&format!("{at}{name}"), format!("must be an integer, got {}", other.type_str()))),
    }
}

fn required<T>(v: Option<T>, key: String) -> std::result::Result<T, KeyError> {
    v.ok_or_else(|| (key, "missing".to_string()))
}

fn string<'t>(t: &'t Table, name: &str, at: &str) -> std::result::Result<Option<&'t str>, KeyError> {
    match t.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(key_err(&format!("{at}{name}"), format!("must be a string, got {}", other.type_str()))),
    }
}

/// The knobs of one table (top level or an entry); `at` prefixes key names in errors.
fn knobs(t: &Table, at: &str) -> std::result::Result<PartialConfig, KeyError> {
    if t.contains_key("num_sms") && t.contains_key("num_channels") {
        return Err(key_err(&format!("{at}num_sms"), "num_sms is another name for num_channels: give one of them"));
    }
    let k = PartialConfig {
        num_channels: positive(t, "num_channels", at)?.or(positive(t, "num_sms", at)?),
        chunk_tokens: positive(t, "chunk_tokens", at)?,
        buffer_tokens: positive(t, "buffer_tokens", at)?,
        timeout_ms: positive(t, "timeout_ms", at)?.map(|v| v as u64),
    };
    if let (Some(chunk), Some(buffer)) = (k.chunk_tokens, k.buffer_tokens) {
        if buffer < chunk {
            return Err(key_err(&format!("{at}buffer_tokens"), format!("{buffer} is smaller than one chunk ({chunk} tokens)")));
        }
    }
    Ok(k)
}

fn reject_unknown(t: &Table, allowed: &[&str], at: &str) -> std::result::Result<(), KeyError> {
    match t.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(key_err(&format!("{at}{k}"), format!("unknown key (known: {})", allowed.join(", ")))),
        None => Ok(()),
    }
}

const KNOB_KEYS: [&str; 5] = ["num_channels", "num_sms", "chunk_tokens", "buffer_tokens", "timeout_ms"];

fn entry(t: &Table, at: &str) -> std::result::Result<Entry, KeyError> {
    let mut allowed = vec!["gpu", "nodes", "ranks_per_node", "op", "dtype", "hidden", "tokens", "median_us", "kernels"];
    allowed.extend(KNOB_KEYS);
    reject_unknown(t, &allowed, at)?;
    let op = match required(string(t, "op", at)?, format!("{at}op"))? {
        "dispatch" => TunedOp::Dispatch,
        "combine" => TunedOp::Combine,
        other => return Err(key_err(&format!("{at}op"), format!("`{other}` is not an op (dispatch, combine)"))),
    };
    let dtype = match required(string(t, "dtype", at)?, format!("{at}dtype"))? {
        "bf16" => DType::Bf16,
        "fp8" => DType::Fp8,
        other => return Err(key_err(&format!("{at}dtype"), format!("`{other}` is not a row type (bf16, fp8)"))),
    };
    if op == TunedOp::Combine && dtype != DType::Bf16 {
        return Err(key_err(&format!("{at}dtype"), "combine moves bf16 rows"));
    }
    let median_us = match t.get("median_us") {
        None => None,
        Some(Value::Float(v)) if *v >= 0.0 => Some(*v),
        Some(Value::Integer(v)) if *v >= 0 => Some(*v as f64),
        Some(_) => return Err(key_err(&format!("{at}median_us"), "must be a number >= 0")),
    };
    Ok(Entry {
        gpu: required(string(t, "gpu", at)?, format!("{at}gpu"))?.to_string(),
        nodes: required(positive(t, "nodes", at)?, format!("{at}nodes"))?,
        ranks_per_node: required(positive(t, "ranks_per_node", at)?, format!("{at}ranks_per_node"))?,
        op,
        dtype,
        hidden: required(positive(t, "hidden", at)?, format!("{at}hidden"))?,
        tokens: positive(t, "tokens", at)?,
        knobs: knobs(t, at)?,
        median_us,
        kernels: string(t, "kernels", at)?.map(str::to_string),
    })
}

impl ConfigFile {
    /// Parse TOML text. Errors are `(key, reason)`.
    fn parse_table(text: &str) -> std::result::Result<Self, KeyError> {
        let t: Table = text.parse().map_err(|e: toml::de::Error| key_err("(syntax)", e.to_string().trim_end()))?;
        let mut allowed = vec!["version", "entry"];
        allowed.extend(KNOB_KEYS);
        reject_unknown(&t, &allowed, "")?;
        match t.get("version") {
            None | Some(Value::Integer(FILE_VERSION)) => {}
            Some(v) => {
                return Err(key_err("version", format!("this build reads version {FILE_VERSION} files, found {v}")));
            }
        }
        let entries = match t.get("entry") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Table(e) => entry(e, &format!("entry[{i}].")),
                    _ => Err(key_err(&format!("entry[{i}]"), "must be a table ([[entry]])")),
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(_) => return Err(key_err("entry", "must be an array of tables ([[entry]])")),
        };
        Ok(Self { defaults: knobs(&t, "")?, entries })
    }

    /// Parse TOML text; `origin` names it in errors (a path, or `<string>`).
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        Self::parse_table(text)
            .map_err(|(key, reason)| Error::Config { path: origin.into(), reason: format!("key `{key}`: {reason}") })
    }

    /// Read and parse a file; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// The entry for calls like `key`: among entries of its shape, the one with the
    /// fewest `tokens` that still covers the call, else the one with the most.
    /// Returns its index too (for messages).
    pub fn lookup(&self, key: &ConfigKey) -> Option<(usize, &Entry)> {
        let cover = |e: &Entry| e.tokens.unwrap_or(usize::MAX);
        let shape: Vec<(usize, &Entry)> = self.entries.iter().enumerate().filter(|(_, e)| e.matches_shape(key)).collect();
        let covering = shape.iter().filter(|(_, e)| cover(e) >= key.tokens).min_by_key(|(_, e)| cover(e));
        covering.or_else(|| shape.iter().max_by_key(|(_, e)| cover(e))).copied()
    }

    /// Add `entry`, replacing one for the same calls.
    pub fn upsert(&mut self, entry: Entry) {
        match self.entries.iter_mut().find(|e| e.same_key(&entry)) {
            Some(slot) => *slot = entry,
            None => self.entries.push(entry),
        }
    }

    /// The file as TOML text (keys in the order of the module docs).
    pub fn to_toml(&self) -> String {
        let mut out = format!("# switchyard config (see README, \"Config\")\nversion = {FILE_VERSION}\n");
        out += &knob_lines(&self.defaults);
        for e in &self.entries {
            out += "\n[[entry]]\n";
            out += &format!("gpu = {}\n", Value::String(e.gpu.clone()));
            out += &format!("nodes = {}\nranks_per_node = {}\n", e.nodes, e.ranks_per_node);
            out += &format!("op = \"{}\"\ndtype = \"{}\"\nhidden = {}\n", e.op.name(), e.dtype, e.hidden);
            if let Some(t) = e.tokens {
                out += &format!("tokens = {t}\n");
            }
            out += &knob_lines(&e.knobs);
            if let Some(us) = e.median_us {
                out += &format!("median_us = {us:.1}\n");
            }
            if let Some(k) = &e.kernels {
                out += &format!("kernels = {}\n", Value::String(k.clone()));
            }
        }
        out
    }

    /// Write the file: to a temporary name beside it, then renamed over it, so a
    /// reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io { path: path.into(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, self.to_toml()).map_err(|source| Error::Io { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn knob_lines(k: &PartialConfig) -> String {
    let mut s = String::new();
    let vals =
        [k.num_channels.map(|v| v as u64), k.chunk_tokens.map(|v| v as u64), k.buffer_tokens.map(|v| v as u64), k.timeout_ms];
    for (name, v) in super::KNOBS.iter().zip(vals) {
        if let Some(v) = v {
            s += &format!("{name} = {v}\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile> {
        ConfigFile::parse(text, Path::new("t.toml"))
    }

    fn err_of(text: &str) -> String {
        match parse(text) {
            Err(e @ Error::Config { .. }) => e.to_string(),
            other => panic!("{text:?}: expected a config error, got {other:?}"),
        }
    }

    const ENTRY: &str =
        "[[entry]]\ngpu = \"NVIDIA H200\"\nnodes = 1\nranks_per_node = 2\nop = \"dispatch\"\ndtype = \"bf16\"\nhidden = 7168\n";

    fn key(tokens: usize) -> ConfigKey {
        ConfigKey {
            gpu: "NVIDIA H200".into(),
            nodes: 1,
            ranks_per_node: 2,
            op: TunedOp::Dispatch,
            dtype: DType::Bf16,
            hidden: 7168,
            tokens,
        }
    }

    #[test]
    fn flat_file_of_earlier_versions_still_reads() {
        let f = parse("num_channels = 3\nchunk_tokens = 8\nbuffer_tokens = 16\ntimeout_ms = 500\n").unwrap();
        assert_eq!(
            f.defaults,
            PartialConfig { num_channels: Some(3), chunk_tokens: Some(8), buffer_tokens: Some(16), timeout_ms: Some(500) }
        );
        assert!(f.entries.is_empty());
    }

    #[test]
    fn round_trips_through_text() {
        let mut f = ConfigFile { defaults: PartialConfig { timeout_ms: Some(2000), ..Default::default() }, entries: Vec::new() };
        f.upsert(Entry {
            gpu: "NVIDIA H200".into(),
            nodes: 1,
            ranks_per_node: 2,
            op: TunedOp::Combine,
            dtype: DType::Bf16,
            hidden: 7168,
            tokens: Some(4096),
            knobs: PartialConfig { num_channels: Some(16), ..Default::default() },
            median_us: Some(201.5),
            kernels: Some("abc".into()),
        });
        let back = parse(&f.to_toml()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn num_sms_is_num_channels() {
        let f = parse(&format!("{ENTRY}num_sms = 12\n")).unwrap();
        assert_eq!(f.entries[0].knobs.num_channels, Some(12));
        assert!(err_of(&format!("{ENTRY}num_sms = 12\nnum_channels = 8\n")).contains("entry[0].num_sms"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("num_channels = 0".to_string(), "`num_channels`"),
            ("chunk_tokens = -3".to_string(), "`chunk_tokens`"),
            ("chunk_tokens = 64\nbuffer_tokens = 32".to_string(), "`buffer_tokens`"),
            ("timeout_ms = \"soon\"".to_string(), "`timeout_ms`"),
            ("chunk_tokenz = 3".to_string(), "`chunk_tokenz`"),
            ("version = 2".to_string(), "`version`"),
            ("entry = 3".to_string(), "`entry`"),
            (format!("{ENTRY}num_sms = 0\n"), "`entry[0].num_sms`"),
            (format!("{ENTRY}op = \"reduce\"\n").replace("op = \"dispatch\"\n", ""), "`entry[0].op`"),
            (ENTRY.replace("dtype = \"bf16\"", "dtype = \"fp16\""), "`entry[0].dtype`"),
            (ENTRY.replace("op = \"dispatch\"", "op = \"combine\"").replace("bf16", "fp8"), "`entry[0].dtype`"),
            (ENTRY.replace("hidden = 7168\n", ""), "`entry[0].hidden`"),
            (format!("{ENTRY}{ENTRY}colour = 1\n"), "`entry[1].colour`"),
            ("num_channels = [".to_string(), "`(syntax)`"),
        ] {
            let e = err_of(&text);
            assert!(e.contains(key) && e.contains("t.toml"), "{text:?}: {e}");
        }
    }

    #[test]
    fn lookup_takes_the_smallest_entry_that_covers_the_call() {
        let mut f = ConfigFile::default();
        let base = parse(ENTRY).unwrap().entries[0].clone();
        for (tokens, ch) in [(Some(128), 4), (Some(4096), 12), (None, 20)] {
            f.upsert(Entry { tokens, knobs: PartialConfig { num_channels: Some(ch), ..Default::default() }, ..base.clone() });
        }
        let ch = |t| f.lookup(&key(t)).map(|(_, e)| e.knobs.num_channels.unwrap());
        assert_eq!(ch(1), Some(4));
        assert_eq!(ch(128), Some(4));
        assert_eq!(ch(129), Some(12));
        assert_eq!(ch(5000), Some(20));
        let other = ConfigKey { hidden: 4096, ..key(128) };
        assert!(f.lookup(&other).is_none());
        // Without an open-ended entry, a larger call takes the largest one.
        f.entries.retain(|e| e.tokens.is_some());
        assert_eq!(f.lookup(&key(5000)).map(|(i, _)| i), Some(1));
    }

    #[test]
    fn upsert_replaces_the_same_key_only() {
        let mut f = ConfigFile::default();
        let e = parse(ENTRY).unwrap().entries[0].clone();
        f.upsert(e.clone());
        f.upsert(Entry { knobs: PartialConfig { num_channels: Some(9), ..Default::default() }, ..e.clone() });
        assert_eq!(f.entries.len(), 1);
        assert_eq!(f.entries[0].knobs.num_channels, Some(9));
        f.upsert(Entry { op: TunedOp::Combine, ..e });
        assert_eq!(f.entries.len(), 2);
    }

    #[test]
    fn write_then_read() {
        let dir = std::env::temp_dir().join(format!("switchyard-cfgfile-{}", std::process::id()));
        let p = dir.join("sub").join("tuned.toml");
        let f = parse(&format!("timeout_ms = 7\n{ENTRY}num_channels = 4\n")).unwrap();
        f.write(&p).unwrap();
        assert_eq!(ConfigFile::read(&p).unwrap(), f);
        assert!(matches!(ConfigFile::read(&dir.join("missing.toml")), Err(Error::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
