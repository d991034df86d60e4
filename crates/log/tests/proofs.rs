//! Proofs end to end (spec §9): signed checkpoints over the log, an inclusion proof for every
//! event and a consistency proof between checkpoints, each checked offline from its file with
//! only the log's public key.

mod common;

use common::*;
use ice_log::checkpoint::{Checkpoint, NoteSigner};
use ice_log::proof::{ProofFile, prove_consistency, prove_inclusion};
use ice_log::verify::verify;
use ice_log::{EventLog, LogError, StoredCheckpoint, root_at};

fn signer() -> NoteSigner {
    NoteSigner::from_seed("ice.test/proofs", [11u8; 32]).unwrap()
}

/// Sign and store a checkpoint of the whole log as it is now; returns the note.
async fn checkpoint(log: &dyn EventLog, signer: &NoteSigner) -> String {
    let size = log.size().await.unwrap();
    let root = root_at(log, size).await.unwrap();
    let note = Checkpoint {
        origin: signer.name().into(),
        size,
        root,
    }
    .sign(signer)
    .unwrap();
    log.add_checkpoint(StoredCheckpoint {
        size,
        note: note.clone(),
    })
    .await
    .unwrap();
    note
}

/// A proof goes through its file form: what is checked is what a recipient would read.
fn through_file(p: &ProofFile) -> ProofFile {
    let bytes = serde_json::to_vec_pretty(p).unwrap();
    ProofFile::parse(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_and_every_checkpoint_pair_is_proven_offline() {
    let fx = Fixture::new();
    let s = signer();
    let v = s.verifier();
    for r in 0..3 {
        fx.ledger
            .append(&run_id(&format!("p{r}")), full_run(&[0, 1, 2, 3, 4]))
            .await
            .unwrap();
    }
    let note1 = checkpoint(fx.log(), &s).await;
    let size1 = fx.log().size().await.unwrap();
    assert_eq!(size1, 42);

    let events = all_events(fx.log()).await;
    for stored in &events {
        let id = stored.event().unwrap().id();
        let p = through_file(&prove_inclusion(fx.log(), &id, &note1).await.unwrap());
        let verdict = p
            .verify(&v)
            .unwrap_or_else(|e| panic!("inclusion of {id} at size {size1}: {e}"));
        assert_eq!(verdict.tree_size, size1);
        assert!(
            verdict.statement.contains(&id.to_string()),
            "{}",
            verdict.statement
        );
    }

    // The log grows (a new run, and more events for a live one); a second checkpoint.
    fx.ledger
        .append(&run_id("p3"), full_run(&[6, 5, 4]))
        .await
        .unwrap();
    let live = run_id("p4");
    fx.ledger.append(&live, opening()).await.unwrap();
    for i in 0..9 {
        fx.ledger
            .append(&live, vec![working(i, i as u64)])
            .await
            .unwrap();
    }
    let note2 = checkpoint(fx.log(), &s).await;
    let size2 = fx.log().size().await.unwrap();
    assert_eq!(size2, size1 + 12 + 13);

    let p = through_file(&prove_consistency(fx.log(), &note1, &note2).await.unwrap());
    assert_eq!(p.verify(&v).unwrap().tree_size, size2);
    // A checkpoint is consistent with itself.
    let same = through_file(&prove_consistency(fx.log(), &note2, &note2).await.unwrap());
    same.verify(&v).unwrap();
    // Every event, old and new, is in the second tree.
    for stored in all_events(fx.log()).await {
        let id = stored.event().unwrap().id();
        let p = prove_inclusion(fx.log(), &id, &note2).await.unwrap();
        assert_eq!(p.verify(&v).unwrap().tree_size, size2);
    }

    // Both checkpoints verify against the events, signatures included.
    let r = verify(fx.log(), Some(&v), |_| {}).await.unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!(r.checkpoints_verified, 2);
    assert_eq!(r.latest_checkpoint, Some(size2));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[tokio::test(flavor = "multi_thread")]
async fn proofs_that_cannot_be_made_are_refused_clearly() {
    let fx = Fixture::new();
    let s = signer();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let note1 = checkpoint(fx.log(), &s).await;
    fx.ledger.append(&run_id("b"), opening()).await.unwrap();
    let note2 = checkpoint(fx.log(), &s).await;

    // An event newer than the checkpoint.
    let newer = event_id("b:0");
    match prove_inclusion(fx.log(), &newer, &note1).await {
        Err(LogError::Invalid(m)) => assert!(m.contains("newer than"), "{m}"),
        other => panic!("{other:?}"),
    }
    // An event that does not exist.
    match prove_inclusion(fx.log(), &event_id("zzz:0"), &note2).await {
        Err(LogError::Invalid(m)) => assert!(m.contains("no event zzz:0"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Checkpoints in the wrong order.
    match prove_consistency(fx.log(), &note2, &note1).await {
        Err(LogError::Invalid(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("{other:?}"),
    }
    // From the empty log: every log extends it, and RFC 9162 defines no such proof.
    let s0 = NoteSigner::from_seed("ice.test/proofs", [12u8; 32]).unwrap();
    let empty = Checkpoint {
        origin: s0.name().into(),
        size: 0,
        root: ice_log::merkle::empty_root(),
    }
    .sign(&s0)
    .unwrap();
    match prove_consistency(fx.log(), &empty, &note2).await {
        Err(LogError::Invalid(m)) => assert!(m.contains("empty log"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A note that is not a checkpoint.
    assert!(matches!(
        prove_inclusion(fx.log(), &event_id("a:0"), "garbage").await,
        Err(LogError::Invalid(_))
    ));
}
