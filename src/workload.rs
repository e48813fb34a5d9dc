//! Seeded workload generator: token rows and routing for every rank of a group.
//!
//! Shared by the bench, the conformance cases and the examples, so a case is
//! data (a spec and a seed), reproducible on any backend and in any process.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::routing;
use crate::tensor::{DType, Rows};
use crate::topology::Topology;

/// How tokens pick their experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingKind {
    /// Top-k of uniformly random positive scores.
    Uniform,
    /// DeepSeek-V3 node-limited top-k (at most `max_nodes` nodes per token).
    NodeLimited,
    /// Skewed: expert popularity follows a Zipf law (exponent 1) over a random permutation.
    Zipf,
}

/// Everything that defines a workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadSpec {
    /// Ranks and nodes.
    pub topology: Topology,
    /// Tokens per rank.
    pub tokens: usize,
    /// Elements per token row.
    pub hidden: usize,
    /// Experts per token (k).
    pub topk: usize,
    /// Total experts.
    pub num_experts: usize,
    /// Row type of the input.
    pub dtype: DType,
    /// Routing rule.
    pub routing: RoutingKind,
    /// Node limit M for node-limited routing.
    pub max_nodes: usize,
    /// Probability that a top-k slot is emptied to -1 (a "hole").
    pub hole_rate: f64,
    /// Seed; rank `r` uses its own stream derived from it.
    pub seed: u64,
}

/// One rank's inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RankInput {
    /// `[T, H]` rows.
    pub x: Rows,
    /// `[T, k]` expert ids (-1 for holes).
    pub topk_idx: Vec<i64>,
    /// `[T, k]` gate weights (0 for holes).
    pub topk_weights: Vec<f32>,
}

impl WorkloadSpec {
    /// Generate every rank's inputs.
    pub fn generate(&self) -> Result<Vec<RankInput>> {
        let world = self.topology.world();
        routing::experts_per_rank(self.num_experts, world)?;
        if self.topk == 0 || self.topk > self.num_experts {
            return Err(Error::InvalidArgument {
                arg: "topk".into(),
                reason: format!("k={} must be in 1..={}", self.topk, self.num_experts),
            });
        }
        if self.dtype == DType::Fp8 && (self.hidden == 0 || self.hidden % crate::quant::SCALE_GROUP != 0) {
            return Err(Error::HiddenNotMultipleOf128 { arg: "hidden", hidden: self.hidden });
        }
        let mut pop_rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_0f_e8be75);
        let popularity = self.popularity(&mut pop_rng);
        (0..world).map(|r| self.generate_rank(r, &popularity)).collect()
    }

    fn popularity(&self, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let e = self.num_experts;
        match self.routing {
            RoutingKind::Zipf => {
                let mut perm: Vec<usize> = (0..e).collect();
                for i in (1..e).rev() {
                    perm.swap(i, rng.gen_range(0..=i));
                }
                let mut pop = vec![0f32; e];
                for (rank, &expert) in perm.iter().enumerate() {
                    pop[expert] = 1.0 / (rank as f32 + 1.0);
                }
                pop
            }
            _ => vec![1.0; e],
        }
    }

    fn generate_rank(&self, rank: usize, popularity: &[f32]) -> Result<RankInput> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(rank as u64 + 1));
        let (t, e, k, h) = (self.tokens, self.num_experts, self.topk, self.hidden);
        let scores: Vec<f32> = (0..t * e).map(|i| (rng.gen::<f32>() + 1e-3) * popularity[i % e]).collect();
        let mut topk_idx = match self.routing {
            RoutingKind::NodeLimited => routing::node_limited_topk(&scores, e, k, self.topology, self.max_nodes)?,
            _ => routing::topk(&scores, e, k)?,
        };
        let mut topk_weights = vec![0f32; t * k];
        for tok in 0..t {
            let row = &mut topk_idx[tok * k..(tok + 1) * k];
            for slot in row.iter_mut() {
                if self.hole_rate > 0.0 && rng.gen_bool(self.hole_rate.min(1.0)) {
                    *slot = -1;
                }
            }
            let sum: f32 = row.iter().filter(|&&x| x >= 0).map(|&x| scores[tok * e + x as usize]).sum();
            for (slot, &x) in row.iter().enumerate() {
                if x >= 0 {
                    topk_weights[tok * k + slot] = scores[tok * e + x as usize] / sum;
                }
            }
        }
        let values: Vec<bf16> = (0..t * h).map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0))).collect();
        let x = match self.dtype {
            DType::Bf16 => Rows::Bf16 { hidden: h, data: values },
            DType::Fp8 => {
                let (data, scales) = crate::quant::quantize(&values, h);
                Rows::Fp8 { hidden: h, data, scales }
            }
        };
        Ok(RankInput { x, topk_idx, topk_weights })
    }
}

/// Expert outputs for a received batch: row `i` of `y` is a deterministic,
/// non-trivial function of the received row and its rank (so combine tests see
/// distinct values per rank). `[R, H]` BF16.
pub fn expert_outputs(recv: &Rows, rank: usize) -> Vec<bf16> {
    let (n, h) = (recv.num_rows(), recv.hidden());
    let mut y = Vec::with_capacity(n * h);
    let gain = 0.5 + 0.25 * (rank % 4) as f32;
    for i in 0..n {
        y.extend(recv.row_f32(i).into_iter().map(|v| bf16::from_f32(v * gain + 0.125)));
    }
    y
}
