//! LoRA (arXiv 2106.09685) on a frozen linear: `y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ` with `A [r, in]`, `B [out,
//! r]` and `s = alpha / r` (or `alpha / √r`, rsLoRA), added after the base output as PEFT's `lora.Linear`
//! adds it. W + ΔW is never materialised: the fused paths compute `u = x·Aᵀ` `[n, r]` and add `s·u·Bᵀ`
//! to the output of the base projection, and the backward gives `dB = s·gᵀ·u`, `dA = (s·g·B)ᵀ·x` and
//! the input's `(s·g·B)·A` on top of the base's. A stacked projection (q/k/v, gate/up) adapts each of
//! its parts on its own columns.

use super::{matmul, put_matmul_tn};
use candle_core::{Result, Tensor};
use ferrospeed::engine::ParamGrads;
use ferrospeed::profile::{scoped_as, Kind};

/// The modules of a Llama layer LoRA can adapt, in slot order (transformers' names inside the layer).
pub const MODULES: [&str; 7] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// The rank and scale of every adapter of a model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LoraShape {
    /// The rank `r`.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA's scale `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraShape {
    /// The scale `s` the update `s·(x·Aᵀ)·Bᵀ` is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The adapters of one layer: which of [`MODULES`] are adapted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerLora {
    /// Rank and scale.
    pub shape: LoraShape,
    /// One flag per entry of [`MODULES`].
    pub targets: [bool; 7],
}

/// The slots of one adapter: `A [r, in]` at `a`, `B [out, r]` at `a + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adapter {
    /// The slot of `A`; `B` follows it.
    pub a: usize,
}

/// One part of a (stacked) projection: its adapter, if any, and its output width.
pub type Part = (Option<Adapter>, usize);

/// `s·(x·Aᵀ)·Bᵀ` for every part of a projection of `x` `[n, in]`, side by side `[n, Σ out]` (zeros for a
/// part without an adapter), and each adapted part's `u = x·Aᵀ` (for the backward). `None` when no part
/// is adapted.
pub fn delta(x: &Tensor, p: &[Tensor], parts: &[Part], scale: f64) -> Result<Option<(Tensor, Vec<Option<Tensor>>)>> {
    if parts.iter().all(|(a, _)| a.is_none()) {
        return Ok(None);
    }
    let n = x.dim(0)?;
    let mut cols = Vec::with_capacity(parts.len());
    let mut us = Vec::with_capacity(parts.len());
    for &(adapter, width) in parts {
        match adapter {
            Some(ad) => {
                let u = matmul(x, &p[ad.a].t()?)?;
                cols.push(scoped_as(Kind::Elementwise, "lora_scale", || matmul(&u, &p[ad.a + 1].t()?)?.affine(scale, 0.0))?);
                us.push(Some(u));
            }
            None => {
                cols.push(Tensor::zeros((n, width), x.dtype(), x.device())?);
                us.push(None);
            }
        }
    }
    let d = if cols.len() == 1 { cols.pop().unwrap_or_else(|| unreachable!()) } else { scoped_as(Kind::Copy, "lora_cat", || Tensor::cat(&cols, 1))? };
    Ok(Some((d, us)))
}

/// The backward of [`delta`] for the output gradient `g` `[n, Σ out]`: `dA` and `dB` of each adapted
/// part into `grads` (as weight work), and the gradient it adds to the input `x`, `Σ (s·g_part·B)·A`.
pub fn backward(grads: &mut ParamGrads, p: &[Tensor], parts: &[Part], us: &[Option<Tensor>], g: &Tensor, x: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let mut dx: Option<Tensor> = None;
    let mut at = 0;
    for (&(adapter, width), u) in parts.iter().zip(us) {
        let col = at;
        at += width;
        let (Some(ad), Some(u)) = (adapter, u) else { continue };
        let r = p[ad.a].dim(0)?;
        let gs = scoped_as(Kind::Elementwise, "lora_scale", || g.narrow(1, col, width)?.affine(scale, 0.0))?;
        put_matmul_tn(grads, vec![(ad.a + 1, width)], &gs, u)?;
        let du = matmul(&gs, &p[ad.a + 1])?;
        put_matmul_tn(grads, vec![(ad.a, r)], &du, x)?;
        let part = matmul(&du, &p[ad.a])?;
        dx = Some(match dx {
            None => part,
            Some(d) => (d + part)?,
        });
    }
    Ok(dx)
}

/// The same update composed of candle ops (autograd), for the composed forward:
/// `s·(x·Aᵀ)·Bᵀ`.
pub fn composed(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    x.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(scale, 0.0)
}

/// Which modules of `n_layer` Llama layers `targets` adapt: `"all-linear"` (every projection of every
/// layer, PEFT's meaning: the LM head excepted), or globs over transformers' module names
/// (`model.layers.N.self_attn.q_proj`), a bare name matching as PEFT's suffix match does (`"q_proj"`
/// adapts every layer's). A target that adapts nothing is an error listing the names there are.
pub fn resolve_targets(n_layer: usize, targets: &[String]) -> std::result::Result<Vec<[bool; 7]>, String> {
    let name = |l: usize, m: usize| format!("model.layers.{l}.{}", MODULES[m]);
    if targets.iter().any(|t| t == "all-linear") {
        return Ok(vec![[true; 7]; n_layer]);
    }
    let hits = |t: &str, n: &str| ferrospeed::optim::glob(t, n) || n.ends_with(&format!(".{t}"));
    let mut out = vec![[false; 7]; n_layer];
    for t in targets {
        let mut any = false;
        for (l, layer) in out.iter_mut().enumerate() {
            for (m, on) in layer.iter_mut().enumerate() {
                if hits(t, &name(l, m)) {
                    *on = true;
                    any = true;
                }
            }
        }
        if !any {
            return Err(format!(
                "lora.targets: {t:?} matches no module; the modules are model.layers.N.{{{}}} (N < {n_layer}), or \"all-linear\"",
                MODULES.join(",")
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_as_globs_and_peft_suffixes() {
        let t = |v: &[&str]| resolve_targets(2, &v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&["all-linear"]).unwrap(), vec![[true; 7]; 2]);
        assert_eq!(t(&["q_proj", "v_proj"]).unwrap(), vec![[true, false, true, false, false, false, false]; 2]);
        assert_eq!(t(&["model.layers.1.mlp.*"]).unwrap(), vec![[false; 7], [false, false, false, false, true, true, true]]);
        assert_eq!(t(&["*proj"]).unwrap(), vec![[true; 7]; 2]);
        let e = t(&["qproj"]).unwrap_err();
        assert!(e.contains("\"qproj\" matches no module") && e.contains("self_attn.q_proj"), "{e}");
        assert_eq!(LoraShape { r: 16, alpha: 32.0, rslora: false }.scale(), 2.0);
        assert_eq!(LoraShape { r: 16, alpha: 32.0, rslora: true }.scale(), 8.0);
    }
}
