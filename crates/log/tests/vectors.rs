//! ICE's Merkle tree and proof checks against the transparency-dev RFC 6962 test vectors
//! (`../shared/vectors/rfc6962`): every case is accepted or rejected exactly as it says.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ice_kernel::Digest;
use std::collections::HashMap;

use ice_log::merkle::{
    Frontier, NodeId, consistency_ranges, empty_root, hashes_of, inclusion_ranges, leaf_hash,
    root_at, verify_consistency, verify_inclusion,
};
use serde::Deserialize;

/// The eight leaf inputs the vectors' trees are built from (vectors README).
const LEAVES_HEX: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// Roots of the trees of size 0..=8 over those leaves (vectors README).
const ROOTS_HEX: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// `inclusion/single-entry` uses one more leaf: upstream's `TestVerifyInclusionSingleEntry`
/// builds its one-leaf tree over the bytes `data`.
const SINGLE_ENTRY_LEAF: &[u8] = b"data";

fn leaves() -> Vec<Vec<u8>> {
    LEAVES_HEX
        .iter()
        .map(|h| hex::decode(h).expect("hex"))
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct InclusionCase {
    leaf_idx: u64,
    tree_size: u64,
    root: String,
    leaf_hash: String,
    proof: Option<Vec<String>>,
    desc: String,
    want_err: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyCase {
    size1: u64,
    size2: u64,
    root1: String,
    root2: String,
    proof: Option<Vec<String>>,
    desc: String,
    #[serde(rename = "wantErr")]
    want_err: bool,
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn b64(s: &str) -> Vec<u8> {
    B64.decode(s).expect("vector field is base64")
}

/// A proof as ICE takes it: exactly 32 bytes per hash. Anything else is a malformed proof,
/// which a verifier rejects before looking at it.
fn proof_digests(proof: &Option<Vec<String>>) -> Option<Vec<Digest>> {
    proof
        .iter()
        .flatten()
        .map(|s| b64(s).try_into().ok().map(Digest))
        .collect()
}

/// A root as ICE takes it. The vectors also use roots that are not 32 bytes ("don't care 1");
/// RFC 9162 compares roots byte for byte, so such a root stands in as the SHA-256 of its bytes:
/// equal roots stay equal, different ones stay different, and no stand-in can equal a real
/// tree's root by accident.
fn root_digest(s: &str) -> Digest {
    let raw = b64(s);
    match <[u8; 32]>::try_from(raw.as_slice()) {
        Ok(a) => Digest(a),
        Err(_) => Digest::of(&raw),
    }
}

/// The leaf data whose leaf hash is `leaf_hash`, among the inputs the vectors are built from.
/// ICE's verifier takes leaf data, so a leaf hash with no known preimage (the vectors'
/// "wrong leaf", "random leaf", empty leaf) cannot be shown included.
fn leaf_data_for(leaf_hash_b64: &str) -> Option<Vec<u8>> {
    let want = b64(leaf_hash_b64);
    leaves()
        .into_iter()
        .chain([SINGLE_ENTRY_LEAF.to_vec()])
        .find(|d| leaf_hash(d).0.as_slice() == want.as_slice())
}

#[test]
fn readme_roots_of_sizes_0_to_8() {
    common::vectors_dir();
    let mut f = Frontier::new();
    assert_eq!(f.root().to_hex(), ROOTS_HEX[0]);
    assert_eq!(empty_root().to_hex(), ROOTS_HEX[0]);
    for (i, leaf) in leaves().iter().enumerate() {
        f.push(leaf_hash(leaf));
        assert_eq!(
            f.root().to_hex(),
            ROOTS_HEX[i + 1],
            "root of size {}",
            i + 1
        );
    }
}

#[test]
fn every_inclusion_vector_is_accepted_or_rejected_as_it_says() {
    let dir = common::vectors_dir().join("rfc6962/inclusion");
    let files = json_files(&dir);
    assert!(
        files.len() >= 60,
        "only {} inclusion vectors under {}",
        files.len(),
        dir.display()
    );
    let leaves = leaves();
    let (mut accepted, mut rejected) = (0, 0);
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read vector");
        let c: InclusionCase = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not an inclusion vector: {e}", file.display()));
        let root = root_digest(&c.root);
        let outcome: Result<(), String> =
            match (leaf_data_for(&c.leaf_hash), proof_digests(&c.proof)) {
                (None, _) => Err("leaf hash has no known preimage".into()),
                (_, None) => Err("malformed proof".into()),
                (Some(data), Some(proof)) => {
                    verify_inclusion(&data, c.leaf_idx, c.tree_size, &root, &proof)
                }
            };
        if !c.want_err {
            // The leaf hash the vector states is ICE's leaf hash of the leaf it indexes.
            let data: &[u8] = if file.parent().is_some_and(|p| p.ends_with("single-entry")) {
                SINGLE_ENTRY_LEAF
            } else {
                &leaves[c.leaf_idx as usize]
            };
            assert_eq!(
                leaf_hash(data).0.to_vec(),
                b64(&c.leaf_hash),
                "{}: leaf hash",
                file.display()
            );
        }
        match outcome {
            Ok(()) => accepted += 1,
            Err(_) => rejected += 1,
        }
        if outcome.is_err() != c.want_err {
            wrong.push(format!(
                "{} ({}): wantErr {} but got {:?}",
                file.display(),
                c.desc,
                c.want_err,
                outcome
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        accepted >= 5 && rejected >= 50,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn every_consistency_vector_is_accepted_or_rejected_as_it_says() {
    let dir = common::vectors_dir().join("rfc6962/consistency");
    let files = json_files(&dir);
    assert!(
        files.len() >= 60,
        "only {} consistency vectors under {}",
        files.len(),
        dir.display()
    );
    let (mut accepted, mut rejected) = (0, 0);
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read vector");
        let c: ConsistencyCase = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not a consistency vector: {e}", file.display()));
        let (root1, root2) = (root_digest(&c.root1), root_digest(&c.root2));
        let outcome = match proof_digests(&c.proof) {
            None => Err("malformed proof".to_string()),
            Some(proof) => verify_consistency(c.size1, &root1, c.size2, &root2, &proof),
        };
        match outcome {
            Ok(()) => accepted += 1,
            Err(_) => rejected += 1,
        }
        if outcome.is_err() != c.want_err {
            wrong.push(format!(
                "{} ({}): wantErr {} but got {:?}",
                file.display(),
                c.desc,
                c.want_err,
                outcome
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        accepted >= 5 && rejected >= 50,
        "{accepted} accepted, {rejected} rejected"
    );
}

/// The stored-subtree map of the tree over the vectors' eight leaves, as the log keeps it.
fn vector_tree() -> HashMap<NodeId, Digest> {
    let mut f = Frontier::new();
    let mut nodes = HashMap::new();
    for leaf in leaves() {
        nodes.extend(f.push(leaf_hash(&leaf)));
    }
    nodes
}

fn b64_all(ds: &[Digest]) -> Vec<String> {
    ds.iter().map(|d| B64.encode(d.0)).collect()
}

/// ICE does not only accept the vectors' good proofs: it produces exactly the same proofs and
/// roots from its stored subtrees.
#[test]
fn ice_builds_the_same_proofs_as_the_vectors() {
    let base = common::vectors_dir().join("rfc6962");
    let nodes = vector_tree();
    let mut src = |id: NodeId| nodes.get(&id).copied().ok_or_else(|| format!("{id:?}"));
    let mut checked = 0;
    for file in json_files(&base.join("inclusion")) {
        let c: InclusionCase =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("parse");
        if c.want_err || file.parent().is_some_and(|p| p.ends_with("single-entry")) {
            continue;
        }
        assert_eq!(
            root_at(&mut src, c.tree_size).expect("root").0.to_vec(),
            b64(&c.root),
            "{}: root",
            file.display()
        );
        let proof = hashes_of(&mut src, &inclusion_ranges(c.leaf_idx, c.tree_size)).expect("proof");
        assert_eq!(
            b64_all(&proof),
            c.proof.clone().unwrap_or_default(),
            "{}: inclusion proof",
            file.display()
        );
        checked += 1;
    }
    for file in json_files(&base.join("consistency")) {
        let c: ConsistencyCase =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("parse");
        // `additional/` holds edge cases over made-up roots, not proofs over the eight leaves.
        if c.want_err || file.parent().is_some_and(|p| p.ends_with("additional")) {
            continue;
        }
        assert_eq!(
            root_at(&mut src, c.size1).expect("root").0.to_vec(),
            b64(&c.root1)
        );
        assert_eq!(
            root_at(&mut src, c.size2).expect("root").0.to_vec(),
            b64(&c.root2)
        );
        let proof = hashes_of(&mut src, &consistency_ranges(c.size1, c.size2)).expect("proof");
        assert_eq!(
            b64_all(&proof),
            c.proof.clone().unwrap_or_default(),
            "{}: consistency proof",
            file.display()
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} good proofs compared");
}
