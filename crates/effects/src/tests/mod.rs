//! Tests as specifications of the effects layer.

mod crash;
mod exec;
mod http;
mod mcp;
mod staging;
mod workspace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A directory tree as it is on disk: every path (relative, `/`-separated) with what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
}

pub(crate) fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Node>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let name = entry.file_name().into_string().expect("utf-8 name");
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let ty = entry.file_type().expect("file type");
            if ty.is_symlink() {
                let target = std::fs::read_link(entry.path()).expect("read_link");
                out.insert(path, Node::Symlink(target));
            } else if ty.is_dir() {
                out.insert(path.clone(), Node::Dir);
                walk(&entry.path(), &path, out);
            } else {
                out.insert(path, Node::File(std::fs::read(entry.path()).expect("read")));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// A scratch area: `ws/` (the workspace), `outside/` (beside it, with `secret.txt`) and
/// `stage/` (a stage directory, not created).
pub(crate) struct Scratch {
    _temp: tempfile::TempDir,
    pub(crate) base: PathBuf,
    pub(crate) ws: PathBuf,
    pub(crate) outside: PathBuf,
}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        let temp = tempfile::tempdir().expect("tempdir");
        let base = temp.path().to_path_buf();
        let ws = base.join("ws");
        let outside = base.join("outside");
        std::fs::create_dir(&ws).expect("ws");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(outside.join("secret.txt"), b"SECRET").expect("secret");
        Scratch {
            _temp: temp,
            base,
            ws,
            outside,
        }
    }

    pub(crate) fn file(&self, path: &str, content: &[u8]) {
        let full = self.ws.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).expect("parents");
        }
        std::fs::write(full, content).expect("write");
    }

    pub(crate) fn stage_dir(&self) -> PathBuf {
        self.base.join("stage")
    }
}
