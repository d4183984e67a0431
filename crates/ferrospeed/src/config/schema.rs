//! The table of known sections and keys with their kinds, and "did you mean" suggestions for typos.
//!
//! The schema is data rather than serde attributes so that an unknown key can be answered with the
//! closest known one, and a wrong type with what the key expects, in our own words.

use super::{ContextKind, DeviceChoice, LoraBase, ModelKind, Offload, OptimizerKind, PipelineSchedule, Precision, ReduceDtype, TrackBackend, Vocab};

/// What a key accepts. Integer ranges live here because a negative TOML integer cannot become a
/// `usize`; ranges of floats and relations between keys are in `validate.rs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    /// An integer ≥ 1.
    PositiveInt,
    /// An integer ≥ 0.
    Count,
    /// A float; an integer is accepted too (`lr = 1`).
    Number,
    Bool,
    /// A string holding a file system path.
    Path,
    /// Any other string (a URL, a name); its form is checked in `validate.rs`.
    Text,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
    /// A ZeRO stage: an integer 0..=3.
    Stage,
    /// A list of strings, each one of a fixed set.
    Choices(&'static [&'static str]),
    /// A list of integers ≥ 1.
    PositiveInts,
    /// A string, or a list of strings.
    Strings,
}

impl Kind {
    /// What to write instead, for "expected …" in a wrong-type message.
    pub(crate) fn expected(self) -> String {
        match self {
            Kind::PositiveInt => "a positive integer".to_string(),
            Kind::Count => "a non-negative integer".to_string(),
            Kind::Number => "a number".to_string(),
            Kind::Bool => "true or false".to_string(),
            Kind::Path => "a path in quotes".to_string(),
            Kind::Text => "a string in quotes".to_string(),
            Kind::Choice(names) => format!("one of {}", quoted_list(names)),
            Kind::Choices(names) => format!("a list of {}", quoted_list(names)),
            Kind::Stage => "an integer 0, 1, 2 or 3".to_string(),
            Kind::PositiveInts => "a list of positive integers, e.g. [7, 8, 8, 7]".to_string(),
            Kind::Strings => "a string or a list of strings, e.g. \"all-linear\" or [\"q_proj\", \"v_proj\"]".to_string(),
        }
    }
}

/// One key of a section.
#[derive(Debug)]
pub(crate) struct KeySpec {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
}

/// One `[section]` and its keys.
#[derive(Debug)]
pub(crate) struct SectionSpec {
    pub name: &'static str,
    pub required: bool,
    pub keys: &'static [KeySpec],
}

impl SectionSpec {
    pub(crate) fn key(&self, name: &str) -> Option<&'static KeySpec> {
        self.keys.iter().find(|k| k.name == name)
    }
}

const fn key(name: &'static str, kind: Kind) -> KeySpec {
    KeySpec { name, kind, required: false }
}

const fn required(name: &'static str, kind: Kind) -> KeySpec {
    KeySpec { name, kind, required: true }
}

/// Every section and key a config file may contain. Defaults are not here but in the `Default` impls
/// and `parse::build`, next to the types they fill.
pub(crate) const SECTIONS: &[SectionSpec] = &[
    SectionSpec {
        name: "model",
        required: true,
        keys: &[
            key("kind", Kind::Choice(ModelKind::NAMES)),
            // Required unless `init_from` names a model directory whose config.json gives them.
            required("n_layer", Kind::PositiveInt),
            required("n_head", Kind::PositiveInt),
            required("d_model", Kind::PositiveInt),
            required("seq_len", Kind::PositiveInt),
            key("n_kv_head", Kind::PositiveInt),
            key("d_ff", Kind::PositiveInt),
            key("rope_theta", Kind::Number),
            key("tie_embeddings", Kind::Bool),
            key("vocab", Kind::Choice(Vocab::NAMES)),
            key("tokenizer", Kind::Path),
            key("init_from", Kind::Path),
            key("adapter_from", Kind::Path),
        ],
    },
    // The section may be absent from the text but its `path` may not; the message then names the key.
    SectionSpec { name: "data", required: false, keys: &[required("path", Kind::Path), key("packing", Kind::Bool), key("allow_binary", Kind::Bool), key("eval_path", Kind::Path), key("eval_split", Kind::Number)] },
    SectionSpec {
        name: "train",
        required: false,
        keys: &[
            // 0 is allowed: import weights and save them as a checkpoint (then export), training nothing.
            key("steps", Kind::Count),
            key("global_batch", Kind::PositiveInt),
            key("micro_batch", Kind::PositiveInt),
            key("lr", Kind::Number),
            key("min_lr", Kind::Number),
            key("warmup", Kind::Count),
            key("weight_decay", Kind::Number),
            key("optimizer", Kind::Choice(OptimizerKind::NAMES)),
            key("momentum", Kind::Number),
            key("beta1", Kind::Number),
            key("beta2", Kind::Number),
            key("eps", Kind::Number),
            key("grad_clip", Kind::Number),
            key("seed", Kind::Count),
            key("precision", Kind::Choice(Precision::NAMES)),
            key("activation_checkpointing", Kind::Bool),
            key("sample_tokens", Kind::Count),
            key("grad_reduce_dtype", Kind::Choice(ReduceDtype::NAMES)),
            key("loss_scale_initial", Kind::Number),
            key("loss_scale_growth_interval", Kind::PositiveInt),
            key("loss_scale_backoff", Kind::Number),
            key("loss_scale_min", Kind::Number),
            key("device", Kind::Choice(DeviceChoice::NAMES)),
            key("eval_every", Kind::Count),
            key("eval_batches", Kind::Count),
            key("early_stopping_patience", Kind::Count),
        ],
    },
    SectionSpec {
        name: "zero",
        required: false,
        keys: &[
            key("stage", Kind::Stage),
            key("offload_optimizer", Kind::Choice(Offload::NAMES)),
            key("offload_ratio", Kind::Number),
            key("nvme_ratio", Kind::Number),
            key("offload_params", Kind::Choice(Offload::NAMES)),
            key("nvme_dir", Kind::Path),
            key("pinned_budget_mb", Kind::Count),
        ],
    },
    SectionSpec {
        name: "parallel",
        required: false,
        keys: &[
            key("pp", Kind::PositiveInt),
            key("tp", Kind::PositiveInt),
            key("sp", Kind::Bool),
            key("cp", Kind::PositiveInt),
            key("cp_kind", Kind::Choice(ContextKind::NAMES)),
            key("ep", Kind::PositiveInt),
            key("pp_schedule", Kind::Choice(PipelineSchedule::NAMES)),
            key("pp_virtual", Kind::PositiveInt),
            key("pp_split", Kind::PositiveInts),
        ],
    },
    SectionSpec {
        name: "lora",
        required: false,
        keys: &[
            key("r", Kind::PositiveInt),
            key("alpha", Kind::Number),
            key("dropout", Kind::Number),
            key("targets", Kind::Strings),
            key("rslora", Kind::Bool),
            key("base", Kind::Choice(LoraBase::NAMES)),
        ],
    },
    SectionSpec {
        name: "moe",
        required: false,
        keys: &[key("aux_loss", Kind::Bool), key("aux_loss_coef", Kind::Number), key("z_loss_coef", Kind::Number), key("capacity_factor", Kind::Number)],
    },
    SectionSpec {
        name: "checkpoint",
        required: false,
        keys: &[
            key("dir", Kind::Path),
            key("every", Kind::Count),
            key("keep", Kind::PositiveInt),
            key("resume", Kind::Bool),
            key("save_on_interrupt", Kind::Bool),
            key("keep_best", Kind::Bool),
        ],
    },
    SectionSpec {
        name: "track",
        required: false,
        keys: &[
            key("dir", Kind::Path),
            key("tensorboard", Kind::Bool),
            key("backends", Kind::Choices(TrackBackend::NAMES)),
            key("mlflow_uri", Kind::Text),
            key("mlflow_experiment", Kind::Text),
        ],
    },
];

pub(crate) fn section(name: &str) -> Option<&'static SectionSpec> {
    SECTIONS.iter().find(|s| s.name == name)
}

/// The end of an unknown-section message: the closest section, or the right home of a key written at
/// the top level (`steps = 5` belongs under `[train]`), or the list of sections.
pub(crate) fn unknown_section_hint(name: &str) -> String {
    if let Some(home) = SECTIONS.iter().find(|s| s.key(name).is_some()) {
        return format!("did you mean `{}.{name}`? (put it under [{}])", home.name, home.name);
    }
    match closest(name, SECTIONS.iter().map(|s| s.name)) {
        Some(best) => format!("did you mean `{best}`?"),
        None => {
            let names: Vec<String> = SECTIONS.iter().map(|s| format!("[{}]", s.name)).collect();
            format!("known sections: {}", names.join(", "))
        }
    }
}

/// The end of an unknown-key message: the closest key of the section, or all of its keys.
pub(crate) fn unknown_key_hint(section: &SectionSpec, name: &str) -> String {
    match closest(name, section.keys.iter().map(|k| k.name)) {
        Some(best) => format!("did you mean `{}.{best}`?", section.name),
        None => {
            let names: Vec<&str> = section.keys.iter().map(|k| k.name).collect();
            format!("known keys of [{}]: {}", section.name, names.join(", "))
        }
    }
}

/// The candidate nearest to `word`: within edit distance 2 (case-insensitive), or sharing a prefix of
/// at least 3 characters with it (`warm` → `warmup`, `global` → `global_batch`); the nearest wins.
pub(crate) fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_lowercase();
    candidates
        .filter_map(|candidate| {
            let distance = edit_distance(&word, candidate);
            let prefix = word.len() >= 3 && (candidate.starts_with(&word) || word.starts_with(candidate));
            (distance <= 2 || prefix).then_some((distance, candidate))
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over characters (insertions, deletions, substitutions each cost 1).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // One row of the dynamic-programming table at a time: `row[j]` = distance(a[..i], b[..j]).
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// `"a", "b" or "c"`: how choices are listed in messages.
pub(crate) fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}
