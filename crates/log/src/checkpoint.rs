//! Signed checkpoints: the tree head in the C2SP `tlog-checkpoint` format, signed as a C2SP
//! `signed-note` with Ed25519.
//!
//! ```text
//! <origin>\n<tree size>\n<base64 root hash>\n
//! \n
//! — <key name> <base64(key id (4 bytes) || Ed25519 signature)>\n
//! ```
//!
//! The key id is the first four bytes of `SHA-256(key name || 0x0A || 0x01 || public key)`; a
//! verifier key is shared as `<name>+<hex key id>+<base64(0x01 || public key)>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use ice_kernel::Digest;

/// Ed25519's signature-type byte in signed notes.
const ALG_ED25519: u8 = 0x01;
/// The signature line prefix: an em dash and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Largest note ICE will parse.
const MAX_NOTE_BYTES: usize = 64 * 1024;
/// Most signature lines ICE will look at in one note.
const MAX_SIGNATURES: usize = 100;

/// What is wrong with a key, note or checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// A key string is malformed.
    #[error("malformed key: {0}")]
    BadKey(String),
    /// A note is malformed.
    #[error("malformed signed note: {0}")]
    BadNote(String),
    /// No signature in the note is by the verifier's key.
    #[error("the note has no signature by key {0}")]
    NoSignature(String),
    /// A signature by the verifier's key does not verify.
    #[error(
        "the signature by key {0} does not verify: the note was altered or signed by another key"
    )]
    BadSignature(String),
    /// The note's text is not a checkpoint.
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(String),
}

fn check_name(name: &str) -> Result<(), CheckpointError> {
    if name.is_empty()
        || name.len() > 256
        || name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
    {
        return Err(CheckpointError::BadKey(format!(
            "key name {name:?} must be 1 to 256 characters with no spaces or '+'"
        )));
    }
    Ok(())
}

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut data = Vec::with_capacity(name.len() + 34);
    data.extend_from_slice(name.as_bytes());
    data.push(b'\n');
    data.push(ALG_ED25519);
    data.extend_from_slice(public.as_bytes());
    let d = Digest::of(&data);
    [d.0[0], d.0[1], d.0[2], d.0[3]]
}

/// A key that signs checkpoints.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl NoteSigner {
    /// A new key from the operating system's randomness.
    pub fn generate(name: &str) -> Result<NoteSigner, CheckpointError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| CheckpointError::BadKey(format!("no randomness: {e}")))?;
        NoteSigner::from_seed(name, seed)
    }

    /// The key with this 32-byte seed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<NoteSigner, CheckpointError> {
        check_name(name)?;
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, &key.verifying_key());
        Ok(NoteSigner {
            name: name.to_string(),
            key,
            id,
        })
    }

    /// Parse `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`.
    pub fn parse(s: &str) -> Result<NoteSigner, CheckpointError> {
        let s = s.trim();
        let rest = s.strip_prefix("PRIVATE+KEY+").ok_or_else(|| {
            CheckpointError::BadKey("a signer key starts with PRIVATE+KEY+".into())
        })?;
        let (name, id_hex, b64) = split3(rest)?;
        let seed = ed25519_key_bytes(b64, "signer")?;
        let signer = NoteSigner::from_seed(name, seed)?;
        if hex::encode(signer.id) != id_hex {
            return Err(CheckpointError::BadKey(
                "signer key id does not match its name and key".into(),
            ));
        }
        Ok(signer)
    }

    /// The signer key string (secret: keep it private).
    pub fn to_secret_string(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex::encode(self.id),
            B64.encode(raw)
        )
    }

    /// The matching verifier.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key: self.key.verifying_key(),
            id: self.id,
        }
    }

    /// The key name (also the checkpoint origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sign `text` (non-empty, ending in a newline, no blank line) as a note.
    pub fn sign(&self, text: &str) -> Result<String, CheckpointError> {
        check_text(text)?;
        let sig: Signature = self.key.sign(text.as_bytes());
        let mut raw = self.id.to_vec();
        raw.extend_from_slice(&sig.to_bytes());
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            B64.encode(raw)
        ))
    }
}

/// The 32 key bytes of `base64(0x01 || key)`, the signed-note encoding of an Ed25519 key.
fn ed25519_key_bytes(b64: &str, which: &str) -> Result<[u8; 32], CheckpointError> {
    let raw = B64
        .decode(b64)
        .map_err(|e| CheckpointError::BadKey(format!("{which} key base64: {e}")))?;
    match raw.split_first() {
        Some((&ALG_ED25519, key)) if key.len() == 32 => key
            .try_into()
            .map_err(|_| CheckpointError::BadKey(format!("{which} key length"))),
        _ => Err(CheckpointError::BadKey(format!(
            "{which} key is not an Ed25519 key (0x01 + 32 bytes)"
        ))),
    }
}

fn split3(s: &str) -> Result<(&str, &str, &str), CheckpointError> {
    let mut it = s.splitn(3, '+');
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) if !a.is_empty() && b.len() == 8 => Ok((a, b, c)),
        _ => Err(CheckpointError::BadKey(
            "expected <name>+<8 hex key id>+<base64 key>".into(),
        )),
    }
}

fn check_text(text: &str) -> Result<(), CheckpointError> {
    if text.is_empty() || !text.ends_with('\n') {
        return Err(CheckpointError::BadNote(
            "text must be non-empty and end with a newline".into(),
        ));
    }
    if text.contains("\n\n") {
        return Err(CheckpointError::BadNote(
            "text must not contain a blank line".into(),
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(CheckpointError::BadNote(
            "text must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// A public key that checks checkpoint signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key: VerifyingKey,
    id: [u8; 4],
}

impl NoteVerifier {
    /// Parse `<name>+<hex key id>+<base64(0x01 || public key)>`.
    pub fn parse(s: &str) -> Result<NoteVerifier, CheckpointError> {
        let (name, id_hex, b64) = split3(s.trim())?;
        check_name(name)?;
        let bytes = ed25519_key_bytes(b64, "verifier")?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| {
            CheckpointError::BadKey("verifier key is not a valid Ed25519 point".into())
        })?;
        let id = key_id(name, &key);
        if hex::encode(id) != id_hex {
            return Err(CheckpointError::BadKey(format!(
                "verifier key id {id_hex} does not match its name and key (expected {})",
                hex::encode(id)
            )));
        }
        Ok(NoteVerifier {
            name: name.to_string(),
            key,
            id,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Open a signed note: returns its text if a signature by this key verifies. A failing
    /// signature by this key rejects the note; signatures by other keys are ignored.
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, CheckpointError> {
        if note.len() > MAX_NOTE_BYTES {
            return Err(CheckpointError::BadNote(format!(
                "note is over {MAX_NOTE_BYTES} bytes"
            )));
        }
        let split = note.rfind("\n\n").ok_or_else(|| {
            CheckpointError::BadNote("no blank line before the signatures".into())
        })?;
        let text = &note[..split + 1];
        let sigs = &note[split + 2..];
        check_text(text)?;
        if !sigs.ends_with('\n') {
            return Err(CheckpointError::BadNote(
                "signature block must end with a newline".into(),
            ));
        }
        let lines: Vec<&str> = sigs[..sigs.len() - 1].split('\n').collect();
        if lines.len() > MAX_SIGNATURES {
            return Err(CheckpointError::BadNote(format!(
                "more than {MAX_SIGNATURES} signatures"
            )));
        }
        for line in lines {
            let rest = line.strip_prefix(SIG_PREFIX).ok_or_else(|| {
                CheckpointError::BadNote(format!(
                    "signature line {line:?} does not start with an em dash"
                ))
            })?;
            let (name, b64) = rest.split_once(' ').ok_or_else(|| {
                CheckpointError::BadNote(format!("signature line {line:?} has no signature"))
            })?;
            let raw = B64.decode(b64).map_err(|_| {
                CheckpointError::BadNote(format!("signature line {line:?} is not base64"))
            })?;
            if raw.len() < 4 {
                return Err(CheckpointError::BadNote(format!(
                    "signature line {line:?} is too short"
                )));
            }
            if name != self.name || raw[..4] != self.id {
                continue;
            }
            let sig = Signature::from_slice(&raw[4..])
                .map_err(|_| CheckpointError::BadSignature(self.name.clone()))?;
            return self
                .key
                .verify_strict(text.as_bytes(), &sig)
                .map(|_| text)
                .map_err(|_| CheckpointError::BadSignature(self.name.clone()));
        }
        Err(CheckpointError::NoSignature(self.name.clone()))
    }
}

impl std::fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(self.id),
            B64.encode(raw)
        )
    }
}

/// A tree head: the log's origin, its size and its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity (the signing key's name).
    pub origin: String,
    /// Number of events covered.
    pub size: u64,
    /// Merkle root over their hashes.
    pub root: Digest,
}

impl Checkpoint {
    /// The note text: `<origin>\n<size>\n<base64 root>\n`.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root.0)
        )
    }

    /// Parse a checkpoint's text (extension lines after the root are allowed and ignored).
    pub fn parse_text(text: &str) -> Result<Checkpoint, CheckpointError> {
        let bad = |m: &str| CheckpointError::BadCheckpoint(m.to_string());
        let mut lines = text.split('\n');
        let origin = lines
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no origin line"))?;
        let size_s = lines.next().ok_or_else(|| bad("no tree size line"))?;
        if size_s.is_empty()
            || !size_s.bytes().all(|b| b.is_ascii_digit())
            || (size_s.len() > 1 && size_s.starts_with('0'))
        {
            return Err(bad("tree size is not a decimal number"));
        }
        let size: u64 = size_s.parse().map_err(|_| bad("tree size out of range"))?;
        let root_s = lines.next().ok_or_else(|| bad("no root hash line"))?;
        let raw = B64
            .decode(root_s)
            .map_err(|_| bad("root hash is not base64"))?;
        let root: [u8; 32] = raw
            .try_into()
            .map_err(|_| bad("root hash is not 32 bytes"))?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root: Digest(root),
        })
    }

    /// Sign this checkpoint.
    pub fn sign(&self, signer: &NoteSigner) -> Result<String, CheckpointError> {
        signer.sign(&self.text())
    }

    /// Open a signed checkpoint note with `verifier`; its origin must be the key's name.
    pub fn open(note: &str, verifier: &NoteVerifier) -> Result<Checkpoint, CheckpointError> {
        let text = verifier.open(note)?;
        let cp = Checkpoint::parse_text(text)?;
        if cp.origin != verifier.name() {
            return Err(CheckpointError::BadCheckpoint(format!(
                "origin {:?} is not the verifier key's name {:?}",
                cp.origin,
                verifier.name()
            )));
        }
        Ok(cp)
    }

    /// Read a checkpoint note without checking its signature (to report what a note claims).
    pub fn parse_unverified(note: &str) -> Result<Checkpoint, CheckpointError> {
        let end = note.find("\n\n").map(|i| i + 1).unwrap_or(note.len());
        Checkpoint::parse_text(&note[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example note and key of the Go `sumdb/note` documentation and the C2SP spec.
    #[test]
    fn opens_the_published_example_note() {
        let v = NoteVerifier::parse(
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        )
        .unwrap();
        let note = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
        let text = v.open(note).unwrap();
        assert!(text.starts_with("If you think"));
        let tampered = note.replace("answer", "Answer");
        assert_eq!(
            v.open(&tampered),
            Err(CheckpointError::BadSignature("PeterNeumann".into()))
        );
    }

    #[test]
    fn signed_checkpoint_round_trips_and_rejects_other_keys() {
        let s = NoteSigner::from_seed("ice.test/log", [7u8; 32]).unwrap();
        let cp = Checkpoint {
            origin: "ice.test/log".into(),
            size: 42,
            root: Digest([9u8; 32]),
        };
        let note = cp.sign(&s).unwrap();
        assert_eq!(Checkpoint::open(&note, &s.verifier()).unwrap(), cp);
        let v2 = NoteVerifier::parse(&s.verifier().to_string()).unwrap();
        assert_eq!(v2, s.verifier());
        let s2 = NoteSigner::parse(&s.to_secret_string()).unwrap();
        assert_eq!(s2.verifier(), s.verifier());
        let other = NoteSigner::from_seed("ice.test/log", [8u8; 32]).unwrap();
        assert!(matches!(
            Checkpoint::open(&note, &other.verifier()),
            Err(CheckpointError::NoSignature(_))
        ));
        let forged = note.replace("\n42\n", "\n43\n");
        assert!(matches!(
            Checkpoint::open(&forged, &s.verifier()),
            Err(CheckpointError::BadSignature(_))
        ));
    }
}
