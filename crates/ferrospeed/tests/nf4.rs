//! NF4 with double quantisation against bitsandbytes (fixtures/make_nf4_fixtures.py recorded its
//! `quantize_4bit(…, quant_type="nf4", compress_statistics=True)` and `dequantize_4bit` once): the
//! dynamic 8-bit map, every packed code, every 8-bit absmax code and second-level scale, and every
//! dequantised value, bit for bit; the absmax mean (`offset`) within one f32 rounding of torch's.

use ferrospeed::quant::{dequantize, dynamic_map, quantize, quantize_absmax, Nf4};
use std::path::Path;

/// An f32 tensor of the fixture file.
fn read(path: &Path, name: &str) -> Vec<f32> {
    bytes(path, name).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A u8 tensor's bytes (WeightFiles reads floats only).
fn bytes(path: &Path, name: &str) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    st.tensor(name).unwrap().data().to_vec()
}

#[test]
fn nf4_quantisation_equals_bitsandbytes_bit_for_bit() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4/fixtures.safetensors");
    let map = read(&path, "dynamic_map");
    assert_eq!(map.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), dynamic_map().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "the dynamic map");
    for case in ["normal", "ragged", "bf16"] {
        let x = read(&path, &format!("{case}.input"));
        let q = quantize(&x);
        assert_eq!(q.packed, bytes(&path, &format!("{case}.packed")), "{case}: the packed NF4 codes");
        let offset = read(&path, &format!("{case}.offset"))[0];
        assert!((q.offset - offset).abs() <= offset.abs() * f32::EPSILON, "{case}: offset {} vs {offset}", q.offset);
        // The second level from bitsandbytes' own offset: the same bytes and scales.
        let theirs = Nf4 { qabsmax: bytes(&path, &format!("{case}.qabsmax")), absmax2: read(&path, &format!("{case}.absmax2")), offset, ..q.clone() };
        let absmax: Vec<f32> = x.chunks(64).map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let (qabsmax, absmax2) = quantize_absmax(&absmax, offset);
        // bitsandbytes' CPU kernel searches the map approximately: where its code differs from ours, ours
        // is the nearer of two neighbours (and that happens rarely).
        let map = dynamic_map();
        let mut off = 0;
        for (k, (&a, &b)) in qabsmax.iter().zip(&theirs.qabsmax).enumerate() {
            if a != b {
                let v = (absmax[k] - offset) / absmax2[k / 256];
                let d = |c: u8| (v - map[c as usize]).abs();
                assert!(a.abs_diff(b) == 1 && d(a) < d(b), "{case}: absmax {k} coded {a} by us, {b} by bitsandbytes, for {v}");
                off += 1;
            }
        }
        assert!(off * 100 <= qabsmax.len(), "{case}: {off} of {} absmax codes differ", qabsmax.len());
        assert_eq!(absmax2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), theirs.absmax2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{case}: the second-level scales");
        let mut y = vec![0f32; x.len()];
        dequantize(&theirs, &mut y);
        let want = read(&path, &format!("{case}.dequantized"));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        if case == "bf16" {
            // bitsandbytes rounds the result to the input's dtype.
            let rounded: Vec<f32> = y.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
            assert_eq!(bits(&rounded), bits(&want), "{case}: dequantised values");
        } else {
            assert_eq!(bits(&y), bits(&want), "{case}: dequantised values");
        }
    }
}
