//! `ferrospeed data prepare` end to end: re-runs do nothing, bad input is one line and writes nothing, an
//! output folder that cannot be made is named as given, chat loss masks, and `train` on prepared data
//! (packed and padded) resuming bit for bit.

mod support;

use ferrospeed::checkpoint;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

/// The tiny GPT these tests train on prepared data.
const GPT: &str = "kind = \"gpt\"\nn_layer = 1\nn_head = 2\nd_model = 32\nseq_len = 32";
/// A ChatML-like template for the bytes tokenizer.
const TEMPLATE: &str = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

/// `data prepare INPUTS --tokenizer bytes --out OUT` with `extra` arguments.
fn prepare(inputs: &[&Path], out: &Path, extra: &[&str]) -> Finished {
    let mut cmd = ferrospeed();
    cmd.args(["data", "prepare"]).args(inputs).args(["--tokenizer", "bytes", "--out"]).arg(out).args(extra);
    run(&mut cmd, Duration::from_secs(120))
}

fn prepared(inputs: &[&Path], out: &Path, extra: &[&str]) -> String {
    let f = prepare(inputs, out, extra);
    assert!(f.status.success(), "prepare failed:\n{}\n{}", f.stdout, f.stderr);
    f.stdout
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Every file of `dir` with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>, std::time::SystemTime)> {
    names_in(dir).into_iter().map(|n| {
        let p = dir.join(&n);
        let bytes = std::fs::read(&p).unwrap();
        (n, bytes, p.metadata().unwrap().modified().unwrap())
    }).collect()
}

/// A one-line failure with exit code 2 (the error, no other output on stderr).
fn one_line_exit_2(f: &Finished, what: &str) {
    assert_eq!(f.status.code(), Some(2), "{what}: {}\n{}", f.stdout, f.stderr);
    assert_eq!(f.stderr.trim().lines().count(), 1, "{what}: one line please: {}", f.stderr);
}

#[test]
fn prepare_is_a_no_op_the_second_time_and_refuses_other_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(&dir.path().join("notes.txt"), "Hello there.\nA second line of text.\n");
    let jsonl = write(&dir.path().join("docs.jsonl"), "{\"text\": \"first document\"}\n{\"text\": \"second\"}\n");
    let out = dir.path().join("prepared");
    let first = prepared(&[&text, &jsonl], &out, &[]);
    assert!(first.starts_with("prepared 3 documents"), "{first}");
    let before = snapshot(&out);
    assert!(before.iter().any(|f| f.0 == "index.json") && before.iter().any(|f| f.0 == "shard-00000.tokens"), "{before:?}");
    std::thread::sleep(Duration::from_millis(20));
    let second = prepared(&[&text, &jsonl], &out, &[]);
    assert!(second.contains("is up to date") && second.contains("3 documents"), "{second}");
    assert_eq!(snapshot(&out), before, "an up-to-date directory is not rewritten");

    // Other inputs into the same --out: refused, the old directory intact.
    let other = write(&dir.path().join("other.jsonl"), "{\"text\": \"something else entirely\"}\n");
    let f = prepare(&[&other], &out, &[]);
    one_line_exit_2(&f, "other inputs");
    assert!(f.stderr.contains("--force") && f.stderr.contains(&out.display().to_string()), "{}", f.stderr);
    assert_eq!(snapshot(&out), before, "a refused prepare leaves the old directory as it was");
    // Changing an input's bytes counts as other inputs too.
    write(&jsonl, "{\"text\": \"first document\"}\n{\"text\": \"changed\"}\n");
    one_line_exit_2(&prepare(&[&text, &jsonl], &out, &[]), "changed input");
    assert_eq!(snapshot(&out), before);

    let forced = prepared(&[&other], &out, &["--force"]);
    assert!(forced.starts_with("prepared 1 documents"), "{forced}");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["documents"], 1);
    assert_eq!(index["tokens"].as_u64(), Some("something else entirely".len() as u64 + 1), "the text and its EOS");
    assert_eq!(index["inputs"], serde_json::json!([other.display().to_string()]));
    let leftovers: Vec<_> = names_in(dir.path()).into_iter().filter(|n| n.to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "no temporary or old directories stay behind: {leftovers:?}");
}

#[test]
fn bad_input_is_one_line_with_file_and_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let template = write(&dir.path().join("chat.jinja"), TEMPLATE);
    let failing = write(&dir.path().join("failing.jinja"), "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ raise_exception('boom') }}");
    let (t, f) = (template.display().to_string(), failing.display().to_string());
    let text = "{\"text\": \"fine\"}\n";
    let chat = |role: &str| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}, {{\"role\": \"{role}\", \"content\": \"hello\"}}]}}\n");
    // (file content, extra arguments, fragments the one line must contain; FILE stands for the input)
    let cases: Vec<(String, Vec<&str>, Vec<&str>)> = vec![
        (format!("{text}{text}{{\"text\": \"broken\"\n{text}"), vec![], vec!["FILE:3", "not JSON"]),
        (format!("{text}{{\"txt\": \"typo\"}}\n"), vec![], vec!["FILE:2", "\"text\""]),
        (format!("{text}{}", chat("wizard")), vec!["--chat-template", &t], vec!["FILE:2", "role \"wizard\""]),
        (format!("{text}{text}{{\"messages\": [{{\"role\": \"user\"}}]}}\n"), vec!["--chat-template", &t], vec!["FILE:3", "\"content\""]),
        (chat("assistant"), vec![], vec!["FILE:1", "--chat-template"]),
        (format!("{text}{}", chat("assistant")), vec!["--chat-template", &f], vec!["FILE:2", "the chat template failed", "boom"]),
    ];
    for (i, (content, extra, expect)) in cases.iter().enumerate() {
        let input = write(&dir.path().join(format!("case{i}.jsonl")), content);
        let out = dir.path().join(format!("out{i}"));
        let f = prepare(&[&input], &out, extra);
        one_line_exit_2(&f, &format!("case {i}"));
        for fragment in expect {
            let fragment = fragment.replace("FILE", &input.display().to_string());
            assert!(f.stderr.contains(&fragment), "case {i}: expected {fragment:?} in: {}", f.stderr);
        }
        assert!(!out.exists(), "case {i}: bad input writes nothing");
        let tmp: Vec<_> = names_in(dir.path()).into_iter().filter(|n| n.to_string_lossy().starts_with(&format!(".out{i}."))).collect();
        assert!(tmp.is_empty(), "case {i}: no temporary directory stays behind: {tmp:?}");
    }
}

/// (tokens, mask, document offsets) of shard `name` of a bytes-tokenizer directory.
fn shard(dir: &Path, name: &str) -> (Vec<u16>, Vec<u8>, Vec<u64>) {
    let tokens = std::fs::read(dir.join(format!("{name}.tokens"))).unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let mask = std::fs::read(dir.join(format!("{name}.mask"))).unwrap();
    let docs = std::fs::read(dir.join(format!("{name}.docs"))).unwrap().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    (tokens, mask, docs)
}

#[test]
fn chat_masks_only_assistant_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let template = write(&dir.path().join("chat.jinja"), TEMPLATE);
    let convs: [&[(&str, &str)]; 2] = [
        &[("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Name?"), ("assistant", "Ferr\u{f6}")],
        &[("user", "2+2?"), ("assistant", "4"), ("user", "thanks")],
    ];
    let lines: String = convs.iter().map(|c| {
        let messages: Vec<_> = c.iter().map(|(r, t)| serde_json::json!({"role": r, "content": t})).collect();
        serde_json::json!({"messages": messages}).to_string() + "\n"
    }).collect();
    let input = write(&dir.path().join("chat.jsonl"), &lines);
    let out = dir.path().join("prepared");
    prepared(&[&input], &out, &["--chat-template", &template.display().to_string()]);
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    assert_eq!((index["width"].as_str(), index["eos"].as_u64(), index["chat_documents"].as_u64()), (Some("u16"), Some(0), Some(2)), "{index}");
    let names: Vec<&str> = index["shards"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["shard-00000"]);
    let (tokens, mask, docs) = shard(&out, "shard-00000");
    assert_eq!(docs.len(), 3, "two documents: {docs:?}");
    assert_eq!((tokens.len(), mask.len()), (docs[2] as usize, docs[2] as usize));
    for (d, conv) in convs.iter().enumerate() {
        // What the template renders, and the mask expected: 1 on each reply and its "</s>".
        let (mut text, mut want) = (Vec::new(), Vec::new());
        for (role, content) in conv.iter() {
            let turn = format!("<{role}>");
            text.extend_from_slice(turn.as_bytes());
            want.extend(std::iter::repeat_n(0u8, turn.len()));
            let reply = format!("{content}</s>");
            text.extend_from_slice(reply.as_bytes());
            want.extend(std::iter::repeat_n(u8::from(*role == "assistant"), reply.len()));
        }
        // Nothing after the rendered conversation (TRL appends no EOS to a chat): the template's
        // end-of-turn ends the document, in the loss after a final reply (the model learns to stop).
        let (a, b) = (docs[d] as usize, docs[d + 1] as usize);
        let got: Vec<u8> = tokens[a..b].iter().map(|&t| u8::try_from(t).unwrap()).collect();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&text), "document {d}: tokens");
        assert!(got.ends_with(b"</s>"), "document {d} ends with the template's end-of-turn");
        assert_eq!(&mask[a..b], &want[..], "document {d}: mask");
    }
    assert_eq!(index["loss_tokens"].as_u64(), Some(mask.iter().map(|&m| m as u64).sum()));
}

/// A config for the tiny GPT on the prepared directory `data`, packed or padded.
fn data_config(dir: &Path, model: &str, data: &Path, packing: bool) -> (PathBuf, Vec<String>) {
    let config = write_config(dir, model, "steps = 6\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1\nlr = 3e-3");
    (config, vec![format!("data.path={}", data.display()), format!("data.packing={packing}")])
}

/// `train` (one process, no launcher) refused in one line with exit code 2, its run directory not created.
fn refused(config: &Path, track: &Path, sets: &[String], what: &str) -> Finished {
    let mut cmd = ferrospeed();
    cmd.args(["train", "--config"]).arg(config).arg("--set").arg(format!("track.dir={}", track.display()));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let f = run(&mut cmd, Duration::from_secs(60));
    one_line_exit_2(&f, what);
    assert!(!track.exists(), "{what}: no run directory is created");
    f
}

#[test]
fn prepared_data_trains_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Packed: one text document of ~650 tokens, ~20 windows: 6 steps of 4 cross an epoch.
    let corpus: String = (0..30).map(|i| format!("line {i}: the {} fox\n", ["quick", "lazy", "brown"][i % 3])).collect();
    let text = write(&dir.path().join("corpus.txt"), &corpus);
    // Padded: ten short documents (at most seq_len tokens with the EOS), 2.5 steps an epoch.
    let docs: String = (0..10).map(|i| serde_json::json!({"text": format!("doc {i} says {}", "ab".repeat(i))}).to_string() + "\n").collect();
    let jsonl = write(&dir.path().join("docs.jsonl"), &docs);
    for (name, input, packing) in [("packed", &text, true), ("padded", &jsonl, false)] {
        let base = dir.path().join(name);
        std::fs::create_dir(&base).unwrap();
        let data = base.join("data");
        prepared(&[input], &data, &[]);
        let (config, sets) = data_config(&base, GPT, &data, packing);
        let with = |extra: &[String]| sets.iter().chain(extra).cloned().collect::<Vec<_>>();
        let whole = train(1, &config, &base.join("whole"), &sets);
        assert_eq!(whole.len(), 6, "{name}");
        assert!(whole[5].1 < whole[0].1, "{name}: the loss falls: {whole:?}");
        let ck = base.join("ck");
        let saving = train(1, &config, &base.join("saving"), &with(&[format!("checkpoint.dir={}", ck.display()), "checkpoint.every=3".into()]));
        assert_eq!(bits(&saving), bits(&whole), "{name}: saving checkpoints changes nothing");
        // Resume from the step-3 checkpoint alone, in a fresh root and a new track dir.
        let root = root_with(&ck.join(checkpoint::step_dir_name(3)), &base.join("root"));
        let resumed = train(1, &config, &base.join("resumed"), &with(&[format!("checkpoint.dir={}", root.display()), "checkpoint.resume=true".into()]));
        assert_eq!(resumed.first().map(|r| r.0), Some(4), "{name}: resumed after step 3");
        assert_eq!(bits(&resumed), bits(&whole[3..]), "{name}: resumed losses equal the uninterrupted run's");
        if packing {
            let w2 = train(2, &config, &base.join("w2"), &sets);
            assert_eq!(w2.len(), whole.len());
            for ((step, a), (_, b)) in w2.iter().zip(&whole) {
                assert!(((a - b) / b).abs() < 1e-5, "{name} world 2 step {step}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn padded_docs_longer_than_seq_len_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    // 33 tokens with the EOS fit seq_len 32 (input 32, target 32); the 41 of the second do not.
    let docs = format!("{}\n{}\n", serde_json::json!({"text": "a".repeat(32)}), serde_json::json!({"text": "b".repeat(40)}));
    let input = write(&dir.path().join("docs.jsonl"), &docs);
    let data = dir.path().join("data");
    prepared(&[&input], &data, &[]);
    let (config, sets) = data_config(dir.path(), GPT, &data, false);
    let track = dir.path().join("track");
    let f = refused(&config, &track, &sets, "padded");
    for fragment in ["data.packing = true", "model.seq_len = 40", "document 2 has 41 tokens"] {
        assert!(f.stderr.contains(fragment), "expected {fragment:?} in {}", f.stderr);
    }
    // The same data packed trains (74 tokens: two windows).
    let (config, sets) = data_config(dir.path(), GPT, &data, true);
    let sets = [sets, vec!["train.steps=1".into(), "train.global_batch=2".into()]].concat();
    assert_eq!(train(1, &config, &dir.path().join("packed"), &sets).len(), 1);
}

#[test]
fn prepared_data_from_another_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let corpus: String = (0..20).map(|i| format!("the {i}th line of the corpus\n")).collect();
    let input = write(&dir.path().join("corpus.txt"), &corpus);
    let data = dir.path().join("data");
    prepared(&[&input], &data, &[]);
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/hf/bpe/tokenizer.json");
    let llama = format!("kind = \"llama\"\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nd_model = 32\nseq_len = 32\ntokenizer = \"{}\"", tokenizer.display());
    let (config, sets) = data_config(dir.path(), &llama, &data, true);
    let track = dir.path().join("track");
    let f = refused(&config, &track, &sets, "another tokenizer");
    assert!(f.stderr.contains("prepared with another tokenizer") && f.stderr.contains("bytes"), "{}", f.stderr);
}

#[test]
fn resuming_on_other_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, words: &str| {
        let corpus: String = (0..30).map(|i| format!("line {i}: {words}\n")).collect();
        let input = write(&dir.path().join(format!("{name}.txt")), &corpus);
        let data = dir.path().join(name);
        prepared(&[&input], &data, &[]);
        data
    };
    let (a, b) = (make("a", "the quick brown fox"), make("b", "a lazy dog sleeps"));
    let (config, sets) = data_config(dir.path(), GPT, &a, true);
    let ck = dir.path().join("ck");
    let with_ck = [sets, vec![format!("checkpoint.dir={}", ck.display()), "checkpoint.every=3".into(), "train.steps=3".into()]].concat();
    train(1, &config, &dir.path().join("first"), &with_ck);
    let mut other: Vec<String> = with_ck.iter().map(|s| if s.starts_with("data.path=") { format!("data.path={}", b.display()) } else { s.clone() }).collect();
    other.extend(["checkpoint.resume=true".into(), "train.steps=6".into()]);
    let mut cmd = ferrospeed();
    cmd.args(["train", "--config"]).arg(&config).arg("--set").arg(format!("track.dir={}", dir.path().join("second").display()));
    for s in &other {
        cmd.args(["--set", s]);
    }
    let f = run(&mut cmd, Duration::from_secs(60));
    one_line_exit_2(&f, "other data");
    assert!(f.stderr.contains("other data than data.path"), "{}", f.stderr);
}

#[test]
fn unsupported_gguf_files_are_refused_before_anything_is_written() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/gguf");
    let dir = tempfile::tempdir().unwrap();
    let corpus = write(&dir.path().join("corpus.txt"), "some text to train on, long enough for a window or two of it\n");
    for (file, want) in [("bad_arch.gguf", "architecture \"falcon\""), ("bad_quant.gguf", "Q5_0")] {
        let config = write_config(dir.path(), &format!("init_from = \"{}\"\nseq_len = 16", fixtures.join(file).display()), "steps = 1\nwarmup = 0\nglobal_batch = 2\nmicro_batch = 2");
        let f = refused(&config, &dir.path().join(format!("track-{file}")), &[format!("data.path={}", corpus.display())], file);
        assert!(f.stderr.contains(want) && f.stderr.contains(file), "{file}: {}", f.stderr);
    }
}

#[test]
fn too_little_prepared_data_packing_off_on_raw_text_and_raw_jsonl_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Three short documents: fewer than the global batch of 4 when padded.
    let input = write(&dir.path().join("docs.jsonl"), "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": \"three\"}\n");
    let data = dir.path().join("data");
    prepared(&[&input], &data, &[]);
    let (config, sets) = data_config(dir.path(), GPT, &data, false);
    let f = refused(&config, &dir.path().join("track-small"), &sets, "too few samples");
    assert!(f.stderr.contains("3 samples (documents), fewer than one global batch of 4"), "{}", f.stderr);
    let text = write(&dir.path().join("notes.txt"), "plain text\n");
    let raw = [format!("data.path={}", text.display()), "data.packing=false".into()];
    let f = refused(&config, &dir.path().join("track-raw"), &raw, "packing off on raw text");
    assert!(f.stderr.contains("data.packing = false applies to data written by `ferrospeed data prepare`"), "{}", f.stderr);
    // JSONL given straight to train would be read as text: refused, with the command that prepares it.
    let f = refused(&config, &dir.path().join("track-jsonl"), &[format!("data.path={}", input.display())], "raw JSONL");
    assert!(f.stderr.contains("holds JSONL") && f.stderr.contains("ferrospeed data prepare"), "{}", f.stderr);
}

#[test]
fn an_output_inside_an_input_directory_is_not_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus");
    std::fs::create_dir(&input).unwrap();
    write(&input.join("a.txt"), "first file\n");
    let out = input.join("prepared");
    assert!(prepared(&[&input], &out, &[]).starts_with("prepared 1 documents"));
    let again = prepared(&[&input], &out, &[]);
    assert!(again.contains("is up to date"), "the output was read as input: {again}");
}

/// Chat samples with replies of very different lengths: the loss is the mean over every counted target
/// of the global batch, so micro-batch size, accumulation and world size give the same losses (a mean per
/// micro-batch would weigh a short reply alone as much as four long ones together).
#[test]
fn masked_losses_do_not_depend_on_the_micro_batch_split() {
    let dir = tempfile::tempdir().unwrap();
    let template = write(&dir.path().join("t.jinja"), TEMPLATE);
    let chats: String = (0..16)
        .map(|i| {
            let reply = if i % 2 == 0 { "ok".to_string() } else { format!("long reply {i}") };
            serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")}, {"role": "assistant", "content": reply}]}).to_string() + "\n"
        })
        .collect();
    let input = write(&dir.path().join("chat.jsonl"), &chats);
    let data = dir.path().join("data");
    prepared(&[&input], &data, &["--chat-template", template.to_str().unwrap()]);
    let (config, sets) = data_config(dir.path(), GPT, &data, false);
    let run = |name: &str, world: usize, micro: usize| {
        let s = [sets.clone(), vec![format!("train.micro_batch={micro}"), "model.seq_len=64".into()]].concat();
        train(world, &config, &dir.path().join(name), &s)
    };
    let whole = run("m4", 1, 4);
    for (name, world, micro) in [("m1", 1, 1), ("m2", 1, 2), ("w2m1", 2, 1)] {
        let other = run(name, world, micro);
        assert_eq!(other.len(), whole.len());
        for ((step, a), (_, b)) in other.iter().zip(&whole) {
            assert!(((a - b) / b).abs() < 1e-5, "{name} step {step}: {a} vs {b}");
        }
    }
}

#[test]
fn an_out_that_cannot_be_created_is_named_as_given_and_nothing_stays_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("notes.txt"), "Hello there.\n");
    let file = write(&dir.path().join("a-file"), "not a folder");
    // Under a regular file (directly and deeper), and under /proc (which not even root can write):
    // failures as real for root as for anyone.
    let mut outs = vec![file.join("prepared"), file.join("deeper/still/prepared"), PathBuf::from("/proc/ferrospeed-prepared")];
    // A read-only folder stops everyone but root: checked where the test is not run as root.
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    let mut perms = std::fs::metadata(&read_only).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&read_only, perms).unwrap();
    if std::fs::create_dir(read_only.join("probe")).is_err() {
        outs.push(read_only.join("prepared"));
    } else {
        eprintln!("note: running as root, so the read-only folder case is left out (the others stand for it)");
        std::fs::remove_dir(read_only.join("probe")).unwrap();
    }
    let before = names_in(dir.path());
    for out in &outs {
        let f = prepare(&[&input], out, &[]);
        one_line_exit_2(&f, &out.display().to_string());
        assert!(f.stderr.contains(&format!("cannot write {}: ", out.display())), "{}: the path given, please: {}", out.display(), f.stderr);
        assert!(f.stderr.contains("choose an --out in a folder you can write to") && !f.stderr.contains(".tmp-"), "{}", f.stderr);
        assert_eq!(names_in(dir.path()), before, "{}: nothing stays behind", out.display());
        assert!(names_in(&read_only).is_empty());
    }
    // Folders created for --out are removed again when the prepare fails (here on bad input).
    let bad = write(&dir.path().join("bad.jsonl"), "{\"text\": \"broken\"\n");
    let f = prepare(&[&bad], &dir.path().join("new/parent/prepared"), &[]);
    one_line_exit_2(&f, "bad input");
    assert!(f.stderr.contains("bad.jsonl:1"), "{}", f.stderr);
    assert!(!dir.path().join("new").exists(), "the folders made for --out stay behind");
}
