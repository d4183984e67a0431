//! Long context on CPU ranks: the Llama MLP run in tiles of token rows (`llama::mlp_tiled`, what a
//! 128K-token sequence takes) against the whole MLP, from the same seed: losses within 1e-6 over a
//! few AdamW steps and every parameter's gradient within 1e-6 of the largest (one SGD step at a
//! learning rate of 1), with and without MLP biases, and under tensor parallelism with sequence
//! parallelism (the tiles of each rank's gathered rows).

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::optim::{LrSchedule, Sgd};
use ferrospeed::precision::Precision;
use ferrospeed::CommConfig;
use ferrospeed_models::llama::mlp_tiled::force_tile_rows;
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig};
use std::sync::Arc;

/// `world` ranks (tensor-parallel groups of `world`, with sp), the MLP in tiles of `tile` rows (or
/// whole); `steps` steps of AdamW, or one of SGD at 1 (`sgd`): rank 0's losses and (SGD, world 1)
/// its blocks' parameters.
fn run(cfg: LlamaConfig, world: usize, tile: Option<usize>, steps: usize, sgd: bool) -> (Vec<f64>, Vec<Vec<f32>>) {
    let corpus = support::corpus("A long context runs the MLP a tile of rows at a time. ", 40);
    run_local_world(world, &CommConfig::default(), |comm| {
        force_tile_rows(tile);
        let mut c = support::engine_config(0, Precision::Fp32, false, 5);
        if sgd {
            c.optimizer = Arc::new(Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false });
            c.grad_clip = 0.0;
        }
        let (mut engine, _) = support::engine_with_tp(Llama::new(cfg).model().unwrap(), Arc::new(comm), world, world > 1, c).unwrap();
        let sampler = BatchSampler { seed: 11, seq_len: 16, micro_batch: 2, accumulation: 2, world_size: 1, rank: 0 };
        let schedule = if sgd { LrSchedule { lr: 1.0, min_lr: 1.0, warmup: 0, total: 1 } } else { LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: steps } };
        let losses = (0..steps).map(|s| engine.train_step_at(&support::batches(&sampler, &corpus, s, &Device::Cpu), schedule.at(s)).unwrap().loss).collect();
        let params = (0..engine.model().num_blocks()).map(|i| engine.master(i).1.to_vec()).collect();
        force_tile_rows(None);
        (losses, params)
    })
    .unwrap()
    .remove(0)
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * y.abs())
}

#[test]
fn a_tiled_mlp_trains_like_the_whole_one() {
    let plain = LlamaConfig::tiny(2, 32, 4, 2, 256, 16);
    let biased = LlamaConfig { mlp_bias: true, ..plain };
    for (name, cfg) in [("plain", plain), ("mlp biases", biased)] {
        let whole = run(cfg, 1, None, 4, false).0;
        // 64 rows a micro-batch: tiles of 5 (the last one short) and 64.
        for tile in [5, 64] {
            let tiled = run(cfg, 1, Some(tile), 4, false).0;
            assert!(close(&tiled, &whole, 1e-6), "{name}, tiles of {tile}: {tiled:?} vs whole {whole:?}");
        }
        let w0 = run(cfg, 1, None, 0, true).1;
        let (a, b) = (run(cfg, 1, None, 1, true).1, run(cfg, 1, Some(5), 1, true).1);
        for (i, ((w0, a), b)) in w0.iter().zip(&a).zip(&b).enumerate() {
            let (ga, gb): (Vec<f32>, Vec<f32>) = (w0.iter().zip(a).map(|(x, y)| x - y).collect(), w0.iter().zip(b).map(|(x, y)| x - y).collect());
            if let Err(e) = support::gradients_match(&ga, &gb, w0, 1e-6) {
                panic!("{name}: block {i}'s gradient with a tiled MLP {e}");
            }
        }
    }
    // Tensor and sequence parallelism: each rank tiles its gathered rows.
    let whole = run(plain, 1, None, 4, false).0;
    let split = run(plain, 2, Some(7), 4, false).0;
    assert!(close(&split, &whole, 1e-5), "tp 2 with sp, tiles of 7: {split:?} vs one rank whole {whole:?}");
}
