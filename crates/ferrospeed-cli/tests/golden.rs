//! `ferrospeed train` on the README example reproduces, bit for bit, the per-step losses recorded
//! before the engine was restructured into the library API (`golden/train_losses.json`, written by
//! the release binary of commit b0a031c). Refactors that should not move numbers must pass this.
//!
//! CPU float results depend on the vector instructions candle's matmul picks at run time; the golden
//! was recorded with AVX2 + FMA. On a CPU with a different set the comparison falls back to 1e-5
//! relative and says so (it still fails on a real change).

mod support;

use std::path::Path;
use std::time::Duration;
use support::*;

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let wanted = ["avx2", "avx512f", "f16c", "fma"];
    let mut got: Vec<String> = flags.split_whitespace().filter(|f| wanted.contains(f)).map(str::to_string).collect();
    got.sort();
    got.dedup();
    got
}

#[test]
fn train_losses_equal_the_recorded_golden_bit_for_bit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/train_losses.json")).unwrap()).unwrap();
    let recorded_flags: Vec<String> = golden["cpu_flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    let exact = cpu_flags() == recorded_flags;
    if !exact {
        eprintln!("note: CPU flags {:?} differ from the golden's {recorded_flags:?}: comparing within 1e-5 relative", cpu_flags());
    }
    let dir = tempfile::tempdir().unwrap();
    for run_spec in golden["runs"].as_array().unwrap() {
        let name = run_spec["name"].as_str().unwrap();
        let world = run_spec["world"].as_u64().unwrap() as usize;
        let mut cmd = ferrospeed();
        cmd.current_dir(&root);
        cmd.args(["launch", "--nproc-per-node", &world.to_string(), "train", "--config", "examples/tiny.toml"]);
        let track = dir.path().join(name);
        cmd.arg("--set").arg(format!("track.dir=\"{}\"", track.display()));
        cmd.args(["--set", "train.sample_tokens=0"]);
        for s in run_spec["set"].as_array().unwrap() {
            cmd.args(["--set", s.as_str().unwrap()]);
        }
        let f = run(&mut cmd, Duration::from_secs(300));
        assert!(f.status.success(), "{name} failed:\n{}\n{}", f.stdout, f.stderr);
        let got: Vec<f64> = metrics(&track).into_iter().map(|(_, l)| l).collect();
        let want: Vec<f64> = run_spec["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{name}: number of steps");
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            if exact {
                assert_eq!(g.to_bits(), w.to_bits(), "{name} step {}: {g} vs golden {w}", step + 1);
            } else {
                assert!(((g - w) / w).abs() < 1e-5, "{name} step {}: {g} vs golden {w}", step + 1);
            }
        }
    }
}
