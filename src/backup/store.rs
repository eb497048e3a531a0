//! The object store a remote is: the few S3 operations backups use, behind
//! a trait so the engine's logic is tested against an in-memory store and
//! runs against S3 (`s3.rs`). Keys are relative to the remote's prefix.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A failed store operation: what, on which key, after how many attempts.
/// Never carries a URL (signed URLs hold the access key id) or credentials.
#[derive(Debug, thiserror::Error)]
#[error("{op} {key} on remote {remote} failed after {attempts} attempt(s)")]
pub struct StoreError {
    pub remote: String,
    pub op: &'static str,
    pub key: String,
    pub attempts: u32,
    #[source]
    pub cause: Box<RequestError>,
}

impl StoreError {
    /// The HTTP status of the last answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match &*self.cause {
            RequestError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Why one request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("the server answered HTTP {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    Transport(String),
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// An unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub key: String,
    pub upload_id: String,
}

/// A part of a multipart upload already on the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u16,
    pub etag: String,
    pub size: u64,
}

/// Whether a put may replace an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    Overwrite,
    /// `If-None-Match: *`: fail with [`Put::Exists`] if the key exists.
    Create,
}

/// The outcome of a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Done,
    Exists,
}

/// The operations backups need from an object store.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The remote's name, for messages.
    fn remote(&self) -> &str;
    /// Read an object; `None` if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Write an object in one request.
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<Put, StoreError>;
    /// Delete an object; deleting a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// The distinct `prefix + x + "/"` under `prefix` (one level of "directories").
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    fn create_multipart(&self, key: &str) -> Result<String, StoreError>;
    /// Upload one part; returns its ETag.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        body: &[u8],
    ) -> Result<String, StoreError>;
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u16, String)],
    ) -> Result<(), StoreError>;
    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError>;
    /// Unfinished multipart uploads of keys starting with `prefix`.
    fn list_multipart(&self, prefix: &str) -> Result<Vec<Upload>, StoreError>;
    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>, StoreError>;
    /// Bytes of request bodies sent so far (uploads, manifests, locks).
    fn bytes_sent(&self) -> u64;
}

/// The quoted hex MD5 S3 uses as the ETag of a single-part object or a part.
pub fn md5_etag(body: &[u8]) -> String {
    use md5::Digest;
    format!("\"{}\"", super::crypto::hex(&md5::Md5::digest(body)))
}

/// An in-memory store with S3's semantics, for unit tests and tools.
#[derive(Debug, Default)]
pub struct MemStore {
    name: String,
    inner: Mutex<MemInner>,
    sent: AtomicU64,
    /// Every put and part upload, by key (for tests that count uploads).
    pub puts: Mutex<Vec<String>>,
}

#[derive(Debug, Default)]
struct MemInner {
    objects: BTreeMap<String, Vec<u8>>,
    uploads: BTreeMap<String, (String, BTreeMap<u16, Vec<u8>>)>,
    next_upload: u64,
}

impl MemStore {
    pub fn new(name: &str) -> MemStore {
        MemStore {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Direct access to the stored objects (tests damage them).
    pub fn with_objects<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Vec<u8>>) -> T) -> T {
        f(&mut self.inner.lock().unwrap().objects)
    }
}

impl Store for MemStore {
    fn remote(&self) -> &str {
        &self.name
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.lock().unwrap().objects.get(key).cloned())
    }
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<Put, StoreError> {
        let mut g = self.inner.lock().unwrap();
        if mode == PutMode::Create && g.objects.contains_key(key) {
            return Ok(Put::Exists);
        }
        self.sent.fetch_add(body.len() as u64, Ordering::Relaxed);
        self.puts.lock().unwrap().push(key.to_string());
        g.objects.insert(key.to_string(), body.to_vec());
        Ok(Put::Done)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.lock().unwrap().objects.remove(key);
        Ok(())
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let g = self.inner.lock().unwrap();
        Ok(g.objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = self
            .list(prefix)?
            .into_iter()
            .filter_map(|o| {
                let rest = &o.key[prefix.len()..];
                rest.find('/').map(|i| format!("{prefix}{}", &rest[..=i]))
            })
            .collect();
        out.dedup();
        Ok(out)
    }
    fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        let mut g = self.inner.lock().unwrap();
        g.next_upload += 1;
        let id = format!("upload-{}", g.next_upload);
        g.uploads
            .insert(id.clone(), (key.to_string(), BTreeMap::new()));
        Ok(id)
    }
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        body: &[u8],
    ) -> Result<String, StoreError> {
        let mut g = self.inner.lock().unwrap();
        let up = g.uploads.get_mut(upload_id).ok_or_else(|| StoreError {
            remote: self.name.clone(),
            op: "upload part of",
            key: key.to_string(),
            attempts: 1,
            cause: Box::new(RequestError::Status {
                status: 404,
                code: "NoSuchUpload".into(),
                message: "no such upload".into(),
            }),
        })?;
        up.1.insert(number, body.to_vec());
        self.sent.fetch_add(body.len() as u64, Ordering::Relaxed);
        self.puts
            .lock()
            .unwrap()
            .push(format!("{key}#part{number}"));
        Ok(md5_etag(body))
    }
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u16, String)],
    ) -> Result<(), StoreError> {
        let mut g = self.inner.lock().unwrap();
        let Some((_, stored)) = g.uploads.remove(upload_id) else {
            return Err(StoreError {
                remote: self.name.clone(),
                op: "complete upload of",
                key: key.to_string(),
                attempts: 1,
                cause: Box::new(RequestError::Status {
                    status: 404,
                    code: "NoSuchUpload".into(),
                    message: "no such upload".into(),
                }),
            });
        };
        let mut body = Vec::new();
        for (n, etag) in parts {
            let p = &stored[n];
            assert_eq!(&md5_etag(p), etag, "part etag");
            body.extend_from_slice(p);
        }
        g.objects.insert(key.to_string(), body);
        Ok(())
    }
    fn abort_multipart(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.inner.lock().unwrap().uploads.remove(upload_id);
        Ok(())
    }
    fn list_multipart(&self, prefix: &str) -> Result<Vec<Upload>, StoreError> {
        let g = self.inner.lock().unwrap();
        Ok(g.uploads
            .iter()
            .filter(|(_, (k, _))| k.starts_with(prefix))
            .map(|(id, (k, _))| Upload {
                key: k.clone(),
                upload_id: id.clone(),
            })
            .collect())
    }
    fn list_parts(&self, _key: &str, upload_id: &str) -> Result<Vec<Part>, StoreError> {
        let g = self.inner.lock().unwrap();
        Ok(g.uploads
            .get(upload_id)
            .map(|(_, parts)| {
                parts
                    .iter()
                    .map(|(n, b)| Part {
                        number: *n,
                        etag: md5_etag(b),
                        size: b.len() as u64,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}
