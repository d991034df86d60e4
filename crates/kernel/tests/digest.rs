//! `Digest::of` and `Digest::of_two` against the `sha2` crate's own SHA-256: every pair of
//! lengths around the block and padding boundaries, random messages, and FIPS 180-4's examples.

use ice_kernel::{Digest, HashedBody};
use proptest::prelude::*;
use sha2::{Digest as _, Sha256};

fn sha2(m: &[u8]) -> Digest {
    Digest(Sha256::digest(m).into())
}

fn message(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn fips_examples() {
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let two_blocks = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
    let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    assert_eq!(Digest::of(b"abc").to_hex(), abc);
    assert_eq!(Digest::of(b"").to_hex(), empty);
    let [a, b] = Digest::of_two(b"abc", b"");
    assert_eq!((a.to_hex().as_str(), b.to_hex().as_str()), (abc, empty));
    let [a, b] = Digest::of_two(long, b"abc");
    assert_eq!(
        (a.to_hex().as_str(), b.to_hex().as_str()),
        (two_blocks, abc)
    );
}

/// Every length from 0 to 300 against every length around the boundaries (55, 56, 63, 64, 119,
/// 120 bytes decide whether the padding takes one block or two): both of each pair, either way
/// round, so one message runs out of blocks first, then the other.
#[test]
fn every_length_pair_agrees_with_sha2() {
    let edges = [
        0usize, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 183, 184, 191, 192, 490, 1000,
    ];
    for la in 0..=300 {
        let a = message(la, 7);
        let want_a = sha2(&a);
        assert_eq!(Digest::of(&a), want_a, "Digest::of, length {la}");
        for &lb in &edges {
            let b = message(lb, 91);
            let want_b = sha2(&b);
            assert_eq!(
                Digest::of_two(&a, &b),
                [want_a, want_b],
                "lengths {la} and {lb}"
            );
            assert_eq!(
                Digest::of_two(&b, &a),
                [want_b, want_a],
                "lengths {lb} and {la}"
            );
        }
    }
}

#[test]
fn the_same_message_twice() {
    let m = message(490, 3);
    assert_eq!(Digest::of_two(&m, &m), [sha2(&m), sha2(&m)]);
}

#[test]
fn a_hashed_body_carries_its_own_digest() {
    let (a, b) = (message(333, 1), message(64, 2));
    let [ha, hb] = HashedBody::two(&a, &b);
    assert_eq!((ha.body(), ha.digest()), (&a[..], sha2(&a)));
    assert_eq!((hb.body(), hb.digest()), (&b[..], sha2(&b)));
    assert_eq!(HashedBody::new(&a).digest(), sha2(&a));
}

proptest! {
    #[test]
    fn random_pairs_agree_with_sha2(
        a in proptest::collection::vec(any::<u8>(), 0..3000),
        b in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        prop_assert_eq!(Digest::of_two(&a, &b), [sha2(&a), sha2(&b)]);
        prop_assert_eq!(Digest::of(&a), sha2(&a));
    }

    /// A change to any one byte of either message changes that message's digest alone.
    #[test]
    fn one_changed_byte_changes_its_digest(
        a in proptest::collection::vec(any::<u8>(), 1..700),
        b in proptest::collection::vec(any::<u8>(), 1..700),
        at in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let [da, db] = Digest::of_two(&a, &b);
        let mut a2 = a.clone();
        let i = at.index(a2.len());
        a2[i] ^= flip;
        let [da2, db2] = Digest::of_two(&a2, &b);
        prop_assert_ne!(da, da2);
        prop_assert_eq!(db, db2);
        prop_assert_eq!(da2, sha2(&a2));
    }
}
