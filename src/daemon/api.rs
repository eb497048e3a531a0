//! The Block Storage v1 API over HTTP: one parser per resource, strict
//! request types, errors in the reference's format. Handlers only check and
//! record; the work runs on the blocking pool (see `Daemon::run_*`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::catalog::{SnapStatus, SnapshotRecord, VolStatus, VolumeKind, VolumeRecord};
use super::{Busy, Daemon, VolumeInfo, GB};
use crate::quiesce::Mode;
use crate::util::{format_timestamp, now_micros};

pub type Shared = Arc<Daemon>;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest and default page of a list.
const MAX_LIMIT: usize = 1000;
/// Metadata keys and values, names and descriptions: Cinder's limit.
const MAX_FIELD: usize = 255;

/// An error in the reference's format: `{"badRequest": {"code": 400, "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
    pub fn plain_not_found() -> ApiError {
        ApiError::not_found("The resource could not be found.")
    }
    fn malformed_url() -> ApiError {
        ApiError::bad_request("Malformed request url")
    }
}

/// The error body's name for a status code.
pub fn error_name(code: u16) -> &'static str {
    match code {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 => "overLimit",
        415 => "badMediaType",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

/// The JSON body of an error.
pub fn error_body(code: u16, message: &str) -> Value {
    json!({ error_name(code): { "code": code, "message": message } })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(error_body(self.status.as_u16(), &self.message)),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

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
    let v1 = Router::new()
        .route(
            "/v1/{tenant}/snapshots",
            get(snapshots_list).post(snapshot_create),
        )
        .route("/v1/{tenant}/snapshots/detail", get(snapshots_detail))
        .route(
            "/v1/{tenant}/snapshots/{id}",
            get(snapshot_show)
                .put(snapshot_update)
                .delete(snapshot_delete),
        )
        .route(
            "/v1/{tenant}/snapshots/{id}/metadata",
            get(meta_get_all).post(meta_merge).put(meta_replace),
        )
        .route(
            "/v1/{tenant}/snapshots/{id}/metadata/{key}",
            get(meta_get).put(meta_put).delete(meta_delete),
        )
        .route(
            "/v1/{tenant}/volumes",
            get(volumes_list).post(volume_create),
        )
        .route("/v1/{tenant}/volumes/detail", get(volumes_detail))
        .route(
            "/v1/{tenant}/volumes/{id}",
            get(volume_show).put(volume_update).delete(volume_delete),
        )
        .route(
            "/v1/{tenant}/volumes/{id}/action",
            axum::routing::post(volume_action),
        )
        .route_layer(axum::middleware::from_fn_with_state(d.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
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
    let tenant = token_tenant(&d, &headers)?;
    let visible: Vec<String> = d
        .volumes()
        .into_iter()
        .filter(|v| v.visible_to(&tenant))
        .map(|v| v.id)
        .collect();
    let mut text = d.metrics.render(&visible);
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

// ------------------------------------------------------------------ bodies

/// Read a JSON request body: at most 1 MiB, JSON content type (or none).
async fn read_json(headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if ct != "application/json" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Unsupported Content-Type {ct:?}: send application/json"),
            ));
        }
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request is too large: the limit is {BODY_LIMIT} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > BODY_LIMIT as u64 {
            return Err(too_large());
        }
    }
    let bytes = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| too_large())?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "Malformed request body: the body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Malformed request body: {e}")))
}

/// Take `key` from a JSON object body; a body without it is 422, as in the reference.
fn wrapped(body: Value, key: &str) -> ApiResult<Value> {
    match body {
        Value::Object(mut m) => m.remove(key).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Unable to process the contained instructions: the body needs a \"{key}\" object"),
            )
        }),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("Unable to process the contained instructions: the body must be a JSON object with \"{key}\""),
        )),
    }
}

/// Read a JSON body, take its `key` object and deserialize it strictly.
async fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: Body, key: &str) -> ApiResult<T> {
    typed(key, wrapped(read_json(headers, body).await?, key)?)
}

/// Deserialize strictly; the message names the field at fault.
fn typed<T: DeserializeOwned>(key: &str, v: Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            key.to_string()
        } else {
            format!("{key}.{path}")
        };
        ApiError::bad_request(format!("Invalid input for field {field}: {}", e.inner()))
    })
}

fn check_text(field: &str, v: &Option<String>) -> ApiResult<()> {
    match v {
        Some(s) if s.chars().count() > MAX_FIELD => Err(ApiError::bad_request(format!(
            "Invalid input received: {field} is longer than {MAX_FIELD} characters"
        ))),
        _ => Ok(()),
    }
}

fn check_metadata(m: &BTreeMap<String, String>) -> ApiResult<()> {
    for (k, v) in m {
        if k.is_empty() || k.chars().count() > MAX_FIELD {
            return Err(ApiError::bad_request(format!(
                "Invalid input received: metadata keys must be 1 to {MAX_FIELD} characters, not {:?}",
                k.chars().take(40).collect::<String>()
            )));
        }
        if v.chars().count() > MAX_FIELD {
            return Err(ApiError::bad_request(format!(
                "Invalid input received: the value of metadata key {k:?} is longer than {MAX_FIELD} characters"
            )));
        }
    }
    Ok(())
}

/// `force`: a JSON bool, 0/1, or a string true/false/yes/no/y/n/1/0 in any case.
pub fn parse_force(v: Option<&Value>) -> ApiResult<bool> {
    let invalid = |s: &str| ApiError::bad_request(format!("Invalid value '{s}' for force. "));
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(1) => Ok(true),
            Some(0) => Ok(false),
            _ => Err(invalid(&n.to_string())),
        },
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "on" | "t" => Ok(true),
            "false" | "no" | "n" | "0" | "off" | "f" => Ok(false),
            _ => Err(invalid(s)),
        },
        Some(other) => Err(invalid(&other.to_string())),
    }
}

/// Parse an id from a URL; anything that is not a UUID is simply not found.
fn parse_id(s: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::not_found(format!(
            "{what} {} could not be found.",
            s.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        ))
    })
}

// ------------------------------------------------------------------ lists

#[derive(Debug, Default)]
struct ListParams {
    limit: usize,
    offset: usize,
    status: Option<String>,
    volume_id: Option<String>,
    display_name: Option<String>,
}

fn list_params(q: &BTreeMap<String, String>) -> ApiResult<ListParams> {
    let num = |name: &str| -> ApiResult<Option<i64>> {
        match q.get(name) {
            None => Ok(None),
            Some(v) => {
                let n: i64 = v.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!("{name} param must be an integer"))
                })?;
                if n < 0 {
                    return Err(ApiError::bad_request(format!(
                        "{name} param must be positive"
                    )));
                }
                Ok(Some(n))
            }
        }
    };
    let limit = match num("limit")? {
        None | Some(0) => MAX_LIMIT,
        Some(n) => (n as usize).min(MAX_LIMIT),
    };
    Ok(ListParams {
        limit,
        offset: num("offset")?.unwrap_or(0) as usize,
        status: q.get("status").cloned(),
        volume_id: q.get("volume_id").cloned(),
        display_name: q.get("display_name").cloned(),
    })
}

fn page<T>(items: Vec<T>, p: &ListParams) -> Vec<T> {
    items.into_iter().skip(p.offset).take(p.limit).collect()
}

// ------------------------------------------------------------------ snapshot views

fn gb(bytes: u64) -> u64 {
    bytes.div_ceil(GB)
}

fn progress_text(d: &Daemon, r: &SnapshotRecord) -> String {
    match r.status {
        SnapStatus::Available => "100%".to_string(),
        SnapStatus::Creating => match d.progress_of(&r.id.to_string()).map(|p| p.percent()) {
            Some(p) if p > 0.0 => format!("{p:.2}%"),
            _ => "0%".to_string(),
        },
        _ => "0%".to_string(),
    }
}

fn snapshot_summary(r: &SnapshotRecord) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(r.id));
    m.insert("status".into(), json!(r.status.as_str()));
    m.insert("display_name".into(), json!(r.display_name));
    m.insert("display_description".into(), json!(r.display_description));
    m.insert("volume_id".into(), json!(r.volume_id));
    m.insert("size".into(), json!(gb(r.size_bytes)));
    m.insert("created_at".into(), json!(format_timestamp(r.created_us)));
    m.insert("metadata".into(), json!(r.metadata));
    m
}

fn snapshot_detail(d: &Daemon, r: &SnapshotRecord, tenant: &str) -> Map<String, Value> {
    let mut m = snapshot_summary(r);
    m.insert(
        "os-extended-snapshot-attributes:progress".into(),
        json!(progress_text(d, r)),
    );
    m.insert(
        "os-extended-snapshot-attributes:project_id".into(),
        json!(r.tenant.as_deref().unwrap_or(tenant)),
    );
    if r.status == SnapStatus::Available {
        m.insert("blocksnap:changed_bytes".into(), json!(r.changed_bytes));
        m.insert("blocksnap:stored_bytes".into(), json!(r.stored_bytes));
        m.insert("blocksnap:freeze_ms".into(), json!(r.freeze_ms));
    }
    if let Some(e) = &r.error {
        m.insert("blocksnap:error".into(), json!(e));
    }
    m
}

/// The snapshots a tenant may see.
fn visible_snapshots(d: &Daemon, tenant: &str) -> Vec<SnapshotRecord> {
    let vols: BTreeMap<String, VolumeInfo> =
        d.volumes().into_iter().map(|v| (v.id.clone(), v)).collect();
    let mut v: Vec<SnapshotRecord> = d.read(|c| {
        c.snapshots
            .values()
            .filter(|r| match &r.tenant {
                Some(t) => t == tenant,
                None => vols.get(&r.volume_id).is_some_and(|v| v.visible_to(tenant)),
            })
            .cloned()
            .collect()
    });
    v.sort_by(|a, b| b.created_us.cmp(&a.created_us).then(a.id.cmp(&b.id)));
    v
}

fn find_snapshot(d: &Daemon, tenant: &str, id: &str) -> ApiResult<SnapshotRecord> {
    let uid = parse_id(id, "Snapshot")?;
    visible_snapshots(d, tenant)
        .into_iter()
        .find(|r| r.id == uid)
        .ok_or_else(|| ApiError::not_found(format!("Snapshot {uid} could not be found.")))
}

fn filter_snapshots(v: Vec<SnapshotRecord>, p: &ListParams) -> Vec<SnapshotRecord> {
    v.into_iter()
        .filter(|r| p.status.as_deref().is_none_or(|s| r.status.as_str() == s))
        .filter(|r| p.volume_id.as_deref().is_none_or(|s| r.volume_id == s))
        .filter(|r| {
            p.display_name
                .as_deref()
                .is_none_or(|s| r.display_name == s)
        })
        .collect()
}

// ------------------------------------------------------------------ snapshot handlers

async fn snapshots_list(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    let p = list_params(&q)?;
    let items = page(filter_snapshots(visible_snapshots(&d, &t), &p), &p);
    Ok(Json(
        json!({ "snapshots": items.iter().map(snapshot_summary).collect::<Vec<_>>() }),
    ))
}

async fn snapshots_detail(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    let p = list_params(&q)?;
    let items = page(filter_snapshots(visible_snapshots(&d, &t), &p), &p);
    Ok(Json(
        json!({ "snapshots": items.iter().map(|r| snapshot_detail(&d, r, &t)).collect::<Vec<_>>() }),
    ))
}

async fn snapshot_show(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    Ok(Json(json!({ "snapshot": snapshot_detail(&d, &r, &t) })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    volume_id: String,
    #[serde(default)]
    force: Option<Value>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

fn find_volume(d: &Daemon, tenant: &str, id: &str) -> ApiResult<VolumeInfo> {
    let not_found = || {
        ApiError::not_found(format!(
            "Volume {} could not be found.",
            id.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        ))
    };
    if !crate::config::valid_name(id) {
        return Err(not_found());
    }
    d.volume(id)
        .filter(|v| v.visible_to(tenant))
        .ok_or_else(not_found)
}

/// Whether a volume is mounted, read off the async runtime. If that cannot be
/// told, it counts as mounted (the safe answer for deletes and reverts).
async fn mounted_now(d: &Shared, v: &VolumeInfo) -> bool {
    let (d, v) = (d.clone(), v.clone());
    tokio::task::spawn_blocking(move || d.mounted(&v))
        .await
        .unwrap_or(true)
}

fn busy_error(prefix: &str, volume: &str, b: &Busy) -> ApiError {
    ApiError::bad_request(format!(
        "{prefix}: volume {volume} is busy: {}; try again when it has finished",
        b.what
    ))
}

async fn snapshot_create(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: SnapshotCreate = parse(&headers, body, "snapshot").await?;
    let force = parse_force(req.force.as_ref())?;
    check_text("display_name", &req.display_name)?;
    check_text("display_description", &req.display_description)?;
    let metadata = req.metadata.unwrap_or_default();
    check_metadata(&metadata)?;
    let vol = find_volume(&d, &t, &req.volume_id)?;
    let vd = d.clone();
    let v2 = vol.clone();
    let (mounted, size) =
        tokio::task::spawn_blocking(move || (vd.mounted(&v2), vd.device_size(&v2)))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !vol.configured && vol.record.status != VolStatus::Available {
        return Err(ApiError::bad_request("Invalid volume: must be available"));
    }
    // A mounted volume is snapshotted safely by freezing or unmounting it;
    // with quiesce none only a forced, crash-consistent snapshot is possible.
    if mounted && vol.quiesce == Mode::None && !force {
        return Err(ApiError::bad_request("Invalid volume: must be available"));
    }
    let size = size.ok_or_else(|| {
        ApiError::bad_request(format!(
            "Invalid volume: the device of volume {} cannot be read",
            vol.id
        ))
    })?;
    let id = Uuid::new_v4();
    d.claim(
        &vol.id,
        Busy {
            what: format!("snapshot {id} is being created"),
            status: None,
        },
    )
    .map_err(|b| busy_error("Invalid volume", &vol.id, &b))?;
    let record = SnapshotRecord {
        id,
        volume_id: vol.id.clone(),
        tenant: Some(t.clone()),
        status: SnapStatus::Creating,
        display_name: req.display_name.unwrap_or_default(),
        display_description: req.display_description.unwrap_or_default(),
        metadata,
        created_us: now_micros(),
        updated_us: 0,
        size_bytes: size,
        error: None,
        changed_bytes: 0,
        stored_bytes: 0,
        freeze_ms: 0.0,
    };
    d.update(|c| {
        c.snapshots.insert(id, record.clone());
    });
    tracing::info!(volume = %vol.id, snapshot = %id, force, "{}", super::logline::snapshot_requested(&vol.id, id, force));
    d.spawn(move |d| d.run_snapshot(vol, id, force));
    Ok(Json(json!({ "snapshot": snapshot_summary(&record) })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotUpdate {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
}

async fn snapshot_update(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    let req: SnapshotUpdate = parse(&headers, body, "snapshot").await?;
    check_text("display_name", &req.display_name)?;
    check_text("display_description", &req.display_description)?;
    let updated = d.update(|c| {
        let rec = c.snapshots.get_mut(&r.id)?;
        if let Some(n) = req.display_name {
            rec.display_name = n;
        }
        if let Some(n) = req.display_description {
            rec.display_description = n;
        }
        Some(rec.clone())
    });
    let rec = updated.ok_or_else(ApiError::plain_not_found)?;
    Ok(Json(json!({ "snapshot": snapshot_detail(&d, &rec, &t) })))
}

async fn snapshot_delete(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let r = find_snapshot(&d, &t, &id)?;
    if !matches!(r.status, SnapStatus::Available | SnapStatus::Error) {
        return Err(ApiError::bad_request(
            "Invalid snapshot: Volume Snapshot status must be available or error",
        ));
    }
    d.claim(
        &r.volume_id,
        Busy {
            what: format!("snapshot {} is being deleted", r.id),
            status: None,
        },
    )
    .map_err(|b| busy_error("Invalid snapshot", &r.volume_id, &b))?;
    d.update(|c| {
        if let Some(rec) = c.snapshots.get_mut(&r.id) {
            rec.status = SnapStatus::Deleting;
        }
    });
    let (vol, sid) = (r.volume_id.clone(), r.id);
    d.spawn(move |d| d.run_delete_snapshot(&vol, sid));
    Ok(StatusCode::ACCEPTED.into_response())
}

// ------------------------------------------------------------------ snapshot metadata

async fn meta_get_all(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    Ok(Json(json!({ "metadata": r.metadata })))
}

async fn meta_body(headers: &HeaderMap, body: Body) -> ApiResult<BTreeMap<String, String>> {
    let m: BTreeMap<String, String> = parse(headers, body, "metadata").await?;
    check_metadata(&m)?;
    Ok(m)
}

async fn meta_merge(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    let m = meta_body(&headers, body).await?;
    let out = d.update(|c| {
        c.snapshots.get_mut(&r.id).map(|rec| {
            rec.metadata.extend(m);
            rec.metadata.clone()
        })
    });
    Ok(Json(
        json!({ "metadata": out.ok_or_else(ApiError::plain_not_found)? }),
    ))
}

async fn meta_replace(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    let m = meta_body(&headers, body).await?;
    let out = d.update(|c| {
        c.snapshots.get_mut(&r.id).map(|rec| {
            rec.metadata = m;
            rec.metadata.clone()
        })
    });
    Ok(Json(
        json!({ "metadata": out.ok_or_else(ApiError::plain_not_found)? }),
    ))
}

fn meta_not_found() -> ApiError {
    ApiError::not_found("Metadata item was not found")
}

async fn meta_get(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    let v = r.metadata.get(&key).ok_or_else(meta_not_found)?;
    Ok(Json(json!({ "meta": { key: v } })))
}

async fn meta_put(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let r = find_snapshot(&d, &t, &id)?;
    let m: BTreeMap<String, String> = parse(&headers, body, "meta").await?;
    if m.len() > 1 {
        return Err(ApiError::bad_request(
            "Request body contains too many items",
        ));
    }
    let Some(value) = m.get(&key) else {
        return Err(ApiError::bad_request("Request body and URI mismatch"));
    };
    check_metadata(&m)?;
    let value = value.clone();
    d.update(|c| {
        if let Some(rec) = c.snapshots.get_mut(&r.id) {
            rec.metadata.insert(key.clone(), value.clone());
        }
    });
    Ok(Json(json!({ "meta": { key: value } })))
}

async fn meta_delete(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Response> {
    let r = find_snapshot(&d, &t, &id)?;
    if !r.metadata.contains_key(&key) {
        return Err(meta_not_found());
    }
    d.update(|c| {
        if let Some(rec) = c.snapshots.get_mut(&r.id) {
            rec.metadata.remove(&key);
        }
    });
    Ok(StatusCode::OK.into_response())
}

// ------------------------------------------------------------------ volume views

fn volume_status(d: &Daemon, v: &VolumeInfo) -> String {
    if let Some(s) = d.busy(&v.id).and_then(|b| b.status) {
        return s.to_string();
    }
    if !v.configured && v.record.status != VolStatus::Available {
        return v.record.status.as_str().to_string();
    }
    match &v.device {
        Some(dev) if dev.exists() => {
            if d.mounted(v) {
                "in-use".into()
            } else {
                "available".into()
            }
        }
        _ => "error".into(),
    }
}

fn volume_view(d: &Daemon, v: &VolumeInfo, detail: bool, tenant: &str) -> Map<String, Value> {
    let r = &v.record;
    let size = d.device_size(v).unwrap_or(r.size_bytes);
    let snapshot_id = match &r.kind {
        VolumeKind::Made { snapshot_id, .. } => json!(snapshot_id),
        VolumeKind::Configured => Value::Null,
    };
    let mut m = Map::new();
    m.insert("id".into(), json!(v.id));
    m.insert("status".into(), json!(volume_status(d, v)));
    m.insert("size".into(), json!(gb(size)));
    m.insert("availability_zone".into(), json!("nova"));
    m.insert("created_at".into(), json!(format_timestamp(r.created_us)));
    m.insert("bootable".into(), json!("false"));
    m.insert("attachments".into(), json!([]));
    m.insert("display_name".into(), json!(r.display_name));
    m.insert("display_description".into(), json!(r.display_description));
    m.insert("volume_type".into(), Value::Null);
    m.insert("snapshot_id".into(), snapshot_id);
    m.insert("source_volid".into(), Value::Null);
    m.insert("encrypted".into(), json!(false));
    m.insert("metadata".into(), json!(r.metadata));
    if detail {
        m.insert(
            "os-vol-tenant-attr:tenant_id".into(),
            json!(v.tenant.as_deref().unwrap_or(tenant)),
        );
        m.insert(
            "os-vol-host-attr:host".into(),
            json!(nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default()),
        );
        if let Some(e) = &r.error {
            m.insert("blocksnap:error".into(), json!(e));
        }
        if let Some(p) = d.progress_of(&v.id) {
            m.insert(
                "blocksnap:progress".into(),
                json!(format!("{:.2}%", p.percent())),
            );
        }
    }
    m
}

async fn volume_views(d: Shared, tenant: String, detail: bool, p: ListParams) -> ApiResult<Value> {
    tokio::task::spawn_blocking(move || {
        let mut vols: Vec<VolumeInfo> = d
            .volumes()
            .into_iter()
            .filter(|v| v.visible_to(&tenant))
            .collect();
        vols.sort_by(|a, b| {
            b.record
                .created_us
                .cmp(&a.record.created_us)
                .then(a.id.cmp(&b.id))
        });
        let views: Vec<Map<String, Value>> = vols
            .iter()
            .filter(|v| {
                p.display_name
                    .as_deref()
                    .is_none_or(|n| v.record.display_name == n)
            })
            .map(|v| volume_view(&d, v, detail, &tenant))
            .filter(|m| p.status.as_deref().is_none_or(|s| m["status"] == s))
            .collect();
        json!({ "volumes": page(views, &p) })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn volumes_list(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    let p = list_params(&q)?;
    Ok(Json(volume_views(d, t, false, p).await?))
}

async fn volumes_detail(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    let p = list_params(&q)?;
    Ok(Json(volume_views(d, t, true, p).await?))
}

async fn volume_show(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let v = find_volume(&d, &t, &id)?;
    let view = tokio::task::spawn_blocking(move || volume_view(&d, &v, true, &t))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({ "volume": view })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeCreate {
    #[serde(default)]
    snapshot_id: Option<String>,
    #[serde(default)]
    size: Option<Value>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    source_volid: Option<String>,
    #[serde(default, rename = "imageRef")]
    image_ref: Option<String>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    volume_type: Option<String>,
}

const MAX_VOLUME_GB: u64 = 65536;

fn parse_size(v: &Option<Value>) -> ApiResult<Option<u64>> {
    let bad = || {
        ApiError::bad_request(format!(
            "Invalid input received: size must be a whole number of GB from 1 to {MAX_VOLUME_GB}"
        ))
    };
    let n = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad)?,
        Some(Value::String(s)) => s.trim().parse::<u64>().map_err(|_| bad())?,
        Some(_) => return Err(bad()),
    };
    if n == 0 || n > MAX_VOLUME_GB {
        return Err(bad());
    }
    Ok(Some(n))
}

async fn volume_create(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: VolumeCreate = parse(&headers, body, "volume").await?;
    check_text("display_name", &req.display_name)?;
    check_text("display_description", &req.display_description)?;
    let mut metadata = req.metadata.unwrap_or_default();
    check_metadata(&metadata)?;
    if metadata.keys().any(|k| k.starts_with("blocksnap:")) {
        return Err(ApiError::bad_request(
            "Invalid input received: metadata keys starting with blocksnap: are reserved",
        ));
    }
    let size = parse_size(&req.size)?;
    if req.snapshot_id.is_some() && (req.source_volid.is_some() || req.image_ref.is_some()) {
        return Err(ApiError::bad_request(
            "Invalid input received: snapshot_id cannot be combined with source_volid or imageRef",
        ));
    }
    if req.source_volid.is_some() || req.image_ref.is_some() {
        return Err(ApiError::bad_request(
            "Invalid input received: blocksnap creates volumes from snapshots (snapshot_id) or blank (size); cloning volumes and images is not supported",
        ));
    }
    let _ = (&req.availability_zone, &req.volume_type);
    let (from, size_bytes, snapshot_id) = match &req.snapshot_id {
        Some(sid) => {
            let uid = Uuid::parse_str(sid)
                .map_err(|_| ApiError::not_found(format!("snapshot id:{sid} not found")))?;
            let snap = visible_snapshots(&d, &t)
                .into_iter()
                .find(|r| r.id == uid)
                .ok_or_else(|| ApiError::not_found(format!("snapshot id:{uid} not found")))?;
            if snap.status != SnapStatus::Available {
                return Err(ApiError::bad_request(
                    "Invalid snapshot: Originating snapshot status must be one of available values",
                ));
            }
            let snap_gb = gb(snap.size_bytes);
            let want = size.unwrap_or(snap_gb);
            if want < snap_gb {
                return Err(ApiError::bad_request(format!(
                    "Invalid input received: Volume size {want}GB cannot be smaller than the snapshot size {snap_gb}GB. They must be >= original snapshot size."
                )));
            }
            // Exactly the snapshot's bytes unless a larger size was asked for.
            let bytes = if size.is_some() && want > snap_gb {
                want * GB
            } else {
                snap.size_bytes
            };
            (
                Some((snap.volume_id.clone(), snap.id)),
                bytes,
                Some(snap.id),
            )
        }
        None => {
            let n = size.ok_or_else(|| {
                ApiError::bad_request(
                    "Invalid input received: a volume needs a snapshot_id or a size",
                )
            })?;
            (None, n * GB, None)
        }
    };
    // Each made volume is a loop device and an image file: bounded.
    let made = d.read(|c| {
        c.volumes
            .values()
            .filter(|v| matches!(v.kind, VolumeKind::Made { .. }))
            .count()
    });
    if made >= d.config.max_made_volumes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "VolumeLimitExceeded: Maximum number of volumes allowed ({}) exceeded (max_made_volumes)",
                d.config.max_made_volumes
            ),
        ));
    }
    let id = Uuid::new_v4().to_string();
    let image = d.volumes_dir().join(format!("{id}.img"));
    metadata.remove("blocksnap:device");
    let record = VolumeRecord {
        id: id.clone(),
        kind: VolumeKind::Made {
            image,
            device: None,
            snapshot_id,
        },
        tenant: Some(t.clone()),
        status: VolStatus::Creating,
        display_name: req.display_name.unwrap_or_default(),
        display_description: req.display_description.unwrap_or_default(),
        metadata,
        created_us: now_micros(),
        updated_us: 0,
        size_bytes,
        error: None,
    };
    d.claim(
        &id,
        Busy {
            what: format!("volume {id} is being created"),
            status: None,
        },
    )
    .map_err(|b| busy_error("Invalid volume", &id, &b))?;
    d.update(|c| {
        c.volumes.insert(id.clone(), record.clone());
    });
    tracing::info!(volume = %id, snapshot = ?snapshot_id, size_bytes, "{}", super::logline::volume_requested(&id, snapshot_id.as_ref(), size_bytes));
    let vid = id.clone();
    d.spawn(move |d| d.run_create_volume(&vid, from, size_bytes));
    let info = VolumeInfo {
        id,
        device: None,
        configured: false,
        tenant: Some(t.clone()),
        quiesce: Mode::Auto,
        block_size: None,
        max_freeze: std::time::Duration::from_secs(60),
        record,
    };
    let mut view = volume_view(&d, &info, false, &t);
    view.insert("status".into(), json!("creating"));
    view.insert("size".into(), json!(gb(size_bytes)));
    Ok(Json(json!({ "volume": view })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeUpdate {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

async fn volume_update(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let v = find_volume(&d, &t, &id)?;
    let req: VolumeUpdate = parse(&headers, body, "volume").await?;
    check_text("display_name", &req.display_name)?;
    check_text("display_description", &req.display_description)?;
    if let Some(m) = &req.metadata {
        check_metadata(m)?;
        if m.keys().any(|k| k.starts_with("blocksnap:")) {
            return Err(ApiError::bad_request(
                "Invalid input received: metadata keys starting with blocksnap: are reserved",
            ));
        }
    }
    let rec = d.update(|c| {
        let r = c
            .volumes
            .entry(v.id.clone())
            .or_insert_with(|| v.record.clone());
        if let Some(n) = req.display_name {
            r.display_name = n;
        }
        if let Some(n) = req.display_description {
            r.display_description = n;
        }
        if let Some(m) = req.metadata {
            let ours: BTreeMap<String, String> = r
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with("blocksnap:"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            r.metadata = m;
            r.metadata.extend(ours);
        }
        r.clone()
    });
    let info = VolumeInfo { record: rec, ..v };
    let view = tokio::task::spawn_blocking(move || volume_view(&d, &info, true, &t))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({ "volume": view })))
}

async fn volume_delete(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let v = find_volume(&d, &t, &id)?;
    if v.configured {
        return Err(ApiError::bad_request(format!(
            "Invalid volume: volume {} is configured in {}; it can only be removed there",
            v.id,
            d.config.path.display()
        )));
    }
    let dependents = d.read(|c| c.snapshots.values().filter(|s| s.volume_id == v.id).count());
    if dependents > 0 {
        return Err(ApiError::bad_request(format!(
            "Invalid volume: Volume still has {dependents} dependent snapshots"
        )));
    }
    if !matches!(v.record.status, VolStatus::Available | VolStatus::Error) {
        return Err(ApiError::bad_request(
            "Invalid volume: Volume status must be available or error",
        ));
    }
    if mounted_now(&d, &v).await {
        return Err(ApiError::bad_request(
            "Invalid volume: the volume is in use (mounted); unmount it first",
        ));
    }
    d.claim(
        &v.id,
        Busy {
            what: format!("volume {} is being deleted", v.id),
            status: Some("deleting"),
        },
    )
    .map_err(|b| busy_error("Invalid volume", &v.id, &b))?;
    d.update(|c| {
        if let Some(r) = c.volumes.get_mut(&v.id) {
            r.status = VolStatus::Deleting;
        }
    });
    let vid = v.id.clone();
    d.spawn(move |d| d.run_delete_volume(&vid));
    Ok(StatusCode::ACCEPTED.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revert {
    snapshot_id: String,
}

async fn volume_action(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let v = find_volume(&d, &t, &id)?;
    let body = read_json(&headers, body).await?;
    let action = match &body {
        Value::Object(m) if m.len() == 1 => m.keys().next().cloned().unwrap_or_default(),
        _ => {
            return Err(ApiError::bad_request(
                "Malformed request body: an action body holds exactly one action",
            ))
        }
    };
    if action != "revert" {
        return Err(ApiError::bad_request(format!(
            "There is no such action: {}",
            action.chars().take(64).collect::<String>()
        )));
    }
    let req: Revert = typed("revert", wrapped(body, "revert")?)?;
    let snap = find_snapshot(&d, &t, &req.snapshot_id)?;
    if snap.volume_id != v.id {
        return Err(ApiError::bad_request(format!(
            "Invalid snapshot: snapshot {} belongs to volume {}, not {}",
            snap.id, snap.volume_id, v.id
        )));
    }
    if snap.status != SnapStatus::Available {
        return Err(ApiError::bad_request(
            "Invalid snapshot: Snapshot status must be available",
        ));
    }
    if mounted_now(&d, &v).await {
        return Err(ApiError::bad_request(
            "Invalid volume: the volume is mounted; unmount it to revert it (its filesystem would be overwritten under the mount)",
        ));
    }
    d.claim(
        &v.id,
        Busy {
            what: format!("volume {} is being reverted to snapshot {}", v.id, snap.id),
            status: Some("reverting"),
        },
    )
    .map_err(|b| busy_error("Invalid volume", &v.id, &b))?;
    tracing::info!(volume = %v.id, snapshot = %snap.id, "{}", super::logline::revert_requested(&v.id, snap.id));
    let sid = snap.id;
    d.spawn(move |d| d.run_revert(v, sid));
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_accepts_the_references_spellings() {
        for (v, want) in [
            (json!(true), true),
            (json!(false), false),
            (json!("YES"), true),
            (json!("n"), false),
            (json!("1"), true),
            (json!("0"), false),
            (json!("True"), true),
            (json!(1), true),
            (json!(0), false),
        ] {
            assert_eq!(parse_force(Some(&v)).unwrap(), want, "{v}");
        }
        assert!(!parse_force(None).unwrap());
        let e = parse_force(Some(&json!("maybe"))).unwrap_err();
        assert_eq!(e.message, "Invalid value 'maybe' for force. ");
        assert!(parse_force(Some(&json!(2))).is_err());
        assert!(parse_force(Some(&json!([]))).is_err());
    }

    #[test]
    fn list_params_follow_the_reference() {
        let q = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(list_params(&q(&[])).unwrap().limit, 1000);
        assert_eq!(list_params(&q(&[("limit", "0")])).unwrap().limit, 1000);
        assert_eq!(list_params(&q(&[("limit", "5000")])).unwrap().limit, 1000);
        assert_eq!(
            list_params(&q(&[("limit", "3"), ("offset", "2")]))
                .unwrap()
                .offset,
            2
        );
        assert_eq!(
            list_params(&q(&[("limit", "x")])).unwrap_err().message,
            "limit param must be an integer"
        );
        assert_eq!(
            list_params(&q(&[("limit", "-1")])).unwrap_err().message,
            "limit param must be positive"
        );
        assert_eq!(
            list_params(&q(&[("offset", "-1")])).unwrap_err().message,
            "offset param must be positive"
        );
    }

    #[test]
    fn error_bodies_use_the_reference_names() {
        assert_eq!(
            error_body(404, "x"),
            json!({"itemNotFound": {"code": 404, "message": "x"}})
        );
        assert_eq!(error_name(422), "computeFault");
        assert_eq!(error_name(500), "computeFault");
        assert_eq!(error_name(413), "overLimit");
    }

    #[test]
    fn typed_errors_name_the_field() {
        let e = typed::<SnapshotCreate>("snapshot", json!({"volume_id": "x", "display_name": 5}))
            .unwrap_err();
        assert!(e.message.contains("snapshot.display_name"), "{}", e.message);
        let e = typed::<SnapshotCreate>("snapshot", json!({"volume_id": "x", "colour": "red"}))
            .unwrap_err();
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = typed::<SnapshotCreate>("snapshot", json!({})).unwrap_err();
        assert!(e.message.contains("volume_id"), "{}", e.message);
    }
}
