//! A power-loss model of checkpoint saves, replayed from the trace that `FERROSPEED_FS_TRACE` makes
//! the binary write (one line per file-system step: pid, operation, path, argument).
//!
//! What may the disk hold after a power loss? POSIX promises that a file's contents are durable once
//! the file is fsynced, and a directory's entries (files created, renamed or removed in it) once the
//! directory is fsynced. Until then, any of the changes made in the directory since its last sync
//! may or may not have reached the disk, in any combination: each change (a rename is one, atomic)
//! on its own. After every step of the trace, the checker tries every such image of every directory
//! and checks invariant 5: where `latest` exists it names a complete checkpoint, and every `step-*`
//! folder is complete (its `meta.json` and every file written into it are there, with durable
//! contents). It is written from that model alone, not from the code it checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Node = usize;
type Entries = BTreeMap<String, Node>;
/// One change to a directory's entries: names set to a node or removed, all at once.
type Change = Vec<(String, Option<Node>)>;

#[derive(Debug)]
enum Kind {
    File { content: String, durable: bool, dir: Node },
    /// `synced`: the entries as of the last fsync; `pending`: the changes since, in order.
    Dir { synced: Entries, pending: Vec<Change>, now: Entries },
}

fn new_dir() -> Kind {
    Kind::Dir { synced: Entries::new(), pending: Vec::new(), now: Entries::new() }
}

/// The model's file system under the checkpoint root, replayed step by step.
pub struct Model {
    root: PathBuf,
    nodes: Vec<Kind>,
}

/// One way the trace breaks invariant 5: the step after which a power loss exposes it, and what.
#[derive(Debug)]
pub struct Violation {
    pub after: String,
    pub problem: String,
}

impl Model {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), nodes: vec![new_dir()] }
    }

    /// Replay a whole trace; the first violation, if any.
    pub fn check_trace(root: &Path, trace: &str) -> Result<Model, Violation> {
        let mut model = Model::new(root);
        for line in trace.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            assert!(f.len() >= 3, "bad trace line {line:?}");
            model.apply(f[1], Path::new(f[2]), f.get(3).copied().unwrap_or(""));
            if let Some(problem) = model.violation() {
                return Err(Violation { after: line.to_string(), problem });
            }
        }
        Ok(model)
    }

    fn current(&self, dir: Node) -> &Entries {
        match &self.nodes[dir] {
            Kind::Dir { now, .. } => now,
            Kind::File { .. } => panic!("node {dir} is a file"),
        }
    }

    /// Make one change to `dir`'s entries (it reaches the disk, or not, as a whole).
    fn change(&mut self, dir: Node, change: Change) {
        if let Kind::Dir { pending, now, .. } = &mut self.nodes[dir] {
            apply_change(now, &change);
            pending.push(change);
        }
    }

    /// The node at `path` in the current namespace (None outside the root or where nothing is).
    fn lookup(&self, path: &Path) -> Option<Node> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let mut node = 0;
        for part in rel.components() {
            node = *self.current(node).get(part.as_os_str().to_str()?)?;
        }
        Some(node)
    }

    fn parent_and_name(&self, path: &Path) -> Option<(Node, String)> {
        let parent = self.lookup(path.parent()?)?;
        Some((parent, path.file_name()?.to_str()?.to_string()))
    }

    fn add(&mut self, path: &Path, kind: impl FnOnce(Node) -> Kind) {
        let Some((parent, name)) = self.parent_and_name(path) else { return };
        let node = self.nodes.len();
        self.nodes.push(kind(parent));
        self.change(parent, vec![(name, Some(node))]);
    }

    /// Apply one step of the trace.
    pub fn apply(&mut self, op: &str, path: &Path, arg: &str) {
        match op {
            "mkdir-all" => {} // the root, or a folder above it: there from the start
            "mkdir" => self.add(path, |_| new_dir()),
            "create" => self.add(path, |dir| Kind::File { content: arg.to_string(), durable: false, dir }),
            "fsync" => {
                if let Some(Kind::File { durable, .. }) = self.lookup(path).map(|n| &mut self.nodes[n]) {
                    *durable = true;
                }
            }
            "fsync-dir" => {
                if let Some(Kind::Dir { synced, pending, now }) = self.lookup(path).map(|n| &mut self.nodes[n]) {
                    *synced = now.clone();
                    pending.clear();
                }
            }
            "rename" | "exchange" => {
                let to = Path::new(arg);
                let (Some((pa, na)), Some((pb, nb))) = (self.parent_and_name(path), self.parent_and_name(to)) else { return };
                assert_eq!(pa, pb, "the model handles renames within one folder only: {path:?} -> {to:?}");
                let a = *self.current(pa).get(&na).expect("renamed path exists");
                let b = self.current(pa).get(&nb).copied();
                let left = if op == "exchange" { b } else { None };
                self.change(pa, vec![(na, left), (nb, Some(a))]);
            }
            "remove" => {
                if let Some(node) = self.lookup(path) {
                    self.empty_subtree(node);
                    let (parent, name) = self.parent_and_name(path).expect("a removed path has a parent");
                    self.change(parent, vec![(name, None)]);
                }
            }
            other => panic!("unknown trace operation {other:?}"),
        }
    }

    fn empty_subtree(&mut self, node: Node) {
        if let Kind::Dir { .. } = self.nodes[node] {
            let children: Vec<(String, Node)> = self.current(node).iter().map(|(k, v)| (k.clone(), *v)).collect();
            for (_, c) in &children {
                self.empty_subtree(*c);
            }
            self.change(node, children.into_iter().map(|(k, _)| (k, None)).collect());
        }
    }

    /// Every state the disk may hold for directory `dir`: its last synced entries with any subset of
    /// the changes since, applied in order.
    fn images(&self, dir: Node) -> Vec<Entries> {
        let Kind::Dir { synced, pending, .. } = &self.nodes[dir] else { return Vec::new() };
        assert!(pending.len() <= 16, "{} unsynced changes in one folder: too many to try every image", pending.len());
        (0..1u32 << pending.len())
            .map(|subset| {
                let mut image = synced.clone();
                for (_, change) in pending.iter().enumerate().filter(|(i, _)| subset & (1 << i) != 0) {
                    apply_change(&mut image, change);
                }
                image
            })
            .collect()
    }

    /// Whether every image of checkpoint folder `dir` is complete.
    fn incomplete(&self, dir: Node) -> Option<String> {
        let Kind::Dir { .. } = self.nodes[dir] else { return Some("it is a file".into()) };
        let written: Vec<Node> = (0..self.nodes.len()).filter(|&n| matches!(self.nodes[n], Kind::File { dir: d, .. } if d == dir)).collect();
        for image in &self.images(dir) {
            if !image.contains_key("meta.json") {
                return Some(format!("meta.json may be missing (folder holds {:?})", image.keys().collect::<Vec<_>>()));
            }
            for &f in &written {
                let Some(name) = image.iter().find(|(_, &n)| n == f).map(|(k, _)| k) else {
                    return Some(format!("a file written into it may be missing (folder holds {:?})", image.keys().collect::<Vec<_>>()));
                };
                if let Kind::File { durable: false, .. } = self.nodes[f] {
                    return Some(format!("{name} may have lost its contents (never fsynced)"));
                }
            }
        }
        None
    }

    /// The first way a power loss now could break invariant 5.
    pub fn violation(&self) -> Option<String> {
        for root in &self.images(0) {
            for (name, &node) in root.iter().filter(|(n, _)| n.starts_with("step-")) {
                if let Some(why) = self.incomplete(node) {
                    return Some(format!("{name} is visible but incomplete: {why}"));
                }
            }
            if let Some(&latest) = root.get("latest") {
                let Kind::File { content, durable, .. } = &self.nodes[latest] else { return Some("latest is a folder".into()) };
                if !durable {
                    return Some("latest may have lost its contents (never fsynced)".into());
                }
                if !root.contains_key(content.as_str()) {
                    return Some(format!("latest names {content}, which may be missing"));
                }
            }
        }
        None
    }

    /// What `latest` names on the disk as of the last syncs (after a save that finished, the only image).
    pub fn durable_latest(&self) -> Option<String> {
        let images = self.images(0);
        let root = images.first()?;
        match &self.nodes[*root.get("latest")?] {
            Kind::File { content, durable: true, .. } => Some(content.clone()),
            _ => None,
        }
    }

    /// The `step-*` names visible on the disk as of the last syncs.
    pub fn durable_checkpoints(&self) -> Vec<String> {
        self.images(0).first().map_or(Vec::new(), |r| r.keys().filter(|k| k.starts_with("step-")).cloned().collect())
    }
}

fn apply_change(entries: &mut Entries, change: &Change) {
    for (name, node) in change {
        match node {
            Some(n) => entries.insert(name.clone(), *n),
            None => entries.remove(name),
        };
    }
}
