//! The host tier's pipeline over blocks: a block's reduced gradient window is copied into a staging
//! buffer ahead of its update (while the block before it is updated); the CPU AdamW (all cores)
//! updates the host state from it and writes the compute copy into a second staging buffer, which is
//! copied into the block's variables while the next block is updated. Two buffers of each kind, sized
//! for the largest such block, live as long as the engine.
//!
//! The order, the buffers' rotation and the update are this file's; what a copy is belongs to a
//! [`Link`]: on a GPU, `host_cuda.rs` (pinned buffers, asynchronous copies ordered by CUDA events);
//! on a CPU run, [`HostLink`] (plain copies, complete at once). CPU runs take the same pipeline as
//! GPU runs, so the CPU tests exercise every step of it: a window not copied out, or a compute copy
//! not written back, changes their losses.
//!
//! Which blocks take it (`BlockParams::fast_host`): state on the host tier, AdamW, and a compute copy
//! the window maps onto whole — the variables where they are resident and the window is the whole
//! block (stage 0, or stages 1–2 on one rank), or the stage-3 shard (any world: the window is the
//! shard), in device memory (one upload per block), page-locked or plain host memory (the update
//! writes it in place: no upload at all).

use super::super::error::EngineError;
use crate::optim::{AdamW, ComputeElem, GroupSettings};
use crate::shard::FlatParam;
use candle_core::{DType, Tensor, Var};
use half::{bf16, f16};
use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// The copies between where blocks compute and the host memory of the state.
pub trait Link {
    /// Marks the completion of copies issued before it.
    type Event;
    /// A reduced gradient window where the gradients live.
    type Grad<'g>;
    /// Elements the buffers hold.
    fn capacity(&self) -> usize;
    /// Bytes of all the buffers.
    fn bytes(&self) -> usize;
    /// Elements of `grad`.
    fn grad_len(grad: &Self::Grad<'_>) -> usize;
    /// Start copying `grad` (block `j`'s) into gradient buffer `b`.
    fn download(&mut self, b: usize, j: usize, grad: Self::Grad<'_>) -> Result<Self::Event, EngineError>;
    /// Block the host until `event` has completed.
    fn wait(&self, event: Self::Event) -> Result<(), EngineError>;
    /// The first `n` gradients of buffer `b` (complete), and upload buffer `u` (free), at once.
    fn buffers(&mut self, b: usize, n: usize, u: usize) -> Result<(&[f32], &mut [u8]), EngineError>;
    /// Start copying the elements of upload buffer `u` from element `offset` into `range` of `dst`
    /// (a variable's tensor, or a stage-3 shard's).
    fn upload(&mut self, u: usize, offset: usize, dst: &Tensor, range: Range<usize>) -> Result<(), EngineError>;
    /// An event after every upload issued so far.
    fn record(&mut self) -> Result<Self::Event, EngineError>;
}

/// A link's buffers and the uploads in flight from them.
pub struct Staging<L: Link> {
    link: L,
    /// The upload last issued from each upload buffer.
    up_done: [Option<L::Event>; 2],
    next_up: usize,
}

impl<L: Link> Staging<L> {
    pub fn new(link: L) -> Self {
        Self { link, up_done: [None, None], next_up: 0 }
    }

    /// Bytes of the buffers.
    pub fn bytes(&self) -> usize {
        self.link.bytes()
    }
}

/// One step's use of the staging: downloads queued ahead, in block order.
pub struct StagingPass<'a, L: Link> {
    staging: &'a mut Staging<L>,
    /// Downloads in flight: block, buffer, the event after the copy.
    downs: VecDeque<(usize, usize, L::Event)>,
    free: Vec<usize>,
    /// The next block to consider for a download.
    next: usize,
    /// Time the host waited on copies.
    waited: Duration,
}

/// Where a block's compute copy goes.
pub enum Dest<'s> {
    /// The block's variables (resident; the window is the whole block), written range by range.
    Vars(&'s [Var]),
    /// A tensor holding exactly the window: a stage-3 shard in device memory.
    Window(&'s Tensor),
    /// Host bytes holding exactly the window: a stage-3 shard in page-locked or plain host memory,
    /// written by the update itself.
    Host(&'s mut [u8]),
}

/// What one block's update needs besides its gradient.
pub struct HostState<'s> {
    pub flat: &'s FlatParam,
    pub window: &'s Range<usize>,
    pub master: &'s mut [f32],
    pub m: &'s mut [f32],
    pub v: &'s mut [f32],
    /// The compute dtype.
    pub dtype: DType,
    pub dest: Dest<'s>,
    pub settings: &'s [GroupSettings],
}

impl<'a, L: Link> StagingPass<'a, L> {
    pub fn new(staging: &'a mut Staging<L>) -> Self {
        Self { staging, downs: VecDeque::new(), free: vec![1, 0], next: 0, waited: Duration::ZERO }
    }

    /// Queue the downloads of the next blocks that take this path (`grad(j)`: block j's reduced
    /// gradient window, `None` when j does not take it) while buffers are free.
    pub fn download_ahead<'g>(&mut self, num_blocks: usize, mut grad: impl FnMut(usize) -> Option<L::Grad<'g>>) -> Result<(), EngineError> {
        while self.next < num_blocks && !self.free.is_empty() {
            let j = self.next;
            self.next += 1;
            let Some(g) = grad(j) else { continue };
            let n = L::grad_len(&g);
            if n > self.staging.link.capacity() {
                return Err(EngineError::Unsupported(format!("block {j}'s window of {n} exceeds the staging of {}", self.staging.link.capacity())));
            }
            let b = self.free.pop().expect("checked");
            let done = self.staging.link.download(b, j, g)?;
            self.downs.push_back((j, b, done));
        }
        Ok(())
    }

    /// Update block `i` (its download queued by [`Self::download_ahead`]): AdamW over the host state
    /// from the downloaded gradient, the compute copy written into the block's variables.
    pub fn update(&mut self, i: usize, opt: &AdamW, mut s: HostState<'_>, factor: f32, lr: f64, t: u64) -> Result<(), EngineError> {
        let (j, b, down) = self.downs.pop_front().ok_or_else(|| EngineError::Unsupported(format!("no gradient download queued for block {i}")))?;
        if j != i {
            return Err(EngineError::Unsupported(format!("the download queued is block {j}'s, block {i} comes next")));
        }
        let n = s.window.len();
        let u = self.staging.next_up;
        self.staging.next_up = 1 - u;
        let waiting = Instant::now();
        if let Some(e) = self.staging.up_done[u].take() {
            self.staging.link.wait(e)?;
        }
        self.staging.link.wait(down)?;
        self.waited += waiting.elapsed();
        {
            let (grads, up) = self.staging.link.buffers(b, n, u)?;
            let HostState { flat, window, master, m, v, dtype, dest, settings } = &mut s;
            let out: &mut [u8] = match dest {
                Dest::Host(bytes) => bytes,
                _ => up,
            };
            let st = Fused { flat, window, master, m, v, settings };
            match dtype {
                DType::BF16 => fused::<bf16>(opt, st, grads, out, factor, lr, t),
                DType::F16 => fused::<f16>(opt, st, grads, out, factor, lr, t),
                _ => fused::<f32>(opt, st, grads, out, factor, lr, t),
            }
        }
        self.free.push(b);
        match &s.dest {
            Dest::Vars(vars) => {
                for (k, part) in s.flat.params_in(s.window.clone()) {
                    let start = s.flat.range(k).start;
                    self.staging.link.upload(u, part.start - s.window.start, vars[k].as_tensor(), part.start - start..part.end - start)?;
                }
            }
            Dest::Window(t) => self.staging.link.upload(u, 0, t, 0..n)?,
            // Written in place by the update.
            Dest::Host(_) => return Ok(()),
        }
        self.staging.up_done[u] = Some(self.staging.link.record()?);
        Ok(())
    }

    /// Wait for the uploads, so that nothing the CPU writes next overlaps them; the time the pass
    /// waited on copies, in all.
    pub fn finish(self) -> Result<Duration, EngineError> {
        let t = Instant::now();
        for e in self.staging.up_done.iter_mut().filter_map(Option::take) {
            self.staging.link.wait(e)?;
        }
        Ok(self.waited + t.elapsed())
    }
}

/// The state [`fused`] updates.
struct Fused<'a> {
    flat: &'a FlatParam,
    window: &'a Range<usize>,
    master: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    settings: &'a [GroupSettings],
}

/// AdamW over each parameter part of the window, the compute copy into `up` (elements of `T`).
fn fused<T: ComputeElem>(opt: &AdamW, s: Fused<'_>, grads: &[f32], up: &mut [u8], factor: f32, lr: f64, t: u64) {
    let n = s.window.len();
    assert!(up.len() >= n * std::mem::size_of::<T>() && up.as_ptr().align_offset(std::mem::align_of::<T>()) == 0, "the upload buffer holds the window");
    // SAFETY: checked above: `up` is aligned for `T` and holds `n` of them; every bit pattern is a `T`.
    let out = unsafe { std::slice::from_raw_parts_mut(up.as_mut_ptr().cast::<T>(), n) };
    for (k, part) in s.flat.params_in(s.window.clone()) {
        let r = part.start - s.window.start..part.end - s.window.start;
        let g = s.settings[k];
        opt.update_fused(&mut s.master[r.clone()], &grads[r.clone()], &mut s.m[r.clone()], &mut s.v[r.clone()], factor, lr * g.lr_scale, t, g.weight_decay, &mut out[r]);
    }
}

/// The link of a CPU run: the state's host memory and the blocks' variables are both in host
/// memory, so each copy is a plain copy, complete when it returns. Its buffers are those a GPU run
/// pins (the gradient window, the compute copy), so the pipeline moves the same data.
pub struct HostLink {
    grads: [Vec<f32>; 2],
    /// u64 words: aligned for any compute dtype.
    ups: [Vec<u64>; 2],
    elems: usize,
}

impl HostLink {
    /// Buffers for windows of up to `elems` elements of `dtype`.
    pub fn new(elems: usize, dtype: DType) -> Self {
        let words = (elems * dtype.size_in_bytes()).div_ceil(8);
        Self { grads: [vec![0.0; elems], vec![0.0; elems]], ups: [vec![0; words], vec![0; words]], elems }
    }
}

impl Link for HostLink {
    type Event = ();
    type Grad<'g> = &'g [f32];

    fn capacity(&self) -> usize {
        self.elems
    }

    fn bytes(&self) -> usize {
        self.grads.iter().map(|g| g.len() * 4).sum::<usize>() + self.ups.iter().map(|u| u.len() * 8).sum::<usize>()
    }

    fn grad_len(grad: &&[f32]) -> usize {
        grad.len()
    }

    fn download(&mut self, b: usize, _j: usize, grad: &[f32]) -> Result<(), EngineError> {
        self.grads[b][..grad.len()].copy_from_slice(grad);
        Ok(())
    }

    fn wait(&self, _event: ()) -> Result<(), EngineError> {
        Ok(())
    }

    fn buffers(&mut self, b: usize, n: usize, u: usize) -> Result<(&[f32], &mut [u8]), EngineError> {
        Ok((&self.grads[b][..n], bytemuck::cast_slice_mut(&mut self.ups[u])))
    }

    fn upload(&mut self, u: usize, offset: usize, dst: &Tensor, range: Range<usize>) -> Result<(), EngineError> {
        // A variable's tensor: the `Var` shares its storage, so `set` writes the variable.
        let var = Var::from_tensor(dst).map_err(EngineError::tensor("the host tier's upload"))?;
        let bytes: &[u8] = bytemuck::cast_slice(&self.ups[u]);
        let size = var.dtype().size_in_bytes();
        let src = &bytes[offset * size..(offset + range.len()) * size];
        if range.start != 0 || range.len() != var.elem_count() {
            return Err(EngineError::Unsupported(format!("the host link writes whole variables, not {range:?} of {}", var.elem_count())));
        }
        let values = match var.dtype() {
            DType::BF16 => candle_core::Tensor::from_slice(bytemuck::cast_slice::<u8, bf16>(src), var.shape(), &candle_core::Device::Cpu),
            DType::F16 => candle_core::Tensor::from_slice(bytemuck::cast_slice::<u8, f16>(src), var.shape(), &candle_core::Device::Cpu),
            _ => candle_core::Tensor::from_slice(bytemuck::cast_slice::<u8, f32>(src), var.shape(), &candle_core::Device::Cpu),
        };
        values.and_then(|t| var.set(&t)).map_err(EngineError::tensor("the host tier's upload"))
    }

    fn record(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
}
