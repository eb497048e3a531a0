//! The Block Storage API over HTTP. Each handler parses a request into an
//! operation's typed request, runs the operation (`ops`) on the blocking
//! pool, and renders its result (a view) or its error (`errors`, one
//! mapping for every version). Only v1 exists so far:
//! - `snapshots`: /v1/{tenant}/snapshots[/detail|/{id}]
//! - `metadata`: /v1/{tenant}/snapshots/{id}/metadata[/{key}]
//! - `volumes`: /v1/{tenant}/volumes[/detail|/{id}|/{id}/action]
//! - `schedules`: /v1/{tenant}/os-blocksnap-schedules (an extension)
//!
//! Authentication (token → tenant), peer checks and request ids are
//! middleware here.

mod backups;
pub mod body;
mod cinder;
pub mod errors;
mod metadata;
mod schedules;
mod snapshots;
mod volumes;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use uuid::Uuid;

pub use body::{parse_bool, parse_force, parse_full, ApiResult};
pub use errors::{error_body, error_name, ApiError};

use super::ops::{Caller, OpError, Ops};
use super::Daemon;

pub type Shared = Arc<Daemon>;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = crate::defaults::BODY_LIMIT;

/// Run an operation on the blocking pool (operations do catalog and device
/// I/O, which must never block an async worker).
pub(crate) async fn run<T: Send + 'static>(
    d: &Shared,
    f: impl FnOnce(Ops) -> Result<T, OpError> + Send + 'static,
) -> ApiResult<T> {
    let ops = d.ops();
    match tokio::task::spawn_blocking(move || f(ops)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            let msg = if e.is_panic() {
                super::panic_message(e.into_panic().as_ref())
            } else {
                e.to_string()
            };
            tracing::error!("a request's operation panicked: {msg}");
            Err(ApiError::internal(format!(
                "internal error: {msg}; see the log"
            )))
        }
    }
}

/// `Path`, with rejections (bad percent-encoding, invalid UTF-8) answered in
/// the reference's format: such an id names nothing, so 404.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(_) => Err(ApiError::plain_not_found()),
        }
    }
}

/// `Query`, with a malformed query string answered in the reference's format.
#[derive(Debug)]
pub struct ApiQuery(pub BTreeMap<String, String>);

impl<S> axum::extract::FromRequestParts<S> for ApiQuery
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<BTreeMap<String, String>>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(_) => Err(ApiError::bad_request("Malformed query string")),
        }
    }
}

/// The peer's credentials, put on every request by the server.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

/// Every response carries a request id.
async fn request_id(req: Request, next: Next) -> Response {
    let id = format!("req-{}", Uuid::new_v4());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-compute-request-id", v);
    }
    tracing::debug!(
        request = %id,
        %method,
        path = %path.chars().take(200).collect::<String>(),
        status = resp.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Peers whose uid is not allowed get 403 on every call.
async fn check_peer(State(d): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(allowed) = &d.config.allowed_uids {
        let uid = req.extensions().get::<Peer>().and_then(|p| p.uid);
        if !uid.is_some_and(|u| allowed.contains(&u)) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "Policy doesn't allow this peer: its uid is not in allowed_uids",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The tenant a request acts for, from its token and its URL.
#[derive(Clone, Debug)]
pub struct Tenant(pub String);

impl Tenant {
    pub fn caller(self) -> Caller {
        Caller::new(self.0)
    }
}

/// Look up the tenant of the request's X-Auth-Token (constant time over
/// every configured token; the token itself is never logged).
fn token_tenant(d: &Daemon, headers: &HeaderMap) -> ApiResult<String> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Authentication required: a valid X-Auth-Token header is needed",
        )
    };
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .ok_or_else(unauthorized)?;
    let h = crate::config::token_hash(token);
    let mut found: Option<&str> = None;
    for t in &d.config.tokens {
        if bool::from(t.sha256.ct_eq(&h)) && found.is_none() {
            found = Some(&t.tenant);
        }
    }
    found.map(str::to_string).ok_or_else(unauthorized)
}

async fn auth(State(d): State<Shared>, mut req: Request, next: Next) -> Response {
    let tenant = match token_tenant(&d, req.headers()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    // /v1/{tenant}/...: the URL's tenant must be the token's.
    let url_tenant = req.uri().path().split('/').nth(2).unwrap_or("");
    let decoded = percent_decode(url_tenant);
    if decoded.as_deref() != Some(tenant.as_str()) {
        return ApiError::malformed_url().into_response();
    }
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The router with every route of the API.
pub fn router(d: Shared) -> Router {
    // v1, v2 and v3: the same operations, three views. The version layer
    // wraps authentication so a v3 refusal carries the microversion too.
    let versions = Router::new()
        .merge(snapshots::routes())
        .merge(metadata::routes())
        .merge(volumes::routes())
        .merge(cinder::routes())
        .merge(schedules::routes())
        .merge(backups::routes())
        .route_layer(axum::middleware::from_fn_with_state(d.clone(), auth))
        .merge(cinder::discovery_routes())
        .route_layer(axum::middleware::from_fn(cinder::versioned));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(versions)
        .fallback(|| async { ApiError::plain_not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "The method is not allowed for the requested URL.",
            )
        })
        .layer(axum::middleware::from_fn_with_state(d.clone(), check_peer))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(d)
}

async fn healthz() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        "ok\n",
    )
        .into_response()
}

async fn metrics(State(d): State<Shared>, headers: HeaderMap) -> ApiResult<Response> {
    // /metrics has no tenant in its URL; the token decides what it shows.
    let caller = Caller::new(token_tenant(&d, &headers)?);
    let visible = run(&d, move |ops| ops.visible_volume_ids(&caller)).await?;
    let mut text = d.metrics.render(&visible);
    if let Some(s) = d.scheduler() {
        text.push_str(&s.render_metrics(&visible));
    }
    text.push_str(&format!(
        "# HELP blocksnap_operations_running Operations running now.\n# TYPE blocksnap_operations_running gauge\nblocksnap_operations_running {}\n",
        d.running()
    ));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response())
}
