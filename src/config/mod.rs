//! Runtime configuration: what the tuner may change (channels, chunk and buffer sizes, deadlines).
//!
//! [`Config`] is what one call runs with. Where its values come from is
//! [`resolve`]'s job: an explicit value, a config file (`--config` or
//! `SWITCHYARD_CONFIG`), the tuned file `switchyard tune` wrote to the cache
//! directory, or an analytic default; [`mod@file`] holds the TOML schema.

pub mod file;
pub mod resolve;

use crate::error::{Error, Result};

pub use file::{ConfigFile, ConfigKey, Entry, TunedOp};
pub use resolve::{analytic_default, Origin, Resolved, Resolver};

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
}

/// Names of the knobs, in [`Config`] field order (as in files and logs).
pub const KNOBS: [&str; 4] = ["num_channels", "chunk_tokens", "buffer_tokens", "timeout_ms"];

/// Some of the knobs of a [`Config`]: one layer of the resolution (an explicit
/// value, a file entry, ...). `None`: this layer does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialConfig {
    /// See [`Config::num_channels`].
    pub num_channels: Option<usize>,
    /// See [`Config::chunk_tokens`].
    pub chunk_tokens: Option<usize>,
    /// See [`Config::buffer_tokens`].
    pub buffer_tokens: Option<usize>,
    /// See [`Config::timeout_ms`].
    pub timeout_ms: Option<u64>,
}

impl PartialConfig {
    /// Every knob of `c`.
    pub fn full(c: &Config) -> Self {
        Self {
            num_channels: Some(c.num_channels),
            chunk_tokens: Some(c.chunk_tokens),
            buffer_tokens: Some(c.buffer_tokens),
            timeout_ms: Some(c.timeout_ms),
        }
    }

    /// Which knobs this layer sets, in [`KNOBS`] order.
    pub fn is_set(&self) -> [bool; 4] {
        [self.num_channels.is_some(), self.chunk_tokens.is_some(), self.buffer_tokens.is_some(), self.timeout_ms.is_some()]
    }

    /// This layer's values over `under`'s (a knob this layer leaves unset keeps `under`'s).
    pub fn over(&self, under: &PartialConfig) -> PartialConfig {
        PartialConfig {
            num_channels: self.num_channels.or(under.num_channels),
            chunk_tokens: self.chunk_tokens.or(under.chunk_tokens),
            buffer_tokens: self.buffer_tokens.or(under.buffer_tokens),
            timeout_ms: self.timeout_ms.or(under.timeout_ms),
        }
    }

    /// This layer's values over a complete config.
    pub fn apply_to(&self, base: &Config) -> Config {
        Config {
            num_channels: self.num_channels.unwrap_or(base.num_channels),
            chunk_tokens: self.chunk_tokens.unwrap_or(base.chunk_tokens),
            buffer_tokens: self.buffer_tokens.unwrap_or(base.buffer_tokens),
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn impossible_values_are_rejected() {
        let d = Config::default();
        for (c, key) in [
            (Config { num_channels: 0, ..d.clone() }, "num_channels"),
            (Config { chunk_tokens: 0, ..d.clone() }, "chunk_tokens"),
            (Config { chunk_tokens: 64, buffer_tokens: 32, ..d.clone() }, "buffer_tokens"),
            (Config { timeout_ms: 0, ..d.clone() }, "timeout_ms"),
        ] {
            match c.validate() {
                Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, key),
                other => panic!("{c:?}: expected InvalidArgument({key}), got {other:?}"),
            }
        }
    }

    #[test]
    fn layers_overlay_knob_by_knob() {
        let top = PartialConfig { num_channels: Some(3), ..Default::default() };
        let under = PartialConfig { num_channels: Some(9), timeout_ms: Some(5), ..Default::default() };
        let both = top.over(&under);
        assert_eq!(both, PartialConfig { num_channels: Some(3), timeout_ms: Some(5), ..Default::default() });
        assert_eq!(both.is_set(), [true, false, false, true]);
        let c = both.apply_to(&Config::default());
        assert_eq!(c, Config { num_channels: 3, timeout_ms: 5, ..Config::default() });
        assert_eq!(PartialConfig::full(&c).apply_to(&Config::default()), c);
    }
}
