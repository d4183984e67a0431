//! transformers' `LlamaForCausalLM` parameter names for export and `init_from`
//! (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `model.norm.weight`,
//! `lm_head.weight`). Our layouts are theirs, so names are the only difference — but for experts:
//! we hold each expert's `mlp.experts.E.gate_up_proj` `[2f, d]` and `mlp.experts.E.down_proj` `[d, f]`
//! (an expert group's share of them is then one range of the block), read from transformers 5's
//! fused `[E, 2f, d]` tensors or from Hub checkpoints' per-expert ones (Mixtral's
//! `block_sparse_moe.experts.E.w1/w3/w2`, Qwen's and OLMoE's `mlp.experts.E.gate_proj/up_proj/down_proj`)
//! by `open_weights`, and written back in the layout the source used (`ExpertLayout::regroup`).

use ferrospeed::checkpoint::{CheckpointError, WeightFiles, Written};
use std::collections::BTreeMap;
use std::path::Path;

/// The names of the Llama family for the `Accelerator` (export and `model.init_from`).
pub const HF_NAMES: ferrospeed::accelerator::ParamNames = ferrospeed::accelerator::ParamNames { tag: "hf-llama", map: hf_name, open: open_weights };

/// The transformers name of parameter `param` of block `block`.
pub fn hf_name(block: &str, param: &str) -> String {
    match (block, param) {
        ("head", "lm_head.weight") => param.to_string(),
        ("embed" | "head", _) => format!("model.{param}"),
        _ => format!("model.{block}.{param}"),
    }
}

/// Open weight files for import, presenting their experts as the ones we hold ([`expert_views`]).
pub fn open_weights(path: &Path) -> Result<WeightFiles, CheckpointError> {
    let mut files = WeightFiles::open(path)?;
    expert_views(&mut files)?;
    Ok(files)
}

/// Register, for every sparse layer of the files, our experts' tensors — expert `E`'s
/// `mlp.experts.E.gate_up_proj` `[2f, d]` (its gate rows, then its up rows) and `mlp.experts.E.down_proj`
/// `[d, f]` — as views of what the files hold: a Hub checkpoint's per-expert tensors (Mixtral's
/// `block_sparse_moe.experts.E.w1/w3/w2`, Qwen's and OLMoE's `mlp.experts.E.gate_proj/up_proj/down_proj`,
/// whose router Mixtral names `block_sparse_moe.gate.weight`), or slices of transformers 5's fused
/// `mlp.experts.gate_up_proj` `[E, 2f, d]` and `mlp.experts.down_proj` `[E, d, f]`. Names may carry a
/// prefix (the gradients of a parity fixture).
pub fn expert_views(files: &mut WeightFiles) -> Result<(), CheckpointError> {
    // (layer prefix, Mixtral naming) → expert → (gate, up, down) tensor names.
    let mut layers: BTreeMap<(String, bool), BTreeMap<usize, [Option<String>; 3]>> = BTreeMap::new();
    let mut fused: Vec<(String, Vec<usize>)> = Vec::new();
    for name in files.names() {
        if name.ends_with(".mlp.experts.gate_up_proj") || name.ends_with(".mlp.experts.down_proj") {
            fused.push((name.to_string(), files.info(name).map(|i| i.shape.clone()).unwrap_or_default()));
            continue;
        }
        let Some((prefix, rest)) = name.split_once(".experts.") else { continue };
        let Some((expert, tail)) = rest.split_once('.') else { continue };
        let Ok(e) = expert.parse::<usize>() else { continue };
        let (layer, mixtral) = match prefix.strip_suffix(".block_sparse_moe") {
            Some(l) => (l, true),
            None => match prefix.strip_suffix(".mlp") {
                Some(l) => (l, false),
                None => continue,
            },
        };
        let slot = match tail {
            "w1.weight" | "gate_proj.weight" => 0,
            "w3.weight" | "up_proj.weight" => 1,
            "w2.weight" | "down_proj.weight" => 2,
            _ => continue,
        };
        layers.entry((layer.to_string(), mixtral)).or_default().entry(e).or_default()[slot] = Some(name.to_string());
    }
    for (name, shape) in fused {
        let &[count, rows, cols] = shape.as_slice() else {
            return Err(CheckpointError::Format(format!("{name} has shape {shape:?}: fused experts are [experts, rows, columns]")));
        };
        let (layer, what) = name.rsplit_once('.').expect("ends with a suffix above");
        let per = rows * cols;
        for e in 0..count {
            files.slice(&format!("{layer}.{e}.{what}"), &name, e * per..(e + 1) * per, vec![rows, cols])?;
        }
    }
    for ((layer, mixtral), experts) in layers {
        let count = experts.len();
        if experts.keys().copied().ne(0..count) {
            return Err(CheckpointError::Format(format!("{layer}: experts {:?} are not numbered 0..{count}", experts.keys().collect::<Vec<_>>())));
        }
        for (e, [g, u, d]) in experts {
            let missing = |what: &str| CheckpointError::Format(format!("{layer}: expert {e} has no {what} weight"));
            let (g, u, d) = (g.ok_or_else(|| missing("gate"))?, u.ok_or_else(|| missing("up"))?, d.ok_or_else(|| missing("down"))?);
            let shape = |n: &str| files.info(n).map(|i| i.shape.clone()).unwrap_or_default();
            let (gs, ds) = (shape(&g), shape(&d));
            if gs.len() != 2 || ds.len() != 2 {
                return Err(CheckpointError::Format(format!("{layer}: expert {e} has weights of shapes {gs:?} and {ds:?}")));
            }
            files.concat(&format!("{layer}.mlp.experts.{e}.gate_up_proj"), vec![g, u], vec![2 * gs[0], gs[1]])?;
            files.concat(&format!("{layer}.mlp.experts.{e}.down_proj"), vec![d], ds)?;
        }
        let router = format!("{layer}.block_sparse_moe.gate.weight");
        if mixtral && files.info(&router).is_some() {
            let s = files.info(&router).map(|i| i.shape.clone()).unwrap_or_default();
            files.concat(&format!("{layer}.mlp.gate.weight"), vec![router], s)?;
        }
    }
    Ok(())
}

/// How a checkpoint lays out its experts, where they are not transformers 5's fused tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// Mixtral's Hub layout: `block_sparse_moe.gate.weight` and `block_sparse_moe.experts.E.w1/w3/w2.weight`.
    Mixtral,
    /// Qwen's and OLMoE's: `mlp.experts.E.gate_proj/up_proj/down_proj.weight`.
    PerExpert,
}

impl ExpertLayout {
    /// The name recorded with a run (`"mixtral"`, `"per_expert"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::PerExpert => "per_expert",
        }
    }

    /// The layout of a recorded name.
    pub fn from_name(s: &str) -> Option<Self> {
        [Self::Mixtral, Self::PerExpert].into_iter().find(|l| l.name() == s)
    }

    /// The layout of the experts in weight files (`None`: fused, or no experts): read from the
    /// files' own tensors, whatever [`expert_views`] presents.
    pub fn of(files: &WeightFiles) -> Option<Self> {
        let mut names = files.names().chain(files.parts());
        names.find_map(|n| {
            if n.contains(".block_sparse_moe.experts.") {
                Some(Self::Mixtral)
            } else if n.contains(".mlp.experts.") && n.ends_with("_proj.weight") {
                Some(Self::PerExpert)
            } else {
                None
            }
        })
    }

    /// How an export writes a block's tensors (transformers names and shapes, in order) in `layout`
    /// (`None`: transformers 5's fused experts): an experts block's per-expert `E.gate_up_proj` and
    /// `E.down_proj` fused into `mlp.experts.gate_up_proj` `[E, 2f, d]` and `mlp.experts.down_proj`
    /// `[E, d, f]`, or split into each expert's gate, up and down weights under the layout's names;
    /// Mixtral's router under its own name. `None` where the block is written as it is.
    pub fn regroup(layout: Option<Self>, params: &[(String, Vec<usize>)]) -> Option<Vec<Written>> {
        let whole = |j: usize| (j, 0..params[j].1.iter().product::<usize>());
        let same = |j: usize, name: String| Written { name, shape: params[j].1.clone(), pieces: vec![whole(j)] };
        // An experts block: `<layer>.mlp.experts.E.gate_up_proj`, `….E.down_proj`, expert after expert.
        let layer = params.first().and_then(|(n, _)| n.strip_suffix(".mlp.experts.0.gate_up_proj"));
        if let Some(layer) = layer.filter(|_| params.len() % 2 == 0) {
            let count = params.len() / 2;
            let (gu, dn) = (&params[0].1, &params[1].1);
            let (f, d) = (gu[0] / 2, gu[1]);
            let Some(layout) = layout else {
                return Some(vec![
                    Written { name: format!("{layer}.mlp.experts.gate_up_proj"), shape: vec![count, 2 * f, d], pieces: (0..count).map(|e| whole(2 * e)).collect() },
                    Written { name: format!("{layer}.mlp.experts.down_proj"), shape: vec![count, dn[0], dn[1]], pieces: (0..count).map(|e| whole(2 * e + 1)).collect() },
                ]);
            };
            let (moe, gate, up, down) = match layout {
                Self::Mixtral => ("block_sparse_moe", "w1", "w3", "w2"),
                Self::PerExpert => ("mlp", "gate_proj", "up_proj", "down_proj"),
            };
            return Some(
                (0..count)
                    .flat_map(|e| {
                        let name = |w: &str| format!("{layer}.{moe}.experts.{e}.{w}.weight");
                        [
                            Written { name: name(gate), shape: vec![f, d], pieces: vec![(2 * e, 0..f * d)] },
                            Written { name: name(up), shape: vec![f, d], pieces: vec![(2 * e, f * d..2 * f * d)] },
                            same(2 * e + 1, name(down)),
                        ]
                    })
                    .collect(),
            );
        }
        // Mixtral's router.
        if layout == Some(Self::Mixtral) && params.iter().any(|(n, _)| n.ends_with(".mlp.gate.weight")) {
            return Some(
                params
                    .iter()
                    .enumerate()
                    .map(|(j, (n, _))| same(j, n.strip_suffix(".mlp.gate.weight").map_or_else(|| n.clone(), |l| format!("{l}.block_sparse_moe.gate.weight"))))
                    .collect(),
            );
        }
        None
    }
}
