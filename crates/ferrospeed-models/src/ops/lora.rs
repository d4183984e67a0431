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

/// What the backward of [`delta`] needs: `u = x·A_allᵀ` `[n, R]`, `A_all` (the adapted parts' A stacked
/// `[R, in]`, R = Σ r) and the block matrix `B_blk` `[Σ out, R]` (each adapted part's `s·B` on its rows and its columns of
/// `u`, zero elsewhere).
pub struct Kept {
    u: Tensor,
    a_all: Tensor,
    b_blk: Tensor,
}

/// The adapted parts' A stacked `[R, in]` and the block matrix of their `s·B` `[Σ out, R]` (see [`Kept`]).
fn stacked(p: &[Tensor], parts: &[Part], scale: f64) -> Result<(Tensor, Tensor)> {
    let adapted: Vec<Adapter> = parts.iter().filter_map(|(a, _)| *a).collect();
    let a_all = if adapted.len() == 1 { p[adapted[0].a].clone() } else { Tensor::cat(&adapted.iter().map(|a| &p[a.a]).collect::<Vec<_>>(), 0)? };
    let rs: Vec<usize> = adapted.iter().map(|a| p[a.a].dim(0)).collect::<Result<_>>()?;
    let total: usize = rs.iter().sum();
    let (dtype, dev) = (a_all.dtype(), a_all.device().clone());
    let mut rows = Vec::with_capacity(parts.len());
    let mut k = 0;
    for &(adapter, width) in parts {
        match adapter {
            Some(ad) => {
                let before: usize = rs[..k].iter().sum();
                let after = total - before - rs[k];
                // s·B: the scale on the small matrix, not on the [n, out] products.
                let b = p[ad.a + 1].affine(scale, 0.0)?;
                let mut cols = Vec::with_capacity(3);
                if before > 0 {
                    cols.push(Tensor::zeros((width, before), dtype, &dev)?);
                }
                cols.push(b);
                if after > 0 {
                    cols.push(Tensor::zeros((width, after), dtype, &dev)?);
                }
                rows.push(if cols.len() == 1 { cols.remove(0) } else { Tensor::cat(&cols, 1)? });
                k += 1;
            }
            None => rows.push(Tensor::zeros((width, total), dtype, &dev)?),
        }
    }
    let b_blk = if rows.len() == 1 { rows.remove(0) } else { Tensor::cat(&rows, 0)? };
    Ok((a_all, b_blk))
}

/// `s·(x·Aᵀ)·Bᵀ` for every part of a (stacked) projection of `x` `[n, in]`, side by side `[n, Σ out]`
/// (zero for a part without an adapter): two matmuls, `u = x·A_allᵀ` and `u·B_blkᵀ`, whatever the number
/// of parts. `None` when no part is adapted.
pub fn delta(x: &Tensor, p: &[Tensor], parts: &[Part], scale: f64) -> Result<Option<(Tensor, Kept)>> {
    if parts.iter().all(|(a, _)| a.is_none()) {
        return Ok(None);
    }
    let (a_all, b_blk) = scoped_as(Kind::Copy, "lora_stack", || stacked(p, parts, scale))?;
    let u = matmul(x, &a_all.t()?)?;
    let d = matmul(&u, &b_blk.t()?)?;
    Ok(Some((d, Kept { u, a_all, b_blk })))
}

/// The backward of [`delta`] for the output gradient `g` `[n, Σ out]`: `dA` and `dB` of each adapted
/// part into `grads` (as weight work), and the gradient it adds to the input `x`: `du = g·B_blk`
/// `[n, R]`, `dA_all = duᵀ·x` (split by rows), `dB = s·gᵀ·u` (each part's diagonal block of `gᵀ·u`), and
/// `du·A_all`.
pub fn backward(grads: &mut ParamGrads, p: &[Tensor], parts: &[Part], kept: &Kept, g: &Tensor, x: &Tensor, scale: f64) -> Result<Tensor> {
    let adapted: Vec<(Adapter, usize, usize)> = {
        let mut at = 0;
        let mut v = Vec::new();
        for &(adapter, width) in parts {
            if let Some(ad) = adapter {
                v.push((ad, at, width));
            }
            at += width;
        }
        v
    };
    let du = matmul(g, &kept.b_blk)?;
    let a_parts: Vec<(usize, usize)> = adapted.iter().map(|(ad, _, _)| Ok((ad.a, p[ad.a].dim(0)?))).collect::<Result<_>>()?;
    put_matmul_tn(grads, a_parts.clone(), &du, x)?;
    // dB of every part from one gᵀ·u, the off-diagonal blocks unused (R is small).
    let (gt, u) = (g.clone(), kept.u.clone());
    let blocks: Vec<(usize, usize, usize, usize, usize)> = {
        let mut col = 0;
        adapted.iter().zip(&a_parts).map(|((ad, row, width), (_, r))| {
            let b = (ad.a + 1, *row, *width, col, *r);
            col += r;
            b
        }).collect()
    };
    grads.put(move |slots| {
        let full = matmul(&gt.t()?, &u)?;
        for (slot, row, width, col, r) in blocks {
            slots[slot] = Some(full.narrow(0, row, width)?.narrow(1, col, r)?.affine(scale, 0.0)?);
        }
        Ok(())
    })?;
    matmul(&du, &kept.a_all)
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
