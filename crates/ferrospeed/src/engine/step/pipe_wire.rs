//! What pipeline stages send each other: a list of tensors (a stage's outputs, or the gradients of
//! its inputs) as one point-to-point batch — a fixed-size header naming the micro-batch and each
//! tensor's dtype and shape, then the tensors' bytes — and the sender thread that posts a stage's
//! sends so that the compute thread never waits on one (the schedules assume sends never block).

use super::error::EngineError;
use crate::comm::{Buf, BufMut, CommError, Communicator, P2p};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use std::sync::mpsc;
use std::sync::Arc;

/// Header length in f32 words: kind, stage, micro-batch, count, then per tensor present/dtype/rank/dims
/// (room for 14 tensors: an MoE sparse layer hands its experts 7).
const HEADER: usize = 130;
const FIXED: usize = 4;
const MAX_RANK: usize = 6;
const PER_TENSOR: usize = 3 + MAX_RANK;

/// Which way a message goes: activations forward, their gradients back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Flow {
    Activations = 1,
    Gradients = 2,
}

/// A tensor's values on the host, owned, in its dtype.
enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostData {
    fn buf(&self) -> Buf<'_> {
        match self {
            Self::F32(v) => Buf::F32(v),
            Self::Bf16(v) => Buf::Bf16(v),
            Self::F16(v) => Buf::F16(v),
        }
    }
}

/// One message, ready to send: the header and the present tensors' values.
pub(super) struct Message {
    peer: usize,
    header: Vec<f32>,
    data: Vec<HostData>,
}

fn dtype_code(d: DType) -> Option<f32> {
    match d {
        DType::F32 => Some(1.0),
        DType::BF16 => Some(2.0),
        DType::F16 => Some(3.0),
        _ => None,
    }
}

/// What a message is: which way it goes, the stage it is for, the micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tag {
    pub flow: Flow,
    pub stage: usize,
    pub micro: usize,
}

/// `tensors` (absent ones allowed: an integer input's gradient) for `peer`, tagged with `flow`, the
/// stage they are for and `micro`. Floating-point tensors only; shapes of up to six dimensions.
pub(super) fn pack(peer: usize, flow: Flow, stage: usize, micro: usize, tensors: &[Option<Tensor>]) -> Result<Message, EngineError> {
    if FIXED + tensors.len() * PER_TENSOR > HEADER {
        return Err(EngineError::Model(format!("a pipeline stage passes {} tensors: at most {}", tensors.len(), (HEADER - FIXED) / PER_TENSOR)));
    }
    let mut header = vec![0f32; HEADER];
    (header[0], header[1], header[2], header[3]) = (flow as u8 as f32, stage as f32, micro as f32, tensors.len() as f32);
    let mut data = Vec::new();
    for (k, t) in tensors.iter().enumerate() {
        let Some(t) = t else { continue };
        let h = &mut header[FIXED + k * PER_TENSOR..FIXED + (k + 1) * PER_TENSOR];
        let code = dtype_code(t.dtype()).ok_or_else(|| {
            EngineError::Model(format!(
                "a pipeline stage's output {k} is {:?}: blocks at a stage boundary pass floating-point tensors (integer ones, such as masks, come from the batch)",
                t.dtype()
            ))
        })?;
        if t.rank() > MAX_RANK {
            return Err(EngineError::Model(format!("a pipeline stage's output {k} has {} dimensions: at most {MAX_RANK}", t.rank())));
        }
        if let Some(&big) = t.dims().iter().find(|&&n| n > 1 << 24) {
            return Err(EngineError::Model(format!("a pipeline stage's output {k} has a dimension of {big}: at most 2^24 per dimension")));
        }
        (h[0], h[1], h[2]) = (1.0, code, t.rank() as f32);
        for (d, &n) in t.dims().iter().enumerate() {
            h[3 + d] = n as f32;
        }
        let flat = t.flatten_all().and_then(|f| f.to_device(&Device::Cpu)).map_err(EngineError::tensor("a stage boundary"))?;
        let err = EngineError::tensor("a stage boundary");
        data.push(match t.dtype() {
            DType::F32 => HostData::F32(flat.to_vec1().map_err(err)?),
            DType::BF16 => HostData::Bf16(flat.to_vec1().map_err(err)?),
            _ => HostData::F16(flat.to_vec1().map_err(err)?),
        });
    }
    Ok(Message { peer, header, data })
}

/// Receive the next message [`pack`] sent from `peer`: its tag and its tensors on `device`.
pub(super) fn receive(comm: &dyn Communicator, peer: usize, device: &Device) -> Result<(Tag, Vec<Option<Tensor>>), EngineError> {
    let mut header = vec![0f32; HEADER];
    comm.send_recv(vec![P2p::Recv { peer, buf: BufMut::F32(&mut header) }])?;
    let flow = match header[0] as u8 {
        1 => Flow::Activations,
        2 => Flow::Gradients,
        k => return Err(EngineError::Model(format!("pipeline: a message of kind {k} from pipeline rank {peer}, which is not a stage boundary's"))),
    };
    let tag = Tag { flow, stage: header[1] as usize, micro: header[2] as usize };
    let count = header[3] as usize;
    let bad = |what: String| EngineError::Model(format!("pipeline: a malformed message from pipeline rank {peer}: {what}"));
    if FIXED + count * PER_TENSOR > HEADER {
        return Err(bad(format!("{count} tensors")));
    }
    let mut shapes = Vec::with_capacity(count);
    let mut bufs: Vec<Option<HostData>> = Vec::with_capacity(count);
    for k in 0..count {
        let h = &header[FIXED + k * PER_TENSOR..FIXED + (k + 1) * PER_TENSOR];
        if h[0] == 0.0 {
            (shapes.push(Vec::new()), bufs.push(None));
            continue;
        }
        if h[2] as usize > MAX_RANK {
            return Err(bad(format!("a tensor of {} dimensions", h[2])));
        }
        let dims: Vec<usize> = h[3..3 + h[2] as usize].iter().map(|&d| d as usize).collect();
        let n = dims.iter().product();
        bufs.push(Some(match h[1] as u8 {
            1 => HostData::F32(vec![0.0; n]),
            2 => HostData::Bf16(vec![bf16::ZERO; n]),
            3 => HostData::F16(vec![f16::ZERO; n]),
            code => return Err(bad(format!("dtype code {code}"))),
        }));
        shapes.push(dims);
    }
    let ops: Vec<P2p<'_>> = bufs
        .iter_mut()
        .flatten()
        .map(|b| P2p::Recv {
            peer,
            buf: match b {
                HostData::F32(v) => BufMut::F32(v),
                HostData::Bf16(v) => BufMut::Bf16(v),
                HostData::F16(v) => BufMut::F16(v),
            },
        })
        .collect();
    if !ops.is_empty() {
        comm.send_recv(ops)?;
    }
    let err = || EngineError::tensor("a stage boundary");
    let tensors = bufs
        .into_iter()
        .zip(shapes)
        .map(|(b, dims)| {
            let Some(b) = b else { return Ok(None) };
            let t = match b {
                HostData::F32(v) => Tensor::from_vec(v, dims, &Device::Cpu),
                HostData::Bf16(v) => Tensor::from_vec(v, dims, &Device::Cpu),
                HostData::F16(v) => Tensor::from_vec(v, dims, &Device::Cpu),
            };
            t.and_then(|t| t.to_device(device)).map(Some).map_err(err())
        })
        .collect::<Result<_, _>>()?;
    Ok((tag, tensors))
}

/// The thread that posts a stage's sends in order (a send waits for its receiver; the compute
/// thread goes on). [`Sender::flush`] waits for every send so far and reports the first failure.
pub(super) struct Sender {
    jobs: Option<mpsc::Sender<Message>>,
    done: mpsc::Receiver<Result<(), CommError>>,
    posted: usize,
}

impl Sender {
    pub(super) fn spawn(comm: Arc<dyn Communicator>) -> Self {
        let (jobs, rx) = mpsc::channel::<Message>();
        let (tx, done) = mpsc::channel();
        // Detached: a send stuck on a dead peer ends with the group's timeout, not with the engine.
        let _ = std::thread::Builder::new()
            .name("ferrospeed-pipe-send".into())
            .spawn(move || {
                for m in rx {
                    let mut ops = vec![P2p::Send { peer: m.peer, buf: Buf::F32(&m.header) }];
                    ops.extend(m.data.iter().map(|d| P2p::Send { peer: m.peer, buf: d.buf() }));
                    if tx.send(comm.send_recv(ops)).is_err() {
                        return;
                    }
                }
            });
        Self { jobs: Some(jobs), done, posted: 0 }
    }

    /// Queue `m`.
    pub(super) fn post(&mut self, m: Message) -> Result<(), EngineError> {
        self.posted += 1;
        self.jobs
            .as_ref()
            .and_then(|j| j.send(m).ok())
            .ok_or_else(|| EngineError::Unsupported("the pipeline's sender thread is gone".into()))
    }

    /// Wait for every queued send.
    pub(super) fn flush(&mut self) -> Result<(), EngineError> {
        while self.posted > 0 {
            let r = self.done.recv().map_err(|_| EngineError::Unsupported("the pipeline's sender thread is gone".into()))?;
            self.posted -= 1;
            r?;
        }
        Ok(())
    }
}
