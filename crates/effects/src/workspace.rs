//! A workspace: filesystem access confined to one directory.
//!
//! Paths are ICE's canonical relative form (`src/lib.rs`; `.` for the root of a listing),
//! checked with [`ice_authority::Resource::path`] and [`ice_authority::Resource::dir`]: a path
//! with `..`, `.`, an empty segment, a leading `/` or a backslash is refused before anything is
//! opened, so `../x`, `/etc/passwd` and `a/../../x` never reach the filesystem.
//!
//! Resolution follows **no symbolic link at all**, inside the workspace or out: every path is
//! opened one component at a time, each relative to the directory handle of the one before
//! (`openat` with `O_NOFOLLOW`), so a symlinked file, a symlinked parent directory, a symlink
//! loop, or a directory swapped for a symlink while a path is being resolved is refused rather
//! than followed. Following even an inside symlink would let a grant on one name act on
//! another (`docs/link` reading `secrets/key`), so ICE does not. Each step goes through
//! `cap-std`, which resolves beneath its directory handle (with `openat2(RESOLVE_BENEATH)` where
//! the kernel has it, and its own checked resolver otherwise), so the walk has two independent
//! fences.
//!
//! A regular file with more than one hard link is refused for reading and writing: it may be
//! another name for a file outside the workspace. Files that are not regular (FIFOs, sockets,
//! devices) are refused too; they are opened non-blocking, so a FIFO cannot hang a read.
//!
//! What this does not cover: a process with write access to the workspace's *parent* that
//! moves a directory out of the workspace while a handle to it is held can make a later step
//! act outside (the handle follows the directory). ICE assumes the workspace's parent is the
//! operator's, not an agent's.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, File, Metadata, MetadataExt, OpenOptions, OpenOptionsExt};
use ice_authority::{Authorization, EffectClass, Resource};
use ice_kernel::Digest;
use rustix::io::Errno;
use sha2::Digest as _;

use crate::auth::{AuthorizationError, cap_bytes, require};
use crate::evidence::{Detail, Digested, Evidence};
use crate::limits::MAX_LIST_ENTRIES;

/// What confinement refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Confinement {
    /// The path is not in ICE's canonical relative form.
    #[error("not a canonical workspace path: {0}")]
    InvalidPath(String),
    /// A component of the path is a symbolic link.
    #[error("{component:?} is a symbolic link; ICE follows no symbolic link in a workspace")]
    Symlink {
        /// The path up to and including the link.
        component: String,
    },
    /// The file has more than one hard link.
    #[error(
        "is a file with {links} hard links; it may be another name for a file outside the \
         workspace"
    )]
    HardLink {
        /// Its link count.
        links: u64,
    },
    /// The file is not a regular file or directory.
    #[error("is a {0}, not a regular file or directory")]
    Special(&'static str),
    /// Resolution led outside the workspace (reported by the sandbox beneath the walk).
    #[error("leads outside the workspace")]
    Escape,
    /// A component is a name ICE keeps for its own commit temporaries.
    #[error(
        "{component:?} is a name ICE keeps for its commit temporaries (`{TEMP_PREFIX}…`); no run writes or deletes it"
    )]
    Reserved {
        /// The path up to and including that component.
        component: String,
    },
}

/// How the names of a commit's temporaries begin ([`temp_name`]): no run may stage a path with
/// a component so named, or it could stand where a commit's temporary goes.
pub(crate) const TEMP_PREFIX: &str = ".ice-commit-";

/// Refuse a path with a component named like a commit temporary.
pub(crate) fn check_unreserved(path: &str, segs: &[&str]) -> Result<(), ConfinementError> {
    match segs.iter().position(|s| s.starts_with(TEMP_PREFIX)) {
        Some(i) => Err(ConfinementError {
            path: path.to_string(),
            problem: Confinement::Reserved {
                component: segs[..=i].join("/"),
            },
        }),
        None => Ok(()),
    }
}

/// A path refused by confinement: it names, or would reach, something the workspace rules
/// forbid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path:?}: {problem}")]
pub struct ConfinementError {
    /// The path as given.
    pub path: String,
    /// What is wrong.
    pub problem: Confinement,
}

/// Why a workspace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Confinement refused the path.
    #[error(transparent)]
    Confinement(#[from] ConfinementError),
    /// The authorization does not cover the operation.
    #[error(transparent)]
    Refused(Box<AuthorizationError>),
    /// Nothing exists at the path (or at one of its parents).
    #[error("{path:?}: not found")]
    NotFound {
        /// The path, or the parent that is missing.
        path: String,
    },
    /// A directory was needed and something else is there.
    #[error("{path:?}: not a directory")]
    NotADirectory {
        /// The path, or the parent that is not a directory.
        path: String,
    },
    /// A file was needed and a directory is there.
    #[error("{path:?}: is a directory")]
    IsADirectory {
        /// The path.
        path: String,
    },
    /// A fixed limit was hit.
    #[error("{path:?}: {what}")]
    Limit {
        /// The path.
        path: String,
        /// Which limit.
        what: String,
    },
    /// The filesystem failed.
    #[error("{path:?}: {op}: {source}")]
    Io {
        /// The path.
        path: String,
        /// What ICE was doing.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl From<AuthorizationError> for FsError {
    fn from(e: AuthorizationError) -> FsError {
        FsError::Refused(Box::new(e))
    }
}

impl FsError {
    pub(crate) fn io(path: &str, op: &'static str) -> impl FnOnce(io::Error) -> FsError {
        let path = path.to_string();
        move |source| FsError::Io { path, op, source }
    }

    fn confinement(path: &str, problem: Confinement) -> FsError {
        FsError::Confinement(ConfinementError {
            path: path.to_string(),
            problem,
        })
    }

    /// Whether this is a confinement refusal.
    pub fn is_confinement(&self) -> bool {
        matches!(self, FsError::Confinement(_))
    }
}

/// What a directory entry is. Symbolic links are reported as such, never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: FIFO, socket, device.
    Other,
}

impl EntryKind {
    /// `file`, `dir`, `symlink` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }

    fn of(meta: &Metadata) -> EntryKind {
        let ty = meta.file_type();
        if ty.is_symlink() {
            EntryKind::Symlink
        } else if ty.is_dir() {
            EntryKind::Dir
        } else if ty.is_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name in the directory.
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its size in bytes (for a symlink, the length of its target).
    pub size: u64,
}

/// A directory's entries, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The directory, as given.
    pub dir: String,
    /// Its entries whose names are UTF-8, sorted by name.
    pub entries: Vec<Entry>,
    /// How many entries were left out because their names are not UTF-8 (ICE paths are text).
    pub non_utf8_names: u64,
}

impl Listing {
    /// The digest of the listing: SHA-256 of its entries as `kind name size` lines.
    pub fn digest(&self) -> Digest {
        let mut text = String::new();
        for entry in &self.entries {
            text.push_str(entry.kind.as_str());
            text.push(' ');
            text.push_str(&entry.name);
            text.push(' ');
            text.push_str(&entry.size.to_string());
            text.push('\n');
        }
        Digest::of(text.as_bytes())
    }

    /// The evidence of this listing, under the grant (`run:seq`) that authorised it.
    pub fn evidence(&self, grant: Option<&str>) -> Evidence {
        Evidence {
            effect: EffectClass::Read,
            capability: "fs.list".into(),
            target: Resource::Dir(self.dir.clone()),
            grant: grant.map(str::to_string),
            inputs: vec![],
            outputs: vec![Digested {
                name: "listing".into(),
                digest: self.digest(),
                bytes: self.entries.len() as u64,
            }],
            detail: Detail::Listing {
                entries: self.entries.len() as u64,
            },
        }
    }
}

/// What a path is, without following it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The path, as given.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its size in bytes.
    pub size: u64,
    /// Its hard link count.
    pub links: u64,
}

/// A file's content as read, up to a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    /// The path, as given.
    pub path: String,
    /// The bytes read: the whole file, or its first `limit` bytes.
    pub content: Vec<u8>,
    /// The file's size when it was opened.
    pub size: u64,
    /// Whether `content` stops short of the end of the file.
    pub truncated: bool,
    /// The evidence of the read (the digest is of `content`, what the reader was given).
    pub evidence: Evidence,
}

/// A regular file's digest and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileState {
    /// SHA-256 of its content.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// The segments of a file path, checked.
pub(crate) fn file_segments(path: &str) -> Result<Vec<&str>, ConfinementError> {
    Resource::path(path).map_err(|e| ConfinementError {
        path: path.to_string(),
        problem: Confinement::InvalidPath(e.problem),
    })?;
    Ok(path.split('/').collect())
}

/// The segments of a directory path, checked; `.` (the root) has none.
pub(crate) fn dir_segments(path: &str) -> Result<Vec<&str>, ConfinementError> {
    Resource::dir(path).map_err(|e| ConfinementError {
        path: path.to_string(),
        problem: Confinement::InvalidPath(e.problem),
    })?;
    if path == "." {
        Ok(vec![])
    } else {
        Ok(path.split('/').collect())
    }
}

/// Options for opening an existing file to read: no symlink followed, never blocking (a FIFO).
fn read_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true);
    options.follow(FollowSymlinks::No);
    options.custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32);
    options
}

/// Turn an I/O error from opening `segs[..=at]` inside `parent` into a typed error. A refusal
/// of a symlink by `O_NOFOLLOW` shows as `ELOOP` (or `ENOTDIR` with `O_DIRECTORY`); the entry
/// is looked at, without following it, only to name the problem.
fn classify(parent: &Dir, path: &str, segs: &[&str], at: usize, e: io::Error) -> FsError {
    let shown = segs[..=at].join("/");
    let raw = e.raw_os_error();
    if raw == Some(Errno::LOOP.raw_os_error()) || raw == Some(Errno::NOTDIR.raw_os_error()) {
        match parent.symlink_metadata(segs[at]) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return FsError::confinement(path, Confinement::Symlink { component: shown });
            }
            Ok(meta) if !meta.is_dir() && raw == Some(Errno::NOTDIR.raw_os_error()) => {
                return FsError::NotADirectory { path: shown };
            }
            _ => {}
        }
    }
    if e.kind() == io::ErrorKind::NotFound {
        return FsError::NotFound { path: shown };
    }
    // cap-std reports an attempt to leave its directory as PermissionDenied without an OS
    // error code; openat2(RESOLVE_BENEATH) reports EXDEV.
    if raw == Some(Errno::XDEV.raw_os_error())
        || (e.kind() == io::ErrorKind::PermissionDenied && raw.is_none())
    {
        return FsError::confinement(path, Confinement::Escape);
    }
    FsError::Io {
        path: path.to_string(),
        op: "open",
        source: e,
    }
}

fn check_regular(path: &str, meta: &Metadata) -> Result<(), FsError> {
    match EntryKind::of(meta) {
        EntryKind::File => {}
        EntryKind::Dir => {
            return Err(FsError::IsADirectory {
                path: path.to_string(),
            });
        }
        EntryKind::Symlink => {
            return Err(FsError::confinement(
                path,
                Confinement::Symlink {
                    component: path.to_string(),
                },
            ));
        }
        EntryKind::Other => {
            return Err(FsError::confinement(
                path,
                Confinement::Special(special_name(meta)),
            ));
        }
    }
    if meta.nlink() > 1 {
        return Err(FsError::confinement(
            path,
            Confinement::HardLink {
                links: meta.nlink(),
            },
        ));
    }
    Ok(())
}

fn special_name(meta: &Metadata) -> &'static str {
    use cap_std::fs::FileTypeExt;
    let ty = meta.file_type();
    if ty.is_fifo() {
        "FIFO"
    } else if ty.is_socket() {
        "socket"
    } else if ty.is_block_device() {
        "block device"
    } else if ty.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// SHA-256 of everything `reader` yields, and how many bytes.
pub(crate) fn hash_reader(mut reader: impl Read) -> io::Result<FileState> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileState {
        digest: Digest(hasher.finalize().into()),
        size,
    })
}

/// The temporary name a commit writes `name` under before renaming it into place: fixed per
/// path, so recovery after a crash reuses (and so removes) any temporary a crash left.
fn temp_name(path: &str) -> String {
    let digest = Digest::of(path.as_bytes()).to_hex();
    format!("{TEMP_PREFIX}{}.tmp", &digest[..16])
}

/// Counts of what a copy made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CopyCounts {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
}

/// Filesystem access confined to one directory. Cloning is cheap (the directory handle is
/// shared).
#[derive(Debug, Clone)]
pub struct Workspace {
    root: Arc<Dir>,
    root_path: PathBuf,
}

impl Workspace {
    /// Open the directory at `root` as a workspace. The root itself is named by the operator
    /// and opened as given; everything beneath it is confined.
    pub fn open(root: impl AsRef<Path>) -> Result<Workspace, FsError> {
        let root_path = root.as_ref().to_path_buf();
        let dir = Dir::open_ambient_dir(&root_path, cap_std::ambient_authority()).map_err(|e| {
            FsError::Io {
                path: root_path.display().to_string(),
                op: "open workspace",
                source: e,
            }
        })?;
        Ok(Workspace {
            root: Arc::new(dir),
            root_path,
        })
    }

    /// The directory as it was given to [`Workspace::open`].
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// Read the file at `path` (`fs.read`), at most `limit` bytes (or the grant's `max_bytes`,
    /// if less); [`FileRead::truncated`] says whether the file holds more.
    pub fn read(&self, auth: &Authorization, path: &str, limit: u64) -> Result<FileRead, FsError> {
        file_segments(path)?;
        require(auth, "fs.read", &Resource::Path(path.to_string()))?;
        let limit = cap_bytes(auth, 0, limit);
        let (content, size, truncated) = self.read_file(path, limit)?;
        let evidence = read_evidence(auth, path, &content, size, truncated, false);
        Ok(FileRead {
            path: path.to_string(),
            content,
            size,
            truncated,
            evidence,
        })
    }

    /// List the directory at `dir` (`fs.list`; `.` is the root).
    pub fn list(&self, auth: &Authorization, dir: &str) -> Result<Listing, FsError> {
        dir_segments(dir)?;
        require(auth, "fs.list", &Resource::Dir(dir.to_string()))?;
        self.list_dir(dir)
    }

    /// What is at `path`, without following it: `fs.read` on the path, or `fs.list` when it
    /// is given as a directory.
    pub fn stat(&self, auth: &Authorization, path: &str) -> Result<Stat, FsError> {
        authorize_stat(auth, path)?;
        self.stat_path(path)
    }

    /// The SHA-256 and size of the whole file at `path` (`fs.read`).
    pub fn digest(&self, auth: &Authorization, path: &str) -> Result<FileState, FsError> {
        file_segments(path)?;
        require(auth, "fs.read", &Resource::Path(path.to_string()))?;
        match self.file_state(path)? {
            Some(state) => Ok(state),
            None => Err(FsError::NotFound {
                path: path.to_string(),
            }),
        }
    }

    // ---- confined primitives, for this crate's runtime-side code (no authorization) ----

    /// Open the directory `segs` (each component without following a symlink).
    fn open_dir_segs(&self, path: &str, segs: &[&str]) -> Result<Dir, FsError> {
        let mut dir = self.root.try_clone().map_err(FsError::io(path, "open"))?;
        for i in 0..segs.len() {
            dir = match dir.open_dir_nofollow(segs[i]) {
                Ok(next) => next,
                Err(e) => return Err(classify(&dir, path, segs, i, e)),
            };
        }
        Ok(dir)
    }

    /// Open the parent directory of the file `segs`, creating missing directories (and making
    /// each creation durable) when `create` is set.
    fn open_parent(
        &self,
        path: &str,
        segs: &[&str],
        create: bool,
        durable: bool,
    ) -> Result<Dir, FsError> {
        let mut dir = self.root.try_clone().map_err(FsError::io(path, "open"))?;
        for i in 0..segs.len() - 1 {
            dir = match dir.open_dir_nofollow(segs[i]) {
                Ok(next) => next,
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    match dir.create_dir(segs[i]) {
                        Ok(()) => {
                            if durable {
                                sync_dir(&dir).map_err(FsError::io(path, "sync directory"))?;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(FsError::io(path, "create directory")(e)),
                    }
                    dir.open_dir_nofollow(segs[i])
                        .map_err(|e| classify(&dir, path, segs, i, e))?
                }
                Err(e) => return Err(classify(&dir, path, segs, i, e)),
            };
        }
        Ok(dir)
    }

    /// Open the regular file at `path` for reading, refusing links and special files.
    fn open_file(&self, path: &str) -> Result<(File, Metadata), FsError> {
        let segs = file_segments(path)?;
        let parent = self.open_parent(path, &segs, false, false)?;
        let last = segs.len() - 1;
        let file = parent
            .open_with(segs[last], &read_options())
            .map_err(|e| classify(&parent, path, &segs, last, e))?;
        let meta = file.metadata().map_err(FsError::io(path, "stat"))?;
        check_regular(path, &meta)?;
        Ok((file, meta))
    }

    /// Read at most `limit` bytes of the file at `path`: (content, size, truncated).
    pub(crate) fn read_file(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<(Vec<u8>, u64, bool), FsError> {
        let (file, meta) = self.open_file(path)?;
        let mut content = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut content)
            .map_err(FsError::io(path, "read"))?;
        let truncated = content.len() as u64 > limit;
        if truncated {
            content.truncate(limit as usize);
        }
        Ok((content, meta.len(), truncated))
    }

    /// The digest and size of the regular file at `path`; `None` if nothing is there (or a
    /// parent is missing). Links, directories and special files are errors.
    pub(crate) fn file_state(&self, path: &str) -> Result<Option<FileState>, FsError> {
        match self.open_file(path) {
            Ok((file, _)) => hash_reader(file)
                .map(Some)
                .map_err(FsError::io(path, "read")),
            Err(FsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What is at `path` (a file or directory path; `.` is the root), without following it.
    pub(crate) fn stat_path(&self, path: &str) -> Result<Stat, FsError> {
        let segs = dir_segments(path)?;
        let meta = if segs.is_empty() {
            self.root
                .dir_metadata()
                .map_err(FsError::io(path, "stat"))?
        } else {
            let parent = self.open_parent(path, &segs, false, false)?;
            let last = segs.len() - 1;
            parent
                .symlink_metadata(segs[last])
                .map_err(|e| classify(&parent, path, &segs, last, e))?
        };
        Ok(Stat {
            path: path.to_string(),
            kind: EntryKind::of(&meta),
            size: meta.len(),
            links: meta.nlink(),
        })
    }

    /// What is at `path`, or `None` if nothing (or a parent is missing).
    pub(crate) fn kind_of(&self, path: &str) -> Result<Option<EntryKind>, FsError> {
        match self.stat_path(path) {
            Ok(stat) => Ok(Some(stat.kind)),
            Err(FsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entries of the directory at `dir`, sorted by name.
    pub(crate) fn list_dir(&self, dir: &str) -> Result<Listing, FsError> {
        let segs = dir_segments(dir)?;
        let handle = self.open_dir_segs(dir, &segs)?;
        let mut entries = Vec::new();
        let mut non_utf8_names = 0;
        for entry in handle.entries().map_err(FsError::io(dir, "list"))? {
            let entry = entry.map_err(FsError::io(dir, "list"))?;
            let name = match entry.file_name().into_string() {
                Ok(name) => name,
                Err(_) => {
                    non_utf8_names += 1;
                    continue;
                }
            };
            if entries.len() == MAX_LIST_ENTRIES {
                return Err(FsError::Limit {
                    path: dir.to_string(),
                    what: format!("more than {MAX_LIST_ENTRIES} entries"),
                });
            }
            let meta = handle
                .symlink_metadata(&name)
                .map_err(FsError::io(dir, "stat entry"))?;
            entries.push(Entry {
                name,
                kind: EntryKind::of(&meta),
                size: meta.len(),
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing {
            dir: dir.to_string(),
            entries,
            non_utf8_names,
        })
    }

    /// Check that `path` can be written by a commit: every existing parent is a directory
    /// reached without a symlink, and the file is absent or a regular file with one link.
    /// Returns its current state.
    pub(crate) fn check_writable(&self, path: &str) -> Result<Option<FileState>, FsError> {
        self.file_state(path)
    }

    /// Check that a commit can write `path` through its temporary: nothing is at the
    /// temporary's name, or a regular file (one a crash left, which the commit replaces). Run
    /// before the commit point, so a directory or link standing there (put by someone outside
    /// the run) refuses the commit before anything is applied, not half-way through.
    pub(crate) fn check_temp_slot(&self, path: &str) -> Result<(), FsError> {
        let temp = match path.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{}", temp_name(path)),
            None => temp_name(path),
        };
        match self.kind_of(&temp) {
            Ok(None | Some(EntryKind::File)) | Err(FsError::NotADirectory { .. }) => Ok(()),
            Ok(Some(_)) => Err(FsError::Confinement(ConfinementError {
                path: path.to_string(),
                problem: Confinement::Reserved { component: temp },
            })),
            Err(e) => Err(e),
        }
    }

    /// Set the file at `path` to the content of `source` (a file outside the workspace, whose
    /// content must have the digest and size `expected`), creating parent directories. The
    /// content goes to a temporary file in the same directory, which is synced and then renamed
    /// over the target; with `durable`, the directory is synced after the rename.
    ///
    /// The target is checked again here, at apply time: a target or parent that has become a
    /// symlink, a hard link or a special file since staging is refused. (The rename replaces
    /// the directory entry and never writes through it, so a swap between that check and the
    /// rename changes only which entry is replaced.)
    pub(crate) fn apply_write(
        &self,
        path: &str,
        source: &Path,
        expected: &FileState,
        durable: bool,
    ) -> Result<(), FsError> {
        let segs = file_segments(path)?;
        let parent = self.open_parent(path, &segs, true, durable)?;
        let last = segs.len() - 1;
        let name = segs[last];
        let (mode, owner) = match parent.symlink_metadata(name) {
            Ok(meta) => {
                check_regular(path, &meta)?;
                // Permission bits only: content the run wrote does not inherit setuid, setgid
                // or sticky (as a write into the file would have cleared setuid).
                (meta.mode() & 0o777, Some((meta.uid(), meta.gid())))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0o666, None),
            Err(e) => return Err(classify(&parent, path, &segs, last, e)),
        };
        let temp = temp_name(path);
        match parent.remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::io(path, "remove stale temporary")(e)),
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true).mode(mode);
        options.follow(FollowSymlinks::No);
        let mut out = parent
            .open_with(&temp, &options)
            .map_err(FsError::io(path, "create temporary"))?;
        // The replaced file's owner stays its owner (a commit by a root process would
        // otherwise hand a user's file to root); a process that may not give files away keeps
        // its own ownership, as an editor saving the file would.
        if let Some((uid, gid)) = owner {
            let _ = rustix::fs::fchown(
                &out,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            );
        }
        let mut input =
            std::fs::File::open(source).map_err(FsError::io(path, "open staged content"))?;
        let written = copy_hashing(&mut input, &mut out).map_err(FsError::io(path, "write"))?;
        if written != *expected {
            drop(out);
            let _ = parent.remove_file(&temp);
            return Err(FsError::Io {
                path: path.to_string(),
                op: "check staged content",
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "staged content is {} ({} bytes), expected {} ({} bytes)",
                        written.digest, written.size, expected.digest, expected.size
                    ),
                ),
            });
        }
        if durable {
            out.sync_all().map_err(FsError::io(path, "sync"))?;
        }
        drop(out);
        parent
            .rename(&temp, &parent, name)
            .map_err(FsError::io(path, "rename into place"))?;
        if durable {
            sync_dir(&parent).map_err(FsError::io(path, "sync directory"))?;
        }
        Ok(())
    }

    /// Remove the file at `path`; nothing there already is success (a commit's ops are
    /// idempotent). Links, directories and special files are refused.
    pub(crate) fn apply_delete(&self, path: &str, durable: bool) -> Result<(), FsError> {
        let segs = file_segments(path)?;
        let parent = match self.open_parent(path, &segs, false, false) {
            Ok(parent) => parent,
            Err(FsError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let last = segs.len() - 1;
        match parent.symlink_metadata(segs[last]) {
            Ok(meta) => check_regular(path, &meta)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(classify(&parent, path, &segs, last, e)),
        }
        match parent.remove_file(segs[last]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(FsError::io(path, "remove")(e)),
        }
        if durable {
            sync_dir(&parent).map_err(FsError::io(path, "sync directory"))?;
        }
        Ok(())
    }

    /// Copy the whole workspace into the empty directory `dest` (a path the runtime owns):
    /// directories, regular files with their permissions, and symbolic links as links (their
    /// targets copied as text, never followed). A hard-linked file is copied as a file of its
    /// own; special files are skipped and their paths returned. Permission bits are copied,
    /// never setuid or setgid.
    pub(crate) fn copy_into(&self, dest: &Path) -> Result<(CopyCounts, Vec<String>), FsError> {
        let mut counts = CopyCounts::default();
        let mut skipped = Vec::new();
        let root = self.root.try_clone().map_err(FsError::io(".", "open"))?;
        self.copy_dir(&root, "", dest, &mut counts, &mut skipped)?;
        Ok((counts, skipped))
    }

    fn copy_dir(
        &self,
        dir: &Dir,
        prefix: &str,
        dest: &Path,
        counts: &mut CopyCounts,
        skipped: &mut Vec<String>,
    ) -> Result<(), FsError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = if prefix.is_empty() { "." } else { prefix };
        let mut names = Vec::new();
        for entry in dir.entries().map_err(FsError::io(shown, "list"))? {
            let entry = entry.map_err(FsError::io(shown, "list"))?;
            names.push(entry.file_name());
        }
        names.sort();
        for name in names {
            let path = join_display(prefix, &name);
            let meta = dir
                .symlink_metadata(&name)
                .map_err(FsError::io(&path, "stat"))?;
            let target = dest.join(&name);
            match EntryKind::of(&meta) {
                EntryKind::Dir => {
                    std::fs::create_dir(&target).map_err(FsError::io(&path, "create directory"))?;
                    std::fs::set_permissions(
                        &target,
                        std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                    )
                    .map_err(FsError::io(&path, "set permissions"))?;
                    let sub = dir
                        .open_dir_nofollow(&name)
                        .map_err(FsError::io(&path, "open"))?;
                    counts.dirs += 1;
                    self.copy_dir(&sub, &path, &target, counts, skipped)?;
                }
                EntryKind::File => {
                    let file = dir
                        .open_with(&name, &read_options())
                        .map_err(FsError::io(&path, "open"))?;
                    let meta = file.metadata().map_err(FsError::io(&path, "stat"))?;
                    // A file with other hard links is copied like any other: the copy is a
                    // file of its own, so nothing done to it reaches the other names (the
                    // probe found one pnpm-style link stopping every command and check).
                    if !meta.is_file() {
                        return Err(FsError::confinement(
                            &path,
                            Confinement::Special(special_name(&meta)),
                        ));
                    }
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .map_err(FsError::io(&path, "create copy"))?;
                    io::copy(&mut file.into_std(), &mut out).map_err(FsError::io(&path, "copy"))?;
                    // Permission bits only: no setuid or setgid copy of a file.
                    out.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o777))
                        .map_err(FsError::io(&path, "set permissions"))?;
                    counts.files += 1;
                }
                EntryKind::Symlink => {
                    let link = dir
                        .read_link_contents(&name)
                        .map_err(FsError::io(&path, "read link"))?;
                    std::os::unix::fs::symlink(link, &target)
                        .map_err(FsError::io(&path, "create link"))?;
                    counts.symlinks += 1;
                }
                EntryKind::Other => skipped.push(path),
            }
        }
        Ok(())
    }
}

fn join_display(prefix: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    if prefix.is_empty() {
        name.into_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Make a directory's entries durable. Directory handles from `cap-std` may be `O_PATH`
/// handles, which cannot be synced, so the directory is reopened (as `.`, beneath the handle)
/// for reading first.
fn sync_dir(dir: &Dir) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    rustix::fs::fsync(&fd)?;
    Ok(())
}

/// Copy `input` to `out`, hashing what passes.
fn copy_hashing(input: &mut impl Read, out: &mut impl Write) -> io::Result<FileState> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok(FileState {
        digest: Digest(hasher.finalize().into()),
        size,
    })
}

/// `stat` needs `fs.read` on the path as a file, or `fs.list` on it as a directory.
pub(crate) fn authorize_stat(auth: &Authorization, path: &str) -> Result<(), FsError> {
    dir_segments(path)?;
    match auth.resource() {
        Resource::Dir(_) => require(auth, "fs.list", &Resource::Dir(path.to_string()))?,
        _ => require(auth, "fs.read", &Resource::Path(path.to_string()))?,
    }
    Ok(())
}

pub(crate) fn read_evidence(
    auth: &Authorization,
    path: &str,
    content: &[u8],
    size: u64,
    truncated: bool,
    staged: bool,
) -> Evidence {
    Evidence {
        effect: EffectClass::Read,
        capability: "fs.read".into(),
        target: Resource::Path(path.to_string()),
        grant: Some(auth.grant().to_string()),
        inputs: vec![],
        outputs: vec![Digested::of("content", content)],
        detail: Detail::FileRead {
            size,
            truncated,
            staged,
        },
    }
}
