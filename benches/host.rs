//! Host-side pieces on the dispatch path: the layout (DeepSeek-V3 shape: 4096
//! tokens, top-8 of 256 experts, 2 nodes x 4 ranks) and the reference FP8 cast
//! (4096 x 7168 BF16 with 1x128 scales).
//!
//! ```text
//! cargo bench --bench host
//! ```
//!
//! Throughput is in bytes of input read: `topk_idx` for the layout, BF16 rows
//! for the cast.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use switchyard::workload::{RoutingKind, WorkloadSpec};
use switchyard::{quant, DType, Layout, Topology};

fn layout(c: &mut Criterion) {
    let topo = Topology::new(2, 4).unwrap();
    let (tokens, topk, num_experts) = (4096, 8, 256);
    let mut g = c.benchmark_group("layout");
    for routing in [RoutingKind::Uniform, RoutingKind::NodeLimited] {
        let spec = WorkloadSpec {
            topology: topo,
            tokens,
            hidden: 128,
            topk,
            num_experts,
            dtype: DType::Bf16,
            routing,
            max_nodes: 1,
            hole_rate: 0.0,
            seed: 1,
        };
        let idx = spec.generate().unwrap().swap_remove(0).topk_idx;
        g.throughput(Throughput::Bytes(std::mem::size_of_val(idx.as_slice()) as u64));
        g.bench_function(format!("new/{tokens}x{topk}of{num_experts}/{topo}/{routing:?}"), |b| {
            b.iter(|| Layout::new(black_box(&idx), topk, num_experts, topo).unwrap())
        });
    }
    g.finish();
}

fn fp8_cast(c: &mut Criterion) {
    let (rows, hidden) = (4096, 7168);
    let x: Vec<bf16> = (0..rows * hidden).map(|i| bf16::from_f32(((i % 1021) as f32 - 510.0) / 97.0)).collect();
    let mut g = c.benchmark_group("fp8");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((rows * hidden * 2) as u64));
    g.bench_function(format!("quantize/{rows}x{hidden}"), |b| b.iter(|| quant::quantize(black_box(&x), hidden)));
    g.finish();
}

criterion_group!(benches, layout, fp8_cast);
criterion_main!(benches);
