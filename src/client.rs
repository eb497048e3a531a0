//! A small client of blocksnapd's API over its Unix socket (hyper).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to blocksnapd at {socket} (is it running? `systemctl status blocksnapd`; or pass --socket)")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with blocksnapd failed")]
    Http(#[source] hyper::Error),
    #[error("blocksnapd answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("blocksnapd sent a body that is not JSON")]
    NotJson,
}

/// Who calls, and where.
#[derive(Debug, Clone)]
pub struct Client {
    pub socket: PathBuf,
    pub tenant: String,
    pub token: String,
}

impl Client {
    /// Send one request; `path` is below `/v1/{tenant}`. Returns the status
    /// and the JSON body (`Null` when empty). Error statuses become
    /// `ClientError::Api` with the message from the error body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let uri = format!("/v1/{}{path}", self.tenant);
        self.raw(method, &uri, body).await
    }

    /// Send a request to an absolute path (such as `/healthz`).
    pub async fn raw(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "localhost")
            .header("x-auth-token", &self.token);
        if !payload.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .expect("request is well formed");
        let resp = sender.send_request(req).await.map_err(ClientError::Http)?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Http)?
            .to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(_) if status.is_success() => {
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                }
                Err(_) => return Err(ClientError::NotJson),
            }
        };
        if !status.is_success() {
            let message = value
                .as_object()
                .and_then(|m| m.values().next())
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_string();
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok((status, value))
    }
}

/// Client settings from a file: `tenant = "..."` and `token = "..."` (TOML).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub tenant: Option<String>,
    pub token: Option<String>,
    pub socket: Option<PathBuf>,
}

impl TokenFile {
    /// Read `path` if it exists.
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => toml::from_str(&t).map_err(|e| format!("{}: {}", path.display(), e.message())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}
