//! Confinement: `..`, absolute paths, symlinks (to files, to directories, as parents, in
//! loops) and hard links never let a workspace operation reach outside.

use std::os::unix::fs::symlink;

use ice_kernel::Digest;

use super::Scratch;
use crate::auth::testing::{authorize_scoped, list, read, write};
use crate::workspace::{Confinement, ConfinementError, EntryKind, FsError, Workspace};
use crate::{AuthorizationError, Detail};

fn confinement(err: FsError) -> Confinement {
    match err {
        FsError::Confinement(ConfinementError { problem, .. }) => problem,
        other => panic!("expected a confinement error, got {other:?}"),
    }
}

fn setup() -> (Scratch, Workspace) {
    let s = Scratch::new();
    s.file("src/lib.rs", b"pub fn f() {}\n");
    s.file("README.md", b"hello");
    let ws = Workspace::open(&s.ws).unwrap();
    (s, ws)
}

#[test]
fn reads_a_file_with_evidence_and_reports_truncation() {
    let (_s, ws) = setup();
    let whole = ws.read(&read("src/lib.rs"), "src/lib.rs", 1024).unwrap();
    assert_eq!(whole.content, b"pub fn f() {}\n");
    assert_eq!(whole.size, 14);
    assert!(!whole.truncated);
    assert_eq!(
        whole.evidence.outputs[0].digest,
        Digest::of(b"pub fn f() {}\n")
    );
    assert_eq!(
        whole.evidence.grant.as_deref(),
        Some("run-1:4"),
        "the grant event"
    );

    let cut = ws.read(&read("src/lib.rs"), "src/lib.rs", 4).unwrap();
    assert_eq!(cut.content, b"pub ");
    assert!(cut.truncated);
    assert_eq!(cut.size, 14);
    assert!(matches!(
        cut.evidence.detail,
        Detail::FileRead {
            truncated: true,
            size: 14,
            staged: false
        }
    ));
    let exact = ws.read(&read("src/lib.rs"), "src/lib.rs", 14).unwrap();
    assert!(!exact.truncated);
}

#[test]
fn lists_stats_and_digests() {
    let (s, ws) = setup();
    symlink("/etc", s.ws.join("etc")).unwrap();
    let root = ws.list(&list("."), ".").unwrap();
    let names: Vec<_> = root
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("README.md", EntryKind::File),
            ("etc", EntryKind::Symlink),
            ("src", EntryKind::Dir)
        ]
    );
    let stat = ws.stat(&read("src/lib.rs"), "src/lib.rs").unwrap();
    assert_eq!((stat.kind, stat.size, stat.links), (EntryKind::File, 14, 1));
    assert_eq!(ws.stat(&list("src"), "src").unwrap().kind, EntryKind::Dir);
    // A symlink is reported, not followed.
    assert_eq!(
        ws.stat(&read("etc"), "etc").unwrap().kind,
        EntryKind::Symlink
    );
    let digest = ws.digest(&read("README.md"), "README.md").unwrap();
    assert_eq!(digest.digest, Digest::of(b"hello"));
    assert_eq!(digest.size, 5);
}

#[test]
fn an_authorization_covers_exactly_its_capability_and_resource() {
    let (_s, ws) = setup();
    let err = ws.read(&read("README.md"), "src/lib.rs", 10).unwrap_err();
    assert!(matches!(
        err,
        FsError::Refused(e) if matches!(*e, AuthorizationError::Mismatch { .. })
    ));
    // fs.write on the path is not fs.read.
    let err = ws.read(&write("README.md"), "README.md", 10).unwrap_err();
    assert!(matches!(err, FsError::Refused(_)));
    // fs.list on a directory does not list another.
    let err = ws.list(&list("src"), ".").unwrap_err();
    assert!(matches!(err, FsError::Refused(_)));
    // fs.read on a path does not list it.
    let err = ws.list(&read("src"), "src").unwrap_err();
    assert!(matches!(err, FsError::Refused(_)));
    // A grant over a directory authorises each use for one target: the authorization made for
    // src/lib.rs does not read src/other.rs.
    let auth = authorize_scoped(
        "run-1",
        "fs.read",
        ice_authority::Resource::path("src/lib.rs").unwrap(),
        Some("fs.read:src"),
        ice_authority::EffectClass::Read,
    );
    ws.read(&auth, "src/lib.rs", 10).unwrap();
    let err = ws.read(&auth, "src/other.rs", 10).unwrap_err();
    assert!(matches!(err, FsError::Refused(_)));
}

#[test]
fn dot_dot_and_absolute_paths_are_refused_before_anything_is_opened() {
    let (_s, ws) = setup();
    for path in [
        "../x",
        "../outside/secret.txt",
        "/etc/passwd",
        "a/../../x",
        "src/../README.md",
        "./README.md",
        "src//lib.rs",
        "src/",
        "",
        "src\\lib.rs",
    ] {
        // No grant can name such a path; the path is refused before the authorization is
        // looked at, as a confinement error.
        let err = ws.read(&read("README.md"), path, 100).unwrap_err();
        assert!(
            matches!(confinement(err), Confinement::InvalidPath(_)),
            "{path}"
        );
        let err = ws.list(&list("."), path).unwrap_err();
        assert!(
            matches!(confinement(err), Confinement::InvalidPath(_)),
            "{path}"
        );
    }
}

#[test]
fn a_symlink_to_etc_is_not_followed() {
    let (s, ws) = setup();
    symlink("/etc", s.ws.join("etc")).unwrap();
    symlink("/etc/passwd", s.ws.join("passwd")).unwrap();
    assert_eq!(
        confinement(ws.read(&read("etc/passwd"), "etc/passwd", 100).unwrap_err()),
        Confinement::Symlink {
            component: "etc".into()
        }
    );
    assert_eq!(
        confinement(ws.read(&read("passwd"), "passwd", 100).unwrap_err()),
        Confinement::Symlink {
            component: "passwd".into()
        }
    );
    assert!(matches!(
        confinement(ws.list(&list("etc"), "etc").unwrap_err()),
        Confinement::Symlink { .. }
    ));
    assert!(matches!(
        confinement(ws.digest(&read("passwd"), "passwd").unwrap_err()),
        Confinement::Symlink { .. }
    ));
}

#[test]
fn a_symlinked_parent_directory_is_not_followed_even_inside() {
    let (s, ws) = setup();
    symlink(&s.outside, s.ws.join("sub")).unwrap();
    symlink("src", s.ws.join("alias")).unwrap();
    assert_eq!(
        confinement(
            ws.read(&read("sub/secret.txt"), "sub/secret.txt", 100)
                .unwrap_err()
        ),
        Confinement::Symlink {
            component: "sub".into()
        }
    );
    assert!(matches!(
        confinement(ws.list(&list("sub"), "sub").unwrap_err()),
        Confinement::Symlink { .. }
    ));
    // An inside symlink would let a grant on one name act on another: refused too.
    assert_eq!(
        confinement(
            ws.read(&read("alias/lib.rs"), "alias/lib.rs", 100)
                .unwrap_err()
        ),
        Confinement::Symlink {
            component: "alias".into()
        }
    );
    // A deeper symlinked parent.
    symlink(&s.outside, s.ws.join("src/deep")).unwrap();
    assert_eq!(
        confinement(
            ws.read(&read("src/deep/secret.txt"), "src/deep/secret.txt", 100)
                .unwrap_err()
        ),
        Confinement::Symlink {
            component: "src/deep".into()
        }
    );
}

#[test]
fn a_symlink_loop_is_refused_not_spun_on() {
    let (s, ws) = setup();
    symlink("loop", s.ws.join("loop")).unwrap();
    symlink("b", s.ws.join("a")).unwrap();
    symlink("a", s.ws.join("b")).unwrap();
    for path in ["loop", "loop/x", "a", "a/x"] {
        assert!(
            matches!(
                confinement(ws.read(&read(path), path, 100).unwrap_err()),
                Confinement::Symlink { .. }
            ),
            "{path}"
        );
    }
    assert!(matches!(
        confinement(ws.list(&list("loop"), "loop").unwrap_err()),
        Confinement::Symlink { .. }
    ));
}

#[test]
fn a_hard_link_to_an_outside_file_is_refused() {
    let (s, ws) = setup();
    std::fs::hard_link(s.outside.join("secret.txt"), s.ws.join("hl")).unwrap();
    assert_eq!(
        confinement(ws.read(&read("hl"), "hl", 100).unwrap_err()),
        Confinement::HardLink { links: 2 }
    );
    assert_eq!(
        confinement(ws.digest(&read("hl"), "hl").unwrap_err()),
        Confinement::HardLink { links: 2 }
    );
    // Listed (its name is in the workspace), but its content is not readable.
    let root = ws.list(&list("."), ".").unwrap();
    assert!(root.entries.iter().any(|e| e.name == "hl"));
}

#[test]
fn a_fifo_is_refused_without_hanging() {
    let (s, ws) = setup();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.ws.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert!(matches!(
        confinement(ws.read(&read("fifo"), "fifo", 100).unwrap_err()),
        Confinement::Special("FIFO")
    ));
}

#[test]
fn missing_paths_and_wrong_kinds_are_typed_errors() {
    let (_s, ws) = setup();
    assert!(matches!(
        ws.read(&read("nope"), "nope", 1).unwrap_err(),
        FsError::NotFound { path } if path == "nope"
    ));
    assert!(matches!(
        ws.read(&read("src"), "src", 1).unwrap_err(),
        FsError::IsADirectory { .. }
    ));
    assert!(matches!(
        ws.read(&read("README.md/x"), "README.md/x", 1).unwrap_err(),
        FsError::NotADirectory { path } if path == "README.md"
    ));
    assert!(matches!(
        ws.list(&list("README.md"), "README.md").unwrap_err(),
        FsError::NotADirectory { .. }
    ));
}
