//! Many processes, one run: who is who ([`World`]), the collectives ([`Comm`]) and the launcher
//! that starts the ranks of one node (`--nproc-per-node`).

pub mod comm;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod world;

pub use comm::{Comm, Fingerprint};
pub use world::World;
