//! Parallelism beyond data parallelism: the device [`Mesh`] and the communicator of each of its groups.

mod groups;
mod mesh;

pub use groups::MeshComms;
pub use mesh::{Axis, Coords, Mesh, MeshError};
