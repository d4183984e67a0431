//! A block's backward split in two (ZB-H1, arXiv 2401.10241): the input gradients, which the stage
//! before waits for, and the parameter gradients, which a zero-bubble schedule runs later in what
//! would be the pipeline's idle time. [`ParamGrads`] lets one hand-written backward serve both ways:
//! it runs each piece of parameter-gradient work at once (the whole backward) or keeps it for a
//! [`WeightGrads`] (the split one) — the same code and the same operations, so the same bits.

use candle_core::{Result, Tensor};

type Job = Box<dyn FnOnce(&mut [Option<Tensor>]) -> Result<()> + Send>;

/// The parameter half of a split backward: what computes a block's slot gradients (in slot order,
/// `None` where a slot has none), run after its input gradients have gone on.
pub struct WeightGrads(Work);

enum Work {
    Ready(Vec<Option<Tensor>>),
    Later(Box<dyn FnOnce() -> Result<Vec<Option<Tensor>>> + Send>),
}

impl WeightGrads {
    /// Gradients already computed (a block whose backward does not split hands them over whole).
    pub fn ready(grads: Vec<Option<Tensor>>) -> Self {
        Self(Work::Ready(grads))
    }

    /// Gradients `work` computes when asked.
    pub fn later(work: impl FnOnce() -> Result<Vec<Option<Tensor>>> + Send + 'static) -> Self {
        Self(Work::Later(Box::new(work)))
    }

    /// Whether work is left (the backward split); `false` for gradients handed over finished.
    pub fn is_deferred(&self) -> bool {
        matches!(self.0, Work::Later(_))
    }

    /// Run the work: the slot gradients.
    pub fn compute(self) -> Result<Vec<Option<Tensor>>> {
        match self.0 {
            Work::Ready(g) => Ok(g),
            Work::Later(f) => f(),
        }
    }
}

impl std::fmt::Debug for WeightGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_deferred() { "WeightGrads(deferred)" } else { "WeightGrads(ready)" })
    }
}

/// Where a hand-written backward puts its slot gradients: set directly ([`ParamGrads::set`], for
/// those the input path computes anyway, like a norm's weight) or as work ([`ParamGrads::put`], the
/// weight matmuls), which runs at once or is kept for later. Build it with [`ParamGrads::whole`] in
/// [`Block::backward`](super::Block::backward) and [`ParamGrads::split`] in
/// [`Block::backward_split`](super::Block::backward_split), around the same function.
pub struct ParamGrads {
    slots: Vec<Option<Tensor>>,
    /// `Some` when the work waits for [`WeightGrads::compute`].
    later: Option<Vec<Job>>,
    /// Slots whose gradients nobody wants (frozen parameters): what is set or put for them alone is dropped.
    frozen: Vec<bool>,
}

impl ParamGrads {
    fn new(slots: usize, defer: bool) -> Self {
        Self { slots: vec![None; slots], later: defer.then(Vec::new), frozen: vec![false; slots] }
    }

    /// Mark `slots` frozen ([`ParamRef::Frozen`](super::ParamRef::Frozen)): [`ParamGrads::set`] and
    /// [`ParamGrads::put_rows`] for them alone do nothing, so their work is never run.
    pub fn freeze(&mut self, slots: impl IntoIterator<Item = usize>) {
        for s in slots {
            self.frozen[s] = true;
        }
    }

    /// Whether slot `slot` is frozen.
    pub fn is_frozen(&self, slot: usize) -> bool {
        self.frozen[slot]
    }

    /// The whole backward: `backward` (given the sink, returning the input gradients) with every
    /// piece of work run where it is put. Returns `(slot gradients, input gradients)`.
    pub fn whole(slots: usize, backward: impl FnOnce(&mut ParamGrads) -> Result<Vec<Option<Tensor>>>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        let mut g = Self::new(slots, false);
        let inputs = backward(&mut g)?;
        Ok((g.slots, inputs))
    }

    /// The split backward: `backward` runs its input path now; the work it puts is kept, in order,
    /// for the returned [`WeightGrads`].
    pub fn split(slots: usize, backward: impl FnOnce(&mut ParamGrads) -> Result<Vec<Option<Tensor>>>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        let mut g = Self::new(slots, true);
        let inputs = backward(&mut g)?;
        let (mut slots, jobs) = (g.slots, g.later.unwrap_or_default());
        if jobs.is_empty() {
            return Ok((WeightGrads::ready(slots), inputs));
        }
        let work = WeightGrads::later(move || {
            for job in jobs {
                job(&mut slots)?;
            }
            Ok(slots)
        });
        Ok((work, inputs))
    }

    /// Set slot `slot`'s gradient now (dropped for a frozen slot).
    pub fn set(&mut self, slot: usize, grad: Tensor) {
        if !self.frozen[slot] {
            self.slots[slot] = Some(grad);
        }
    }

    /// Work that sets slot gradients (it gets every slot): run now for the whole backward, kept for
    /// the split one. It should own what it reads (tensors are cheap handles), so a kept one holds
    /// only what it needs.
    pub fn put(&mut self, work: impl FnOnce(&mut [Option<Tensor>]) -> Result<()> + Send + 'static) -> Result<()> {
        match &mut self.later {
            Some(jobs) => {
                jobs.push(Box::new(work));
                Ok(())
            }
            None => work(&mut self.slots),
        }
    }

    /// Work whose result is split along dimension 0 into slots: `parts` are (slot, rows), in order
    /// (one part: the whole tensor, whatever its rows). Skipped when every part's slot is frozen.
    pub fn put_rows(&mut self, parts: Vec<(usize, usize)>, work: impl FnOnce() -> Result<Tensor> + Send + 'static) -> Result<()> {
        if parts.iter().all(|&(slot, _)| self.frozen[slot]) {
            return Ok(());
        }
        self.put(move |slots| {
            let t = work()?;
            if let [(slot, _)] = parts[..] {
                slots[slot] = Some(t);
                return Ok(());
            }
            let mut at = 0;
            for (slot, rows) in parts {
                slots[slot] = Some(t.narrow(0, at, rows)?);
                at += rows;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn backward(g: &mut ParamGrads, log: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>) -> Result<Vec<Option<Tensor>>> {
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((3, 2))?;
        g.set(0, x.sum_all()?);
        let l = log.clone();
        g.put_rows(vec![(1, 1), (2, 2)], move || {
            l.lock().unwrap().push("weights");
            Ok(x)
        })?;
        log.lock().unwrap().push("inputs done");
        Ok(vec![None])
    }

    #[test]
    fn split_work_waits_for_compute_and_gives_the_whole_backwards_gradients() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (whole, _) = ParamGrads::whole(3, |g| backward(g, log.clone())).unwrap();
        assert_eq!(*log.lock().unwrap(), ["weights", "inputs done"]);
        log.lock().unwrap().clear();
        let (work, inputs) = ParamGrads::split(3, |g| backward(g, log.clone())).unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!(*log.lock().unwrap(), ["inputs done"]);
        assert!(work.is_deferred());
        let split = work.compute().unwrap();
        assert_eq!(*log.lock().unwrap(), ["inputs done", "weights"]);
        let v = |g: &[Option<Tensor>]| g.iter().map(|t| t.as_ref().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>();
        assert_eq!(v(&whole), v(&split));
        assert_eq!(v(&split), vec![vec![15.0], vec![0.0, 1.0], vec![2.0, 3.0, 4.0, 5.0]]);
    }
}
