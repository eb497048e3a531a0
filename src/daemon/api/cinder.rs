//! v2 and v3 (Cinder's API) over the same operations as v1:
//! /{v2,v3}/{project_id}/snapshots[/detail|/{id}] and
//! /{v2,v3}/{project_id}/volumes[/detail|/{id}|/{id}/action]; metadata is
//! in `metadata` for every version. Each handler reads the request
//! (`views::request`), runs one operation and renders the result
//! (`views::cinder`) for the API and microversion the request came in on.
//!
//! Also the version layer every v2/v3 request passes: it reads the
//! microversion (v3) and echoes it on the answer, errors included.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use super::body::{read_json, wrapped, ApiResult};
use super::errors::ApiError;
use super::{run, ApiPath, ApiQuery, Shared, Tenant};
use crate::daemon::discovery::{self, Major};
use crate::daemon::microversion::{self, features};
use crate::daemon::ops::{
    gb, Caller, CreateSnapshot, CreateVolume, OpError, RevertVolume, Snapshot, SnapshotFilter,
    UpdateSnapshot, UpdateVolume, Volume, VolumeFilter,
};
use crate::daemon::store::{Page, SortDir, SortKey};
use crate::daemon::views::cinder::{self as view, Api, Ctx, SnapshotFacts, VolumeFacts};
use crate::daemon::views::request::{self, Collection, ListRequest, RequestError};

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

fn snap(s: &Snapshot) -> SnapshotFacts<'_> {
    SnapshotFacts {
        record: &s.record,
        progress: s.progress,
    }
}

fn vol(v: &Volume) -> VolumeFacts<'_> {
    VolumeFacts {
        info: &v.info,
        status: v.status.as_str(),
        size_bytes: v.size_bytes,
        progress: v.progress,
    }
}

pub(super) fn routes() -> Router<Shared> {
    let mut r = Router::new();
    for v in ["v2", "v3"] {
        r = r
            .route(
                &format!("/{v}/{{tenant}}/snapshots"),
                get(snapshots_list).post(snapshot_create),
            )
            .route(
                &format!("/{v}/{{tenant}}/snapshots/detail"),
                get(snapshots_detail),
            )
            .route(
                &format!("/{v}/{{tenant}}/snapshots/{{id}}"),
                get(snapshot_show)
                    .put(snapshot_update)
                    .delete(snapshot_delete),
            )
            .route(
                &format!("/{v}/{{tenant}}/volumes"),
                get(volumes_list).post(volume_create),
            )
            .route(
                &format!("/{v}/{{tenant}}/volumes/detail"),
                get(volumes_detail),
            )
            .route(
                &format!("/{v}/{{tenant}}/volumes/{{id}}"),
                get(volume_show).put(volume_update).delete(volume_delete),
            )
            .route(
                &format!("/{v}/{{tenant}}/volumes/{{id}}/action"),
                post(volume_action),
            );
    }
    r
}

/// Discovery, without a token: `GET /` (300) and the one-version
/// documents (200).
pub(super) fn discovery_routes() -> Router<Shared> {
    let mut r = Router::new().route("/", get(versions));
    for m in Major::ALL {
        let seg = m.segment();
        r = r
            .route(&format!("/{seg}"), get(move |h: HeaderMap| version(h, m)))
            .route(&format!("/{seg}/"), get(move |h: HeaderMap| version(h, m)));
    }
    // keystoneauth (openstacksdk) reads the endpoint it is given.
    let v3 = |h: HeaderMap| version(h, Major::V3);
    r.route("/v3/{project_id}", get(v3))
        .route("/v3/{project_id}/", get(v3))
}

fn base(headers: &HeaderMap) -> String {
    discovery::base_url(headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

async fn versions(headers: HeaderMap) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(discovery::versions_document(&base(&headers))),
    )
        .into_response()
}

async fn version(headers: HeaderMap, m: Major) -> Response {
    Json(discovery::version_document(&base(&headers), m)).into_response()
}

/// The version layer of /v2 and /v3: the request's `Api` for the views;
/// on v3 the microversion is read (a bad one is refused as Cinder refuses
/// it) and echoed with `Vary` on every answer.
pub(super) async fn versioned(mut req: Request, next: Next) -> Response {
    let major = req
        .uri()
        .path()
        .split('/')
        .nth(1)
        .and_then(Major::from_segment);
    match major {
        Some(Major::V3) => match microversion::negotiate(req.headers()) {
            Ok(v) => {
                req.extensions_mut().insert(Api::V3(v));
                let mut resp = next.run(req).await;
                microversion::echo(resp.headers_mut(), v);
                resp
            }
            Err(e) => {
                let mut resp = ApiError::new(e.status(), e.to_string()).into_response();
                if let Some(v) = e.requested() {
                    microversion::echo(resp.headers_mut(), v);
                }
                resp
            }
        },
        Some(Major::V2) => {
            req.extensions_mut().insert(Api::V2);
            next.run(req).await
        }
        _ => next.run(req).await,
    }
}

/// What every answer of a request shares.
pub(super) fn ctx(api: Api, headers: &HeaderMap, tenant: &str) -> Ctx {
    Ctx {
        api,
        base: base(headers),
        project: tenant.to_string(),
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
    }
}

/// A request body's wrapped object (`{"snapshot": {...}}`). Without it,
/// Cinder's v2/v3 schema validation answers 400 naming the field (v1's
/// reference says 422).
pub(super) async fn object(headers: &HeaderMap, body: Body, key: &str) -> ApiResult<Value> {
    match read_json(headers, body).await? {
        Value::Object(mut m) if m.contains_key(key) => Ok(m.remove(key).unwrap_or_default()),
        _ => Err(ApiError::bad_request(format!(
            "Invalid input for field {key}: is required"
        ))),
    }
}

/// A list's items and total: one page, and with `with_count` the number of
/// all items that match.
pub(super) struct Listed<T> {
    pub(super) items: Vec<T>,
    pub(super) count: Option<usize>,
}

pub(super) fn everything(page: &Page) -> Page {
    Page {
        sort: page.sort.clone(),
        ..Page::default()
    }
}

/// A list answer; `path` is the list's path under the project
/// (`snapshots/detail`), its first segment the collection.
pub(super) fn list_answer<T>(
    c: &Ctx,
    path: &str,
    q: &BTreeMap<String, String>,
    lr: &ListRequest,
    listed: Listed<T>,
    id: impl Fn(&T) -> String,
    render: impl Fn(&T) -> Map<String, Value>,
) -> Json<Value> {
    let collection = path.split('/').next().unwrap_or(path);
    let last = listed.items.last().map(&id);
    let links = view::next_links(
        c,
        path,
        q,
        lr.page.limit,
        last.as_deref(),
        listed.items.len(),
    );
    Json(view::list_body(
        collection,
        listed.items.iter().map(render).collect(),
        links,
        listed.count,
    ))
}

// ------------------------------------------------------------------ snapshots

async fn list_snapshots(d: &Shared, t: &str, lr: &ListRequest) -> ApiResult<Listed<Snapshot>> {
    if lr.nothing_matches {
        let count = lr.with_count.then_some(0);
        return Ok(Listed {
            items: Vec::new(),
            count,
        });
    }
    let f = SnapshotFilter {
        status: lr.status.clone(),
        volume_id: lr.volume_id.clone(),
        name: lr.name.clone(),
        metadata: lr.metadata.clone(),
        name_like: lr.name_like.clone(),
        page: lr.page.clone(),
    };
    let c = Caller::new(t);
    let with_count = lr.with_count;
    run(d, move |ops| {
        let items = ops.list_snapshots(&c, &f)?;
        let count = if with_count {
            let all = SnapshotFilter {
                page: everything(&f.page),
                ..f.clone()
            };
            Some(ops.list_snapshots(&c, &all)?.len())
        } else {
            None
        };
        Ok(Listed { items, count })
    })
    .await
}

async fn snapshots_any(
    d: Shared,
    api: Api,
    t: String,
    headers: HeaderMap,
    q: BTreeMap<String, String>,
    detail: bool,
) -> ApiResult<Json<Value>> {
    let lr = request::list_request(api, Collection::Snapshots, &q)?;
    let listed = list_snapshots(&d, &t, &lr).await?;
    let c = ctx(api, &headers, &t);
    let path = if detail {
        "snapshots/detail"
    } else {
        "snapshots"
    };
    Ok(list_answer(
        &c,
        path,
        &q,
        &lr,
        listed,
        |s| s.record.id.to_string(),
        |s| {
            if detail {
                view::snapshot_show(&c, snap(s))
            } else {
                view::snapshot_summary(snap(s))
            }
        },
    ))
}

async fn snapshots_list(
    State(d): State<Shared>,
    Extension(Tenant(t)): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    snapshots_any(d, api, t, headers, q, false).await
}

async fn snapshots_detail(
    State(d): State<Shared>,
    Extension(Tenant(t)): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    snapshots_any(d, api, t, headers, q, true).await
}

async fn snapshot_show(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let c = ctx(api, &headers, &tenant.0);
    let s = run(&d, move |ops| ops.snapshot(&tenant.caller(), &id)).await?;
    Ok(Json(
        json!({ "snapshot": view::snapshot_show(&c, snap(&s)) }),
    ))
}

async fn snapshot_create(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let r = request::snapshot_create(Some(api), object(&headers, body, "snapshot").await?)?;
    let req = CreateSnapshot {
        volume_id: r.volume_id,
        force: r.force,
        full: r.full,
        name: r.name,
        description: r.description,
        metadata: r.metadata,
    };
    let c = ctx(api, &headers, &tenant.0);
    let s = run(&d, move |ops| ops.create_snapshot(&tenant.caller(), req)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "snapshot": view::snapshot_detail(&c, snap(&s)) })),
    )
        .into_response())
}

async fn snapshot_update(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let r = request::snapshot_update(Some(api), object(&headers, body, "snapshot").await?)?;
    let req = UpdateSnapshot {
        name: r.name,
        description: r.description,
    };
    let c = ctx(api, &headers, &tenant.0);
    let s = run(&d, move |ops| {
        ops.update_snapshot(&tenant.caller(), &id, req)
    })
    .await?;
    Ok(Json(
        json!({ "snapshot": view::snapshot_detail(&c, snap(&s)) }),
    ))
}

async fn snapshot_delete(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    run(&d, move |ops| ops.delete_snapshot(&tenant.caller(), &id)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

// ------------------------------------------------------------------ volumes

async fn list_volumes(d: &Shared, t: &str, lr: &ListRequest) -> ApiResult<Listed<Volume>> {
    if lr.nothing_matches {
        let count = lr.with_count.then_some(0);
        return Ok(Listed {
            items: Vec::new(),
            count,
        });
    }
    let f = VolumeFilter {
        status: lr.status.clone(),
        name: lr.name.clone(),
        name_like: lr.name_like.clone(),
        metadata: lr.metadata.clone(),
        size_gb: lr.size_gb,
        sort: lr.page.sort.clone(),
        marker: lr.page.marker.clone(),
        offset: lr.page.offset,
        limit: lr.page.limit,
    };
    let c = Caller::new(t);
    let with_count = lr.with_count;
    run(d, move |ops| {
        let items = ops.list_volumes(&c, &f)?;
        let count = if with_count {
            let all = VolumeFilter {
                marker: None,
                offset: 0,
                limit: usize::MAX,
                ..f.clone()
            };
            Some(ops.list_volumes(&c, &all)?.len())
        } else {
            None
        };
        Ok(Listed { items, count })
    })
    .await
}

async fn volumes_any(
    d: Shared,
    api: Api,
    t: String,
    headers: HeaderMap,
    q: BTreeMap<String, String>,
    detail: bool,
) -> ApiResult<Json<Value>> {
    let lr = request::list_request(api, Collection::Volumes, &q)?;
    let listed = list_volumes(&d, &t, &lr).await?;
    let c = ctx(api, &headers, &t);
    let path = if detail { "volumes/detail" } else { "volumes" };
    Ok(list_answer(
        &c,
        path,
        &q,
        &lr,
        listed,
        |v| v.info.id.clone(),
        |v| {
            if detail {
                view::volume_show(&c, vol(v))
            } else {
                view::volume_summary(&c, vol(v))
            }
        },
    ))
}

async fn volumes_list(
    State(d): State<Shared>,
    Extension(Tenant(t)): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    volumes_any(d, api, t, headers, q, false).await
}

async fn volumes_detail(
    State(d): State<Shared>,
    Extension(Tenant(t)): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    volumes_any(d, api, t, headers, q, true).await
}

async fn volume_show(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let c = ctx(api, &headers, &tenant.0);
    let v = run(&d, move |ops| ops.volume(&tenant.caller(), &id)).await?;
    Ok(Json(json!({ "volume": view::volume_show(&c, vol(&v)) })))
}

async fn volume_create(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let r = request::volume_create(Some(api), object(&headers, body, "volume").await?)?;
    let req = CreateVolume {
        snapshot_id: r.snapshot_id,
        backup_id: r.backup_id,
        size_gb: r.size_gb,
        source_volid: r.source_volid,
        image_ref: r.image_ref,
        name: r.name,
        description: r.description,
        metadata: r.metadata,
    };
    let c = ctx(api, &headers, &tenant.0);
    let v = run(&d, move |ops| ops.create_volume(&tenant.caller(), req)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "volume": view::volume_detail(&c, vol(&v)) })),
    )
        .into_response())
}

async fn volume_update(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let r = request::volume_update(Some(api), object(&headers, body, "volume").await?)?;
    let req = UpdateVolume {
        name: r.name,
        description: r.description,
        metadata: r.metadata,
    };
    let c = ctx(api, &headers, &tenant.0);
    let v = run(&d, move |ops| ops.update_volume(&tenant.caller(), &id, req)).await?;
    Ok(Json(json!({ "volume": view::volume_detail(&c, vol(&v)) })))
}

async fn volume_delete(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Response> {
    // openstacksdk sends cascade=False&force=False. Cascading would delete
    // the volume's snapshots with it; forcing is an administrator's.
    let flag = |k: &str| -> ApiResult<bool> {
        match q.get(k) {
            None => Ok(false),
            Some(v) => request::parse_bool(&Value::String(v.clone())).ok_or_else(|| {
                ApiError::bad_request(format!("Invalid value '{v}' for {k}: expected a boolean"))
            }),
        }
    };
    if flag("cascade")? {
        return Err(ApiError::bad_request(
            "Invalid volume: blocksnap does not delete a volume's snapshots with it (cascade); delete them first",
        ));
    }
    if flag("force")? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Policy doesn't allow volume:force_delete to be performed.",
        ));
    }
    run(&d, move |ops| ops.delete_volume(&tenant.caller(), &id)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn volume_action(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
    body: Body,
) -> ApiResult<Response> {
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
            action
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        )));
    }
    // Revert is v3's from 3.40; below, Cinder has no such method.
    if matches!(api, Api::V3(_)) && !api.has(features::VOLUME_REVERT) {
        return Err(ApiError::plain_not_found());
    }
    let snapshot_id = request::revert(wrapped(body, "revert")?)?;
    revert(&d, tenant, id, snapshot_id).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Cinder's revert: only to the volume's latest snapshot, of the volume's
/// size; a volume or snapshot in the wrong state is a conflict (409).
async fn revert(d: &Shared, tenant: Tenant, id: String, snapshot_id: String) -> ApiResult<()> {
    let c = tenant.caller();
    run(d, move |ops| -> Result<Result<(), ApiError>, OpError> {
        let v = ops.volume(&c, &id)?;
        let latest = ops.list_snapshots(
            &c,
            &SnapshotFilter {
                volume_id: Some(v.info.id.clone()),
                page: Page {
                    sort: vec![(SortKey::CreatedAt, SortDir::Desc)],
                    limit: 1,
                    ..Page::default()
                },
                ..SnapshotFilter::default()
            },
        )?;
        let Some(latest) = latest.into_iter().next() else {
            return Ok(Err(ApiError::bad_request(format!(
                "Volume {} doesn't have any snapshots.",
                v.info.id
            ))));
        };
        if latest.record.id.to_string() != snapshot_id.to_ascii_lowercase() {
            return Ok(Err(ApiError::bad_request(format!(
                "Specified snapshot {} is None or not the latest one of volume {}.",
                snapshot_id.chars().filter(|c| !c.is_control()).take(64).collect::<String>(),
                v.info.id
            ))));
        }
        if gb(v.size_bytes) != gb(latest.record.size_bytes) {
            return Ok(Err(ApiError::bad_request(format!(
                "Can't revert volume {} to its latest snapshot {}. The volume size must be equal to the snapshot size.",
                v.info.id, latest.record.id
            ))));
        }
        match ops.revert_volume(&c, &v.info.id, RevertVolume { snapshot_id }) {
            Ok(()) => Ok(Ok(())),
            // Cinder answers a volume or snapshot in the wrong state with
            // 409 Conflict here (its other calls say 400).
            Err(
                e @ (OpError::RevertSnapshotNotAvailable
                | OpError::MountedForRevert
                | OpError::DeviceUnreadable(_)
                | OpError::InUse { .. }),
            ) => Ok(Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))),
            Err(e) => Err(e),
        }
    })
    .await?
}
