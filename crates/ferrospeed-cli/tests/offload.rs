//! Offload end to end through `ferrospeed train`: a run with the optimizer state on NVMe (or in
//! host memory, or split between them) gives the losses of the run without, a checkpoint saved with
//! offload resumes without it and the reverse, bit for bit; the summary reports the disk's bandwidth.

mod support;

use ferrospeed::checkpoint;
use support::*;

#[test]
fn checkpoints_move_between_offloaded_and_plain_runs_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let nvme = dir.path().join("nvme");
    std::fs::create_dir(&nvme).unwrap();
    // 2 ranks, micro-batch 2, global batch 8: accumulation 2.
    let config = write_config(dir.path(), TINY, "steps = 8\nglobal_batch = 8\nmicro_batch = 2\nwarmup = 2");
    let offload = |tier: &str, ratio: f64| vec![format!("zero.offload_optimizer=\"{tier}\""), format!("zero.offload_ratio={ratio}"), format!("zero.nvme_dir={}", nvme.display())];
    let plain: Vec<String> = vec![];
    // Three tiers: half of the state on disk, the rest in host memory.
    let host_and_disk = [offload("nvme", 1.0), vec!["zero.nvme_ratio=0.5".into()]].concat();
    for (stage, saved_with, resumed_with) in [(2, offload("nvme", 0.5), plain.clone()), (3, plain.clone(), [offload("nvme", 1.0), vec!["zero.offload_params=\"nvme\"".into()]].concat()), (1, offload("cpu", 1.0), host_and_disk)] {
        let base = dir.path().join(format!("s{stage}"));
        let ck = base.join("ck");
        let mut sets = vec![format!("zero.stage={stage}"), format!("checkpoint.dir={}", ck.display()), "checkpoint.every=4".into()];
        sets.extend(saved_with.iter().cloned());
        let whole = train(2, &config, &base.join("whole"), &sets);
        let reference = train(2, &config, &base.join("reference"), &[format!("zero.stage={stage}")]);
        assert_eq!(bits(&whole), bits(&reference), "stage {stage}: {saved_with:?} vs no offload");
        let root = root_with(&ck.join(checkpoint::step_dir_name(4)), &base.join("resume-root"));
        let mut sets = vec![format!("zero.stage={stage}"), format!("checkpoint.dir={}", root.display())];
        sets.extend(resumed_with.iter().cloned());
        let resumed = train(2, &config, &base.join("resumed"), &sets);
        assert_eq!(resumed.first().map(|r| r.0), Some(5), "stage {stage}: resumed after step 4");
        assert_eq!(bits(&resumed), bits(&whole[4..]), "stage {stage}: saved with {saved_with:?}, resumed with {resumed_with:?}");
    }
    assert_eq!(std::fs::read_dir(&nvme).unwrap().count(), 0, "the runs removed their state files");
}

#[test]
fn the_summary_reports_the_disk_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 3\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let track = dir.path().join("run");
    let f = run(
        &mut train_command(1, &config, &track, &["zero.stage=1".into(), "zero.offload_optimizer=\"nvme\"".into(), format!("zero.nvme_dir={}", dir.path().display())]),
        std::time::Duration::from_secs(120),
    );
    assert!(f.status.success(), "{}", f.stderr);
    let line = f.stdout.lines().find(|l| l.contains("NVMe (rank 0): read")).unwrap_or_else(|| panic!("no NVMe line in {}", f.stdout));
    assert!(line.contains("GB/s"), "{line}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(track.join("summary.json")).unwrap()).unwrap();
    assert!(summary["nvme"]["read_bytes"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["memory"]["offloaded_nvme"].as_u64().unwrap() > 0, "{summary}");
}

#[test]
fn estimate_memory_lists_every_stage_and_offload_choice() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 3\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1\nprecision = \"bf16\"");
    let f = run(ferrospeed().args(["estimate-memory", "--config", &config.display().to_string(), "--gpu", "--world", "2", "--set", "zero.stage=2", "--set", "model.d_model=1024", "--set", "model.n_head=8", "--set", "model.n_layer=8"]), std::time::Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    let rows: Vec<&str> = f.stdout.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains("GPU").eq(&false)).skip(1).collect();
    assert_eq!(rows.len(), 16, "{}", f.stdout);
    let this: Vec<&&str> = rows.iter().filter(|l| l.contains("this config")).collect();
    assert_eq!(this.len(), 1, "{}", f.stdout);
    assert!(this[0].starts_with("2 ") && this[0].contains("on the device"), "{}", this[0]);
    // Offloading the optimizer state moves bytes from the GPU to the host.
    // [stage, GPU, host, NVMe]
    let cols = |l: &str| -> Vec<f64> { l.split_whitespace().filter_map(|x| x.parse().ok()).collect() };
    let (dev, cpu) = (cols(rows[8]), cols(rows[10]));
    assert!(cpu[1] < dev[1] && cpu[2] > dev[2], "{}\n{}", rows[8], rows[10]);
}

#[test]
fn estimate_memory_shows_a_config_of_three_tiers_between_host_and_nvme() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 3\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1\nprecision = \"bf16\"");
    let nvme = format!("zero.nvme_dir={:?}", dir.path().display().to_string());
    let mut args = vec!["estimate-memory", "--config", config.to_str().unwrap(), "--gpu", "--set", "model.d_model=2048", "--set", "model.n_head=16", "--set", "model.n_layer=32"];
    args.extend(["--set", "zero.stage=1", "--set", "zero.offload_optimizer=\"nvme\"", "--set", "zero.nvme_ratio=0.5", "--set", &nvme]);
    let f = run(ferrospeed().args(&args), std::time::Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    let rows: Vec<&str> = f.stdout.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && !l.contains("GPU")).skip(1).collect();
    assert_eq!(rows.len(), 17, "{}", f.stdout);
    let this = rows[16];
    assert!(this.starts_with("1 ") && this.contains("nvme 1, NVMe 0.5") && this.contains("this config"), "{}", f.stdout);
    // [stage, ratio, ratio, GPU, host, NVMe] for the mix; [stage, GPU, host, NVMe] for the table.
    let cols = |l: &str| -> Vec<f64> { l.split_whitespace().filter_map(|x| x.trim_end_matches(',').parse().ok()).collect() };
    let (mix, cpu, disk) = (cols(this), cols(rows[6]), cols(rows[7]));
    let (mix_host, mix_nvme) = (mix[mix.len() - 2], mix[mix.len() - 1]);
    assert!(mix_host > disk[2] && mix_host < cpu[2], "host between all-on-disk and all-on-host:\n{}", f.stdout);
    assert!(mix_nvme > 0.3 * disk[3] && mix_nvme < 0.7 * disk[3], "about half on disk:\n{}", f.stdout);

    // Stage-3 parameter shards on NVMe: they leave host memory for the disk.
    let this_row = |params: &str| {
        let mut a = args.clone();
        let p = format!("zero.offload_params=\"{params}\"");
        a.extend(["--set", "zero.stage=3", "--set", &p]);
        let f = run(ferrospeed().args(&a), std::time::Duration::from_secs(60));
        assert!(f.status.success(), "{}", f.stderr);
        let line = f.stdout.lines().find(|l| l.contains("this config")).map(str::to_string).unwrap_or_default();
        assert!(line.contains(&format!("params {params}")), "{}", f.stdout);
        cols(&line)
    };
    let (cpu, nvme) = (this_row("cpu"), this_row("nvme"));
    let n = cpu.len();
    assert!(nvme[n - 2] < cpu[n - 2] && nvme[n - 1] > cpu[n - 1], "host {} → {}, NVMe {} → {}", cpu[n - 2], nvme[n - 2], cpu[n - 1], nvme[n - 1]);
}
