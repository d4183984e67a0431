//! Context parallelism of the Llama family on CPU ranks (threads over TCP): each rank of a
//! context-parallel group holds a chunk of every sequence. Ulysses: all-to-alls turn the q/k/v
//! projection into the whole sequence's rows of its share of the heads and the attention output
//! back; ring attention: key/value chunks pass round the group, partial results merged by their
//! log-sum-exp (and GQA at a cp that does not divide the key/value heads). Against cp = 1 from the same seed, on packed documents with a loss mask (attention and
//! RoPE restart at each document; the loss is the mean over the micro-batch's counted targets,
//! whichever chunk holds them): losses within 1e-5, every parameter's gradient within 1e-5 (one SGD
//! step at a learning rate of 1), ZeRO stages over the data × context-parallel ranks bitwise equal
//! to stage 0; head counts cp does not divide are refused in one line.

mod support;

use candle_core::{Device, Tensor};
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Batch, EngineConfig};
use ferrospeed::optim::{LrSchedule, Sgd};
use ferrospeed::precision::Precision;
use ferrospeed::CommConfig;
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig};
use std::sync::Arc;
use support::bits;

const STEPS: usize = 4;

/// 4 query heads, 4 key/value heads (cp ∈ {2, 4}), every bias, the head tied.
fn mha() -> LlamaConfig {
    LlamaConfig { attention_bias: true, mlp_bias: true, tie_word_embeddings: true, ..LlamaConfig::tiny(2, 32, 4, 4, 256, 16) }
}

/// GQA: 4 query heads, 2 key/value heads (cp 2; cp 4 refused).
fn gqa() -> LlamaConfig {
    LlamaConfig::tiny(2, 32, 4, 2, 256, 16)
}

/// A step's micro-batches as packed documents (lengths 5, 5, 6: positions restart) with a loss mask
/// that drops every third target.
fn packed(sampler: &BatchSampler, corpus: &ferrospeed_models::TextCorpus, step: usize) -> Vec<Batch> {
    support::batches(sampler, corpus, step, &Device::Cpu)
        .into_iter()
        .map(|b| {
            let t = sampler.seq_len;
            let positions: Vec<u32> = (0..sampler.micro_batch).flat_map(|_| (0..t as u32).map(|j| if j < 10 { j % 5 } else { j - 10 })).collect();
            let mask: Vec<f32> = (0..sampler.micro_batch * t).map(|j| if j % 3 == 0 { 0.0 } else { 1.0 }).collect();
            b.with("positions", Tensor::from_vec(positions, (sampler.micro_batch, t), &Device::Cpu).unwrap())
                .with("loss_mask", Tensor::from_vec(mask, (sampler.micro_batch, t), &Device::Cpu).unwrap())
        })
        .collect()
}

/// `world` ranks in context-parallel groups of `cp`, ZeRO `stage`, `steps` steps (SGD at a learning
/// rate of 1 without clipping where `sgd`, else AdamW): rank 0's losses and every block's parameters.
fn run(cfg: LlamaConfig, world: usize, cp: usize, stage: u8, steps: usize, sgd: bool) -> (Vec<f64>, Vec<Vec<f32>>) {
    run_kind(cfg, world, cp, false, stage, steps, sgd)
}

/// [`run`] with ring attention (`ring`) or Ulysses.
fn run_kind(cfg: LlamaConfig, world: usize, cp: usize, ring: bool, stage: u8, steps: usize, sgd: bool) -> (Vec<f64>, Vec<Vec<f32>>) {
    run_split(cfg, world, 1, cp, ring, stage, steps, sgd)
}

/// [`run_kind`] with the blocks split over tensor-parallel groups of `tp` too.
#[allow(clippy::too_many_arguments)]
fn run_split(cfg: LlamaConfig, world: usize, tp: usize, cp: usize, ring: bool, stage: u8, steps: usize, sgd: bool) -> (Vec<f64>, Vec<Vec<f32>>) {
    let corpus = support::corpus("Context parallel ranks hold a chunk of every sequence. ", 40);
    run_local_world(world, &CommConfig::default(), |comm| {
        let mut c: EngineConfig = support::engine_config(stage, Precision::Fp32, false, 5);
        if sgd {
            c.optimizer = Arc::new(Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false });
            c.grad_clip = 0.0;
        }
        let model = Llama::new(cfg).model().unwrap();
        let (mut engine, (dp_rank, dp)) = if tp > 1 { support::engine_with_tp_cp(model, Arc::new(comm), tp, cp, ring, c) } else { support::engine_with_cp(model, Arc::new(comm), cp, ring, c) }.unwrap();
        let sampler = BatchSampler { seed: 11, seq_len: 16, micro_batch: 2, accumulation: 2 / dp, world_size: dp, rank: dp_rank };
        let schedule = if sgd { LrSchedule { lr: 1.0, min_lr: 1.0, warmup: 0, total: 1 } } else { LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS } };
        let losses = (0..steps).map(|s| engine.train_step_at(&packed(&sampler, &corpus, s), schedule.at(s)).unwrap().loss).collect();
        let params = if sgd { (0..engine.model().num_blocks()).map(|i| engine.master(i).1.to_vec()).collect() } else { Vec::new() };
        (losses, params)
    })
    .unwrap()
    .remove(0)
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
}

#[test]
fn context_parallel_losses_and_every_gradient_match_cp_1_on_packed_masked_documents() {
    // Ulysses needs cp to divide the heads; ring attention does not (gqa at cp 4).
    let ulysses = [(2usize, false), (4, false), (2, true), (4, true)];
    for (name, cfg, kinds) in [("mha", mha(), &ulysses[..]), ("gqa", gqa(), &[(2, false), (2, true), (4, true)][..])] {
        let base = run(cfg, 1, 1, 0, STEPS, false).0;
        assert!(base.iter().all(|l| l.is_finite()) && base.last() < base.first(), "{name}: {base:?}");
        let (w0, w1) = (run(cfg, 1, 1, 0, 0, true).1, run(cfg, 1, 1, 0, 1, true).1);
        for &(cp, ring) in kinds {
            let name = format!("{name} {}", if ring { "ring" } else { "ulysses" });
            let got = run_kind(cfg, cp, cp, ring, 0, STEPS, false).0;
            assert!(close(&got, &base, 1e-5), "{name} cp {cp}: losses {got:?} vs cp 1 {base:?}");
            let after = run_kind(cfg, cp, cp, ring, 0, 1, true).1;
            for (i, ((w0, w1), a)) in w0.iter().zip(&w1).zip(&after).enumerate() {
                let want: Vec<f32> = w0.iter().zip(w1).map(|(x, y)| x - y).collect();
                let got: Vec<f32> = w0.iter().zip(a).map(|(x, y)| x - y).collect();
                if let Err(e) = support::gradients_match(&want, &got, w0, 1e-5) {
                    panic!("{name} cp {cp}: block {i}'s gradient {e}");
                }
            }
        }
    }
}

/// Four ranks as two data-parallel ranks × context-parallel groups of two: dp 2's losses within 1e-5,
/// ZeRO stages 1–3 (over all four ranks) bitwise equal to stage 0.
#[test]
fn data_parallel_times_context_parallel_matches_and_is_bitwise_across_stages() {
    let base = run(mha(), 2, 1, 0, STEPS, false).0;
    let ref0 = run(mha(), 4, 2, 0, STEPS, false).0;
    assert!(close(&ref0, &base, 1e-5), "dp 2 × cp 2 {ref0:?} vs dp 2 {base:?}");
    for stage in 1..=3 {
        assert_eq!(bits(&run(mha(), 4, 2, stage, STEPS, false).0), bits(&ref0), "dp 2 × cp 2 stage {stage} vs stage 0");
    }
    let ring0 = run_kind(mha(), 4, 2, true, 0, STEPS, false).0;
    assert!(close(&ring0, &base, 1e-5), "dp 2 × cp 2 ring {ring0:?} vs dp 2 {base:?}");
    assert_eq!(bits(&run_kind(mha(), 4, 2, true, 3, STEPS, false).0), bits(&ring0), "dp 2 × cp 2 ring: stage 3 vs stage 0");
}

/// Tensor and context parallelism together (tp 2 × cp 2 on four ranks, Ulysses over each rank's share
/// of the heads, and ring attention): the losses of one rank within 1e-5, ZeRO-3 over the context
/// ranks bitwise equal to stage 0.
#[test]
fn tensor_times_context_parallel_matches_one_rank() {
    let base = run(mha(), 1, 1, 0, STEPS, false).0;
    for ring in [false, true] {
        let got = run_split(mha(), 4, 2, 2, ring, 0, STEPS, false).0;
        assert!(close(&got, &base, 1e-5), "tp 2 × cp 2 (ring {ring}) {got:?} vs one rank {base:?}");
        assert_eq!(bits(&run_split(mha(), 4, 2, 2, ring, 3, STEPS, false).0), bits(&got), "tp 2 × cp 2 (ring {ring}): stage 3 vs stage 0");
    }
}

#[test]
fn head_counts_context_parallelism_cannot_split_are_refused() {
    let errors = run_local_world(4, &CommConfig::default(), |comm| {
        support::engine_with_cp(Llama::new(gqa()).model().unwrap(), Arc::new(comm), 4, false, support::engine_config(0, Precision::Fp32, false, 5)).err().map(|e| e.to_string())
    })
    .unwrap();
    for e in errors {
        let e = e.expect("cp 4 with 2 key/value heads was accepted");
        assert!(e.contains("2 key/value heads (num_key_value_heads), which parallel.cp = 4 does not divide (Ulysses gives each rank whole heads): choose parallel.cp among [1, 2], or parallel.cp_kind = \"ring\""), "{e}");
    }
}
