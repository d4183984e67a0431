//! `data prepare`: inputs → token shards, in parallel over all cores (rayon), written into a temporary
//! directory that is renamed into place only when complete, so a failure or bad line leaves nothing
//! (nor the folders made above it); a failure to write is reported as the output directory the caller
//! named, never as the temporary one.
//!
//! Work is cut into units of about `chunk_bytes`: JSONL files at line ends (a line is a document), text
//! files (one document each) after a single newline between a non-space and a letter or digit — where a byte-level
//! BPE pre-tokenizer splits anyway, so the tokens equal those of the whole file. Units are tokenized in
//! waves and written in input order, so the output does not depend on the number of threads.

use super::chat::ChatTemplate;
use super::{is_prepared, Index, Message, PrepareError, ShardInfo, TokenWidth, CHAT_RENDERING, FORMAT, ROLES};
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What to prepare and how.
pub struct PrepareOptions<'a> {
    /// Files or directories (read recursively, in name order, hidden files skipped). `.jsonl` files hold
    /// one JSON document a line; any other file is one text document.
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub tokenizer: &'a Tokenizer,
    /// A chat template replacing the tokenizer's own.
    pub chat_template: Option<String>,
    /// Replace an existing prepared directory at `out` whose inputs differ.
    pub force: bool,
    /// Bytes of input per unit of parallel work.
    pub chunk_bytes: usize,
    /// A new shard starts at the first document end past this many tokens.
    pub shard_tokens: u64,
    /// Called with the number of input bytes done so far.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

impl<'a> PrepareOptions<'a> {
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf, tokenizer: &'a Tokenizer) -> Self {
        Self { inputs, out, tokenizer, chat_template: None, force: false, chunk_bytes: 4 << 20, shard_tokens: 1 << 28, progress: None }
    }
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub index: Index,
    /// The output was already there for the same inputs: nothing was done.
    pub up_to_date: bool,
    pub seconds: f64,
    pub input_bytes: u64,
    pub threads: usize,
}

/// The files of `inputs`, directories expanded (prepared directories, the output among them, skipped).
fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, PrepareError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PrepareError> {
        if is_prepared(dir) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| PrepareError::Read { path: dir.to_path_buf(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.is_file() {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut files)?;
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(PrepareError::file(p, "does not exist: give text files, .jsonl files or directories of them"));
        }
    }
    if files.is_empty() {
        return Err(PrepareError::File { path: inputs.first().cloned().unwrap_or_default(), reason: "holds no files to prepare".into() });
    }
    Ok(files)
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "jsonl")
}

/// A unit of work: bytes `range` of input `file`; `line` is the 1-based line number of its start (JSONL),
/// `last` whether it ends its text document.
struct Unit {
    file: usize,
    range: (usize, usize),
    line: usize,
    last: bool,
}

fn units(files: &[PathBuf], data: &[memmap2::Mmap], chunk: usize) -> Vec<Unit> {
    let mut out = Vec::new();
    for (f, bytes) in data.iter().enumerate() {
        let jsonl = is_jsonl(&files[f]);
        let (mut start, mut line) = (0, 1);
        loop {
            let mut end = (start + chunk).min(bytes.len());
            // Extend to a cut point: after a newline (JSONL), or (text) after a single newline that follows a
            // non-space and precedes a letter or digit: a pre-token boundary for byte-level BPE either way.
            while end < bytes.len() {
                let single = end >= start + 2 && !bytes[end - 2].is_ascii_whitespace();
                if bytes[end - 1] == b'\n' && (jsonl || (single && bytes[end].is_ascii_alphanumeric())) {
                    break;
                }
                end += 1;
            }
            out.push(Unit { file: f, range: (start, end), line, last: end == bytes.len() });
            if jsonl {
                line += bytes[start..end].iter().filter(|&&b| b == b'\n').count();
            }
            if end == bytes.len() {
                break;
            }
            start = end;
        }
    }
    out
}

/// Tokens of one unit: documents that end in it end at `ends` (token offsets in `tokens`).
#[derive(Default)]
struct Piece {
    tokens: Vec<u32>,
    mask: Vec<u8>,
    ends: Vec<usize>,
    chat: u64,
}

struct Ctx<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    eos: u32,
}

/// Tokens of `text` from line `line` of `path` (0: a text file, no line).
fn tokenize(ctx: &Ctx, path: &Path, line: usize, text: &str) -> Result<Vec<u32>, PrepareError> {
    ctx.tokenizer.encode(text).map_err(|e| if line == 0 { PrepareError::file(path, e.to_string()) } else { PrepareError::line(path, line, e.to_string()) })
}

/// One JSONL line as a document appended to `piece`.
fn jsonl_line(ctx: &Ctx, path: &Path, line: usize, text: &str, piece: &mut Piece) -> Result<(), PrepareError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| PrepareError::line(path, line, format!("not JSON ({e})")))?;
    let err = |reason: String| PrepareError::line(path, line, reason);
    if let Some(t) = v.get("text") {
        let t = t.as_str().ok_or_else(|| err("\"text\" must be a string".into()))?;
        let tokens = tokenize(ctx, path, line, t)?;
        piece.mask.extend(std::iter::repeat_n(1, tokens.len() + 1));
        piece.tokens.extend(tokens);
        piece.tokens.push(ctx.eos);
    } else if let Some(m) = v.get("messages") {
        let list = m.as_array().ok_or_else(|| err("\"messages\" must be a list of {\"role\", \"content\"}".into()))?;
        let mut messages = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).ok_or_else(|| err(format!("message {} has no \"role\" string", i + 1)))?;
            if !ROLES.contains(&role) {
                return Err(err(format!("message {} has role {role:?}; roles are {}", i + 1, ROLES.join(", "))));
            }
            let content = m.get("content").and_then(|c| c.as_str()).ok_or_else(|| err(format!("message {} has no \"content\" string", i + 1)))?;
            messages.push(Message { role: role.into(), content: content.into() });
        }
        let template = ctx.template.ok_or_else(|| err("a chat line needs a chat template: the tokenizer has none; pass --chat-template FILE".into()))?;
        let r = template.render_with_spans(&messages).map_err(|e| err(format!("the chat template failed: {e}")))?;
        let (tokens, offsets) = ctx.tokenizer.encode_with_offsets(&r.text).map_err(|e| err(e.to_string()))?;
        if tokens.is_empty() {
            return Err(err("the chat template renders this conversation as no text: give it messages with content".into()));
        }
        // The document is the rendered conversation and nothing else (TRL's SFTTrainer appends no EOS to
        // conversations: the template's end-of-turn ends it), and a token counts in the loss where it
        // covers any byte of a reply, as transformers' `return_assistant_tokens_mask` marks the tokens
        // from the one holding a span's first character to the one holding its last.
        piece.mask.extend(offsets.iter().map(|&(s, e)| u8::from(r.assistant.iter().any(|&(a, b)| s < b && e.max(s + 1) > a))));
        piece.tokens.extend(tokens);
        piece.chat += 1;
    } else {
        return Err(err("a line needs \"text\" (a string) or \"messages\" (a chat)".into()));
    }
    piece.ends.push(piece.tokens.len());
    Ok(())
}

fn run_unit(ctx: &Ctx, path: &Path, bytes: &[u8], u: &Unit) -> Result<Piece, PrepareError> {
    let chunk = &bytes[u.range.0..u.range.1];
    let mut piece = Piece::default();
    if is_jsonl(path) {
        for (i, raw) in chunk.split(|&b| b == b'\n').enumerate() {
            let line = u.line + i;
            let text = std::str::from_utf8(raw).map_err(|e| PrepareError::line(path, line, format!("not UTF-8 ({e})")))?;
            if text.trim().is_empty() {
                continue;
            }
            jsonl_line(ctx, path, line, text, &mut piece)?;
        }
    } else if bytes.is_empty() {
        // An empty text file is no document.
    } else {
        let text = std::str::from_utf8(chunk).map_err(|e| PrepareError::file(path, format!("is not UTF-8 text (byte {}): only text and .jsonl files can be prepared", u.range.0 + e.valid_up_to())))?;
        piece.tokens = tokenize(ctx, path, 0, text)?;
        if u.last {
            piece.tokens.push(ctx.eos);
            piece.ends.push(piece.tokens.len());
        }
        piece.mask = vec![1; piece.tokens.len()];
    }
    Ok(piece)
}

/// Writes shards: a new one starts at the first document end past `limit` tokens.
struct Shards {
    dir: PathBuf,
    width: TokenWidth,
    limit: u64,
    done: Vec<ShardInfo>,
    open: Option<(std::io::BufWriter<std::fs::File>, std::io::BufWriter<std::fs::File>, Vec<u64>, u64)>,
}

impl Shards {
    fn create(&self, name: &str, ext: &str) -> Result<std::io::BufWriter<std::fs::File>, PrepareError> {
        let path = self.dir.join(format!("{name}.{ext}"));
        std::fs::File::create(&path).map(|f| std::io::BufWriter::with_capacity(1 << 20, f)).map_err(|source| PrepareError::Write { path, source })
    }

    fn write(&mut self, piece: &Piece) -> Result<(), PrepareError> {
        let mut from = 0;
        let mut cuts: Vec<(usize, bool)> = piece.ends.iter().map(|&e| (e, true)).collect();
        if cuts.last().map(|c| c.0) != Some(piece.tokens.len()) {
            cuts.push((piece.tokens.len(), false));
        }
        for (to, doc_end) in cuts {
            if self.open.is_none() {
                let name = format!("shard-{:05}", self.done.len());
                self.open = Some((self.create(&name, "tokens")?, self.create(&name, "mask")?, vec![0], 0));
            }
            let dir = self.dir.clone();
            let width = self.width;
            let (tok, mask, docs, n) = self.open.as_mut().expect("opened above");
            let io = |source| PrepareError::Write { path: dir.clone(), source };
            let mut buf = Vec::with_capacity((to - from) * width.bytes());
            for &t in &piece.tokens[from..to] {
                match width {
                    TokenWidth::U16 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
                    TokenWidth::U32 => buf.extend_from_slice(&t.to_le_bytes()),
                }
            }
            tok.write_all(&buf).map_err(io)?;
            mask.write_all(&piece.mask[from..to]).map_err(io)?;
            *n += (to - from) as u64;
            if doc_end {
                docs.push(*n);
                if *n >= self.limit {
                    self.close()?;
                }
            }
            from = to;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), PrepareError> {
        let Some((tok, mask, docs, n)) = self.open.take() else { return Ok(()) };
        let name = format!("shard-{:05}", self.done.len());
        for w in [tok, mask] {
            let f = w.into_inner().map_err(|e| PrepareError::Write { path: self.dir.clone(), source: e.into_error() })?;
            f.sync_all().map_err(|source| PrepareError::Write { path: self.dir.clone(), source })?;
        }
        let bytes: Vec<u8> = docs.iter().flat_map(|d| d.to_le_bytes()).collect();
        let path = self.dir.join(format!("{name}.docs"));
        std::fs::write(&path, bytes).map_err(|source| PrepareError::Write { path, source })?;
        self.done.push(ShardInfo { name, documents: docs.len() as u64 - 1, tokens: n });
        Ok(())
    }
}

/// Tokenize `opts.inputs` into `opts.out` (see the module docs). Re-running with the same inputs,
/// tokenizer and template finds the same content hash and does nothing.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary, PrepareError> {
    let started = Instant::now();
    let threads = rayon::current_num_threads();
    let files = expand(&opts.inputs)?;
    let data: Vec<memmap2::Mmap> = files
        .iter()
        .map(|p| {
            let f = std::fs::File::open(p).map_err(|source| PrepareError::Read { path: p.clone(), source })?;
            // SAFETY: inputs are read-only here; a file changed while it is prepared gives a wrong hash, not UB in safe code we rely on.
            unsafe { memmap2::Mmap::map(&f) }.map_err(|source| PrepareError::Read { path: p.clone(), source })
        })
        .collect::<Result<_, _>>()?;
    let input_bytes: u64 = data.iter().map(|d| d.len() as u64).sum();
    let specials = opts.tokenizer.specials();
    let template_src = opts.chat_template.clone().or(specials.chat_template.clone());
    let eos = opts.tokenizer.eos_id().ok_or_else(|| {
        PrepareError::File { path: opts.tokenizer.path().map(Path::to_path_buf).unwrap_or_default(), reason: "has no EOS token (tokenizer_config.json eos_token): documents need one to end".into() }
    })?;

    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    if template_src.is_some() {
        // How conversations are rendered and masked: a change there is a change of the tokens.
        h.update(CHAT_RENDERING.to_le_bytes());
    }
    h.update(opts.tokenizer.fingerprint().as_bytes());
    h.update(template_src.as_deref().unwrap_or("").as_bytes());
    h.update(eos.to_le_bytes());
    for (p, d) in files.iter().zip(&data) {
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update((d.len() as u64).to_le_bytes());
        h.update(&d[..]);
    }
    let hash = format!("{:x}", h.finalize());

    let out = &opts.out;
    if out.exists() {
        if is_prepared(out) {
            if let Ok(old) = super::PreparedData::open(out) {
                if old.index.hash == hash {
                    return Ok(PrepareSummary { index: old.index, up_to_date: true, seconds: started.elapsed().as_secs_f64(), input_bytes, threads });
                }
            }
            if !opts.force {
                return Err(PrepareError::file(out, "holds data prepared from other inputs (or by a ferrospeed that rendered chats differently): choose another --out, or pass --force to replace it"));
            }
        } else if std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(PrepareError::file(out, "exists and is not a prepared-data directory: choose another --out"));
        }
    }

    let template = template_src
        .as_deref()
        .map(|src| ChatTemplate::new(src, specials.bos.as_deref().unwrap_or(""), specials.eos.as_ref().map_or("", |e| e.0.as_str())))
        .transpose()
        .map_err(|e| PrepareError::File { path: opts.tokenizer.path().map(Path::to_path_buf).unwrap_or_default(), reason: format!("its chat template does not compile: {e}") })?;
    let ctx = Ctx { tokenizer: opts.tokenizer, template: template.as_ref(), eos };

    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "prepared".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    // The folders above `out` that this call creates, removed again (if still empty) when it fails.
    let created: Vec<&Path> = parent.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.exists()).collect();
    let undo = || {
        let _ = std::fs::remove_dir_all(&tmp);
        created.iter().for_each(|d| drop(std::fs::remove_dir(d)));
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp).map_err(|source| PrepareError::Write { path: tmp.clone(), source }).and_then(|()| write_all(opts, &files, &data, &ctx, &tmp, hash));
    let index = match result {
        Ok(index) => index,
        Err(e) => {
            undo();
            // A write into the temporary folder is reported as the output directory the user named.
            return Err(match e {
                PrepareError::Write { source, .. } => PrepareError::Write { path: out.clone(), source },
                e => e,
            });
        }
    };
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if let Err(source) = std::fs::rename(out, &old) {
            undo();
            return Err(PrepareError::Write { path: out.clone(), source });
        }
        if let Err(source) = std::fs::rename(&tmp, out) {
            // Put the old data back: a failed --force loses nothing.
            let _ = std::fs::rename(&old, out);
            undo();
            return Err(PrepareError::Write { path: out.clone(), source });
        }
        let _ = std::fs::remove_dir_all(&old);
    } else if let Err(source) = std::fs::rename(&tmp, out) {
        undo();
        return Err(PrepareError::Write { path: out.clone(), source });
    }
    Ok(PrepareSummary { index, up_to_date: false, seconds: started.elapsed().as_secs_f64(), input_bytes, threads })
}

fn write_all(opts: &PrepareOptions, files: &[PathBuf], data: &[memmap2::Mmap], ctx: &Ctx, tmp: &Path, hash: String) -> Result<Index, PrepareError> {
    let vocab = opts.tokenizer.vocab_size();
    let width = TokenWidth::for_vocab(vocab);
    let mut shards = Shards { dir: tmp.to_path_buf(), width, limit: opts.shard_tokens.max(1), done: Vec::new(), open: None };
    let all = units(files, data, opts.chunk_bytes.max(1));
    let done_bytes = AtomicU64::new(0);
    let (mut documents, mut tokens, mut loss_tokens, mut chat, mut longest, mut current) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let wave = rayon::current_num_threads() * 4;
    for group in all.chunks(wave) {
        let pieces: Vec<Piece> = group
            .par_iter()
            .map(|u| {
                let p = run_unit(ctx, &files[u.file], &data[u.file], u);
                let n = done_bytes.fetch_add((u.range.1 - u.range.0) as u64, Ordering::Relaxed) + (u.range.1 - u.range.0) as u64;
                if let Some(f) = opts.progress {
                    f(n);
                }
                p
            })
            .collect::<Result<_, _>>()?;
        for (p, u) in pieces.iter().zip(group) {
            if let Some(&t) = p.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(PrepareError::file(&files[u.file], format!("token id {t} is outside the tokenizer's vocabulary of {vocab}")));
            }
            let mut prev = 0;
            for &e in &p.ends {
                current += (e - prev) as u64;
                longest = longest.max(current);
                current = 0;
                prev = e;
            }
            current += (p.tokens.len() - prev) as u64;
            documents += p.ends.len() as u64;
            tokens += p.tokens.len() as u64;
            loss_tokens += p.mask.iter().map(|&m| m as u64).sum::<u64>();
            chat += p.chat;
            shards.write(p)?;
        }
    }
    shards.close()?;
    if documents == 0 {
        return Err(PrepareError::File { path: files[0].clone(), reason: "holds no documents (empty input)".into() });
    }
    let index = Index {
        format: FORMAT.into(),
        hash,
        tokenizer: opts.tokenizer.fingerprint(),
        vocab_size: vocab,
        eos: ctx.eos,
        width,
        documents,
        tokens,
        loss_tokens,
        longest,
        chat_documents: chat,
        chat_rendering: CHAT_RENDERING,
        shards: shards.done,
        inputs: files.iter().map(|p| p.display().to_string()).collect(),
    };
    let path = tmp.join("index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| PrepareError::file(&path, e.to_string()))?;
    let mut f = std::fs::File::create(&path).map_err(|source| PrepareError::Write { path: path.clone(), source })?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|source| PrepareError::Write { path, source })?;
    Ok(index)
}
