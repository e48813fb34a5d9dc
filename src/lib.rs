//! # switchyard
//!
//! An expert-parallel all-to-all runtime for Mixture-of-Experts layers.
//!
//! *Dispatch* sends each token to every rank that hosts one of its top-k
//! experts (once per rank); *combine* brings one row per received token back
//! and sums them per token. Across nodes a token crosses the inter-node hop once
//! per destination node, to the rank with the same local index, which forwards
//! it inside its node (the DeepSeek-V3 design); combine reverses the route and
//! sums each node's partial rows before they cross back.
//!
//! ```
//! use switchyard::{backend::cpu::CpuCluster, Config, Communicator, DispatchOptions, Layout, Rows, Topology};
//! use half::bf16;
//!
//! let topo = Topology::new(2, 2).unwrap(); // 2 emulated nodes x 2 ranks
//! let ranks = CpuCluster::new(topo, Config::default()).unwrap().into_ranks();
//! let hidden = 128;
//! let outs: Vec<_> = std::thread::scope(|s| {
//!     let hs: Vec<_> = ranks.into_iter().map(|mut comm| s.spawn(move || {
//!         // Two tokens per rank, top-2 of 8 experts (2 per rank).
//!         let x = Rows::Bf16 { hidden, data: vec![bf16::from_f32(comm.rank() as f32); 2 * hidden] };
//!         let idx = vec![0, 7, 2, -1];
//!         let w = vec![0.5, 0.5, 1.0, 0.0];
//!         let layout = Layout::new(&idx, 2, 8, comm.topology()).unwrap();
//!         let (recv, handle) = comm.dispatch(x.as_ref(), &idx, &w, &layout, &DispatchOptions::default()).unwrap();
//!         // ... run the local experts on recv.x; here: identity.
//!         let y = match &recv.x { Rows::Bf16 { data, .. } => data.clone(), _ => unreachable!() };
//!         comm.combine(&y, hidden, &handle, None).unwrap()
//!     })).collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! // Token 0 of rank r went to ranks 0 and 3 and comes back twice: 2 * r.
//! assert_eq!(outs[3].x[0].to_f32(), 6.0);
//! ```

pub mod backend;
pub mod bench;
pub mod bootstrap;
pub mod config;
pub mod conformance;
pub mod error;
pub mod handle;
pub mod oracle;
pub mod probe;
pub mod quant;
pub mod routing;
pub mod tensor;
pub mod topology;
pub mod tune;
pub mod workload;

pub use backend::{CombineOutput, Communicator, DispatchOptions, DispatchOutput, HopCount, Traffic, TrafficLog};
pub use config::Config;
pub use error::{Error, Result, Role, WaitDiagnostic};
pub use handle::Handle;
pub use routing::Layout;
pub use tensor::{DType, Rows, RowsRef};
pub use topology::Topology;
