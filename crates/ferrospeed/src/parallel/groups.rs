//! One communicator per mesh axis, split from the world's: what the parallelisms run their
//! collectives on.

use super::mesh::{Axis, Mesh};
use crate::comm::{CommError, Communicator};
use std::sync::Arc;

/// The world's communicator and one sub-group per [`Axis`] of a [`Mesh`] (a group of one rank
/// where the axis is off: it costs no connections and its collectives are copies).
pub struct MeshComms {
    mesh: Mesh,
    world: Arc<dyn Communicator>,
    groups: Vec<(Axis, Arc<dyn Communicator>)>,
}

impl MeshComms {
    /// Split `world` along every axis of `mesh`, in [`Axis::ALL`]'s order: a collective over the world.
    pub fn new(world: Arc<dyn Communicator>, mesh: Mesh) -> Result<Self, CommError> {
        if world.world_size() != mesh.world() {
            return Err(CommError::Split {
                group: world.group().describe(),
                axis: "mesh".into(),
                reason: format!("the mesh {mesh} is for {} ranks but the world has {}", mesh.world(), world.world_size()),
            });
        }
        let mut groups = Vec::with_capacity(Axis::ALL.len());
        for axis in Axis::ALL {
            let comm: Arc<dyn Communicator> = Arc::from(world.split(axis.name(), &mesh.groups(axis))?);
            groups.push((axis, comm));
        }
        Ok(Self { mesh, world, groups })
    }

    /// The mesh the groups were split by.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The whole job's communicator.
    pub fn world(&self) -> &Arc<dyn Communicator> {
        &self.world
    }

    /// The communicator of this rank's group along `axis`.
    pub fn get(&self, axis: Axis) -> &Arc<dyn Communicator> {
        &self.groups.iter().find(|(a, _)| *a == axis).expect("every axis has a group").1
    }
}
