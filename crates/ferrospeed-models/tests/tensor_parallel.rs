//! Tensor parallelism of the Llama family on CPU ranks (threads over TCP): q/k/v and gate/up split by
//! heads and width (column-parallel), o and down by their inputs (row-parallel), the embedding and
//! head by vocabulary, against `tp = 1`. Each check trains from the same seed: the initial values of
//! every split are the slices of the whole model's, so the runs differ only in how sums are split.
//! Losses agree within 1e-5 (AdamW, several steps) and every parameter's gradient within 1e-5 of the
//! whole model's (one SGD step with a learning rate of 1 leaves `w0 − g`: the gradients, reassembled
//! from each rank's slices); ZeRO stages over the data-parallel ranks beside the tensor-parallel
//! groups stay bitwise equal to stage 0; shapes tp does not divide are refused in one line. Each check
//! runs with sequence parallelism too (activations between the layers' halves split by token rows:
//! all-gathers and reduce-scatters instead of all-reduces).

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{EngineConfig, TpSplit};
use ferrospeed::optim::{LrSchedule, Sgd};
use ferrospeed::parallel::tp_assemble;
use ferrospeed::precision::Precision;
use ferrospeed::shard::FlatParam;
use ferrospeed::CommConfig;
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig};
use ferrospeed::checkpoint::ImportScope;
use std::path::Path;
use std::sync::Arc;
use support::bits;

const STEPS: usize = 4;

/// GQA (4 query heads, 2 key/value heads): tp ∈ {1, 2}.
fn gqa() -> LlamaConfig {
    LlamaConfig::tiny(2, 32, 4, 2, 256, 16)
}

/// Every bias transformers' configs can ask for, and the head tied to the embedding.
fn biased_tied() -> LlamaConfig {
    LlamaConfig { attention_bias: true, o_proj_bias: true, mlp_bias: true, tie_word_embeddings: true, ..LlamaConfig::tiny(2, 32, 4, 4, 256, 16) }
}

/// What a run gives back: rank 0's losses and gradient norms, and each block's parameters after the
/// last step, whole (the tensor-parallel ranks' slices reassembled).
struct Run {
    losses: Vec<f64>,
    norms: Vec<f64>,
    params: Vec<Vec<f32>>,
}

/// `world` ranks in tensor-parallel groups of `tp`, ZeRO `stage`, `steps` steps; `sgd`: plain SGD with
/// a learning rate of 1 and no clipping (the update is the gradient), else AdamW.
fn run(cfg: LlamaConfig, world: usize, tp: usize, stage: u8, steps: usize, sgd: bool) -> Run {
    run_with(cfg, world, tp, stage, 0..steps, sgd, &Io::default())
}

/// Checkpoints and imports around a run: the state of `resume` first (or the weights of `import`,
/// a consolidated safetensors file), `save` a checkpoint after the steps; `seed` of the initial values.
#[derive(Default)]
struct Io<'a> {
    /// Sequence parallelism.
    sp: bool,
    resume: Option<&'a Path>,
    import: Option<&'a Path>,
    save: Option<&'a Path>,
    seed: u64,
}

/// [`run`] over the steps `steps` (the schedule's, from a resumed step) with `io`.
fn run_with(cfg: LlamaConfig, world: usize, tp: usize, stage: u8, steps: std::ops::Range<usize>, sgd: bool, io: &Io<'_>) -> Run {
    let corpus = support::corpus("Tensor parallel ranks split every layer of the model. ", 40);
    let per_rank = run_local_world(world, &CommConfig::default(), |comm| {
        let mut c: EngineConfig = support::engine_config(stage, Precision::Fp32, false, 5 + io.seed);
        if sgd {
            c.optimizer = Arc::new(Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false });
            c.grad_clip = 0.0;
        }
        let model = Llama::new(cfg).model().unwrap();
        let (mut engine, (dp_rank, dp, tp_rank)) = support::engine_with_tp(model, Arc::new(comm), tp, io.sp, c).unwrap();
        let sampler = BatchSampler { seed: 11, seq_len: 16, micro_batch: 1, accumulation: 4 / dp, world_size: dp, rank: dp_rank };
        let schedule = if sgd { LrSchedule { lr: 1.0, min_lr: 1.0, warmup: 0, total: steps.end } } else { LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS } };
        if let Some(dir) = io.resume {
            ferrospeed::checkpoint::load_into(&mut engine, dir).unwrap();
        }
        if let Some(file) = io.import {
            ferrospeed::checkpoint::load_consolidated(&mut engine, file, &|b, p| format!("{b}.{p}"), ImportScope::All).unwrap();
        }
        let stats: Vec<_> = steps.clone().map(|s| engine.train_step_at(&support::batches(&sampler, &corpus, s, &Device::Cpu), schedule.at(s)).unwrap()).collect();
        if let Some(dir) = io.save {
            let req = ferrospeed::checkpoint::SaveRequest { root: dir, samples: 0, keep: 1, keep_best: false, run: serde_json::Value::Null };
            ferrospeed::checkpoint::save(&mut engine, &req).unwrap();
        }
        // This rank's slice of every block (SGD runs at stage 0: the whole window).
        let m = engine.model();
        let params: Vec<Vec<f32>> = if sgd { (0..m.num_blocks()).map(|i| engine.master(i).1.to_vec()).collect() } else { Vec::new() };
        (tp_rank, stats.iter().map(|s| s.loss).collect::<Vec<_>>(), stats.iter().map(|s| s.grad_norm).collect::<Vec<_>>(), params, dp)
    })
    .unwrap();
    let (_, losses, norms, _, dp) = per_rank[0].clone();
    if !sgd {
        return Run { losses, norms, params: Vec::new() };
    }
    // Reassemble each block from the tensor-parallel ranks of data-parallel rank 0 (ranks 0..tp).
    let model = Llama::new(cfg).model().unwrap();
    let mut params = Vec::new();
    for i in 0..model.num_blocks() {
        let whole = model.own_params(i);
        let whole_flat = FlatParam::new(whole, 1);
        let mut out = vec![0f32; whole_flat.numel()];
        // The split of each parameter, as the blocks declare it (slots in order: own ones first-come).
        let plan = if tp == 1 { vec![TpSplit::Replicated; whole.len()] } else { own_splits(&model, i) };
        let local: Vec<_> = whole.iter().zip(&plan).map(|(s, p)| ferrospeed::shard::ParamSpec { shape: p.local_shape(&s.shape, tp).unwrap(), ..s.clone() }).collect();
        let local_flat = FlatParam::new(&local, dp);
        for (j, spec) in whole.iter().enumerate() {
            let slices: Vec<&[f32]> = (0..tp).map(|r| &per_rank[r].3[i][local_flat.range(j)]).collect();
            out[whole_flat.range(j)].copy_from_slice(&tp_assemble(&slices, &spec.shape, plan[j]));
        }
        params.push(out);
    }
    Run { losses, norms, params }
}

/// How block `i`'s own parameters split, from its plan over its slots.
fn own_splits(model: &ferrospeed::engine::Model, i: usize) -> Vec<TpSplit> {
    let plan = model.block(i).tensor_plan();
    let mut own = vec![TpSplit::Replicated; model.own_params(i).len()];
    for (slot, split) in model.slots(i).iter().zip(plan) {
        if slot.block == i && !slot.frozen {
            own[slot.index] = split;
        }
    }
    own
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
}

/// The gradients (`w0 − w1` of one SGD step at learning rate 1) of every parameter of every block,
/// and the initial values (`w1` is rounded to their precision: the measurement's own error).
fn gradients(cfg: LlamaConfig, world: usize, tp: usize, sp: bool) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let io = Io { sp, ..Io::default() };
    let (before, after) = (run_with(cfg, world, tp, 0, 0..0, true, &io), run_with(cfg, world, tp, 0, 0..1, true, &io));
    (before.params.iter().zip(&after.params).map(|(b, a)| b.iter().zip(a).map(|(x, y)| x - y).collect()).collect(), before.params)
}

#[test]
fn tensor_parallel_losses_and_every_gradient_match_tp_1() {
    for (name, cfg, tps) in [("gqa", gqa(), &[2usize][..]), ("biases, tied head", biased_tied(), &[2, 4][..])] {
        let base = run(cfg, 1, 1, 0, STEPS, false);
        assert!(base.losses.iter().all(|l| l.is_finite()) && base.losses.last() < base.losses.first(), "{name}: {:?}", base.losses);
        let (base_grads, w0) = gradients(cfg, 1, 1, false);
        for (tp, sp) in tps.iter().flat_map(|&tp| [(tp, false), (tp, true)]) {
            let got = run_with(cfg, tp, tp, 0, 0..STEPS, false, &Io { sp, ..Io::default() });
            assert!(close(&got.losses, &base.losses, 1e-5), "{name} tp {tp} sp {sp}: losses {:?} vs tp 1 {:?}", got.losses, base.losses);
            assert!(close(&got.norms, &base.norms, 1e-5), "{name} tp {tp} sp {sp}: gradient norms {:?} vs tp 1 {:?}", got.norms, base.norms);
            let (grads, _) = gradients(cfg, tp, tp, sp);
            let names = Llama::new(cfg).model().unwrap();
            for (i, (g, want)) in grads.iter().zip(&base_grads).enumerate() {
                let flat = FlatParam::new(names.own_params(i), 1);
                for (j, spec) in names.own_params(i).iter().enumerate() {
                    let (g, want) = (&g[flat.range(j)], &want[flat.range(j)]);
                    if let Err(e) = support::gradients_match(want, g, &w0[i][flat.range(j)], 1e-5) {
                        panic!("{name} tp {tp} sp {sp}: gradient of {} of {}: {e}", spec.name, names.block_names()[i]);
                    }
                }
            }
        }
    }
}

/// Four ranks as two data-parallel ranks × tensor-parallel groups of two: the losses of tp = 1 on two
/// ranks within 1e-5, and ZeRO stages 1–3 (over the data-parallel ranks) bitwise equal to stage 0.
#[test]
fn data_parallel_times_tensor_parallel_matches_and_is_bitwise_across_stages() {
    let cfg = gqa();
    let base = run(cfg, 2, 1, 0, STEPS, false);
    let ref0 = run(cfg, 4, 2, 0, STEPS, false);
    assert!(close(&ref0.losses, &base.losses, 1e-5), "dp 2 × tp 2 {:?} vs dp 2 {:?}", ref0.losses, base.losses);
    for stage in 1..=3 {
        assert_eq!(bits(&run(cfg, 4, 2, stage, STEPS, false).losses), bits(&ref0.losses), "dp 2 × tp 2 stage {stage} vs stage 0");
    }
    // With sequence parallelism: the same within 1e-5, stages bitwise.
    let sp = |stage| run_with(cfg, 4, 2, stage, 0..STEPS, false, &Io { sp: true, ..Io::default() }).losses;
    let sp0 = sp(0);
    assert!(close(&sp0, &base.losses, 1e-5), "dp 2 × tp 2 with sp {sp0:?} vs dp 2 {:?}", base.losses);
    assert_eq!(bits(&sp(3)), bits(&sp0), "dp 2 × tp 2 with sp: stage 3 vs stage 0");
}

#[test]
fn shapes_tensor_parallelism_cannot_split_are_refused() {
    // Two key/value heads over four ranks.
    let errors = run_local_world(4, &CommConfig::default(), |comm| {
        let model = Llama::new(gqa()).model().unwrap();
        support::engine_with_tp(model, Arc::new(comm), 4, false, support::engine_config(0, Precision::Fp32, false, 5)).err().map(|e| e.to_string())
    })
    .unwrap();
    for e in errors {
        let e = e.expect("tp 4 with 2 key/value heads was accepted");
        assert!(e.contains("2 key/value heads (num_key_value_heads), which parallel.tp = 4 does not divide: choose parallel.tp among [1, 2]"), "{e}");
    }
    // A vocabulary of 250 over four ranks.
    let errors = run_local_world(4, &CommConfig::default(), |comm| {
        let model = Llama::new(LlamaConfig { vocab_size: 250, ..biased_tied() }).model().unwrap();
        support::engine_with_tp(model, Arc::new(comm), 4, false, support::engine_config(0, Precision::Fp32, false, 5)).err().map(|e| e.to_string())
    })
    .unwrap();
    for e in errors {
        let e = e.expect("tp 4 with a vocabulary of 250 was accepted");
        assert!(e.contains("a vocabulary of 250 tokens, which parallel.tp = 4 does not divide"), "{e}");
    }
}

/// Checkpoints are universal across tp: saved at tp 2 they resume at tp 1, 2 (bitwise the
/// uninterrupted run), 4 and dp 2 × tp 2, and the tp = 1 run's losses follow within 1e-5; a checkpoint
/// of the initial values exports the same bytes whether saved at tp 1 or tp 4.
#[test]
fn tensor_parallel_checkpoints_resume_at_any_tp() {
    let cfg = biased_tied();
    let tmp = tempfile::tempdir().unwrap();
    let (saved, half) = (tmp.path().join("tp2"), STEPS / 2);
    let whole = run(cfg, 1, 1, 0, STEPS, false).losses;
    let straight = run(cfg, 2, 2, 0, STEPS, false).losses;
    let first = run_with(cfg, 2, 2, 0, 0..half, false, &Io { save: Some(&saved), ..Io::default() }).losses;
    assert_eq!(bits(&first), bits(&straight[..half]));
    let dir = ferrospeed::checkpoint::latest(&saved).unwrap().unwrap();
    // Split blocks make a format builds before them refuse (their windows are in slice coordinates).
    let meta = ferrospeed::checkpoint::read_meta(&dir).unwrap();
    assert_eq!(meta.format_version, ferrospeed::checkpoint::FORMAT_VERSION_SPLIT);
    assert!(meta.blocks.iter().any(|b| b.tp == 2 && !b.splits.is_empty()) && meta.files.iter().any(|f| f.tp_rank == 1), "{:?}", meta.blocks[0]);
    for (world, tp, stage, sp) in [(2, 2, 0, false), (1, 1, 0, false), (4, 4, 3, false), (4, 2, 2, true), (2, 1, 1, false)] {
        let rest = run_with(cfg, world, tp, stage, half..STEPS, false, &Io { resume: Some(&dir), sp, ..Io::default() }).losses;
        if (world, tp, stage, sp) == (2, 2, 0, false) {
            assert_eq!(bits(&rest), bits(&straight[half..]), "tp 2 resumed at tp 2 vs uninterrupted");
        }
        assert!(close(&rest, &whole[half..], 1e-5), "resumed at world {world} tp {tp} stage {stage}: {rest:?} vs tp 1 {:?}", &whole[half..]);
    }
    // The initial values, saved at tp 1 and tp 4 (stage 3: each file a shard of a slice), export alike.
    let mut exported = Vec::new();
    for (world, tp, stage) in [(1, 1, 0), (4, 4, 3)] {
        let root = tmp.path().join(format!("init-{tp}"));
        run_with(cfg, world, tp, stage, 0..0, false, &Io { save: Some(&root), ..Io::default() });
        let file = tmp.path().join(format!("init-{tp}.safetensors"));
        ferrospeed::checkpoint::export(&ferrospeed::checkpoint::latest(&root).unwrap().unwrap(), &file, &|b, p| format!("{b}.{p}")).unwrap();
        exported.push(std::fs::read(&file).unwrap());
    }
    assert!(exported[0] == exported[1], "the initial values saved at tp 4 export otherwise than at tp 1");
}

/// Weights imported from a file (what `model.init_from` does) are read as each rank's slices: from a
/// different seed, an import at tp 2 trains like the import at tp 1.
#[test]
fn tensor_parallel_ranks_import_their_slices_of_whole_weights() {
    let cfg = gqa();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("source");
    run_with(cfg, 1, 1, 0, 0..2, false, &Io { save: Some(&root), ..Io::default() });
    let file = tmp.path().join("weights.safetensors");
    ferrospeed::checkpoint::export(&ferrospeed::checkpoint::latest(&root).unwrap().unwrap(), &file, &|b, p| format!("{b}.{p}")).unwrap();
    let io = Io { import: Some(&file), seed: 7, ..Io::default() };
    let base = run_with(cfg, 1, 1, 0, 0..STEPS, false, &io).losses;
    let fresh = run_with(cfg, 1, 1, 0, 0..STEPS, false, &Io { seed: 7, ..Io::default() }).losses;
    assert_ne!(bits(&base), bits(&fresh), "the import changed nothing");
    let split = run_with(cfg, 2, 2, 0, 0..STEPS, false, &io).losses;
    assert!(close(&split, &base, 1e-5), "imported at tp 2 {split:?} vs tp 1 {base:?}");
}
