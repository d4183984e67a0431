//! `ferrospeed generate` end to end: from a checkpoint of each family (exported on the fly), greedy
//! output repeats and top-p output depends on the seed; a model trained until it knows its corpus by
//! heart continues it, as many tokens as asked or up to its EOS; bad requests are one line; SmolLM2
//! from its GGUF file answers a question as transformers does (when `scripts/fetch-smollm2.sh` has
//! fetched it).

mod support;

use std::time::Duration;
use support::*;

fn generate(args: &[&str]) -> Finished {
    let mut cmd = ferrospeed();
    cmd.arg("generate").args(args).args(["--device", "cpu"]);
    run(&mut cmd, Duration::from_secs(120))
}

fn ok(f: &Finished) -> String {
    assert!(f.status.success(), "generate failed:\n{}\n{}", f.stdout, f.stderr);
    assert!(f.stderr.contains("tokens/s"), "{}", f.stderr);
    f.stdout.clone()
}

#[test]
fn generate_from_checkpoints_of_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let families = [
        ("gpt", "kind = \"gpt\"\nn_layer = 1\nn_head = 2\nd_model = 32\nseq_len = 32\nvocab = \"bytes\""),
        ("llama", "kind = \"llama\"\nn_layer = 1\nn_head = 4\nn_kv_head = 2\nd_model = 32\nseq_len = 32\nvocab = \"bytes\""),
    ];
    for (name, model) in families {
        let base = dir.path().join(name);
        std::fs::create_dir(&base).unwrap();
        let config = write_config(&base, model, "steps = 3\nwarmup = 1\nglobal_batch = 2\nmicro_batch = 2\nlr = 3e-3");
        let ck = base.join("ck");
        train(1, &config, &base.join("track"), &[format!("checkpoint.dir={}", ck.display())]);
        let ck = ck.to_str().unwrap();
        let greedy = ok(&generate(&["--model", ck, "--prompt", "fn main", "--max-tokens", "20"]));
        assert_eq!(ok(&generate(&["--model", ck, "--prompt", "fn main", "--max-tokens", "20"])), greedy, "{name}: greedy repeats");
        let sampled: Vec<String> = ["1", "1", "2"]
            .iter()
            .map(|seed| ok(&generate(&["--model", ck, "--prompt", "fn main", "--max-tokens", "20", "--temperature", "1.5", "--top-p", "0.95", "--seed", seed])))
            .collect();
        assert_eq!(sampled[0], sampled[1], "{name}: the same seed samples the same text");
        assert_ne!(sampled[0], sampled[2], "{name}: another seed samples other text");
        // The bytes tokenizer has no chat template.
        let f = generate(&["--model", ck, "--prompt", "hi", "--chat"]);
        assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
        assert!(f.stderr.trim().lines().count() == 1 && f.stderr.contains("no chat template"), "{}", f.stderr);
    }
    let f = generate(&["--model", dir.path().to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.trim().lines().count() == 1 && f.stderr.contains("not a model directory, GGUF file or checkpoint"), "{}", f.stderr);
}

/// The number of new tokens `generate` reports on stderr.
fn new_tokens(f: &Finished) -> usize {
    let (_, after) = f.stderr.split_once(" prompt tokens in ").unwrap_or_else(|| panic!("{}", f.stderr));
    let (_, after) = after.split_once(" s, ").unwrap();
    after.split_once(" new tokens").unwrap().0.parse().unwrap()
}

#[test]
fn a_model_that_knows_its_corpus_continues_it_and_stops_at_eos() {
    // Documents of the alphabet, each ending in the bytes tokenizer's EOS (0): a small GPT learns
    // them by heart, so the greedy continuation of "abc" is known letter for letter.
    let dir = tempfile::tempdir().unwrap();
    let docs: String = (0..64).map(|_| "{\"text\": \"abcdefghijklmnopqrstuvwxyz\"}\n").collect();
    std::fs::write(dir.path().join("alphabet.jsonl"), docs).unwrap();
    let data = dir.path().join("data");
    let f = run(ferrospeed().args(["data", "prepare"]).arg(dir.path().join("alphabet.jsonl")).args(["--tokenizer", "bytes", "--out"]).arg(&data), Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    let config = write_config(dir.path(), "kind = \"gpt\"\nn_layer = 1\nn_head = 2\nd_model = 32\nseq_len = 32\nvocab = \"bytes\"", "steps = 150\nwarmup = 5\nglobal_batch = 8\nmicro_batch = 8\nlr = 1e-2");
    let ck = dir.path().join("ck");
    let losses = train(1, &config, &dir.path().join("track"), &[format!("data.path={}", data.display()), format!("checkpoint.dir={}", ck.display())]);
    assert!(losses.last().unwrap().1 < 0.05, "the model has not learnt the alphabet: {losses:?}");
    let ck = ck.to_str().unwrap();
    // As many tokens as asked, when no EOS comes first.
    let f = generate(&["--model", ck, "--prompt", "abc", "--max-tokens", "5"]);
    assert_eq!(ok(&f), "defgh\n");
    assert_eq!(new_tokens(&f), 5, "{}", f.stderr);
    // Up to the EOS after "z" (23 letters and the EOS, fewer than the 30 asked), which is not printed.
    let f = generate(&["--model", ck, "--prompt", "abc", "--max-tokens", "30"]);
    assert_eq!(ok(&f), "defghijklmnopqrstuvwxyz\n");
    assert_eq!(new_tokens(&f), 24, "{}", f.stderr);
    // Sampling that keeps only the most likely token is greedy, whatever the temperature.
    let f = generate(&["--model", ck, "--prompt", "abc", "--max-tokens", "30", "--temperature", "2", "--top-p", "1e-6", "--seed", "7"]);
    assert_eq!(ok(&f), "defghijklmnopqrstuvwxyz\n");
}

#[test]
fn bad_sampling_settings_are_one_line_naming_the_flag_and_the_value() {
    // Checked while the arguments are read: no model is opened (this one does not exist).
    let cases: [(&[&str], &str, &str); 12] = [
        (&["--temperature=-1"], "--temperature", "'-1'"),
        (&["--temperature", "-1"], "--temperature", "'-1'"),
        (&["--temperature", "nan"], "--temperature", "'nan'"),
        (&["--temperature", "inf"], "--temperature", "'inf'"),
        (&["--temperature", "warm"], "--temperature", "'warm'"),
        (&["--top-p", "2"], "--top-p", "'2'"),
        (&["--top-p", "-0.5"], "--top-p", "'-0.5'"),
        (&["--top-p", "0"], "--top-p", "'0'"),
        (&["--top-p", "NaN"], "--top-p", "'NaN'"),
        (&["--max-tokens", "0"], "--max-tokens", "'0'"),
        (&["--max-tokens", "-3"], "--max-tokens", "'-3'"),
        (&["--seed", "-1"], "--seed", "'-1'"),
    ];
    for (args, flag, value) in cases {
        let f = generate(&[&["--model", "/nonexistent/model", "--prompt", "hi"], args].concat());
        assert_eq!(f.status.code(), Some(2), "{args:?}: {}", f.stderr);
        assert_eq!(f.stderr.trim().lines().count(), 1, "{args:?}: one line please: {}", f.stderr);
        assert!(f.stderr.contains(flag) && f.stderr.contains(value) && f.stderr.contains("must be"), "{args:?}: {}", f.stderr);
    }
    let f = generate(&["--model", "/nonexistent/model", "--prompt", "hi", "--temperature", "nan"]);
    assert!(f.stderr.contains("a finite number ≥ 0 (0 is greedy)"), "{}", f.stderr);
    let f = generate(&["--model", "/nonexistent/model", "--prompt", "hi", "--top-p", "2"]);
    assert!(f.stderr.contains("above 0 and at most 1"), "{}", f.stderr);
}

#[test]
fn smollm2_answers_from_its_gguf_file() {
    let Some(path) = smollm2() else { return };
    let f = generate(&["--model", path.to_str().unwrap(), "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "20"]);
    // What transformers answers (greedy, the same prompt through apply_chat_template), stopping at the
    // same EOS (bench/results/finetune-2026-12-01.md): 7 tokens of text and <|im_end|>, not printed.
    assert_eq!(ok(&f), "The capital of France is Paris.\n");
    assert_eq!(new_tokens(&f), 8, "{}", f.stderr);
}
