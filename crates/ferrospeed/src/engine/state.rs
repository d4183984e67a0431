//! The engine's optimizer state as checkpoints see it: per block, the window of the flat buffer this
//! rank owns with its master weights and moments; and restoring it (then republishing parameters).

use super::error::EngineError;
use super::trainer::Engine;
use crate::precision::ScalerState;
use crate::shard::FlatParam;
use std::ops::Range;

/// One block's optimizer state held by this rank.
pub struct WindowRef<'a> {
    pub block: &'a str,
    pub flat: &'a FlatParam,
    /// Range of the padded flat buffer covered by `master`, `m` and `v`.
    pub window: Range<usize>,
    pub master: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
}

/// The same, writable.
pub struct WindowMut<'a> {
    pub block: &'a str,
    pub flat: &'a FlatParam,
    pub window: Range<usize>,
    pub master: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
}

impl Engine {
    /// Every block's state held by this rank, in block order.
    pub fn windows(&self) -> Vec<WindowRef<'_>> {
        self.blocks_state()
            .map(|(name, p)| WindowRef { block: name, flat: &p.flat, window: p.window.clone(), master: &p.master, m: &p.m, v: &p.v })
            .collect()
    }

    /// Every block's state, writable. After writing, call [`Engine::finish_restore`].
    pub fn windows_mut(&mut self) -> Vec<WindowMut<'_>> {
        self.blocks_state_mut()
            .map(|(name, p)| WindowMut {
                block: name,
                flat: &p.flat,
                window: p.window.clone(),
                master: &mut p.master,
                m: &mut p.m,
                v: &mut p.v,
            })
            .collect()
    }

    /// Adopt restored state: the step count (schedule, bias correction), the loss scaler, and the
    /// parameters blocks compute on, rebuilt from the master weights (a collective at stages 1–2).
    pub fn finish_restore(&mut self, steps_done: u64, scaler: Option<ScalerState>) -> Result<(), EngineError> {
        self.set_progress(steps_done, scaler);
        self.republish()
    }
}
