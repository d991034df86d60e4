//! Staging: reads see the staged view, an abort discards, a commit applies exactly the diff,
//! a stage rebuilt from its ops equals the live one, and a commit refuses paths that became
//! escapes after staging.

use std::os::unix::fs::{PermissionsExt, symlink};

use ice_kernel::{Digest, RunId};

use super::{Node, Scratch, tree};
use crate::auth::testing::{authorize_scoped, delete, list, read, write, write_in};
use crate::staging::{ChangeKind, CommitPoint, Recovery, Stage, StageError, StagedOp, recover};
use crate::workspace::{Confinement, ConfinementError, EntryKind, FileRead, FsError, Workspace};
use crate::{AuthorizationError, Detail};

fn run() -> RunId {
    RunId::new("run-1").unwrap()
}

fn setup() -> (Scratch, Stage) {
    let s = Scratch::new();
    s.file("a.txt", b"old a");
    s.file("b.txt", b"old b");
    s.file("src/lib.rs", b"lib");
    let ws = Workspace::open(&s.ws).unwrap();
    let stage = Stage::create(s.stage_dir(), ws, run()).unwrap();
    (s, stage)
}

/// Stage a representative set of ops: modify, delete, add in new directories, add then
/// delete (no change), rewrite with the same content (no change).
fn stage_some(stage: &mut Stage) {
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    stage.delete(&delete("b.txt"), "b.txt").unwrap();
    stage
        .write(&write("new/dir/c.txt"), "new/dir/c.txt", b"c")
        .unwrap();
    stage.write(&write("tmp.txt"), "tmp.txt", b"t").unwrap();
    stage.delete(&delete("tmp.txt"), "tmp.txt").unwrap();
    stage
        .write(&write("src/lib.rs"), "src/lib.rs", b"lib")
        .unwrap();
}

fn stage_err_fs(err: StageError) -> FsError {
    match err {
        StageError::Fs(e) => e,
        other => panic!("expected a workspace error, got {other:?}"),
    }
}

#[test]
fn reads_and_listings_see_the_staged_view_and_the_workspace_is_untouched() {
    let (s, mut stage) = setup();
    let before = tree(&s.ws);
    stage_some(&mut stage);
    assert_eq!(tree(&s.ws), before, "staging never touches the workspace");

    let a = stage.read(&read("a.txt"), "a.txt", 100).unwrap();
    assert_eq!(a.content, b"new a");
    assert!(matches!(
        a.evidence.detail,
        Detail::FileRead { staged: true, .. }
    ));
    let lib = stage.read(&read("src/lib.rs"), "src/lib.rs", 100).unwrap();
    assert_eq!(lib.content, b"lib");
    assert!(matches!(
        stage_err_fs(stage.read(&read("b.txt"), "b.txt", 100).unwrap_err()),
        FsError::NotFound { .. }
    ));
    assert!(matches!(
        stage_err_fs(stage.read(&read("tmp.txt"), "tmp.txt", 100).unwrap_err()),
        FsError::NotFound { .. }
    ));
    let c = stage
        .read(&read("new/dir/c.txt"), "new/dir/c.txt", 0)
        .unwrap();
    assert!(c.truncated);
    assert!(c.content.is_empty());

    let root = stage.list(&list("."), ".").unwrap();
    let names: Vec<_> = root
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind, e.size))
        .collect();
    assert_eq!(
        names,
        [
            ("a.txt", EntryKind::File, 5),
            ("new", EntryKind::Dir, 0),
            ("src", EntryKind::Dir, names[2].2),
        ]
    );
    let new = stage.list(&list("new"), "new").unwrap();
    assert_eq!(new.entries[0].name, "dir");
    assert_eq!(
        stage.stat(&list("new/dir"), "new/dir").unwrap().kind,
        EntryKind::Dir
    );
    assert_eq!(stage.stat(&read("a.txt"), "a.txt").unwrap().size, 5);
    assert!(matches!(
        stage_err_fs(stage.list(&list("nowhere"), "nowhere").unwrap_err()),
        FsError::NotFound { .. }
    ));
}

#[test]
fn the_diff_names_each_changed_path_with_before_and_after() {
    let (_s, mut stage) = setup();
    stage_some(&mut stage);
    let diff = stage.diff().unwrap();
    let summary: Vec<_> = diff
        .iter()
        .map(|c| {
            (
                c.path.as_str(),
                c.kind,
                c.before.map(|b| (b.digest, b.size)),
                c.after.map(|a| (a.digest, a.size)),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "a.txt",
                ChangeKind::Modified,
                Some((Digest::of(b"old a"), 5)),
                Some((Digest::of(b"new a"), 5))
            ),
            (
                "b.txt",
                ChangeKind::Deleted,
                Some((Digest::of(b"old b"), 5)),
                None
            ),
            (
                "new/dir/c.txt",
                ChangeKind::Added,
                None,
                Some((Digest::of(b"c"), 1))
            ),
        ]
    );
    let evidence = diff[0].evidence().to_json();
    assert_eq!(evidence["applied"]["change"], "modified");
    assert_eq!(
        evidence["inputs"][0]["digest"],
        Digest::of(b"old a").to_hex()
    );
}

#[test]
fn discard_removes_everything_staged_and_leaves_the_workspace() {
    let (s, mut stage) = setup();
    let before = tree(&s.ws);
    stage_some(&mut stage);
    stage.discard().unwrap();
    assert!(!s.stage_dir().exists());
    assert_eq!(tree(&s.ws), before);
}

#[test]
fn commit_applies_exactly_the_diff() {
    let (s, mut stage) = setup();
    std::fs::set_permissions(s.ws.join("a.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    stage_some(&mut stage);
    let diff = stage.diff().unwrap();
    let mut expected = tree(&s.ws);
    for change in &diff {
        match change.after {
            Some(_) => {
                let content = stage
                    .read(&read(&change.path), &change.path, u64::MAX)
                    .unwrap()
                    .content;
                expected.insert(change.path.clone(), Node::File(content));
            }
            None => {
                expected.remove(&change.path);
            }
        }
    }
    expected.insert("new".into(), Node::Dir);
    expected.insert("new/dir".into(), Node::Dir);

    let mut points = Vec::new();
    let report = stage
        .commit_with_hook(&mut |p| {
            points.push(match p {
                CommitPoint::Prepared { changes } => format!("prepared {}", changes.len()),
                CommitPoint::JournalDurable => "journal".to_string(),
                CommitPoint::Applied { index, change } => format!("{index} {}", change.path),
            })
        })
        .unwrap();
    assert_eq!(report.changes, diff);
    assert_eq!(tree(&s.ws), expected);
    assert_eq!(
        points,
        [
            "prepared 3",
            "journal",
            "0 a.txt",
            "1 b.txt",
            "2 new/dir/c.txt"
        ]
    );
    // The file's permissions survive its replacement; the stage is gone.
    let mode = std::fs::metadata(s.ws.join("a.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(!s.stage_dir().exists());
    assert_eq!(
        recover(s.stage_dir(), &Workspace::open(&s.ws).unwrap()).unwrap(),
        Recovery::NothingPending
    );
}

#[test]
fn a_stage_rebuilt_from_its_ops_equals_the_live_one() {
    let (s, mut live) = setup();
    stage_some(&mut live);
    // Ops go through their JSON form, as they would through the log.
    let recorded: Vec<_> = live.ops().iter().map(StagedOp::to_json).collect();
    let ops: Vec<_> = recorded
        .iter()
        .map(|v| StagedOp::from_json(v).unwrap())
        .collect();
    let ws = Workspace::open(&s.ws).unwrap();
    let rebuilt = Stage::from_ops(s.stage_dir(), ws, run(), ops).unwrap();
    assert_eq!(rebuilt.ops(), live.ops());
    assert_eq!(rebuilt.diff().unwrap(), live.diff().unwrap());
    for dir in [".", "new", "new/dir", "src"] {
        assert_eq!(
            rebuilt.list(&list(dir), dir).unwrap(),
            live.list(&list(dir), dir).unwrap()
        );
    }
    for path in ["a.txt", "src/lib.rs", "new/dir/c.txt"] {
        assert_eq!(
            rebuilt.read(&read(path), path, 100).unwrap(),
            live.read(&read(path), path, 100).unwrap()
        );
    }
    assert_eq!(
        recorded[0],
        serde_json::json!({"op": "write", "path": "a.txt",
                           "digest": Digest::of(b"new a").to_hex(), "size": 5})
    );
    assert_eq!(
        recorded[1],
        serde_json::json!({"op": "delete", "path": "b.txt"})
    );
}

#[test]
fn a_rebuild_refuses_missing_or_altered_content() {
    let (s, mut live) = setup();
    live.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    let ops = live.ops().to_vec();
    let object = s
        .stage_dir()
        .join("objects")
        .join(Digest::of(b"new a").to_hex());
    std::fs::write(&object, b"tampered").unwrap();
    let ws = Workspace::open(&s.ws).unwrap();
    assert!(matches!(
        Stage::from_ops(s.stage_dir(), ws.clone(), run(), ops.clone()),
        Err(StageError::Object { .. })
    ));
    std::fs::remove_file(&object).unwrap();
    assert!(matches!(
        Stage::from_ops(s.stage_dir(), ws.clone(), run(), ops),
        Err(StageError::Object { .. })
    ));
    assert!(StagedOp::from_json(&serde_json::json!({"op": "delete", "path": "../x"})).is_err());
    assert!(StagedOp::from_json(&serde_json::json!({"op": "chmod", "path": "x"})).is_err());
}

#[test]
fn staging_needs_the_matching_authorization_of_the_same_run() {
    let (_s, mut stage) = setup();
    let err = stage.write(&write("a.txt"), "b.txt", b"x").unwrap_err();
    assert!(matches!(
        stage_err_fs(err),
        FsError::Refused(e) if matches!(*e, AuthorizationError::Mismatch { .. })
    ));
    // A grant on src covers src/a.rs and src/b.rs, but each authorization is for one target.
    let auth = authorize_scoped(
        "run-1",
        "fs.write",
        ice_authority::Resource::path("src/a.rs").unwrap(),
        Some("fs.write:src"),
        ice_authority::EffectClass::InternalWrite,
    );
    stage.write(&auth, "src/a.rs", b"a").unwrap();
    let err = stage.write(&auth, "src/b.rs", b"b").unwrap_err();
    assert!(matches!(stage_err_fs(err), FsError::Refused(_)));
    let err = stage.write(&read("a.txt"), "a.txt", b"x").unwrap_err();
    assert!(matches!(stage_err_fs(err), FsError::Refused(_)));
    let err = stage.delete(&write("a.txt"), "a.txt").unwrap_err();
    assert!(matches!(stage_err_fs(err), FsError::Refused(_)));
    let err = stage
        .write(&write_in("run-2", "a.txt"), "a.txt", b"x")
        .unwrap_err();
    assert!(matches!(
        stage_err_fs(err),
        FsError::Refused(e) if matches!(*e, AuthorizationError::Run { .. })
    ));
    let err = stage
        .read(
            &authorize_scoped(
                "run-2",
                "fs.read",
                ice_authority::Resource::path("a.txt").unwrap(),
                None,
                ice_authority::EffectClass::Read,
            ),
            "a.txt",
            1,
        )
        .unwrap_err();
    assert!(matches!(stage_err_fs(err), FsError::Refused(_)));
    assert_eq!(stage.ops().len(), 1);
}

#[test]
fn staged_paths_are_confined_like_reads() {
    let (s, mut stage) = setup();
    symlink("/etc", s.ws.join("etc")).unwrap();
    symlink(&s.outside, s.ws.join("out")).unwrap();
    symlink("loop", s.ws.join("loop")).unwrap();
    std::fs::hard_link(s.outside.join("secret.txt"), s.ws.join("hl")).unwrap();
    for path in [
        "etc/passwd",
        "out/secret.txt",
        "out/new.txt",
        "loop",
        "loop/x",
        "etc",
    ] {
        let err = stage_err_fs(stage.write(&write(path), path, b"x").unwrap_err());
        assert!(
            matches!(
                err,
                FsError::Confinement(ConfinementError {
                    problem: Confinement::Symlink { .. },
                    ..
                })
            ),
            "{path}: {err:?}"
        );
    }
    for err in [
        stage.write(&write("hl"), "hl", b"x").unwrap_err(),
        stage.delete(&delete("hl"), "hl").unwrap_err(),
    ] {
        assert!(matches!(
            stage_err_fs(err),
            FsError::Confinement(ConfinementError {
                problem: Confinement::HardLink { links: 2 },
                ..
            })
        ));
    }
    for path in ["../x", "/etc/passwd", "a/../../x"] {
        let err = stage_err_fs(stage.write(&write("a.txt"), path, b"x").unwrap_err());
        assert!(matches!(
            err,
            FsError::Confinement(ConfinementError {
                problem: Confinement::InvalidPath(_),
                ..
            })
        ));
    }
    assert!(matches!(
        stage_err_fs(stage.write(&write("src"), "src", b"x").unwrap_err()),
        FsError::IsADirectory { .. }
    ));
    assert!(matches!(
        stage_err_fs(stage.write(&write("a.txt/x"), "a.txt/x", b"x").unwrap_err()),
        FsError::NotADirectory { .. }
    ));
    stage.write(&write("n/f"), "n/f", b"x").unwrap();
    assert!(matches!(
        stage_err_fs(stage.write(&write("n"), "n", b"x").unwrap_err()),
        FsError::IsADirectory { .. }
    ));
    assert!(matches!(
        stage_err_fs(stage.write(&write("n/f/g"), "n/f/g", b"x").unwrap_err()),
        FsError::NotADirectory { .. }
    ));
    assert!(matches!(
        stage_err_fs(stage.delete(&delete("zz"), "zz").unwrap_err()),
        FsError::NotFound { .. }
    ));
    assert_eq!(
        std::fs::read(s.outside.join("secret.txt")).unwrap(),
        b"SECRET"
    );
    assert_eq!(stage.ops().len(), 1);
}

#[test]
fn commit_refuses_a_parent_that_became_a_symlink_after_staging() {
    let (s, mut stage) = setup();
    s.file("sub/keep.txt", b"k");
    stage.write(&write("sub/x.txt"), "sub/x.txt", b"x").unwrap();
    std::fs::rename(s.ws.join("sub"), s.base.join("moved")).unwrap();
    symlink(&s.outside, s.ws.join("sub")).unwrap();
    let before = tree(&s.ws);
    let err = stage.commit().unwrap_err();
    assert!(matches!(
        stage_err_fs(err),
        FsError::Confinement(ConfinementError {
            problem: Confinement::Symlink { .. },
            ..
        })
    ));
    assert!(!s.outside.join("x.txt").exists());
    assert_eq!(tree(&s.ws), before);
    assert!(!s.stage_dir().join("journal.json").exists());
}

#[test]
fn commit_refuses_a_file_that_became_a_hard_link_after_staging() {
    let (s, mut stage) = setup();
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    std::fs::remove_file(s.ws.join("a.txt")).unwrap();
    std::fs::hard_link(s.outside.join("secret.txt"), s.ws.join("a.txt")).unwrap();
    let err = stage.commit().unwrap_err();
    assert!(matches!(
        stage_err_fs(err),
        FsError::Confinement(ConfinementError {
            problem: Confinement::HardLink { .. },
            ..
        })
    ));
    assert_eq!(
        std::fs::read(s.outside.join("secret.txt")).unwrap(),
        b"SECRET"
    );
}

#[test]
fn confinement_is_checked_again_as_each_change_is_applied() {
    let (s, mut stage) = setup();
    s.file("sub/keep.txt", b"k");
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    stage.write(&write("sub/x.txt"), "sub/x.txt", b"x").unwrap();
    let (ws_path, outside, base) = (s.ws.clone(), s.outside.clone(), s.base.clone());
    // Swap the directory for a symlink after the commit point, before it is applied.
    let err = stage
        .commit_with_hook(&mut |p| {
            if let CommitPoint::JournalDurable = p {
                std::fs::rename(ws_path.join("sub"), base.join("moved")).unwrap();
                symlink(&outside, ws_path.join("sub")).unwrap();
            }
        })
        .unwrap_err();
    match err {
        StageError::Apply {
            index,
            path,
            source,
        } => {
            assert_eq!((index, path.as_str()), (1, "sub/x.txt"));
            assert!(source.is_confinement());
        }
        other => panic!("expected an apply error, got {other:?}"),
    }
    assert!(!s.outside.join("x.txt").exists());
    // The journal stays, so the run is visibly part-way and recovery refuses the same way.
    assert!(s.stage_dir().join("journal.json").exists());
    let ws = Workspace::open(&s.ws).unwrap();
    assert!(matches!(
        recover(s.stage_dir(), &ws),
        Err(StageError::Apply { .. })
    ));
    assert!(!s.outside.join("x.txt").exists());
}

#[test]
fn materialize_copies_the_workspace_with_the_diff_applied() {
    let (s, mut stage) = setup();
    s.file("run.sh", b"#!/bin/sh\n");
    std::fs::set_permissions(s.ws.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("src/lib.rs", s.ws.join("link")).unwrap();
    stage_some(&mut stage);
    let before = tree(&s.ws);
    let dest = s.base.join("copy");
    let made = stage.materialize(&dest).unwrap();
    assert_eq!(tree(&s.ws), before, "the workspace is unchanged");
    let copy = tree(&dest);
    assert_eq!(copy["a.txt"], Node::File(b"new a".to_vec()));
    assert!(!copy.contains_key("b.txt"));
    assert_eq!(copy["new/dir/c.txt"], Node::File(b"c".to_vec()));
    assert_eq!(copy["link"], Node::Symlink("src/lib.rs".into()));
    assert!(!copy.keys().any(|k| k.contains(".ice-commit")));
    let mode = std::fs::metadata(dest.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!((made.symlinks, made.skipped.len()), (1, 0));
    // A second materialisation into the same (now non-empty) directory is refused.
    assert!(matches!(
        stage.materialize(&dest),
        Err(StageError::Layout { .. })
    ));
}

#[test]
fn a_stage_directory_inside_the_workspace_is_refused() {
    let s = Scratch::new();
    let ws = Workspace::open(&s.ws).unwrap();
    assert!(matches!(
        Stage::create(s.ws.join(".stage"), ws, run()),
        Err(StageError::Layout { .. })
    ));
}

#[test]
fn materialize_copies_a_hard_linked_file_as_a_file_of_its_own_and_skips_special_files() {
    let (s, stage) = setup();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.ws.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let made = stage.materialize(s.base.join("copy1")).unwrap();
    assert_eq!(made.skipped, ["fifo"]);
    assert!(!s.base.join("copy1/fifo").exists());

    // A hard-linked file (pnpm's store, say) does not stop the copy: it is copied, and the
    // copy is a file of its own, so a command writing it changes no other name of the file.
    std::fs::hard_link(s.outside.join("secret.txt"), s.ws.join("src/hl")).unwrap();
    let original = std::fs::read(s.outside.join("secret.txt")).unwrap();
    stage.materialize(s.base.join("copy2")).unwrap();
    let copy = s.base.join("copy2/src/hl");
    assert_eq!(std::fs::read(&copy).unwrap(), original);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&copy).unwrap().nlink(), 1);
    std::fs::write(&copy, b"changed in the copy").unwrap();
    assert_eq!(
        std::fs::read(s.outside.join("secret.txt")).unwrap(),
        original
    );
}

#[test]
fn a_grants_max_bytes_refuses_a_larger_write_and_cuts_a_read() {
    use crate::auth::testing::constrained;
    use ice_authority::{Constraints, EffectClass, Resource};
    let limit = Constraints {
        max_bytes: Some(3),
        timeout_ms: None,
    };
    let (s, mut stage) = setup();
    let w = constrained(
        "fs.write",
        Resource::path("a.txt").unwrap(),
        EffectClass::InternalWrite,
        limit,
    );
    let err = stage_err_fs(stage.write(&w, "a.txt", b"four").unwrap_err());
    let FsError::Refused(refusal) = &err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert!(
        matches!(
            **refusal,
            AuthorizationError::Constraint {
                limit: 3,
                bytes: 4,
                ..
            }
        ),
        "{refusal:?}"
    );
    assert!(stage.diff().unwrap().is_empty(), "nothing was staged");
    stage.write(&w, "a.txt", b"abc").unwrap();
    // A read keeps at most max_bytes and says it was cut, from the stage and the workspace.
    let r = constrained(
        "fs.read",
        Resource::path("a.txt").unwrap(),
        EffectClass::Read,
        limit,
    );
    let got = stage.read(&r, "a.txt", 100).unwrap();
    assert_eq!(
        (got.content.as_slice(), got.truncated),
        (&b"abc"[..], false)
    );
    let r = constrained(
        "fs.read",
        Resource::path("b.txt").unwrap(),
        EffectClass::Read,
        limit,
    );
    let got = stage.read(&r, "b.txt", 100).unwrap();
    assert_eq!((got.content.as_slice(), got.truncated), (&b"old"[..], true));
    let ws = Workspace::open(&s.ws).unwrap();
    let got = ws.read(&r, "b.txt", 100).unwrap();
    assert_eq!((got.content.as_slice(), got.truncated), (&b"old"[..], true));
}

#[test]
fn apply_keeps_the_journal_until_release_and_roll_forward_completes_it_again() {
    let (s, mut stage) = setup();
    stage_some(&mut stage);
    let ws = || Workspace::open(&s.ws).unwrap();
    let report = stage.apply_with_hook(&mut |_| {}).unwrap();
    assert_eq!(report.changes.len(), 3);
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"new a");
    // Applied, not yet released: the commit is still pending, and rolling it forward again
    // (a crash before the caller recorded it) changes nothing and keeps the journal.
    assert!(crate::commit_pending(s.stage_dir()));
    let after = tree(&s.ws);
    match crate::roll_forward(s.stage_dir(), &ws()).unwrap() {
        Recovery::RolledForward { changes } => assert_eq!(changes, report.changes),
        other => panic!("{other:?}"),
    }
    assert_eq!(tree(&s.ws), after);
    assert!(crate::commit_pending(s.stage_dir()));
    crate::release(s.stage_dir()).unwrap();
    assert!(!crate::commit_pending(s.stage_dir()));
    assert!(!s.stage_dir().exists());
    // Releasing what is gone is not an error.
    crate::release(s.stage_dir()).unwrap();
    assert_eq!(
        recover(s.stage_dir(), &ws()).unwrap(),
        Recovery::NothingPending
    );
}

/// A journal that cannot be written (a full disk; here, its temporary file's name leads
/// nowhere) stops the commit before its commit point: the error says so, the workspace is as
/// it was, and no journal is left for recovery to roll forward.
#[test]
fn a_journal_that_cannot_be_written_applies_nothing_and_leaves_no_journal() {
    let (s, mut stage) = setup();
    stage_some(&mut stage);
    let before = tree(&s.ws);
    symlink(
        s.stage_dir().join("no-such-dir/journal"),
        s.stage_dir().join("journal.json.tmp"),
    )
    .unwrap();
    let mut points = Vec::new();
    let err = stage
        .apply_with_hook(&mut |p| {
            points.push(match p {
                CommitPoint::Prepared { .. } => "prepared",
                CommitPoint::JournalDurable => "durable",
                CommitPoint::Applied { .. } => "applied",
            })
        })
        .unwrap_err();
    assert!(
        matches!(err, StageError::JournalUnwritten { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("commit: the journal could not be written, so nothing was applied"),
        "{err}"
    );
    assert_eq!(points, ["prepared"]);
    assert_eq!(tree(&s.ws), before);
    assert!(!crate::commit_pending(s.stage_dir()));
    // Nothing of it is left, not even the link.
    assert!(std::fs::symlink_metadata(s.stage_dir().join("journal.json.tmp")).is_err());
    assert_eq!(
        recover(s.stage_dir(), &Workspace::open(&s.ws).unwrap()).unwrap(),
        Recovery::NothingPending
    );
    assert_eq!(tree(&s.ws), before);
}

#[test]
fn a_truncated_stage_forgets_the_later_ops() {
    let (s, mut stage) = setup();
    stage.write(&write("a.txt"), "a.txt", b"first").unwrap();
    stage.write(&write("a.txt"), "a.txt", b"second").unwrap();
    stage.delete(&delete("b.txt"), "b.txt").unwrap();
    stage.truncate(1);
    assert_eq!(stage.ops().len(), 1);
    let a = stage.read(&read("a.txt"), "a.txt", 100).unwrap();
    assert_eq!(a.content, b"first");
    assert_eq!(
        stage.read(&read("b.txt"), "b.txt", 100).unwrap().content,
        b"old b"
    );
    // Truncating to more ops than it holds changes nothing.
    stage.truncate(5);
    assert_eq!(stage.ops().len(), 1);
    let changes = stage.commit().unwrap().changes;
    assert_eq!(changes.len(), 1);
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"first");
    assert_eq!(std::fs::read(s.ws.join("b.txt")).unwrap(), b"old b");
}

#[test]
fn an_abandoned_commit_is_moved_aside_whole_and_never_rolled_forward() {
    let (s, mut stage) = setup();
    stage_some(&mut stage);
    let report = stage.apply_with_hook(&mut |_| {}).unwrap();
    assert_eq!(
        crate::pending_changes(s.stage_dir()).unwrap(),
        report.changes
    );
    let keep = s.stage_dir().with_file_name("kept");
    // The place to keep it must be free; nothing moves otherwise.
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("x"), b"x").unwrap();
    assert!(crate::abandon(s.stage_dir(), &keep).is_err());
    assert!(crate::commit_pending(s.stage_dir()));
    std::fs::remove_dir_all(&keep).unwrap();
    crate::abandon(s.stage_dir(), &keep).unwrap();
    // Kept whole where asked: the journal there names the same changes.
    assert_eq!(crate::pending_changes(&keep).unwrap(), report.changes);
    assert!(!s.stage_dir().exists());
    assert!(!crate::commit_pending(s.stage_dir()));
    assert!(crate::commit_pending(&keep), "the journal is kept");
    let ws = Workspace::open(&s.ws).unwrap();
    assert_eq!(
        recover(s.stage_dir(), &ws).unwrap(),
        Recovery::NothingPending
    );
    // With no commit pending there is nothing to abandon, and no changes pending.
    assert!(crate::pending_changes(s.stage_dir()).is_err());
    let err = crate::abandon(s.stage_dir(), s.stage_dir().with_file_name("k2")).unwrap_err();
    assert!(err.to_string().contains("no commit is pending"), "{err}");
    assert!(!s.stage_dir().with_file_name("k2").exists());
}

/// The probe's finding: a commit's temporary has a name that can be worked out from the path,
/// and a run could stage a directory under it, so the commit failed half-way (after its commit
/// point) and the run was stuck. Such names are ICE's own: no run stages them.
#[test]
fn a_run_cannot_stage_a_name_kept_for_commit_temporaries() {
    let (_s, mut stage) = setup();
    for path in [
        ".ice-commit-734cad14909bedfa.tmp",
        ".ice-commit-734cad14909bedfa.tmp/x",
        "src/.ice-commit-anything",
    ] {
        let err = stage_err_fs(stage.write(&write(path), path, b"x").unwrap_err());
        assert!(
            matches!(
                &err,
                FsError::Confinement(ConfinementError {
                    problem: Confinement::Reserved { .. },
                    ..
                })
            ),
            "{path}: {err:?}"
        );
        assert!(err.to_string().contains("commit temporaries"), "{err}");
    }
    let err = stage_err_fs(
        stage
            .delete(&delete("src/.ice-commit-x.tmp"), "src/.ice-commit-x.tmp")
            .unwrap_err(),
    );
    assert!(
        matches!(
            err,
            FsError::Confinement(ConfinementError {
                problem: Confinement::Reserved { .. },
                ..
            })
        ),
        "{err:?}"
    );
    assert!(stage.ops().is_empty());
}

/// Something other than a file where a write's temporary goes (put there by someone outside
/// the run) refuses the commit before its commit point: nothing applied, no journal.
#[test]
fn a_directory_where_a_commit_temporary_goes_refuses_the_commit_before_anything_is_applied() {
    let (s, mut stage) = setup();
    stage_some(&mut stage);
    let temp = format!(".ice-commit-{}.tmp", &Digest::of(b"a.txt").to_hex()[..16]);
    std::fs::create_dir(s.ws.join(&temp)).unwrap();
    let before = tree(&s.ws);
    let err = stage.prepare().unwrap_err();
    assert!(err.to_string().contains(&temp), "{err}");
    let err = stage.commit().unwrap_err();
    assert!(matches!(err, StageError::Fs(_)), "{err:?}");
    assert_eq!(tree(&s.ws), before, "nothing was applied");
    assert!(!crate::commit_pending(s.stage_dir()));
}

/// Read `path` and tell the stage what the run was shown, as the runtime does once the read
/// is recorded (a whole file read from the workspace, or nothing found there).
fn read_shown(stage: &Stage, path: &str) -> Result<FileRead, StageError> {
    let from_workspace = !stage.is_staged(path);
    let got = stage.read(&read(path), path, 100);
    match &got {
        Ok(r) if from_workspace && !r.truncated => {
            let state = crate::FileState {
                digest: Digest::of(&r.content),
                size: r.size,
            };
            stage.saw(path, Some(state));
        }
        Err(StageError::Fs(FsError::NotFound { .. })) if from_workspace => stage.saw(path, None),
        _ => {}
    }
    got
}

/// The review's finding: a read noted what the run saw as it read, before its record was made
/// or its output shown, so a read the agent never saw (its record failed, its output withheld)
/// moved what the commit checks against, and an operator's edit it read that way was
/// overwritten unseen. A read changes nothing until the runtime says the run was shown it.
#[test]
fn a_read_the_run_was_not_shown_changes_nothing_the_commit_checks() {
    let (s, mut stage) = setup();
    read_shown(&stage, "a.txt").unwrap();
    std::fs::write(s.ws.join("a.txt"), b"human edit").unwrap();
    let unseen = stage.read(&read("a.txt"), "a.txt", 100).unwrap();
    assert_eq!(unseen.content, b"human edit");
    assert_eq!(
        stage.seen_of("a.txt").unwrap().unwrap().digest,
        Digest::of(b"old a")
    );
    // Nor does a read that found nothing, until it is shown.
    assert!(stage.read(&read("late.txt"), "late.txt", 100).is_err());
    assert_eq!(stage.seen_of("late.txt"), None);
    stage.write(&write("a.txt"), "a.txt", b"mine").unwrap();
    assert!(matches!(
        stage.prepare().unwrap_err(),
        StageError::Conflict { .. }
    ));
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"human edit");
}

/// The probe's finding: someone else's edit made while the run worked was overwritten by the
/// commit with nothing to show it. A path changed since the run last read it (before
/// staging it) or staged it refuses the commit before its commit point.
#[test]
fn a_commit_over_a_change_made_since_the_run_looked_is_refused_and_applies_nothing() {
    // Changed after the run read it (and before it wrote it).
    let (s, mut stage) = setup();
    read_shown(&stage, "a.txt").unwrap();
    std::fs::write(s.ws.join("a.txt"), b"human edit").unwrap();
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    stage.write(&write("zz.txt"), "zz.txt", b"z").unwrap();
    let err = stage.commit().unwrap_err();
    match &err {
        StageError::Conflict { path, seen, now } => {
            assert_eq!(path, "a.txt");
            assert_eq!(seen.unwrap().digest, Digest::of(b"old a"));
            assert_eq!(now.unwrap().digest, Digest::of(b"human edit"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("so that change is kept"), "{err}");
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"human edit");
    assert!(!s.ws.join("zz.txt").exists(), "nothing was applied");

    // Changed after the run staged it; a file that appeared where the run adds one; a file
    // removed that the run deletes.
    let (s, mut stage) = setup();
    stage.write(&write("b.txt"), "b.txt", b"new b").unwrap();
    std::fs::write(s.ws.join("b.txt"), b"human edit").unwrap();
    assert!(matches!(
        stage.prepare().unwrap_err(),
        StageError::Conflict { .. }
    ));
    let (s, mut stage) = setup();
    stage.write(&write("new.txt"), "new.txt", b"mine").unwrap();
    std::fs::write(s.ws.join("new.txt"), b"theirs").unwrap();
    assert!(matches!(
        stage.prepare().unwrap_err(),
        StageError::Conflict { seen: None, .. }
    ));
    let (s, mut stage) = setup();
    stage.delete(&delete("a.txt"), "a.txt").unwrap();
    std::fs::write(s.ws.join("a.txt"), b"edited").unwrap();
    assert!(matches!(
        stage.prepare().unwrap_err(),
        StageError::Conflict { .. }
    ));

    // Read as absent, then added by someone else before the run writes its own.
    let (s, mut stage) = setup();
    assert!(read_shown(&stage, "late.txt").is_err());
    std::fs::write(s.ws.join("late.txt"), b"theirs").unwrap();
    stage
        .write(&write("late.txt"), "late.txt", b"mine")
        .unwrap();
    assert!(matches!(
        stage.prepare().unwrap_err(),
        StageError::Conflict { seen: None, .. }
    ));

    // Unchanged paths commit as before; a change the run never looked at is no conflict.
    let (s, mut stage) = setup();
    read_shown(&stage, "a.txt").unwrap();
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    std::fs::write(s.ws.join("b.txt"), b"human edit").unwrap();
    stage.commit().unwrap();
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"new a");
    assert_eq!(std::fs::read(s.ws.join("b.txt")).unwrap(), b"human edit");

    // An edit the run read again before writing is no change behind its back: the last read
    // before staging is what the commit checks against (an absent file found later too).
    let (s, mut stage) = setup();
    read_shown(&stage, "a.txt").unwrap();
    assert!(read_shown(&stage, "late.txt").is_err());
    std::fs::write(s.ws.join("a.txt"), b"human edit").unwrap();
    std::fs::write(s.ws.join("late.txt"), b"theirs").unwrap();
    let again = read_shown(&stage, "a.txt").unwrap();
    assert_eq!(again.content, b"human edit");
    read_shown(&stage, "late.txt").unwrap();
    stage.write(&write("a.txt"), "a.txt", b"mine").unwrap();
    stage
        .write(&write("late.txt"), "late.txt", b"mine too")
        .unwrap();
    // Once staged, a read sees the stage: an edit made after it is a change all the same.
    read_shown(&stage, "a.txt").unwrap();
    stage.commit().unwrap();
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read(s.ws.join("late.txt")).unwrap(), b"mine too");
    let (s, mut stage) = setup();
    read_shown(&stage, "a.txt").unwrap();
    stage.write(&write("a.txt"), "a.txt", b"mine").unwrap();
    std::fs::write(s.ws.join("a.txt"), b"human edit").unwrap();
    read_shown(&stage, "a.txt").unwrap();
    assert!(matches!(
        stage.prepare().unwrap_err(),
        StageError::Conflict { .. }
    ));
}

/// Recovery completes a commit past its commit point whatever is found; what it replaced is
/// what was there, not what the journal expected (the probe's finding: a file changed between
/// the crash and recovery was recorded as the journal's `before`).
#[test]
fn roll_forward_records_what_it_actually_replaced() {
    let (s, mut stage) = setup();
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    stage.write(&write("added.txt"), "added.txt", b"n").unwrap();
    let mut crashed = false;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stage
            .commit_with_hook(&mut |p| {
                if matches!(p, CommitPoint::JournalDurable) {
                    crashed = true;
                    panic!("crash after the commit point");
                }
            })
            .unwrap()
    }));
    assert!(crashed && crate::commit_pending(s.stage_dir()));
    std::fs::write(s.ws.join("a.txt"), b"edited after the crash").unwrap();
    std::fs::write(s.ws.join("added.txt"), b"appeared").unwrap();
    let ws = Workspace::open(&s.ws).unwrap();
    match crate::roll_forward(s.stage_dir(), &ws).unwrap() {
        Recovery::RolledForward { changes } => {
            assert_eq!(changes[0].path, "a.txt");
            assert_eq!(
                changes[0].before.unwrap().digest,
                Digest::of(b"edited after the crash")
            );
            assert_eq!(changes[1].path, "added.txt");
            assert_eq!(changes[1].kind, ChangeKind::Modified);
            assert_eq!(changes[1].before.unwrap().digest, Digest::of(b"appeared"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(s.ws.join("a.txt")).unwrap(), b"new a");
    // Rolled forward again (a second crash before the commit was recorded): what was replaced
    // is still what the first recovery found, not the journal's first guess.
    match crate::roll_forward(s.stage_dir(), &ws).unwrap() {
        Recovery::RolledForward { changes } => assert_eq!(
            changes[0].before.unwrap().digest,
            Digest::of(b"edited after the crash")
        ),
        other => panic!("{other:?}"),
    }
}

/// A file the run deletes cannot become a directory in the same commit (the commit would
/// fail on it after staging accepted it): writing beneath it is refused when staged.
#[test]
fn writing_beneath_a_file_the_run_deletes_is_refused_when_staged() {
    let (_s, mut stage) = setup();
    stage.delete(&delete("a.txt"), "a.txt").unwrap();
    let err = stage_err_fs(
        stage
            .write(&write("a.txt/b.txt"), "a.txt/b.txt", b"x")
            .unwrap_err(),
    );
    assert!(
        matches!(err, FsError::NotADirectory { ref path } if path == "a.txt"),
        "{err:?}"
    );
    // A new file staged and deleted again was never in the workspace: a directory may go there.
    stage.write(&write("n"), "n", b"x").unwrap();
    stage.delete(&delete("n"), "n").unwrap();
    stage.write(&write("n/b.txt"), "n/b.txt", b"x").unwrap();
}

/// Rewriting a setuid file keeps its permission bits, not setuid or setgid.
#[test]
fn a_rewritten_file_does_not_keep_setuid_or_setgid() {
    let (s, mut stage) = setup();
    std::fs::set_permissions(s.ws.join("a.txt"), std::fs::Permissions::from_mode(0o6755)).unwrap();
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    stage.commit().unwrap();
    let mode = std::fs::metadata(s.ws.join("a.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}
