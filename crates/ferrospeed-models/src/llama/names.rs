//! transformers' `LlamaForCausalLM` parameter names for export and `init_from`
//! (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `model.norm.weight`,
//! `lm_head.weight`). Our layouts are theirs, so names are the only difference; experts are held as
//! transformers 5 holds them (`mlp.experts.gate_up_proj` `[E, 2f, d]`, `mlp.experts.down_proj`
//! `[E, d, f]`, the router `mlp.gate.weight`), and Hub checkpoints' per-expert tensors (Mixtral's
//! `block_sparse_moe.experts.E.w1/w3/w2`, Qwen's and OLMoE's `mlp.experts.E.gate_proj/up_proj/down_proj`)
//! are read as those (`open_weights`).

use ferrospeed::checkpoint::{CheckpointError, WeightFiles};
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

/// Open weight files for import, presenting per-expert tensors as the fused ones we hold.
pub fn open_weights(path: &Path) -> Result<WeightFiles, CheckpointError> {
    let mut files = WeightFiles::open(path)?;
    fuse_experts(&mut files)?;
    Ok(files)
}

/// Register, for every layer whose experts the files hold one by one, `mlp.experts.gate_up_proj`
/// (each expert's gate rows, then its up rows), `mlp.experts.down_proj` and (Mixtral) the router
/// `mlp.gate.weight`, as [`WeightFiles::concat`]s of the per-expert tensors.
pub fn fuse_experts(files: &mut WeightFiles) -> Result<(), CheckpointError> {
    // (layer prefix, Mixtral naming) → expert → (gate, up, down) tensor names.
    let mut layers: BTreeMap<(String, bool), BTreeMap<usize, [Option<String>; 3]>> = BTreeMap::new();
    for name in files.names() {
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
    for ((layer, mixtral), experts) in layers {
        let count = experts.len();
        if experts.keys().copied().ne(0..count) {
            return Err(CheckpointError::Format(format!("{layer}: experts {:?} are not numbered 0..{count}", experts.keys().collect::<Vec<_>>())));
        }
        let mut gate_up = Vec::with_capacity(2 * count);
        let mut down = Vec::with_capacity(count);
        for (e, [g, u, d]) in experts {
            let missing = |what: &str| CheckpointError::Format(format!("{layer}: expert {e} has no {what} weight"));
            gate_up.push(g.ok_or_else(|| missing("gate"))?);
            gate_up.push(u.ok_or_else(|| missing("up"))?);
            down.push(d.ok_or_else(|| missing("down"))?);
        }
        let shape = |files: &WeightFiles, n: &str| files.info(n).map(|i| i.shape.clone()).unwrap_or_default();
        let (gs, ds) = (shape(files, &gate_up[0]), shape(files, &down[0]));
        if gs.len() != 2 || ds.len() != 2 {
            return Err(CheckpointError::Format(format!("{layer}: expert weights of shapes {gs:?} and {ds:?}")));
        }
        files.concat(&format!("{layer}.mlp.experts.gate_up_proj"), gate_up, vec![count, 2 * gs[0], gs[1]])?;
        files.concat(&format!("{layer}.mlp.experts.down_proj"), down, vec![count, ds[0], ds[1]])?;
        let router = format!("{layer}.block_sparse_moe.gate.weight");
        if mixtral && files.info(&router).is_some() {
            let s = shape(files, &router);
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

    /// The layout of the experts in weight files (`None`: fused, or no experts).
    pub fn of(files: &WeightFiles) -> Option<Self> {
        let mut names = files.names().chain(files.parts());
        names.find_map(|n| {
            if n.contains(".block_sparse_moe.experts.") {
                Some(Self::Mixtral)
            } else if n.contains(".mlp.experts.") && !n.ends_with("gate_up_proj") && !n.ends_with("experts.down_proj") {
                Some(Self::PerExpert)
            } else {
                None
            }
        })
    }

    /// The tensors an exported fused tensor `name` of `shape` is written as in this layout (`None`:
    /// itself): per expert, its gate then up rows of `mlp.experts.gate_up_proj`, its
    /// `mlp.experts.down_proj`; Mixtral's router under its own name.
    pub fn split(self, name: &str, shape: &[usize]) -> Option<Vec<(String, Vec<usize>)>> {
        let (moe, gate, up, down) = match self {
            Self::Mixtral => ("block_sparse_moe", "w1", "w3", "w2"),
            Self::PerExpert => ("mlp", "gate_proj", "up_proj", "down_proj"),
        };
        if let Some(layer) = name.strip_suffix(".mlp.experts.gate_up_proj") {
            let &[e, f2, d] = shape else { return None };
            return Some((0..e).flat_map(|i| [(format!("{layer}.{moe}.experts.{i}.{gate}.weight"), vec![f2 / 2, d]), (format!("{layer}.{moe}.experts.{i}.{up}.weight"), vec![f2 / 2, d])]).collect());
        }
        if let Some(layer) = name.strip_suffix(".mlp.experts.down_proj") {
            let &[e, d, f] = shape else { return None };
            return Some((0..e).map(|i| (format!("{layer}.{moe}.experts.{i}.{down}.weight"), vec![d, f])).collect());
        }
        match (self, name.strip_suffix(".mlp.gate.weight")) {
            (Self::Mixtral, Some(layer)) => Some(vec![(format!("{layer}.block_sparse_moe.gate.weight"), shape.to_vec())]),
            _ => None,
        }
    }
}
