//! v1 volumes: /v1/{tenant}/volumes[/detail|/{id}|/{id}/action].

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::body::{list_params, parse, parse_size, read_json, typed, wrapped, ApiResult};
use super::errors::ApiError;
use super::{run, ApiPath, ApiQuery, Shared, Tenant};
use crate::daemon::catalog::VolumeKind;
use crate::daemon::ops::{
    gb, Caller, CreateVolume, RevertVolume, UpdateVolume, Volume, VolumeFilter,
};
use crate::util::format_timestamp;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/{tenant}/volumes",
            get(volumes_list).post(volume_create),
        )
        .route("/v1/{tenant}/volumes/detail", get(volumes_detail))
        .route(
            "/v1/{tenant}/volumes/{id}",
            get(volume_show).put(volume_update).delete(volume_delete),
        )
        .route("/v1/{tenant}/volumes/{id}/action", post(volume_action))
}

// ------------------------------------------------------------------ views

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn view(v: &Volume, detail: bool, tenant: &str) -> Map<String, Value> {
    let r = &v.info.record;
    let snapshot_id = match &r.kind {
        VolumeKind::Made { snapshot_id, .. } => json!(snapshot_id),
        VolumeKind::Configured => Value::Null,
    };
    let mut m = Map::new();
    m.insert("id".into(), json!(v.info.id));
    m.insert("status".into(), json!(v.status.as_str()));
    m.insert("size".into(), json!(gb(v.size_bytes)));
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
            json!(v.info.tenant.as_deref().unwrap_or(tenant)),
        );
        m.insert("os-vol-host-attr:host".into(), json!(hostname()));
        if let Some(e) = &r.error {
            m.insert("blocksnap:error".into(), json!(e));
        }
        if let Some(p) = v.progress {
            m.insert("blocksnap:progress".into(), json!(format!("{p:.2}%")));
        }
    }
    m
}

// ------------------------------------------------------------------ handlers

async fn list(
    d: Shared,
    t: String,
    q: BTreeMap<String, String>,
    detail: bool,
) -> ApiResult<Json<Value>> {
    let p = list_params(&q)?;
    let f = VolumeFilter {
        status: p.status,
        name: p.display_name,
        offset: p.offset,
        limit: p.limit,
        ..VolumeFilter::default()
    };
    let c = Caller::new(t.clone());
    let vols = run(&d, move |ops| ops.list_volumes(&c, &f)).await?;
    Ok(Json(
        json!({ "volumes": vols.iter().map(|v| view(v, detail, &t)).collect::<Vec<_>>() }),
    ))
}

async fn volumes_list(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    list(d, t, q, false).await
}

async fn volumes_detail(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    list(d, t, q, true).await
}

async fn volume_show(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let t = tenant.0.clone();
    let v = run(&d, move |ops| ops.volume(&tenant.caller(), &id)).await?;
    Ok(Json(json!({ "volume": view(&v, true, &t) })))
}

#[derive(Debug, Deserialize)]
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

async fn volume_create(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: VolumeCreate = parse(&headers, body, "volume").await?;
    // Accepted and ignored, as the reference does.
    let _ = (&req.availability_zone, &req.volume_type);
    let req = CreateVolume {
        snapshot_id: req.snapshot_id,
        // v1 (Rackspace's) has no backups.
        backup_id: None,
        size_gb: parse_size(&req.size),
        source_volid: req.source_volid,
        image_ref: req.image_ref,
        name: req.display_name,
        description: req.display_description,
        metadata: req.metadata.unwrap_or_default(),
    };
    let t = tenant.0.clone();
    let v = run(&d, move |ops| ops.create_volume(&tenant.caller(), req)).await?;
    Ok(Json(json!({ "volume": view(&v, false, &t) })))
}

#[derive(Debug, Deserialize)]
struct VolumeUpdate {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// v1 answers an unknown volume before it reads the body.
async fn exists(d: &Shared, tenant: &Tenant, id: &str) -> ApiResult<()> {
    let (c, i) = (tenant.clone().caller(), id.to_string());
    run(d, move |ops| ops.find_volume(&c, &i)).await.map(drop)
}

async fn volume_update(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    exists(&d, &tenant, &id).await?;
    let req: VolumeUpdate = parse(&headers, body, "volume").await?;
    let req = UpdateVolume {
        name: req.display_name,
        description: req.display_description,
        metadata: req.metadata,
    };
    let t = tenant.0.clone();
    let v = run(&d, move |ops| ops.update_volume(&tenant.caller(), &id, req)).await?;
    Ok(Json(json!({ "volume": view(&v, true, &t) })))
}

async fn volume_delete(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    run(&d, move |ops| ops.delete_volume(&tenant.caller(), &id)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[derive(Debug, Deserialize)]
struct Revert {
    snapshot_id: String,
}

async fn volume_action(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    exists(&d, &tenant, &id).await?;
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
    let req = RevertVolume {
        snapshot_id: req.snapshot_id,
    };
    run(&d, move |ops| ops.revert_volume(&tenant.caller(), &id, req)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
