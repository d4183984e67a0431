//! Memory accounting: the bytes of each kind a rank holds between steps, from the buffers allocated.

/// Bytes held by one rank, per kind. Persistent kinds are measured between steps; `gathered_peak` is
/// the largest amount of all-gathered (stage 3) parameters alive at once during the last step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReport {
    /// Compute-dtype parameters: whole blocks (stages 0–2) or this rank's shards (stage 3).
    pub params: usize,
    /// Frozen parameters (a LoRA base) in the compute dtype: whole blocks (stages 0–2) or this
    /// rank's shards (stage 3). They have no gradients, master weights or optimizer state.
    pub frozen: usize,
    /// Reduced fp32 gradients kept between steps: whole (stages 0–1) or this rank's shards (2–3).
    pub grads: usize,
    /// fp32 master weights on the device tier (where blocks compute).
    pub master: usize,
    /// Optimizer state (AdamW: first and second moments) on the device tier.
    pub moments: usize,
    /// Master weights and optimizer state offloaded to host memory (`zero.offload_optimizer = "cpu"`).
    pub offloaded_host: usize,
    /// Master weights and optimizer state in NVMe files.
    pub offloaded_nvme: usize,
    /// Largest amount of all-gathered (stage 3) parameters alive at once during the last step.
    pub gathered_peak: usize,
    /// The host tier's staging buffers in host memory (page-locked on a GPU).
    pub staging: usize,
}

impl MemoryReport {
    /// Bytes held between steps where blocks compute: parameters (frozen ones too), gradients,
    /// master weights and optimizer state (offloaded state and `gathered_peak` excluded).
    pub fn persistent(&self) -> usize {
        self.params + self.frozen + self.grads + self.master + self.moments
    }
}
