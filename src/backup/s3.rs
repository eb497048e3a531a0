//! The S3 client: rusty-s3 signs each request (AWS Signature V4, presigned
//! with a short expiry; custom endpoints, path-style or virtual-host
//! addressing), ureq sends it (blocking, rustls for https). Every request is
//! retried with exponential backoff and jitter on 5xx, 408, 429, S3's
//! `SlowDown`/`RequestTimeout` and transport errors; bodies go through the
//! remote's token bucket in both directions.
//!
//! Nothing here prints a URL: a signed URL holds the access key id.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::store::*;
use crate::config::RemoteConfig;

/// How long a signed request stays valid.
const SIGN_EXPIRY: Duration = Duration::from_secs(3600);
/// Bytes moved per token-bucket grant.
const CHUNK: usize = 64 << 10;

/// A bandwidth limit: a token bucket of `rate` bytes per second holding at
/// most a quarter second of tokens (at least one chunk).
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: u64) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = (rate / 4.0).max(CHUNK as f64);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Wait until `n` bytes may pass.
    pub fn take(&self, n: usize) {
        let wait = {
            let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *g;
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
            let left = tokens - n as f64;
            *g = (left, now);
            if left >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-left / self.rate)
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Retry {
    fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .first_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        // Full jitter between half and all of the delay.
        let f: f64 = 0.5 + rand::random::<f64>() * 0.5;
        base.mul_f64(f)
    }
}

/// A remote on an S3-compatible object store.
pub struct S3Store {
    name: String,
    bucket: Bucket,
    creds: Credentials,
    prefix: String,
    agent: ureq::Agent,
    limiter: Option<TokenBucket>,
    retry: Retry,
    sent: AtomicU64,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("S3Store")
            .field("name", &self.name)
            .field("bucket", &self.bucket.name())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A response we accepted.
struct Answer {
    status: u16,
    etag: Option<String>,
    body: Vec<u8>,
}

enum Body<'a> {
    None,
    Bytes(&'a [u8]),
}

impl S3Store {
    pub fn new(cfg: &RemoteConfig) -> Result<S3Store, String> {
        let url = url::Url::parse(&cfg.endpoint).map_err(|e| format!("endpoint: {e}"))?;
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(url, style, cfg.bucket.clone(), cfg.region.clone())
            .map_err(|e| format!("endpoint: {e}"))?;
        let c = &cfg.credentials;
        let creds = match &c.session_token {
            Some(t) => Credentials::new_with_token(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                t.clone(),
            ),
            None => Credentials::new(c.access_key_id.clone(), c.secret_access_key.clone()),
        };
        let timeout = cfg.timeout;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(timeout.min(Duration::from_secs(30))))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout))
            .max_idle_connections_per_host(cfg.concurrency * 2)
            .user_agent(concat!("blocksnap/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(S3Store {
            name: cfg.name.clone(),
            bucket,
            creds,
            prefix: cfg.prefix.clone(),
            agent,
            limiter: cfg.bandwidth_limit.map(TokenBucket::new),
            retry: Retry {
                attempts: cfg.retries + 1,
                first_delay: cfg.retry_delay,
                max_delay: Duration::from_secs(20).max(cfg.retry_delay),
            },
            sent: AtomicU64::new(0),
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn err(&self, op: &'static str, key: &str, attempts: u32, cause: RequestError) -> StoreError {
        StoreError {
            remote: self.name.clone(),
            op,
            key: key.to_string(),
            attempts,
            cause: Box::new(cause),
        }
    }

    /// Send a request built (and signed afresh) by `build` for each attempt.
    /// Statuses in `accept` are answers; others are errors, retried if transient.
    fn call(
        &self,
        op: &'static str,
        key: &str,
        build: &dyn Fn() -> (rusty_s3::Method, url::Url, Vec<(&'static str, String)>),
        body: Body<'_>,
        accept: &[u16],
    ) -> Result<Answer, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (method, url, headers) = build();
            let r = self.once(method, &url, &headers, &body);
            let cause = match r {
                Ok(a) if accept.contains(&a.status) => return Ok(a),
                Ok(a) => status_error(a.status, &a.body),
                Err(e) => e,
            };
            let transient = match &cause {
                RequestError::Status { status, code, .. } => {
                    *status >= 500
                        || *status == 408
                        || *status == 429
                        || code == "SlowDown"
                        || code == "RequestTimeout"
                }
                RequestError::Transport(_) => true,
                RequestError::Protocol(_) => false,
            };
            if !transient || attempt >= self.retry.attempts {
                return Err(self.err(op, key, attempt, cause));
            }
            let d = self.retry.delay(attempt - 1);
            tracing::debug!(remote = %self.name, op, key, attempt, error = %cause, "retrying in {d:?}");
            std::thread::sleep(d);
        }
    }

    fn once(
        &self,
        method: rusty_s3::Method,
        url: &url::Url,
        headers: &[(&'static str, String)],
        body: &Body<'_>,
    ) -> Result<Answer, RequestError> {
        use rusty_s3::Method as M;
        let u = url.as_str();
        let resp = match (method, body) {
            (M::Get, _) => with_headers(self.agent.get(u), headers).call(),
            (M::Head, _) => with_headers(self.agent.head(u), headers).call(),
            (M::Delete, _) => with_headers(self.agent.delete(u), headers).call(),
            (M::Put | M::Post, b) => {
                let data: &[u8] = match b {
                    Body::Bytes(d) => d,
                    Body::None => &[],
                };
                let rb = if method == M::Put {
                    self.agent.put(u)
                } else {
                    self.agent.post(u)
                };
                let rb = with_headers(rb, headers).header("content-length", data.len().to_string());
                let mut reader = Throttled {
                    data,
                    pos: 0,
                    limiter: self.limiter.as_ref(),
                };
                let r = rb.send(ureq::SendBody::from_reader(&mut reader));
                if r.is_ok() {
                    self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                r
            }
        }
        .map_err(transport_error)?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        if method != M::Head {
            let mut r = resp.into_body().into_reader();
            let mut buf = vec![0u8; CHUNK];
            loop {
                if let Some(l) = &self.limiter {
                    l.take(CHUNK);
                }
                let n = r
                    .read(&mut buf)
                    .map_err(|e| RequestError::Transport(format!("reading the answer: {e}")))?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
        }
        Ok(Answer { status, etag, body })
    }

    fn list_page(
        &self,
        prefix: &str,
        delimiter: bool,
        token: Option<&str>,
    ) -> Result<rusty_s3::actions::ListObjectsV2Response, StoreError> {
        let full = self.full(prefix);
        let build = || {
            let mut a = self.bucket.list_objects_v2(Some(&self.creds));
            a.with_prefix(full.as_str());
            if delimiter {
                a.with_delimiter("/");
            }
            if let Some(t) = token {
                a.with_continuation_token(t);
            }
            (rusty_s3::Method::Get, a.sign(SIGN_EXPIRY), Vec::new())
        };
        let a = self.call("list", prefix, &build, Body::None, &[200])?;
        let text = String::from_utf8_lossy(&a.body);
        rusty_s3::actions::ListObjectsV2::parse_response(&text)
            .map_err(|e| self.err("list", prefix, 1, RequestError::Protocol(e.to_string())))
    }

    fn strip<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())
    }
}

fn with_headers<B>(
    mut rb: ureq::RequestBuilder<B>,
    headers: &[(&'static str, String)],
) -> ureq::RequestBuilder<B> {
    for (k, v) in headers {
        rb = rb.header(*k, v.as_str());
    }
    rb
}

/// A request body read through the token bucket.
struct Throttled<'a> {
    data: &'a [u8],
    pos: usize,
    limiter: Option<&'a TokenBucket>,
}

impl Read for Throttled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK).min(self.data.len() - self.pos);
        if n == 0 {
            return Ok(0);
        }
        if let Some(l) = self.limiter {
            l.take(n);
        }
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A transport error, described without the URL.
fn transport_error(e: ureq::Error) -> RequestError {
    use ureq::Error as E;
    RequestError::Transport(match e {
        E::Io(e) => format!("network error: {e}"),
        E::Timeout(t) => format!("timed out ({t})"),
        E::HostNotFound => "host not found".into(),
        E::ConnectionFailed => "connection failed".into(),
        E::Tls(m) => format!("TLS error: {m}"),
        E::Rustls(e) => format!("TLS error: {e}"),
        E::Protocol(e) => format!("HTTP protocol error: {e}"),
        E::BodyExceedsLimit(n) => format!("answer larger than {n} bytes"),
        E::StatusCode(s) => format!("HTTP {s}"),
        _ => "request failed".into(),
    })
}

/// An S3 error answer: only its Code and Message (error documents may echo
/// the access key id and the string that was signed; those stay out).
fn status_error(status: u16, body: &[u8]) -> RequestError {
    let text = String::from_utf8_lossy(body);
    let code = xml_field(&text, "Code").unwrap_or_default();
    let mut message = xml_field(&text, "Message").unwrap_or_default();
    if message.len() > 300 {
        message.truncate(300);
    }
    if message.is_empty() {
        message = match status {
            404 => "not found".into(),
            412 => "precondition failed".into(),
            _ => "no details".into(),
        };
    }
    RequestError::Status {
        status,
        code,
        message,
    }
}

/// The text of the first `<tag>...</tag>` in `xml`, unescaped.
fn xml_field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(unescape(&xml[start..end]))
}

/// Every `<tag>...</tag>` text in `xml`.
fn xml_fields<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let s = &rest[i + open.len()..];
        let Some(j) = s.find(&close) else { break };
        out.push(&s[..j]);
        rest = &s[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn content_md5(body: &[u8]) -> String {
    use base64::Engine;
    use md5::Digest;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body))
}

impl Store for S3Store {
    fn remote(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.full(key);
        let build = || {
            let a = self.bucket.get_object(Some(&self.creds), &full);
            (rusty_s3::Method::Get, a.sign(SIGN_EXPIRY), Vec::new())
        };
        let a = self.call("get", key, &build, Body::None, &[200, 404])?;
        Ok((a.status == 200).then_some(a.body))
    }

    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<Put, StoreError> {
        let full = self.full(key);
        let md5 = content_md5(body);
        let build = || {
            let mut a = self.bucket.put_object(Some(&self.creds), &full);
            let mut headers = vec![("content-md5", md5.clone())];
            a.headers_mut().insert("content-md5", md5.clone());
            if mode == PutMode::Create {
                a.headers_mut().insert("if-none-match", "*");
                headers.push(("if-none-match", "*".to_string()));
            }
            (rusty_s3::Method::Put, a.sign(SIGN_EXPIRY), headers)
        };
        let a = self.call("put", key, &build, Body::Bytes(body), &[200, 412])?;
        Ok(if a.status == 412 {
            Put::Exists
        } else {
            Put::Done
        })
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full(key);
        let build = || {
            let a = self.bucket.delete_object(Some(&self.creds), &full);
            (rusty_s3::Method::Delete, a.sign(SIGN_EXPIRY), Vec::new())
        };
        self.call("delete", key, &build, Body::None, &[200, 204, 404])?;
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_page(prefix, false, token.as_deref())?;
            for c in page.contents {
                if let Some(k) = self.strip(&c.key) {
                    out.push(ObjectInfo {
                        key: k.to_string(),
                        size: c.size,
                    });
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_page(prefix, true, token.as_deref())?;
            for c in page.common_prefixes {
                if let Some(k) = self.strip(&c.prefix) {
                    out.push(k.to_string());
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        let full = self.full(key);
        let build = || {
            let a = self
                .bucket
                .create_multipart_upload(Some(&self.creds), &full);
            (rusty_s3::Method::Post, a.sign(SIGN_EXPIRY), Vec::new())
        };
        let a = self.call("start upload of", key, &build, Body::None, &[200])?;
        let text = String::from_utf8_lossy(&a.body);
        let r = rusty_s3::actions::CreateMultipartUpload::parse_response(&text).map_err(|e| {
            self.err(
                "start upload of",
                key,
                1,
                RequestError::Protocol(e.to_string()),
            )
        })?;
        Ok(r.upload_id().to_string())
    }

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        body: &[u8],
    ) -> Result<String, StoreError> {
        let full = self.full(key);
        let md5 = content_md5(body);
        let build = || {
            let mut a = self
                .bucket
                .upload_part(Some(&self.creds), &full, number, upload_id);
            a.headers_mut().insert("content-md5", md5.clone());
            (
                rusty_s3::Method::Put,
                a.sign(SIGN_EXPIRY),
                vec![("content-md5", md5.clone())],
            )
        };
        let a = self.call("upload part of", key, &build, Body::Bytes(body), &[200])?;
        a.etag.ok_or_else(|| {
            self.err(
                "upload part of",
                key,
                1,
                RequestError::Protocol("no ETag in the answer".into()),
            )
        })
    }

    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u16, String)],
    ) -> Result<(), StoreError> {
        let full = self.full(key);
        let mut sorted = parts.to_vec();
        sorted.sort_by_key(|p| p.0);
        let body = {
            let a = self.bucket.complete_multipart_upload(
                Some(&self.creds),
                &full,
                upload_id,
                sorted.iter().map(|p| p.1.as_str()),
            );
            a.body()
        };
        let build = || {
            let a = self.bucket.complete_multipart_upload(
                Some(&self.creds),
                &full,
                upload_id,
                sorted.iter().map(|p| p.1.as_str()),
            );
            (rusty_s3::Method::Post, a.sign(SIGN_EXPIRY), Vec::new())
        };
        let a = self.call(
            "complete upload of",
            key,
            &build,
            Body::Bytes(body.as_bytes()),
            &[200],
        )?;
        // S3 may answer 200 with an error document for a completion.
        let text = String::from_utf8_lossy(&a.body);
        if text.contains("<Error>") {
            return Err(self.err("complete upload of", key, 1, status_error(500, &a.body)));
        }
        Ok(())
    }

    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let full = self.full(key);
        let build = || {
            let a = self
                .bucket
                .abort_multipart_upload(Some(&self.creds), &full, upload_id);
            (rusty_s3::Method::Delete, a.sign(SIGN_EXPIRY), Vec::new())
        };
        self.call("abort upload of", key, &build, Body::None, &[200, 204, 404])?;
        Ok(())
    }

    fn list_multipart(&self, prefix: &str) -> Result<Vec<Upload>, StoreError> {
        // rusty-s3 has no ListMultipartUploads; sign it with its signer.
        let full = self.full(prefix);
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let build = || {
                let mut query: Vec<(&str, &str)> = vec![("uploads", ""), ("prefix", &full)];
                if let Some((k, u)) = &markers {
                    query.push(("key-marker", k));
                    query.push(("upload-id-marker", u));
                }
                let url = rusty_s3::signing::sign(
                    &jiff::Timestamp::now(),
                    rusty_s3::Method::Get,
                    self.bucket.base_url().clone(),
                    self.creds.key(),
                    self.creds.secret(),
                    self.creds.token(),
                    self.bucket.region(),
                    SIGN_EXPIRY.as_secs(),
                    query.iter().copied(),
                    std::iter::empty(),
                );
                (rusty_s3::Method::Get, url, Vec::new())
            };
            let a = self.call("list uploads under", prefix, &build, Body::None, &[200])?;
            let text = String::from_utf8_lossy(&a.body).into_owned();
            for up in xml_fields(&text, "Upload") {
                let (Some(k), Some(id)) = (xml_field(up, "Key"), xml_field(up, "UploadId")) else {
                    continue;
                };
                if let Some(k) = self.strip(&k) {
                    out.push(Upload {
                        key: k.to_string(),
                        upload_id: id,
                    });
                }
            }
            let truncated = xml_field(&text, "IsTruncated").as_deref() == Some("true");
            match (
                truncated,
                xml_field(&text, "NextKeyMarker"),
                xml_field(&text, "NextUploadIdMarker"),
            ) {
                (true, Some(k), Some(u)) if !k.is_empty() => markers = Some((k, u)),
                _ => break,
            }
        }
        Ok(out)
    }

    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>, StoreError> {
        let full = self.full(key);
        let mut out = Vec::new();
        let mut marker: Option<u16> = None;
        loop {
            let build = || {
                let mut a = self.bucket.list_parts(Some(&self.creds), &full, upload_id);
                if let Some(m) = marker {
                    a.set_part_number_marker(m);
                }
                (rusty_s3::Method::Get, a.sign(SIGN_EXPIRY), Vec::new())
            };
            let a = self.call("list parts of", key, &build, Body::None, &[200, 404])?;
            if a.status == 404 {
                return Ok(Vec::new());
            }
            // Parsed by hand: servers differ in the root element's name
            // (ListPartsResult, or moto's ListPartsResponse).
            let text = String::from_utf8_lossy(&a.body).into_owned();
            for p in xml_fields(&text, "Part") {
                let number = xml_field(p, "PartNumber").and_then(|n| n.parse().ok());
                let size = xml_field(p, "Size").and_then(|n| n.parse().ok());
                let (Some(number), Some(size), Some(etag)) = (number, size, xml_field(p, "ETag"))
                else {
                    return Err(self.err(
                        "list parts of",
                        key,
                        1,
                        RequestError::Protocol("a part without number, size or ETag".into()),
                    ));
                };
                out.push(Part { number, etag, size });
            }
            match xml_field(&text, "NextPartNumberMarker").and_then(|m| m.parse().ok()) {
                Some(m) if xml_field(&text, "IsTruncated").as_deref() == Some("true") => {
                    marker = Some(m)
                }
                _ => break,
            }
        }
        Ok(out)
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_keep_only_code_and_message() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match &amp; so on</Message><AWSAccessKeyId>AKIASECRET</AWSAccessKeyId><StringToSign>x</StringToSign></Error>";
        let e = status_error(403, body);
        let s = e.to_string();
        assert!(s.contains("403 SignatureDoesNotMatch"), "{s}");
        assert!(s.contains("match & so on"), "{s}");
        assert!(!s.contains("AKIASECRET"), "{s}");
        assert_eq!(
            status_error(503, b"").to_string(),
            "the server answered HTTP 503 : no details"
        );
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let r = Retry {
            attempts: 5,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        };
        for a in 0..20 {
            let d = r.delay(a);
            assert!(d <= Duration::from_secs(2), "{d:?}");
            assert!(d >= Duration::from_millis(50), "{d:?}");
        }
        assert!(r.delay(3) >= Duration::from_millis(400));
    }

    #[test]
    fn the_token_bucket_holds_its_rate() {
        let b = TokenBucket::new(4 << 20);
        let t = Instant::now();
        // 1 MiB of burst, then 2 MiB more at 4 MiB/s: about half a second.
        for _ in 0..48 {
            b.take(CHUNK);
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(450), "{e:?}");
    }

    #[test]
    fn xml_lists_parse() {
        let x = "<ListMultipartUploadsResult><Upload><Key>a/b</Key><UploadId>1</UploadId></Upload><Upload><Key>c</Key><UploadId>2</UploadId></Upload><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>";
        let ups = xml_fields(x, "Upload");
        assert_eq!(ups.len(), 2);
        assert_eq!(xml_field(ups[1], "Key").as_deref(), Some("c"));
    }
}
