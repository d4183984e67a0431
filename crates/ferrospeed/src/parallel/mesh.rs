//! The device mesh: how the ranks of a job split into pipeline, data, context and tensor groups.
//!
//! Ranks are laid out as `[pp][dp][cp][tp]`, tensor-parallel fastest (torchtitan's order): the ranks
//! that talk inside every layer sit next to each other, on one node when they fit; pipeline stages
//! are the slowest axis, so a stage boundary is the link that may cross nodes. Expert parallelism
//! does not add ranks: it cuts each data-parallel group into `dp / ep` expert groups of `ep`
//! consecutive members; the members at the same place of each expert group form the expert
//! data-parallel group (`edp`) that reduces an expert's gradients.

use std::fmt;

/// One axis of the mesh, or a combination of axes a parallelism needs a group for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Pipeline stages.
    Pp,
    /// Data parallelism (ZeRO shards its state over this group).
    Dp,
    /// Context parallelism (a sequence split over ranks).
    Cp,
    /// Tensor parallelism (a layer's matrices split over ranks).
    Tp,
    /// Expert parallelism: `ep` consecutive members of a data-parallel group.
    Ep,
    /// Expert data parallelism: the members of a data-parallel group holding the same experts.
    Edp,
    /// Data and context together: the ranks that hold the same parameters (gradients reduce here).
    DpCp,
}

impl Axis {
    /// Every axis, in the order groups are formed (the same on every rank).
    pub const ALL: [Axis; 7] = [Axis::Pp, Axis::Dp, Axis::Cp, Axis::Tp, Axis::Ep, Axis::Edp, Axis::DpCp];

    /// The name in configs, group names and errors.
    pub fn name(self) -> &'static str {
        match self {
            Axis::Pp => "pp",
            Axis::Dp => "dp",
            Axis::Cp => "cp",
            Axis::Tp => "tp",
            Axis::Ep => "ep",
            Axis::Edp => "edp",
            Axis::DpCp => "dp_cp",
        }
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rank's place on the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub pp: usize,
    pub dp: usize,
    pub cp: usize,
    pub tp: usize,
}

/// A mesh that cannot be built from the job's ranks, with the numbers to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    #[error("parallel.{axis} = 0: every axis needs at least 1 (1 turns it off)")]
    Zero { axis: &'static str },
    #[error(
        "world size {world} does not split into pp·tp·cp = {product} (pp = {pp}, tp = {tp}, cp = {cp}): launch a multiple of \
         {product} ranks, or change [parallel] so that pp·tp·cp divides {world}"
    )]
    Indivisible { world: usize, product: usize, pp: usize, tp: usize, cp: usize },
    #[error(
        "parallel.ep = {ep} does not divide the data-parallel size dp = {dp} ({world} ranks / pp·tp·cp = {product}): \
         choose ep among {choices:?}"
    )]
    Ep { ep: usize, dp: usize, world: usize, product: usize, choices: Vec<usize> },
}

/// The shape of a job's parallelism: sizes per axis, and which ranks form each group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    world: usize,
    pp: usize,
    dp: usize,
    cp: usize,
    tp: usize,
    ep: usize,
}

impl Mesh {
    /// The mesh of `world` ranks with the given axes; `dp = world / (pp·tp·cp)`, and `ep` divides `dp`.
    pub fn new(world: usize, pp: usize, tp: usize, cp: usize, ep: usize) -> Result<Self, MeshError> {
        for (axis, v) in [("pp", pp), ("tp", tp), ("cp", cp), ("ep", ep)] {
            if v == 0 {
                return Err(MeshError::Zero { axis });
            }
        }
        let product = pp * tp * cp;
        if world == 0 || world % product != 0 {
            return Err(MeshError::Indivisible { world, product, pp, tp, cp });
        }
        let dp = world / product;
        if dp % ep != 0 {
            let choices = (1..=dp).filter(|d| dp % d == 0).collect();
            return Err(MeshError::Ep { ep, dp, world, product, choices });
        }
        Ok(Self { world, pp, dp, cp, tp, ep })
    }

    /// Data parallelism only: every rank one data-parallel replica.
    pub fn data_parallel(world: usize) -> Self {
        Self { world, pp: 1, dp: world.max(1), cp: 1, tp: 1, ep: 1 }
    }

    /// Every valid mesh of `world` ranks: each divisor triple (pp, tp, cp) of the world with each `ep`
    /// dividing the data-parallel size left (what a layout search, or a test of every shape, walks).
    pub fn every(world: usize) -> Vec<Mesh> {
        let divisors = |n: usize| (1..=n).filter(move |d| n % d == 0);
        let mut out = Vec::new();
        for pp in divisors(world) {
            for tp in divisors(world / pp) {
                for cp in divisors(world / pp / tp) {
                    for ep in divisors(world / pp / tp / cp) {
                        out.extend(Mesh::new(world, pp, tp, cp, ep));
                    }
                }
            }
        }
        out
    }

    /// Ranks in the job.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The number of ranks in each group of `axis`.
    pub fn size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Pp => self.pp,
            Axis::Dp => self.dp,
            Axis::Cp => self.cp,
            Axis::Tp => self.tp,
            Axis::Ep => self.ep,
            Axis::Edp => self.dp / self.ep,
            Axis::DpCp => self.dp * self.cp,
        }
    }

    /// The rank at `c`.
    pub fn rank(&self, c: Coords) -> usize {
        ((c.pp * self.dp + c.dp) * self.cp + c.cp) * self.tp + c.tp
    }

    /// Where `rank` sits.
    pub fn coords(&self, rank: usize) -> Coords {
        let tp = rank % self.tp;
        let cp = (rank / self.tp) % self.cp;
        let dp = (rank / (self.tp * self.cp)) % self.dp;
        let pp = rank / (self.tp * self.cp * self.dp);
        Coords { pp, dp, cp, tp }
    }

    /// The groups of `axis`: a partition of the ranks, each group listed in the order of its members'
    /// index along the axis (so group rank `i` is the one at index `i`), the groups in order of their
    /// lowest rank.
    pub fn groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut key_of_group: Vec<(Coords, usize)> = Vec::new();
        for rank in 0..self.world {
            let (key, _) = self.place(axis, rank);
            match key_of_group.iter().position(|k| *k == key) {
                Some(g) => groups[g].push(rank),
                None => {
                    key_of_group.push(key);
                    groups.push(vec![rank]);
                }
            }
        }
        for g in &mut groups {
            g.sort_by_key(|&r| self.place(axis, r).1);
        }
        groups
    }

    /// The group of `axis` holding `rank`, and `rank`'s index in it.
    pub fn group_of(&self, axis: Axis, rank: usize) -> (Vec<usize>, usize) {
        let group = self.groups(axis).into_iter().find(|g| g.contains(&rank)).expect("the groups partition the ranks");
        let index = group.iter().position(|&r| r == rank).expect("the rank is in its group");
        (group, index)
    }

    /// What identifies `rank`'s group along `axis` (the coordinates it shares with its group, with
    /// a block index for expert groups), and its index inside the group.
    fn place(&self, axis: Axis, rank: usize) -> ((Coords, usize), usize) {
        let c = self.coords(rank);
        let zero = |mut k: Coords, f: fn(&mut Coords)| {
            f(&mut k);
            k
        };
        match axis {
            Axis::Pp => ((zero(c, |k| k.pp = 0), 0), c.pp),
            Axis::Dp => ((zero(c, |k| k.dp = 0), 0), c.dp),
            Axis::Cp => ((zero(c, |k| k.cp = 0), 0), c.cp),
            Axis::Tp => ((zero(c, |k| k.tp = 0), 0), c.tp),
            Axis::Ep => ((zero(c, |k| k.dp = 0), c.dp / self.ep), c.dp % self.ep),
            Axis::Edp => ((zero(c, |k| k.dp = 0), c.dp % self.ep), c.dp / self.ep),
            Axis::DpCp => ((zero(c, |k| (k.dp, k.cp) = (0, 0)), 0), c.dp * self.cp + c.cp),
        }
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pp={} dp={} cp={} tp={} ep={} ({} ranks)", self.pp, self.dp, self.cp, self.tp, self.ep, self.world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every valid mesh of 1 to 8 ranks.
    fn meshes() -> Vec<Mesh> {
        (1..=8).flat_map(Mesh::every).collect()
    }

    #[test]
    fn coordinates_round_trip_and_tensor_parallel_ranks_are_adjacent() {
        for m in meshes() {
            for rank in 0..m.world() {
                assert_eq!(m.rank(m.coords(rank)), rank, "{m}");
            }
            for g in m.groups(Axis::Tp) {
                assert!(g.windows(2).all(|w| w[1] == w[0] + 1), "{m}: tp group {g:?} not adjacent");
            }
        }
        let m = Mesh::new(8, 2, 2, 1, 1).unwrap();
        assert_eq!(m.coords(5), Coords { pp: 1, dp: 0, cp: 0, tp: 1 });
        assert_eq!(m.groups(Axis::Pp), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert_eq!(m.groups(Axis::Dp), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
    }

    #[test]
    fn every_axis_partitions_the_ranks_into_groups_of_its_size_varying_only_that_axis() {
        for m in meshes() {
            for axis in Axis::ALL {
                let groups = m.groups(axis);
                let mut seen = vec![0; m.world()];
                for g in &groups {
                    assert_eq!(g.len(), m.size(axis), "{m} {axis}: {groups:?}");
                    for &r in g {
                        seen[r] += 1;
                    }
                    let first = m.coords(g[0]);
                    for (i, &r) in g.iter().enumerate() {
                        let c = m.coords(r);
                        let same = |a: usize, b: usize| a == b;
                        match axis {
                            Axis::Pp => assert!(same(c.pp, i) && c.dp == first.dp && c.cp == first.cp && c.tp == first.tp),
                            Axis::Dp => assert!(same(c.dp, i) && c.pp == first.pp && c.cp == first.cp && c.tp == first.tp),
                            Axis::Cp => assert!(same(c.cp, i) && c.pp == first.pp && c.dp == first.dp && c.tp == first.tp),
                            Axis::Tp => assert!(same(c.tp, i) && c.pp == first.pp && c.dp == first.dp && c.cp == first.cp),
                            Axis::Ep => assert!(c.dp / m.size(Axis::Ep) == first.dp / m.size(Axis::Ep) && c.dp % m.size(Axis::Ep) == i),
                            Axis::Edp => assert!(c.dp % m.size(Axis::Ep) == first.dp % m.size(Axis::Ep) && c.dp / m.size(Axis::Ep) == i),
                            Axis::DpCp => assert!(c.pp == first.pp && c.tp == first.tp && c.dp * m.size(Axis::Cp) + c.cp == i),
                        }
                    }
                    let (own, index) = m.group_of(axis, g[g.len() - 1]);
                    assert_eq!((&own, index), (g, g.len() - 1));
                }
                assert!(seen.iter().all(|&n| n == 1), "{m} {axis}: {groups:?}");
            }
            // An expert group and an expert data-parallel group meet in exactly one rank.
            for e in m.groups(Axis::Ep) {
                for d in m.groups(Axis::Edp) {
                    let shared = e.iter().filter(|r| d.contains(r)).count();
                    let same_dp = m.group_of(Axis::Dp, e[0]).0.contains(&d[0]);
                    assert_eq!(shared, usize::from(same_dp), "{m}: {e:?} {d:?}");
                }
            }
        }
    }

    #[test]
    fn every_lists_exactly_the_meshes_new_accepts() {
        for world in 1..=12 {
            let mut brute = Vec::new();
            for (pp, tp, cp, ep) in (1..=world).flat_map(|a| (1..=world).flat_map(move |b| (1..=world).flat_map(move |c| (1..=world).map(move |d| (a, b, c, d))))) {
                brute.extend(Mesh::new(world, pp, tp, cp, ep));
            }
            assert_eq!(Mesh::every(world), brute, "world {world}");
        }
        assert_eq!(Mesh::every(8).len(), 35);
    }

    #[test]
    fn invalid_meshes_name_the_numbers_to_change() {
        let msg = Mesh::new(6, 2, 2, 1, 1).unwrap_err().to_string();
        assert!(msg.contains("world size 6 does not split into pp·tp·cp = 4") && msg.contains("multiple of 4"), "{msg}");
        let msg = Mesh::new(8, 2, 1, 1, 3).unwrap_err().to_string();
        assert!(msg.contains("parallel.ep = 3 does not divide") && msg.contains("dp = 4") && msg.contains("[1, 2, 4]"), "{msg}");
        let msg = Mesh::new(4, 0, 1, 1, 1).unwrap_err().to_string();
        assert!(msg.contains("parallel.pp = 0"), "{msg}");
        assert_eq!(Mesh::new(8, 2, 2, 1, 2).unwrap().size(Axis::Dp), 2);
        assert_eq!(Mesh::data_parallel(3), Mesh::new(3, 1, 1, 1, 1).unwrap());
    }
}
