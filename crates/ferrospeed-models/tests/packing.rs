//! Loss masks and packing, through the blocks' forward and hand-written backward (what training runs)
//! and their autograd forward: masked targets contribute exactly nothing; a packed row of documents gives
//! each document the loss it has alone (positions restart, no attention across a boundary); prepared
//! data gives those rows.

use candle_core::{DType, Device, Tensor, Var};
use ferrospeed::engine::{Batch, Model, Upstream};
use ferrospeed_models::ops::docs::{LOSS_MASK, POSITIONS};
use ferrospeed_models::{Gpt, GptConfig, Llama, LlamaConfig};

fn models() -> Vec<(&'static str, Model)> {
    vec![
        ("llama", Llama::new(LlamaConfig::tiny(2, 32, 4, 2, 64, 64)).model().unwrap()),
        ("gpt", Gpt::new(GptConfig { n_layer: 2, n_head: 4, d_model: 32, seq_len: 64, vocab_size: 64 }).model().unwrap()),
    ]
}

/// Seeded parameters for every block's own parameters.
fn params(model: &Model) -> Vec<Vec<Tensor>> {
    (0..model.num_blocks())
        .map(|i| {
            model
                .slots(i)
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let spec = &model.own_params(s.block)[s.index];
                    let n: usize = spec.shape.iter().product();
                    let v: Vec<f32> = (0..n).map(|k| (((k * 7919 + j * 104_729 + i * 31) % 1000) as f32 / 1000.0 - 0.5) * 0.4).collect();
                    let t = Tensor::from_vec(v, spec.shape.clone(), &Device::Cpu).unwrap();
                    if spec.init == ferrospeed::engine::Init::Ones { t.affine(0.5, 1.0).unwrap() } else { t }
                })
                .collect()
        })
        .collect()
}

/// The loss and every parameter gradient, through forward_saving and the hand-written backward.
fn loss_and_grads(model: &Model, p: &[Vec<Tensor>], batch: &Batch) -> (f64, Vec<Vec<f32>>) {
    let mut x: Vec<Tensor> = Vec::new();
    let mut saved = Vec::new();
    for (i, params) in p.iter().enumerate() {
        let (y, s) = model.block(i).forward_saving(params, &x, batch).unwrap().unwrap();
        saved.push(s);
        x = y;
    }
    let loss = x[0].to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let mut grads = vec![Vec::new(); p.len()];
    let mut up: Vec<Option<Tensor>> = Vec::new();
    for i in (0..p.len()).rev() {
        let s = saved.pop().unwrap();
        let upstream = if i + 1 == p.len() { Upstream::Loss(1.0) } else { Upstream::Grads(&up) };
        let (g, dx) = model.block(i).backward(&p[i], s, upstream).unwrap();
        grads[i] = g.into_iter().flatten().flat_map(|t| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()).collect();
        up = dx;
    }
    (loss, grads)
}

/// The loss of the autograd forward (the composed ops).
fn autograd_loss(model: &Model, p: &[Vec<Tensor>], batch: &Batch) -> f64 {
    let vars: Vec<Vec<Tensor>> = p.iter().map(|b| b.iter().map(|t| Var::from_tensor(t).unwrap().as_tensor().clone()).collect()).collect();
    let mut x: Vec<Tensor> = Vec::new();
    for (i, params) in vars.iter().enumerate() {
        x = model.block(i).forward(params, &x, batch).unwrap();
    }
    x[0].to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn ids(v: &[u32], t: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (v.len() / t, t), &Device::Cpu).unwrap()
}

#[test]
fn masked_targets_contribute_exactly_nothing() {
    let t = 24;
    let tokens: Vec<u32> = (0..t as u32).map(|i| (i * 5 + 3) % 64).collect();
    let targets: Vec<u32> = (0..t as u32).map(|i| (i * 11 + 1) % 64).collect();
    // A prompt of 10 tokens (mask 0), then the reply.
    let mask: Vec<f32> = (0..t).map(|i| if i < 10 { 0.0 } else { 1.0 }).collect();
    let mut other = targets.clone();
    for o in other.iter_mut().take(10) {
        *o = (*o + 17) % 64;
    }
    let batch = |tg: &[u32]| Batch::tokens(ids(&tokens, t), ids(tg, t)).with(LOSS_MASK, Tensor::from_vec(mask.clone(), (1, t), &Device::Cpu).unwrap());
    for (name, model) in models() {
        let p = params(&model);
        let (l1, g1) = loss_and_grads(&model, &p, &batch(&targets));
        let (l2, g2) = loss_and_grads(&model, &p, &batch(&other));
        assert_eq!(l1.to_bits(), l2.to_bits(), "{name}: a masked target changed the loss");
        assert_eq!(g1, g2, "{name}: a masked target changed a gradient");
        assert_eq!(autograd_loss(&model, &p, &batch(&targets)).to_bits(), autograd_loss(&model, &p, &batch(&other)).to_bits(), "{name}: autograd");
        // The masked loss is the mean over the reply: 14 rows of weight 1/14 against the unmasked mean.
        let mut changed = targets.clone();
        changed[20] = (changed[20] + 1) % 64;
        assert_ne!(loss_and_grads(&model, &p, &batch(&changed)).0.to_bits(), l1.to_bits(), "{name}: an unmasked target must count");
    }
}

/// Three documents packed in one row of 64 (positions restart at each), against each run alone.
#[test]
fn a_packed_row_gives_each_document_its_own_loss() {
    let lens = [20usize, 30, 15];
    let t = 64;
    let docs: Vec<Vec<u32>> = lens.iter().enumerate().map(|(d, &n)| (0..n as u32).map(|i| (i * 13 + d as u32 * 7 + 2) % 64).collect()).collect();
    let stream: Vec<u32> = docs.concat();
    let mut tokens = stream[..t.min(stream.len() - 1)].to_vec();
    tokens.resize(t, 0);
    let mut targets = stream[1..].to_vec();
    targets.resize(t, 0);
    let positions: Vec<u32> = lens.iter().flat_map(|&n| 0..n as u32).chain(std::iter::repeat(0)).take(t).collect();
    for (name, model) in models() {
        let p = params(&model);
        let mut start = 0;
        for (d, doc) in docs.iter().enumerate() {
            let n = doc.len();
            // Doc d's own targets: rows start .. start + n − 1 (the last row's target begins the next document).
            let mask: Vec<f32> = (0..t).map(|i| if i >= start && i + 1 < start + n { 1.0 } else { 0.0 }).collect();
            // Two identical rows (the tables and masks per row of a micro-batch of 2).
            let two = |v: &[u32]| ids(&[v, v].concat(), t);
            let packed = Batch::tokens(two(&tokens), two(&targets))
                .with(POSITIONS, two(&positions))
                .with(LOSS_MASK, Tensor::from_vec([mask.clone(), mask].concat(), (2, t), &Device::Cpu).unwrap());
            let alone = Batch::tokens(ids(&doc[..n - 1], n - 1), ids(&doc[1..], n - 1));
            let (lp, la) = (loss_and_grads(&model, &p, &packed).0, loss_and_grads(&model, &p, &alone).0);
            assert!((lp - la).abs() <= 1e-5 * la.abs(), "{name} document {d}: packed {lp} alone {la}");
            let (ap, aa) = (autograd_loss(&model, &p, &packed), autograd_loss(&model, &p, &alone));
            assert!((ap - aa).abs() <= 1e-5 * aa.abs(), "{name} document {d} (autograd): packed {ap} alone {aa}");
            // Without the document structure the later documents see the earlier ones: the losses differ.
            if d > 0 {
                let leaky = Batch::tokens(two(&tokens), two(&targets)).with(LOSS_MASK, packed.get(LOSS_MASK).unwrap().clone());
                assert!((loss_and_grads(&model, &p, &leaky).0 - la).abs() > 1e-4, "{name} document {d}: the check cannot tell");
            }
            start += n;
        }
    }
}

#[test]
fn prepared_packed_windows_carry_positions_and_cross_document_masks() {
    use ferrospeed_models::prepared::{prepare, PrepareOptions};
    use ferrospeed_models::{PackedWindows, PreparedData, Tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    std::fs::write(&input, "{\"text\": \"abcde\"}\n{\"text\": \"fgh\"}\n\n{\"text\": \"ijklmnopq\"}\n").unwrap();
    let tok = Tokenizer::Bytes;
    let out = dir.path().join("prepared");
    prepare(&PrepareOptions::new(vec![input], out.clone(), &tok)).unwrap();
    let data = PreparedData::open(&out).unwrap();
    // Documents with their EOS (0): 6, 4 and 10 tokens.
    assert_eq!((data.documents(), data.tokens()), (3, 20));
    let w = PackedWindows { data: &data, seq_len: 8 };
    let (tokens, targets, mask, pos) = w.row(0);
    assert_eq!(tokens, b"abcde\0fg".iter().map(|&b| b as u32).collect::<Vec<_>>());
    assert_eq!(targets, b"bcde\0fgh".iter().map(|&b| b as u32).collect::<Vec<_>>());
    assert_eq!(pos.unwrap(), vec![0, 1, 2, 3, 4, 5, 0, 1]);
    // The EOS (row 5) would predict the next document's first token: out of the loss.
    assert_eq!(mask, vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    // Window 1 starts inside the second document: its positions start at 0 there.
    let (_, _, _, pos) = w.row(1);
    assert_eq!(pos.unwrap(), vec![0, 1, 0, 1, 2, 3, 4, 5]);
}
