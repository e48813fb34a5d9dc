//! Runtime configuration: what the tuner may change (channels, chunk and buffer sizes, deadlines).

use std::path::Path;

use crate::error::{Error, Result};

/// Environment variable naming a config file (same meaning as `--config`).
pub const CONFIG_ENV: &str = "SWITCHYARD_CONFIG";

/// Knobs of the data movement. Every value is checked by [`Config::validate`]
/// before any data moves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Channels: independent slices of the tokens, each with its own buffers
    /// (one SM pair per channel on the GPU).
    pub num_channels: usize,
    /// Tokens moved per step through a channel buffer (the chunk).
    pub chunk_tokens: usize,
    /// Capacity of each channel buffer, in tokens; at least one chunk.
    pub buffer_tokens: usize,
    /// Deadline of every wait, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self { num_channels: 2, chunk_tokens: 32, buffer_tokens: 128, timeout_ms: 10_000 }
    }
}

impl Config {
    /// Reject values that cannot work; `origin` names where they came from.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &str, reason: String| Err(Error::InvalidArgument { arg: arg.into(), reason });
        if self.num_channels == 0 {
            return bad("num_channels", "must be >= 1".into());
        }
        if self.chunk_tokens == 0 {
            return bad("chunk_tokens", "must be >= 1".into());
        }
        if self.buffer_tokens < self.chunk_tokens {
            return bad(
                "buffer_tokens",
                format!("{} is smaller than one chunk ({} tokens)", self.buffer_tokens, self.chunk_tokens),
            );
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms", "must be >= 1".into());
        }
        Ok(())
    }

    /// Read and validate a TOML config file; errors name the file and the key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::InvalidArgument { arg, reason } => {
                Error::Config { path: path.into(), reason: format!("key `{arg}`: {reason}") }
            }
            Error::Config { reason, .. } => Error::Config { path: path.into(), reason },
            other => other,
        })
    }

    /// Parse and validate TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config { path: "<string>".into(), reason: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), c);
    }

    #[test]
    fn impossible_values_are_rejected() {
        for (text, key) in [
            ("num_channels = 0", "num_channels"),
            ("chunk_tokens = 0", "chunk_tokens"),
            ("chunk_tokens = 64\nbuffer_tokens = 32", "buffer_tokens"),
            ("timeout_ms = 0", "timeout_ms"),
        ] {
            match Config::from_toml_str(text) {
                Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, key),
                other => panic!("{text}: expected InvalidArgument({key}), got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_key() {
        let e = Config::from_toml_str("chunk_tokenz = 3").unwrap_err().to_string();
        assert!(e.contains("chunk_tokenz"), "{e}");
        let e = Config::from_toml_str("chunk_tokens = \"big\"").unwrap_err().to_string();
        assert!(e.contains("chunk_tokens"), "{e}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("switchyard-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "num_channels = 0\n").unwrap();
        let e = Config::from_toml_file(&p).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
        assert!(e.to_string().contains("bad.toml") && e.to_string().contains("num_channels"), "{e}");
        let missing = Config::from_toml_file(&dir.join("missing.toml")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
