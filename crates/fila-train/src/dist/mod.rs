//! Many processes, one run: who is who ([`World`], read from the launcher's environment), the
//! rendezvous, the collectives ([`Comm`]) over one of two engines (TCP, NCCL) and the launcher
//! that starts the ranks of one node (`--nproc-per-node`).

pub mod comm;
pub mod engine;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
pub mod world;

pub use comm::{Comm, Fingerprint, Pending};
pub use engine::Op;
pub use world::World;
