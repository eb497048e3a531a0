//! Client-side encryption, object names and block checksums.
//!
//! Everything that leaves the host is either plaintext protected by BLAKE3
//! hashes (a remote without a key) or sealed with XChaCha20-Poly1305 (a
//! remote with a key file). From the 32-byte master key in the key file,
//! BLAKE3's key derivation makes independent keys for encryption, for
//! object names, for block checksums and a public key id.
//!
//! - An object's name is the BLAKE3 hash of its plaintext, keyed with the
//!   name key when encrypted (so a name reveals nothing about the content
//!   without the key). Identical content gets the same name: that is what
//!   makes an interrupted upload resumable and an object never uploaded twice.
//! - An object is sealed with a nonce taken from its name (24 of its 32
//!   bytes) and the object's path as associated data. The same plaintext
//!   always seals to the same bytes (deterministic, SIV-like: distinct
//!   plaintexts get distinct nonces unless 192-bit hashes collide), which
//!   lets a resumed multipart upload check the parts already on the remote by
//!   their MD5. Swapping two objects, or moving one to another volume, fails
//!   authentication.
//! - A manifest is sealed with a random nonce and its own header (format,
//!   key id, volume, backup id) as associated data.
//! - A block checksum is 128 bits of BLAKE3 over the block, keyed with the
//!   checksum key for encrypted objects. The chain's fingerprint seed and
//!   its seeded fingerprints never leave the host.

use std::fmt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};

/// Bytes of a master key.
pub const KEY_LEN: usize = 32;
/// Bytes of the authentication tag appended to every sealed object.
pub const TAG_LEN: usize = 16;
/// Bytes of a manifest's random nonce.
pub const NONCE_LEN: usize = 24;

/// A block checksum: 128 bits of BLAKE3.
pub type Sum = [u8; 16];
/// An object name: 256 bits of BLAKE3 (hex in the object's key).
pub type Name = [u8; 32];

/// The keys derived from one master key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    enc: [u8; 32],
    names: [u8; 32],
    sums: [u8; 32],
    id: [u8; 8],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the public id; never key material.
        f.debug_struct("Key").field("id", &self.id_hex()).finish()
    }
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} must hold 32 random bytes or 64 hex digits (make one with `head -c 32 /dev/urandom > FILE && chmod 600 FILE`)")]
    Format { path: PathBuf },
}

impl Key {
    /// Derive the keys from a master key.
    pub fn from_master(master: &[u8; KEY_LEN]) -> Key {
        let d = |ctx: &str| blake3::derive_key(ctx, master);
        let id_full = d("blocksnap backup v1 2026 key id");
        let mut id = [0u8; 8];
        id.copy_from_slice(&id_full[..8]);
        Key {
            enc: d("blocksnap backup v1 2026 encryption"),
            names: d("blocksnap backup v1 2026 object names"),
            sums: d("blocksnap backup v1 2026 block checksums"),
            id,
        }
    }

    /// Read a key file: 32 raw bytes, or 64 hex digits (surrounding
    /// whitespace allowed). Permissions are checked by the caller.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let master = parse_key(&bytes).ok_or_else(|| KeyError::Format {
            path: path.to_path_buf(),
        })?;
        Ok(Key::from_master(&master))
    }

    /// The public id of the key: recorded in manifests so that a wrong key
    /// file is named as such rather than reported as damage.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.enc).into())
    }
}

fn parse_key(bytes: &[u8]) -> Option<[u8; KEY_LEN]> {
    if bytes.len() == KEY_LEN {
        return bytes.try_into().ok();
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 2 * KEY_LEN {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parse lower- or upper-case hex of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The name of an object holding `plain`.
pub fn object_name(key: Option<&Key>, plain: &[u8]) -> Name {
    match key {
        Some(k) => *blake3::keyed_hash(&k.names, plain).as_bytes(),
        None => *blake3::hash(plain).as_bytes(),
    }
}

/// The checksum of one block.
pub fn block_sum(key: Option<&Key>, block: &[u8]) -> Sum {
    let h = match key {
        Some(k) => blake3::keyed_hash(&k.sums, block),
        None => blake3::hash(block),
    };
    let mut s = [0u8; 16];
    s.copy_from_slice(&h.as_bytes()[..16]);
    s
}

/// Why a sealed object or manifest did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("it is shorter than its authentication tag")]
    Short,
    #[error("authentication failed: the bytes were changed, or the object was swapped or moved")]
    Auth,
    #[error("its content does not match its name (damaged or swapped)")]
    NameMismatch,
}

fn object_aad(path: &str) -> Vec<u8> {
    let mut aad = b"blocksnap object v1\0".to_vec();
    aad.extend_from_slice(path.as_bytes());
    aad
}

/// Seal the plaintext of object `name`, stored at `path` (relative to the
/// remote's prefix), in place: the buffer becomes ciphertext and tag.
pub fn seal_object(key: &Key, name: &Name, path: &str, buf: &mut Vec<u8>) {
    let nonce = XNonce::from_slice(&name[..NONCE_LEN]);
    let tag = key
        .cipher()
        .encrypt_in_place_detached(nonce, &object_aad(path), buf)
        .expect("objects are far below the AEAD's size limit");
    buf.extend_from_slice(&tag);
}

/// Open a stored object in place, checking that it is the object `name`
/// at `path`. Without a key, the content hash must equal the name.
pub fn open_object(
    key: Option<&Key>,
    name: &Name,
    path: &str,
    buf: &mut Vec<u8>,
) -> Result<(), OpenError> {
    if let Some(key) = key {
        if buf.len() < TAG_LEN {
            return Err(OpenError::Short);
        }
        let at = buf.len() - TAG_LEN;
        let tag = chacha20poly1305::Tag::clone_from_slice(&buf[at..]);
        buf.truncate(at);
        let nonce = XNonce::from_slice(&name[..NONCE_LEN]);
        key.cipher()
            .decrypt_in_place_detached(nonce, &object_aad(path), buf, &tag)
            .map_err(|_| OpenError::Auth)?;
    }
    // Also with a key: the name is a keyed hash of the plaintext, so this
    // catches an object sealed under its own name from other content.
    if object_name(key, buf) != *name {
        return Err(OpenError::NameMismatch);
    }
    Ok(())
}

/// Seal a manifest body: returns nonce, ciphertext, tag.
pub fn seal_manifest(key: &Key, header: &[u8], body: &[u8]) -> Vec<u8> {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let nonce = XNonce::from_slice(&nonce_bytes);
    let mut buf = body.to_vec();
    let tag = key
        .cipher()
        .encrypt_in_place_detached(nonce, header, &mut buf)
        .expect("manifests are far below the AEAD's size limit");
    let mut out = Vec::with_capacity(NONCE_LEN + buf.len() + TAG_LEN);
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    out
}

/// Open a sealed manifest body (nonce, ciphertext, tag).
pub fn open_manifest(key: &Key, header: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError::Short);
    }
    let nonce = XNonce::from_slice(&sealed[..NONCE_LEN]);
    let at = sealed.len() - TAG_LEN;
    let tag = chacha20poly1305::Tag::clone_from_slice(&sealed[at..]);
    let mut buf = sealed[NONCE_LEN..at].to_vec();
    key.cipher()
        .decrypt_in_place_detached(nonce, header, &mut buf, &tag)
        .map_err(|_| OpenError::Auth)?;
    Ok(buf)
}

/// A plain (unencrypted) manifest's integrity hash.
pub fn manifest_hash(header: &[u8], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(body);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_master(&[b; 32])
    }

    #[test]
    fn objects_seal_deterministically_and_refuse_swaps() {
        let k = key(7);
        let plain = b"some block bytes".repeat(300);
        let name = object_name(Some(&k), &plain);
        assert_ne!(name, object_name(None, &plain), "keyed names differ");
        let mut a = plain.clone();
        seal_object(&k, &name, "vol/objects/x", &mut a);
        let mut b = plain.clone();
        seal_object(&k, &name, "vol/objects/x", &mut b);
        assert_eq!(a, b, "sealing is deterministic");
        assert!(
            !a.windows(16).any(|w| w == &plain[..16]),
            "plaintext visible"
        );
        let mut ok = a.clone();
        open_object(Some(&k), &name, "vol/objects/x", &mut ok).unwrap();
        assert_eq!(ok, plain);
        // Another path (another volume, or another name's slot): refused.
        let mut moved = a.clone();
        assert_eq!(
            open_object(Some(&k), &name, "other/objects/x", &mut moved),
            Err(OpenError::Auth)
        );
        // Another object's bytes under this name: refused.
        let other = b"other".repeat(100);
        let oname = object_name(Some(&k), &other);
        let mut swapped = other.clone();
        seal_object(&k, &oname, "vol/objects/x", &mut swapped);
        assert_eq!(
            open_object(Some(&k), &name, "vol/objects/x", &mut swapped),
            Err(OpenError::Auth)
        );
        // A flipped bit: refused.
        let mut flipped = a.clone();
        flipped[10] ^= 1;
        assert_eq!(
            open_object(Some(&k), &name, "vol/objects/x", &mut flipped),
            Err(OpenError::Auth)
        );
        // The wrong key: refused.
        let mut wrong = a.clone();
        assert_eq!(
            open_object(Some(&key(8)), &name, "vol/objects/x", &mut wrong),
            Err(OpenError::Auth)
        );
    }

    #[test]
    fn plain_objects_are_checked_against_their_name() {
        let plain = vec![3u8; 5000];
        let name = object_name(None, &plain);
        let mut ok = plain.clone();
        open_object(None, &name, "p", &mut ok).unwrap();
        let mut bad = plain.clone();
        bad[4999] = 4;
        assert_eq!(
            open_object(None, &name, "p", &mut bad),
            Err(OpenError::NameMismatch)
        );
    }

    #[test]
    fn manifests_bind_their_header() {
        let k = key(1);
        let sealed = seal_manifest(&k, b"header", b"body");
        assert_eq!(open_manifest(&k, b"header", &sealed).unwrap(), b"body");
        assert_eq!(open_manifest(&k, b"headex", &sealed), Err(OpenError::Auth));
        assert_eq!(
            open_manifest(&key(2), b"header", &sealed),
            Err(OpenError::Auth)
        );
        assert_ne!(
            seal_manifest(&k, b"h", b"b"),
            seal_manifest(&k, b"h", b"b"),
            "random nonces"
        );
    }

    #[test]
    fn key_files_parse_raw_or_hex_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [9u8; 32]).unwrap();
        let hexf = dir.path().join("hex");
        std::fs::write(&hexf, format!("{}\n", "09".repeat(32))).unwrap();
        assert_eq!(Key::load(&raw).unwrap(), Key::load(&hexf).unwrap());
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "too short").unwrap();
        assert!(matches!(Key::load(&bad), Err(KeyError::Format { .. })));
        let k = Key::load(&raw).unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(&k.id_hex()) && !dbg.contains("enc"), "{dbg}");
        assert_ne!(key(1).id(), key(2).id());
    }

    #[test]
    fn checksums_depend_on_the_key() {
        let b = [5u8; 4096];
        assert_eq!(block_sum(None, &b), block_sum(None, &b));
        assert_ne!(block_sum(None, &b), block_sum(Some(&key(1)), &b));
        assert_ne!(block_sum(Some(&key(1)), &b), block_sum(Some(&key(2)), &b));
        assert_eq!(unhex::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
