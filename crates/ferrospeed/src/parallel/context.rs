//! The narrow handle a block splits its sequence through under context parallelism (`parallel.cp`,
//! DeepSpeed-Ulysses): its rank and size in the context-parallel group, the chunk of the sequence it
//! holds (rank `r` of `cp` holds positions `r·t/cp .. (r+1)·t/cp` of every sample), and the two
//! all-to-alls around attention — from sequence chunks with every head to the whole sequence with
//! `1/cp` of the heads, and back. Every rank of the group calls them in the same order.

use crate::comm::{CommExt, Communicator};
use candle_core::Tensor;
use std::ops::Range;
use std::sync::Arc;

/// A block's view of its context-parallel group. Without context parallelism it is a group of one:
/// the chunk is the whole sequence and the all-to-alls return their input.
///
/// With ring attention ([`ContextGroup::with_ring`]) a block keeps every head of its chunk and passes
/// key/value chunks round the group instead ([`ContextGroup::ring_pass`]).
#[derive(Clone, Default)]
pub struct ContextGroup {
    comm: Option<Arc<dyn Communicator>>,
    ring: bool,
}

impl std::fmt::Debug for ContextGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContextGroup(rank {} of {}, {})", self.rank(), self.size(), if self.ring { "ring" } else { "ulysses" })
    }
}

impl ContextGroup {
    /// A group of one rank holding the whole sequence.
    pub fn single() -> Self {
        Self { comm: None, ring: false }
    }

    /// The group of `comm`'s ranks (Ulysses).
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm: Some(comm), ring: false }
    }

    /// The same group running ring attention (`true`) or Ulysses.
    pub fn with_ring(mut self, ring: bool) -> Self {
        self.ring = ring;
        self
    }

    /// Whether attention runs as ring attention (each rank keeps every head of its chunk).
    pub fn ring(&self) -> bool {
        self.ring && self.size() > 1
    }

    /// Ring attention's step: send `xs` to the next rank of the group (`rank + 1`, wrapping) and
    /// return what the previous one sent (same shapes, dtype and device). Every rank calls it the
    /// same number of times.
    pub fn ring_pass(&self, xs: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        let Some(comm) = self.comm.as_ref().filter(|c| c.world_size() > 1) else { return Ok(xs.to_vec()) };
        let (n, r) = (self.size(), self.rank());
        let host: Vec<Vec<f32>> = xs.iter().map(super::host_f32).collect::<candle_core::Result<_>>()?;
        let mut recv: Vec<Vec<f32>> = host.iter().map(|h| vec![0f32; h.len()]).collect();
        let mut ops = Vec::with_capacity(2 * xs.len());
        for h in &host {
            ops.push(crate::comm::P2p::Send { peer: (r + 1) % n, buf: crate::comm::Buf::F32(h) });
        }
        for h in recv.iter_mut() {
            ops.push(crate::comm::P2p::Recv { peer: (r + n - 1) % n, buf: crate::comm::BufMut::F32(h) });
        }
        comm.send_recv(ops).map_err(wrap)?;
        xs.iter().zip(recv).map(|(x, v)| super::from_host(v, x.shape(), x.dtype(), x.device())).collect()
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// The positions of a sequence of `t` this rank holds, or an error naming the sizes where the
    /// group does not divide `t`.
    pub fn chunk(&self, t: usize) -> candle_core::Result<Range<usize>> {
        let cp = self.size();
        if t % cp != 0 {
            candle_core::bail!("parallel.cp = {cp} splits sequences of {t} tokens, which it does not divide: choose a seq_len that cp divides");
        }
        let len = t / cp;
        Ok(self.rank() * len..(self.rank() + 1) * len)
    }

    /// From sequence chunks to heads: `x` is this rank's rows `[b·t/cp, W]` (sample-major, each
    /// sample's chunk in order) whose columns are the runs `segments` (their widths, adding up to
    /// `W`, each divided by `cp`: the query, key and value heads); returns every sample's whole
    /// sequence `[b·t, W/cp]` with this rank's part of each run (its `1/cp` of the heads).
    pub fn seq_to_heads(&self, x: &Tensor, b: usize, segments: &[usize]) -> candle_core::Result<Tensor> {
        let Some(comm) = self.comm.as_ref().filter(|c| c.world_size() > 1) else { return Ok(x.clone()) };
        let cp = self.size();
        let (rows, w) = x.dims2()?;
        check(segments, w, cp)?;
        let (tl, wl) = (rows / b, w / cp);
        let (dtype, device) = (x.dtype(), x.device().clone());
        let input: Vec<f32> = super::host_f32(x)?;
        // To rank p: every local row's part p of each run.
        let mut send = Vec::with_capacity(input.len());
        for p in 0..cp {
            for row in input.chunks(w) {
                let mut at = 0;
                for &s in segments {
                    let part = s / cp;
                    send.extend_from_slice(&row[at + p * part..at + (p + 1) * part]);
                    at += s;
                }
            }
        }
        let mut recv = vec![0f32; input.len()];
        let counts = vec![rows * wl; cp];
        comm.all_to_all_slice(&send, &counts, &mut recv, &counts).map_err(wrap)?;
        // From rank p: its chunk of every sample, rows (sample, position in the chunk).
        let mut out = vec![0f32; input.len()];
        for p in 0..cp {
            for bi in 0..b {
                for j in 0..tl {
                    let src = (p * rows + bi * tl + j) * wl;
                    let dst = (bi * tl * cp + p * tl + j) * wl;
                    out[dst..dst + wl].copy_from_slice(&recv[src..src + wl]);
                }
            }
        }
        super::from_host(out, (rows * cp, wl), dtype, &device)
    }

    /// The inverse of [`ContextGroup::seq_to_heads`]: `x` is every sample's whole sequence
    /// `[b·t, W/cp]` with this rank's part of each run of `segments`; returns this rank's chunk
    /// `[b·t/cp, W]` with every run whole.
    pub fn heads_to_seq(&self, x: &Tensor, b: usize, segments: &[usize]) -> candle_core::Result<Tensor> {
        let Some(comm) = self.comm.as_ref().filter(|c| c.world_size() > 1) else { return Ok(x.clone()) };
        let cp = self.size();
        let (rows_all, wl) = x.dims2()?;
        let w = wl * cp;
        check(segments, w, cp)?;
        let (rows, tl) = (rows_all / cp, rows_all / cp / b);
        let (dtype, device) = (x.dtype(), x.device().clone());
        let input: Vec<f32> = super::host_f32(x)?;
        // To rank p: its chunk of every sample.
        let mut send = Vec::with_capacity(input.len());
        for p in 0..cp {
            for bi in 0..b {
                let start = (bi * tl * cp + p * tl) * wl;
                send.extend_from_slice(&input[start..start + tl * wl]);
            }
        }
        let mut recv = vec![0f32; input.len()];
        let counts = vec![rows * wl; cp];
        comm.all_to_all_slice(&send, &counts, &mut recv, &counts).map_err(wrap)?;
        // From rank p: part p of each run, for every local row.
        let mut out = vec![0f32; input.len()];
        for p in 0..cp {
            for r in 0..rows {
                let src = &recv[(p * rows + r) * wl..(p * rows + r + 1) * wl];
                let (mut at, mut from) = (0, 0);
                for &s in segments {
                    let part = s / cp;
                    out[r * w + at + p * part..r * w + at + (p + 1) * part].copy_from_slice(&src[from..from + part]);
                    at += s;
                    from += part;
                }
            }
        }
        super::from_host(out, (rows, w), dtype, &device)
    }
}

fn check(segments: &[usize], w: usize, cp: usize) -> candle_core::Result<()> {
    if segments.iter().sum::<usize>() != w || segments.iter().any(|s| s % cp != 0) {
        candle_core::bail!("context parallelism: runs {segments:?} of {w} columns over {cp} ranks");
    }
    Ok(())
}

fn wrap(e: crate::comm::CommError) -> candle_core::Error {
    candle_core::Error::Msg(format!("context parallelism: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{run_local_world, CommConfig};
    use candle_core::Device;

    /// Over 2 and 4 ranks: each rank's rows of the whole sequence, turned to heads, are the whole
    /// sequence's columns of its part of every run; and back again, its rows unchanged.
    #[test]
    fn sequence_chunks_and_head_parts_exchange_exactly() {
        let (b, t, segments) = (2usize, 8usize, [8usize, 4, 4]);
        let w: usize = segments.iter().sum();
        let whole: Vec<f32> = (0..b * t * w).map(|i| i as f32).collect();
        for cp in [2usize, 4] {
            let got = run_local_world(cp, &CommConfig::default(), |comm| {
                let g = ContextGroup::new(Arc::new(comm));
                let chunk = g.chunk(t).unwrap();
                let mine: Vec<f32> = (0..b).flat_map(|bi| chunk.clone().flat_map(move |j| (0..w).map(move |c| ((bi * t + j) * w + c) as f32))).collect();
                let x = Tensor::from_vec(mine.clone(), (b * chunk.len(), w), &Device::Cpu).unwrap();
                let heads = g.seq_to_heads(&x, b, &segments).unwrap();
                let back = g.heads_to_seq(&heads, b, &segments).unwrap();
                (g.rank(), heads.flatten_all().unwrap().to_vec1::<f32>().unwrap(), back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), mine)
            })
            .unwrap();
            for (rank, heads, back, mine) in got {
                assert_eq!(back, mine, "cp {cp} rank {rank}: back to the chunk");
                let mut want = Vec::new();
                for row in whole.chunks(w) {
                    let mut at = 0;
                    for &s in &segments {
                        want.extend_from_slice(&row[at + rank * s / cp..at + (rank + 1) * s / cp]);
                        at += s;
                    }
                }
                assert_eq!(heads, want, "cp {cp} rank {rank}: heads");
            }
        }
    }
}
