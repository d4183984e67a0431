//! Loss masks and packing, through the blocks' forward and hand-written backward (what training runs)
//! and their autograd forward: masked targets contribute exactly nothing; a packed row of documents gives
//! each document the loss it has alone (positions restart, no attention across a boundary); prepared
//! data gives those rows. In f64 on tiny models, the gradients of packed rows — of every parameter, and
//! of every layer's input — match central finite differences along both paths, and equal the gradients
//! of the documents run alone, weighted as the loss mask weighs them.

mod support;

use candle_core::{DType, Device, Tensor, Var};
use ferrospeed::engine::{Batch, Model, Upstream};
use ferrospeed::rng::Rng;
use support::fd::{analytic, autograd, central, composed_loss, loss, random_params, randn_f64, slots, weighted_sum, Owned};
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

// Finite differences of packed rows, in f64, on the shapes of `gradients.rs` with rows of 12 tokens.
//
// Tolerance, as in `gradients.rs`: |analytic − fd| ≤ 1e-7 + 1e-5·|fd| with steps of 1e-5. The central
// difference is off by eps²/6 times the third derivative (about 1e-11 here) plus rounding of about
// 1e-16·|loss|/eps (about 1e-11), so the bound leaves four orders of magnitude for the arithmetic.
// Autograd through candle's GELU is allowed 1e-5 of the tensor's largest gradient more: candle's GELU
// derivative is written with six-digit constants (0.797885 for √(2/π), …: 7e-7 relative), and a
// gradient summed from such terms can cancel down to an element far smaller than they are (seen:
// 6.7e-7 off at an element of 3.4e-2). A backward that ignores the document structure is off by far
// more (the commit that added these tests names the mutations it ran and what they printed).

const T: usize = 12;

fn f64_models() -> Vec<(&'static str, Model, usize)> {
    vec![
        ("llama", Llama::new(LlamaConfig::tiny(2, 8, 4, 2, 11, T)).model().unwrap(), 8),
        ("gpt", Gpt::new(GptConfig { n_layer: 2, n_head: 2, d_model: 8, seq_len: T, vocab_size: 11 }).model().unwrap(), 8),
    ]
}

/// Two packed rows of `T` tokens — documents of 4, 5 and 3 tokens, then of 7 and 5 — with their
/// positions and loss mask (a document's last token, whose target begins the next document, does not
/// count; nor does the first target of the second document, a prompt), and each document alone with
/// the number of its targets that count.
fn packed_documents() -> (Batch, Vec<(Batch, f64)>) {
    let rows = [vec![4usize, 5, 3], vec![7, 5]];
    let (mut tokens, mut targets, mut positions, mut mask, mut alone) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut k = 0;
    for lens in &rows {
        let docs: Vec<Vec<u32>> = lens.iter().enumerate().map(|(d, &n)| (0..n as u32).map(|j| (j * 5 + (k + d) as u32 * 3 + 1) % 11).collect()).collect();
        for (d, doc) in docs.iter().enumerate() {
            let n = doc.len();
            let next_first = docs.get(d + 1).map_or(0, |next| next[0]);
            let counts: Vec<f32> = (0..n).map(|j| if j + 1 == n || (k + d == 1 && j == 0) { 0.0 } else { 1.0 }).collect();
            tokens.extend_from_slice(doc);
            targets.extend(doc[1..].iter().copied().chain([next_first]));
            positions.extend(0..n as u32);
            mask.extend_from_slice(&counts);
            let one = |v: &[u32]| Tensor::from_slice(v, (1, n - 1), &Device::Cpu).unwrap();
            let batch = Batch::tokens(one(&doc[..n - 1]), one(&doc[1..])).with(LOSS_MASK, Tensor::from_slice(&counts[..n - 1], (1, n - 1), &Device::Cpu).unwrap());
            alone.push((batch, counts.iter().sum::<f32>() as f64));
        }
        k += docs.len();
    }
    let two = |v: Vec<u32>| Tensor::from_vec(v, (2, T), &Device::Cpu).unwrap();
    let packed = Batch::tokens(two(tokens), two(targets)).with(POSITIONS, two(positions)).with(LOSS_MASK, Tensor::from_vec(mask, (2, T), &Device::Cpu).unwrap());
    (packed, alone)
}

/// Whether `an` is `fd` within the tolerance above; `largest` is the largest gradient of its tensor,
/// given for autograd's.
fn close(an: f64, fd: f64, largest: Option<f64>) -> bool {
    (fd - an).abs() <= 1e-7 + 1e-5 * fd.abs() + largest.map_or(0.0, |m| 1e-5 * m)
}

fn largest(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Which elements of a parameter of `n` to check: all of the embedding-sized ones, 16 spread over
/// the larger ones.
fn picks(n: usize) -> Vec<usize> {
    if n <= 100 { (0..n).collect() } else { (0..16).map(|k| (k * 7919 + 3) % n).collect() }
}

#[test]
fn packed_parameter_gradients_match_finite_differences_on_both_paths() {
    let (packed, _) = packed_documents();
    for (family, model, _) in f64_models() {
        let owned = random_params(&model);
        let (lf, lc) = (loss(&model, &owned, &packed), composed_loss(&model, &owned, &packed));
        assert!((lf - lc).abs() <= 1e-12 * lf.abs(), "{family}: the composed forward's loss {lc} differs from the blocks' {lf}");
        type LossFn = fn(&Model, &Owned, &Batch) -> f64;
        let paths: [(&str, Owned, LossFn); 2] = [("hand-written", analytic(&model, &owned, &packed, true), loss), ("autograd", autograd(&model, &owned, &packed), composed_loss)];
        for (path, grads, loss_of) in paths {
            let mut checked = 0;
            for b in 0..model.num_blocks() {
                for (p, spec) in model.own_params(b).iter().enumerate() {
                    let at = |v: &[f64]| {
                        let mut o = owned.clone();
                        o[b][p] = v.to_vec();
                        loss_of(&model, &o, &packed)
                    };
                    for e in picks(spec.numel()) {
                        let fd = central(at, &owned[b][p], e, 1e-5);
                        let an = grads[b][p][e];
                        assert!(close(an, fd, (path == "autograd").then(|| largest(&grads[b][p]))), "{family} {path}: block {} {}[{e}]: analytic {an:e} vs finite difference {fd:e}", model.block(b).name(), spec.name);
                        checked += 1;
                    }
                }
            }
            assert!(checked > 300, "{family} {path}: checked {checked} elements");
        }
    }
}

#[test]
fn packed_input_gradients_of_every_layer_match_finite_differences_on_both_paths() {
    // For each layer d(sum(y · r))/dx, for the head d(loss)/dx, at every element of x, on the packed
    // rows: the hand-written backward against differences of the blocks' forward, autograd of the
    // composed forward against differences of the composed forward.
    let (packed, _) = packed_documents();
    for (family, model, d) in f64_models() {
        let owned = random_params(&model);
        let params = slots(&model, &owned, None);
        let shape = (2, T, d);
        let mut rng = Rng::new(9);
        let x0: Vec<f64> = (0..2 * T * d).map(|_| rng.normal()).collect();
        for b in 1..model.num_blocks() {
            let block = model.block(b);
            let head = b + 1 == model.num_blocks();
            let r = randn_f64(&mut rng, shape);
            let objective = |y: &Tensor| weighted_sum(y, (!head).then_some(&r));
            let input = |x: &[f64]| Tensor::from_slice(x, shape, &Device::Cpu).unwrap();
            let blocks_forward = |x: &[f64]| objective(&block.forward(&params[b], &[input(x)], &packed).unwrap()[0]);
            let composed_forward = |x: &[f64]| objective(&block.forward(&params[b], &[Var::from_tensor(&input(x)).unwrap().as_tensor().clone()], &packed).unwrap()[0]);

            let (_, saved) = block.forward_saving(&params[b], &[input(&x0)], &packed).unwrap().unwrap();
            let r_grads = [Some(r.clone())];
            let upstream = if head { Upstream::Loss(1.0) } else { Upstream::Grads(&r_grads) };
            let (_, dx) = block.backward(&params[b], saved, upstream).unwrap();
            let hand: Vec<f64> = dx.into_iter().next().flatten().unwrap().flatten_all().unwrap().to_vec1().unwrap();

            let xv = Var::from_tensor(&input(&x0)).unwrap();
            let y = block.forward(&params[b], &[xv.as_tensor().clone()], &packed).unwrap().remove(0);
            let out = if head { y } else { (y * &r).unwrap().sum_all().unwrap() };
            let auto: Vec<f64> = out.backward().unwrap().get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();

            for e in 0..x0.len() {
                let fd = central(blocks_forward, &x0, e, 1e-5);
                assert!(close(hand[e], fd, None), "{family} block {} x[{e}]: hand-written {:e} vs finite difference {fd:e}", block.name(), hand[e]);
                let fd = central(composed_forward, &x0, e, 1e-5);
                assert!(close(auto[e], fd, Some(largest(&auto))), "{family} block {} x[{e}]: autograd {:e} vs finite difference {fd:e}", block.name(), auto[e]);
            }
        }
    }
}

#[test]
fn packed_gradients_are_the_documents_gradients_weighted_by_the_mask() {
    // The packed loss is the mean over the N counted targets of both rows, so its gradient is
    // Σ_d (n_d / N) · (gradient of document d alone, the mean over its own n_d targets).
    let (packed, alone) = packed_documents();
    let total: f64 = alone.iter().map(|a| a.1).sum();
    for (family, model, _) in f64_models() {
        let owned = random_params(&model);
        type GradFn = fn(&Model, &Owned, &Batch) -> Owned;
        let paths: [(&str, GradFn); 2] = [("hand-written", |m, o, b| analytic(m, o, b, true)), ("autograd", autograd)];
        for (path, grads_of) in paths {
            let got = grads_of(&model, &owned, &packed);
            let mut want: Owned = owned.iter().map(|b| b.iter().map(|p| vec![0.0; p.len()]).collect()).collect();
            for (batch, n) in &alone {
                let g = grads_of(&model, &owned, batch);
                for (w, g) in want.iter_mut().flatten().zip(g.iter().flatten()) {
                    w.iter_mut().zip(g).for_each(|(a, b)| *a += n / total * b);
                }
            }
            for b in 0..model.num_blocks() {
                for (p, spec) in model.own_params(b).iter().enumerate() {
                    let scale = want[b][p].iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                    for (e, (g, w)) in got[b][p].iter().zip(&want[b][p]).enumerate() {
                        assert!((g - w).abs() <= 1e-10 * scale, "{family} {path}: block {} {}[{e}]: packed {g:e} vs documents alone {w:e}", model.block(b).name(), spec.name);
                    }
                }
            }
        }
    }
}

#[test]
fn some_documents_packed_are_the_windows_of_those_documents_alone() {
    // PackedDocs of every document is PackedWindows; of documents 0, 2 and 3 it is PackedWindows of a
    // directory prepared from those three alone (what data.eval_split holds out, and the rest).
    use ferrospeed::data::Dataset;
    use ferrospeed_models::prepared::{prepare, PrepareOptions};
    use ferrospeed_models::{PackedDocs, PackedWindows, PreparedData, Tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let docs = ["abcde", "fgh", "ijklmnopq", "rs", "tuvwxyz0123"];
    let write = |name: &str, which: &[usize]| {
        let input = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&input, which.iter().map(|&i| format!("{{\"text\": \"{}\"}}\n", docs[i])).collect::<String>()).unwrap();
        let out = dir.path().join(name);
        prepare(&PrepareOptions::new(vec![input], out.clone(), &Tokenizer::Bytes)).unwrap();
        PreparedData::open(&out).unwrap()
    };
    let all = write("all", &[0, 1, 2, 3, 4]);
    let some = write("some", &[0, 2, 3]);
    for seq_len in [3, 4, 7] {
        let (whole, packed) = (PackedWindows { data: &all, seq_len }, PackedDocs::new(&all, seq_len, (0..5).collect()));
        assert_eq!(packed.len(), whole.len());
        for w in 0..whole.len() {
            assert_eq!(packed.row(w), whole.row(w), "all documents, seq_len {seq_len}, window {w}");
        }
        let (alone, chosen) = (PackedWindows { data: &some, seq_len }, PackedDocs::new(&all, seq_len, vec![0, 2, 3]));
        assert_eq!(chosen.len(), alone.len());
        assert!(chosen.len() > 1, "seq_len {seq_len}");
        for w in 0..alone.len() {
            assert_eq!(chosen.row(w), alone.row(w), "documents 0, 2, 3, seq_len {seq_len}, window {w}");
        }
    }
}
