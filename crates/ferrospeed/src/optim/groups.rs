//! Parameter groups: which weight decay and learning-rate scale each parameter gets, chosen by glob
//! patterns over `block.parameter` names (`"*.bias"`, `"embed.*"`), first match wins. Parameters no
//! group matches decay when their spec says so (weights, not biases or norms) at the optimizer's rate.

use crate::shard::ParamSpec;

/// One group: the parameters whose full name matches `pattern` (`*` matches any run of characters).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// A glob over `block.parameter`, e.g. `"*.bias"`, `"*norm*"`, `"head.*"`.
    pub pattern: String,
    /// Weight decay of the group; `None` keeps the default (the spec's `decay` at the optimizer's rate).
    pub weight_decay: Option<f64>,
    /// Multiplies the schedule's learning rate.
    pub lr_scale: f64,
}

impl ParamGroup {
    /// A group of the parameters matching `pattern`, with the defaults (no change).
    pub fn new(pattern: &str) -> Self {
        Self { pattern: pattern.to_string(), weight_decay: None, lr_scale: 1.0 }
    }

    /// This group with weight decay `wd`.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = Some(wd);
        self
    }

    /// This group with learning-rate scale `scale`.
    pub fn lr_scale(mut self, scale: f64) -> Self {
        self.lr_scale = scale;
        self
    }
}

/// The groups of a run, in priority order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamGroups {
    /// Checked in order; the first whose pattern matches decides.
    pub groups: Vec<ParamGroup>,
}

/// What a parameter gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupSettings {
    /// Weight decay (0 for none).
    pub weight_decay: f64,
    /// Multiplies the learning rate.
    pub lr_scale: f64,
}

impl ParamGroups {
    /// The settings of parameter `spec` of block `block`, for an optimizer whose decay is `default_wd`.
    pub fn resolve(&self, block: &str, spec: &ParamSpec, default_wd: f64) -> GroupSettings {
        let full = format!("{block}.{}", spec.name);
        let default = if spec.decay { default_wd } else { 0.0 };
        match self.groups.iter().find(|g| glob(&g.pattern, &full)) {
            Some(g) => GroupSettings { weight_decay: g.weight_decay.unwrap_or(default), lr_scale: g.lr_scale },
            None => GroupSettings { weight_decay: default, lr_scale: 1.0 },
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any (possibly empty) run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Init;

    #[test]
    fn globs_and_first_match_wins() {
        assert!(glob("*.bias", "h.0.attn.bias"));
        assert!(!glob("*.bias", "h.0.attn.weight"));
        assert!(glob("embed.*", "embed.wte"));
        assert!(glob("*norm*", "h.1.norm1.weight"));
        assert!(glob("a*b*c", "axxbyyc") && !glob("a*b*c", "axxcyyb"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
        let groups = ParamGroups { groups: vec![ParamGroup::new("head.*").lr_scale(0.1), ParamGroup::new("*.weight").weight_decay(0.0)] };
        let w = ParamSpec::new("proj.weight", &[2, 2], Init::Zeros, true);
        let b = ParamSpec::new("proj.bias", &[2], Init::Zeros, false);
        assert_eq!(groups.resolve("head", &w, 0.1), GroupSettings { weight_decay: 0.1, lr_scale: 0.1 });
        assert_eq!(groups.resolve("h.0", &w, 0.1), GroupSettings { weight_decay: 0.0, lr_scale: 1.0 });
        assert_eq!(groups.resolve("h.0", &b, 0.1), GroupSettings { weight_decay: 0.0, lr_scale: 1.0 });
        assert_eq!(ParamGroups::default().resolve("h.0", &w, 0.1), GroupSettings { weight_decay: 0.1, lr_scale: 1.0 });
    }
}
