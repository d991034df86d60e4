//! The RFC 6962 / RFC 9162 Merkle tree over event hashes, in log order.
//!
//! Leaf `i` is `SHA-256(0x00 || hash of the event at log_seq i)`; an interior node is
//! `SHA-256(0x01 || left || right)`. The log stores the hash of every *perfect* subtree (aligned,
//! power-of-two sized) once it is complete; any tree size's root and any proof is then a
//! combination of O(log n) stored nodes, computed here by pure functions over a [`NodeSource`].
//!
//! Proofs are verified with `ct-merkle` (an independent implementation of the same RFC), so a
//! proof this module produces is checked by code that did not produce it.

use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use ice_kernel::Digest;
use sha2::{Digest as _, Sha256};

/// A perfect subtree: `2^level` leaves starting at leaf `index << level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// Height above the leaves (0 = a leaf).
    pub level: u8,
    /// Position among the nodes of that level.
    pub index: u64,
}

impl NodeId {
    /// Index of the last leaf the node covers: the leaf whose append completed it.
    pub fn last_leaf(&self) -> u64 {
        // Total for any id, even one read from a damaged store (an index no tree of 2^64 leaves
        // has): past the end of such a tree it is u64::MAX.
        let end = ((u128::from(self.index) + 1) << self.level.min(64)) - 1;
        u64::try_from(end).unwrap_or(u64::MAX)
    }
}

/// A stored node's bytes as a hash: `None` unless exactly 32 bytes (a damaged store).
pub fn stored_hash(bytes: &[u8]) -> Option<Digest> {
    bytes.try_into().ok().map(Digest)
}

/// Hash of leaf data (here: an event hash).
pub fn leaf_hash(data: &[u8]) -> Digest {
    // An event's leaf is 0x00 and its 32-byte hash: one padded block, built in place.
    if let Ok(h) = <&[u8; 32]>::try_from(data) {
        let mut b = [0u8; 64];
        b[1..33].copy_from_slice(h);
        b[33] = 0x80;
        b[56..].copy_from_slice(&(33u64 * 8).to_be_bytes());
        return Digest::of_padded(&[b]);
    }
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    Digest(h.finalize().into())
}

/// Hash of an interior node: 0x01, left, right (65 bytes: two padded blocks, built in place).
pub fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut b = [[0u8; 64]; 2];
    let flat = b.as_flattened_mut();
    flat[0] = 1;
    flat[1..33].copy_from_slice(&left.0);
    flat[33..65].copy_from_slice(&right.0);
    flat[65] = 0x80;
    flat[120..].copy_from_slice(&(65u64 * 8).to_be_bytes());
    Digest::of_padded(&b)
}

/// Root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Digest {
    Digest::of(&[])
}

/// The right edge of a growing tree: one perfect subtree root per set bit of its size. Appending
/// a leaf reports the nodes it completes, which is how the log stores them incrementally and
/// how verification recomputes them while streaming, in O(log n) memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Perfect subtree roots, largest (leftmost) first, with their levels.
    stack: Vec<(u8, Digest)>,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// Rebuild the frontier of a tree of `size` leaves from its stored perfect subtrees.
    pub fn from_nodes(
        size: u64,
        mut get: impl FnMut(NodeId) -> Option<Digest>,
    ) -> Option<Frontier> {
        let mut stack = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size & (1u64 << level) != 0 {
                let id = NodeId {
                    level,
                    index: start >> level,
                };
                stack.push((level, get(id)?));
                start += 1u64 << level;
            }
        }
        Some(Frontier { size, stack })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Append a leaf hash; returns every node completed by it, the leaf itself first.
    pub fn push(&mut self, leaf: Digest) -> Vec<(NodeId, Digest)> {
        let mut done = Vec::with_capacity(2);
        self.push_each(leaf, |id, h| done.push((id, h)));
        done
    }

    /// Append a leaf hash and hand each node it completes to `done`, the leaf itself first
    /// (what [`Frontier::push`] returns, without a vector per leaf).
    pub fn push_each(&mut self, leaf: Digest, mut done: impl FnMut(NodeId, Digest)) {
        let index = self.size;
        done(NodeId { level: 0, index }, leaf);
        let mut cur = (0u8, leaf);
        while let Some(&(lvl, left)) = self.stack.last() {
            if lvl != cur.0 {
                break;
            }
            self.stack.pop();
            let parent = node_hash(&left, &cur.1);
            cur = (lvl + 1, parent);
            done(
                NodeId {
                    level: cur.0,
                    index: index >> cur.0,
                },
                parent,
            );
        }
        self.stack.push(cur);
        self.size += 1;
    }

    /// Root hash of the tree so far.
    pub fn root(&self) -> Digest {
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// Largest power of two strictly smaller than `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The perfect subtrees whose right fold is `MTH(D[lo:hi])`, left to right.
///
/// `lo` must be aligned as RFC 6962's recursion leaves it (true for every range a proof uses).
pub fn range_nodes(lo: u64, hi: u64) -> Vec<NodeId> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo, hi);
    while lo < hi {
        let n = hi - lo;
        let k = if n.is_power_of_two() { n } else { split(n) };
        let level = k.trailing_zeros() as u8;
        out.push(NodeId {
            level,
            index: lo >> level,
        });
        lo += k;
    }
    out
}

/// A source of stored perfect-subtree hashes.
pub trait NodeSource {
    /// The hash of a stored node, or an error naming what is missing.
    fn node(&mut self, id: NodeId) -> Result<Digest, String>;
}

impl<F: FnMut(NodeId) -> Result<Digest, String>> NodeSource for F {
    fn node(&mut self, id: NodeId) -> Result<Digest, String> {
        self(id)
    }
}

/// `MTH(D[lo:hi])` from stored nodes.
pub fn range_hash(src: &mut dyn NodeSource, lo: u64, hi: u64) -> Result<Digest, String> {
    if lo >= hi {
        return Ok(empty_root());
    }
    let nodes = range_nodes(lo, hi);
    let mut hashes = Vec::with_capacity(nodes.len());
    for id in nodes {
        hashes.push(src.node(id)?);
    }
    let mut acc = hashes.pop().unwrap_or_else(empty_root);
    while let Some(left) = hashes.pop() {
        acc = node_hash(&left, &acc);
    }
    Ok(acc)
}

/// Root of the tree of the first `size` leaves.
pub fn root_at(src: &mut dyn NodeSource, size: u64) -> Result<Digest, String> {
    range_hash(src, 0, size)
}

/// The ranges whose hashes form the inclusion proof of leaf `m` in a tree of `n` leaves
/// (RFC 9162 §2.1.3.1), in proof order.
pub fn inclusion_ranges(m: u64, n: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut lo, mut hi) = (0u64, n);
    // Collected top-down; the proof lists them bottom-up.
    while hi - lo > 1 {
        let k = split(hi - lo);
        if m < lo + k {
            out.push((lo + k, hi));
            hi = lo + k;
        } else {
            out.push((lo, lo + k));
            lo += k;
        }
    }
    out.reverse();
    out
}

/// The ranges whose hashes form the consistency proof from `m` to `n` leaves
/// (RFC 9162 §2.1.4.1), in proof order. Requires `0 < m <= n`.
pub fn consistency_ranges(m: u64, n: u64) -> Vec<(u64, u64)> {
    fn sub(m: u64, lo: u64, hi: u64, complete: bool, out: &mut Vec<(u64, u64)>) {
        let n = hi - lo;
        if m == n {
            if !complete {
                out.push((lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, lo, lo + k, complete, out);
            out.push((lo + k, hi));
        } else {
            sub(m - k, lo + k, hi, false, out);
            out.push((lo, lo + k));
        }
    }
    let mut out = Vec::new();
    if m > 0 && m < n {
        sub(m, 0, n, true, &mut out);
    }
    out
}

/// Hashes of the given ranges.
pub fn hashes_of(src: &mut dyn NodeSource, ranges: &[(u64, u64)]) -> Result<Vec<Digest>, String> {
    ranges
        .iter()
        .map(|&(lo, hi)| range_hash(src, lo, hi))
        .collect()
}

fn to_output(d: &Digest) -> ct_merkle::digest::Output<Sha256> {
    d.0.into()
}

/// Check that `leaf_data` (an event hash) is leaf `index` of the tree with `root` and `size`.
pub fn verify_inclusion(
    leaf_data: &[u8],
    index: u64,
    size: u64,
    root: &Digest,
    proof: &[Digest],
) -> Result<(), String> {
    let root = RootHash::<Sha256>::new(to_output(root), size);
    let outs: Vec<_> = proof.iter().map(to_output).collect();
    let proof = InclusionProof::<Sha256>::from_digests(outs.iter());
    root.verify_inclusion(&leaf_data, index, &proof)
        .map_err(|e| format!("inclusion proof does not verify: {e}"))
}

/// Check that the tree (`size1`, `root1`) is a prefix of (`size2`, `root2`).
pub fn verify_consistency(
    size1: u64,
    root1: &Digest,
    size2: u64,
    root2: &Digest,
    proof: &[Digest],
) -> Result<(), String> {
    if size1 > size2 {
        return Err(format!(
            "the old tree ({size1} leaves) is larger than the new one ({size2})"
        ));
    }
    // RFC 9162 §2.1.4 defines consistency proofs for 0 < m only: a proof from the empty tree
    // proves nothing, and the RFC 6962 test vectors require it to be rejected.
    if size1 == 0 {
        return Err("a consistency proof from the empty tree (size 0) is meaningless".into());
    }
    if size1 == size2 {
        return if proof.is_empty() && root1 == root2 {
            Ok(())
        } else {
            Err("consistency proof between equal sizes must be empty and the roots equal".into())
        };
    }
    let old = RootHash::<Sha256>::new(to_output(root1), size1);
    let new = RootHash::<Sha256>::new(to_output(root2), size2);
    let outs: Vec<_> = proof.iter().map(to_output).collect();
    let proof = ConsistencyProof::<Sha256>::from_digests(outs.iter());
    new.verify_consistency(&old, &proof)
        .map_err(|e| format!("consistency proof does not verify: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The in-place leaf and node hashes are RFC 6962's, as a general SHA-256 hasher computes
    /// them.
    #[test]
    fn leaf_and_node_hashes_built_in_place_are_the_hashers() {
        let general = |parts: &[&[u8]]| {
            let mut h = Sha256::new();
            for p in parts {
                h.update(p);
            }
            Digest(h.finalize().into())
        };
        for i in 0..200u32 {
            let a = Digest::of(&i.to_be_bytes());
            let b = Digest::of(&(i + 1000).to_be_bytes());
            assert_eq!(leaf_hash(&a.0), general(&[&[0], &a.0]));
            assert_eq!(node_hash(&a, &b), general(&[&[1], &a.0, &b.0]));
            let short = &a.0[..(i % 32) as usize];
            assert_eq!(leaf_hash(short), general(&[&[0], short]));
        }
    }

    fn tree(n: u64) -> (Frontier, HashMap<NodeId, Digest>, Vec<Vec<u8>>) {
        let mut f = Frontier::new();
        let mut nodes = HashMap::new();
        let mut leaves = Vec::new();
        for i in 0..n {
            let data = format!("leaf {i}").into_bytes();
            for (id, h) in f.push(leaf_hash(&data)) {
                nodes.insert(id, h);
            }
            leaves.push(data);
        }
        (f, nodes, leaves)
    }

    /// Differential check against ct-merkle's in-memory tree: same roots at every size.
    #[test]
    fn roots_match_ct_merkle_at_every_size() {
        let mut mem = ct_merkle::mem_backed_tree::MemoryBackedTree::<Sha256, Vec<u8>>::new();
        let (_, nodes, leaves) = tree(70);
        let mut src = |id: NodeId| nodes.get(&id).copied().ok_or_else(|| format!("{id:?}"));
        for (i, l) in leaves.iter().enumerate() {
            mem.push(l.clone());
            let want: [u8; 32] = mem.root().as_bytes().as_slice().try_into().unwrap();
            assert_eq!(
                root_at(&mut src, i as u64 + 1).unwrap(),
                Digest(want),
                "size {}",
                i + 1
            );
        }
    }

    #[test]
    fn every_inclusion_and_consistency_proof_verifies() {
        let (_, nodes, leaves) = tree(37);
        let mut src = |id: NodeId| nodes.get(&id).copied().ok_or_else(|| format!("{id:?}"));
        for n in 1..=37u64 {
            let root = root_at(&mut src, n).unwrap();
            for m in 0..n {
                let proof = hashes_of(&mut src, &inclusion_ranges(m, n)).unwrap();
                // ct-merkle hashes the leaf data itself.
                verify_inclusion(&leaves[m as usize], m, n, &root, &proof).unwrap();
                // The same proof must not verify another leaf.
                assert!(verify_inclusion(b"another leaf", m, n, &root, &proof).is_err());
                if m >= 1 {
                    let r1 = root_at(&mut src, m).unwrap();
                    let p = hashes_of(&mut src, &consistency_ranges(m, n)).unwrap();
                    verify_consistency(m, &r1, n, &root, &p).unwrap();
                }
            }
        }
    }

    #[test]
    fn frontier_rebuilt_from_nodes_continues_identically() {
        let (f, nodes, _) = tree(45);
        let g = Frontier::from_nodes(45, |id| nodes.get(&id).copied()).unwrap();
        assert_eq!(f, g);
    }
}
