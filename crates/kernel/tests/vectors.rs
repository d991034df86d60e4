//! External test vectors: the RFC 8785 (JSON Canonicalization Scheme) reference data in
//! `<repo>/../shared/vectors/rfc8785`. ICE hashes canonical JSON, so its encoder must agree
//! byte for byte with other implementations, not only with itself.

use std::fs;
use std::path::PathBuf;

use ice_kernel::canonical::canonicalize_text;

/// `<repo>/../shared/vectors`: the repository is checked out with `shared/` beside it.
fn vectors_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors");
    assert!(
        dir.is_dir(),
        "the shared test vectors are missing: expected them at {} (the repository's parent \
         directory must hold `shared/vectors`); these tests do not skip",
        dir.display()
    );
    dir
}

fn read(path: &PathBuf) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `outhex/X.txt`: the expected bytes as whitespace-separated hex pairs.
fn parse_outhex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|pair| {
            u8::from_str_radix(pair, 16).unwrap_or_else(|e| panic!("bad hex {pair:?}: {e}"))
        })
        .collect()
}

#[test]
fn every_rfc8785_vector_canonicalises_to_its_expected_bytes() {
    let root = vectors_dir().join("rfc8785");
    let inputs = root.join("input");
    let mut names: Vec<String> = fs::read_dir(&inputs)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", inputs.display()))
        .map(|entry| entry.expect("directory entry").file_name())
        .filter_map(|n| n.to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no RFC 8785 vectors in {}",
        inputs.display()
    );

    let mut failures = Vec::new();
    for name in &names {
        let stem = name.trim_end_matches(".json");
        let input = read(&inputs.join(name));
        let expected = read(&root.join("output").join(name));
        let expected_hex = parse_outhex(
            &String::from_utf8(read(&root.join("outhex").join(format!("{stem}.txt"))))
                .expect("outhex is text"),
        );
        assert_eq!(
            expected, expected_hex,
            "{stem}: output/ and outhex/ disagree (damaged vectors)"
        );
        match canonicalize_text(&input) {
            Ok(got) if got == expected => {}
            Ok(got) => failures.push(format!(
                "{stem}:\n  expected {}\n  got      {}",
                String::from_utf8_lossy(&expected),
                String::from_utf8_lossy(&got)
            )),
            Err(e) => failures.push(format!("{stem}: refused: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "canonical encoding differs from RFC 8785 on {} of {} vectors:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

#[test]
fn canonical_encoding_is_idempotent_on_the_rfc8785_vectors() {
    let root = vectors_dir().join("rfc8785");
    for entry in fs::read_dir(root.join("output")).expect("output directory") {
        let path = entry.expect("directory entry").path();
        let expected = read(&path);
        let again = canonicalize_text(&expected)
            .unwrap_or_else(|e| panic!("{}: refused: {e}", path.display()));
        assert_eq!(again, expected, "{} is not a fixed point", path.display());
    }
}

/// Members come out in RFC 8785 order however the map holds them: `serde_json` keeps insertion
/// order when any crate in the build enables `preserve_order`.
#[test]
fn members_are_sorted_whatever_order_they_were_inserted_in() {
    let mut m = serde_json::Map::new();
    for k in ["zeta", "\u{e000}", "alpha", "😂", "Beta", "a\u{0}"] {
        m.insert(k.to_string(), serde_json::Value::from(k.len()));
    }
    let got = ice_kernel::canonical::canonicalize(&serde_json::Value::Object(m)).unwrap();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "{\"Beta\":4,\"a\\u0000\":2,\"alpha\":5,\"zeta\":4,\"😂\":4,\"\u{e000}\":3}"
    );
}
