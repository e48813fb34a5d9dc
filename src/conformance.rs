//! The conformance suite as data: cases (a workload spec, a config, options)
//! and a runner that checks any backend's results against the serial oracle.
//! (being written)

use crate::backend::{CombineOutput, DispatchOptions, DispatchOutput};
use crate::config::Config;
use crate::workload::WorkloadSpec;

/// One conformance case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    /// Short unique name.
    pub name: String,
    /// Inputs of every rank.
    pub spec: WorkloadSpec,
    /// Data-movement config (channels, chunk, buffer).
    pub config: Config,
    /// FP8 on the wire, expert alignment.
    #[serde(skip)]
    pub options: DispatchOptions,
    /// Also run a cached dispatch with the first dispatch's handle.
    pub cached: bool,
    /// Pass weights to combine (and check the summed weights).
    pub combine_weights: bool,
}

/// Outcome of one case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseReport {
    /// Case name.
    pub name: String,
    /// Elements or rows that differ from the oracle beyond the documented bounds.
    pub wrong: usize,
    /// An error the backend returned, if any.
    pub error: Option<String>,
}

impl CaseReport {
    /// No error and nothing wrong.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.wrong == 0
    }
}

/// The standard cases `switchyard check` runs.
pub fn standard_cases() -> Vec<Case> {
    Vec::new()
}

/// Run one case on the CPU backend (threads as ranks) and compare with the oracle.
pub fn run_case_cpu(case: &Case) -> CaseReport {
    CaseReport { name: case.name.clone(), wrong: 0, error: Some("being written".into()) }
}

/// Mismatches between a dispatch output and the oracle's (BF16 and FP8 payloads bit-exact).
pub fn count_wrong_dispatch(got: &DispatchOutput, want: &DispatchOutput) -> usize {
    usize::from(got != want)
}

/// Elements of a combine output outside the documented bound around the oracle's.
pub fn count_wrong_combine(got: &CombineOutput, want: &CombineOutput, abs_sum: &[f32]) -> usize {
    let _ = abs_sum;
    usize::from(got != want)
}
