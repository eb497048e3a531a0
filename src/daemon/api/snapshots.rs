//! v1 snapshots: /v1/{tenant}/snapshots[/detail|/{id}].

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::body::{list_params, parse, parse_force, parse_full, ApiResult};
use super::{run, ApiPath, ApiQuery, Shared, Tenant};
use crate::daemon::catalog::{SnapStatus, SnapshotRecord};
use crate::daemon::ops::gb;
use crate::daemon::ops::{self, CreateSnapshot, Snapshot, SnapshotFilter, UpdateSnapshot};
use crate::util::format_timestamp;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
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
}

// ------------------------------------------------------------------ views

fn progress_text(s: &Snapshot) -> String {
    match s.record.status {
        SnapStatus::Available => "100%".to_string(),
        SnapStatus::Creating => match s.progress {
            Some(p) if p > 0.0 => format!("{p:.2}%"),
            _ => "0%".to_string(),
        },
        _ => "0%".to_string(),
    }
}

pub(super) fn summary(r: &SnapshotRecord) -> Map<String, Value> {
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

pub(super) fn detail(s: &Snapshot, tenant: &str) -> Map<String, Value> {
    let r = &s.record;
    let mut m = summary(r);
    m.insert(
        "os-extended-snapshot-attributes:progress".into(),
        json!(progress_text(s)),
    );
    m.insert(
        "os-extended-snapshot-attributes:project_id".into(),
        json!(r.tenant.as_deref().unwrap_or(tenant)),
    );
    if r.status == SnapStatus::Available {
        m.insert("blocksnap:changed_bytes".into(), json!(r.changed_bytes));
        m.insert("blocksnap:stored_bytes".into(), json!(r.stored_bytes));
        m.insert("blocksnap:freeze_ms".into(), json!(r.freeze_ms));
        if let Some(t) = &s.take {
            for (k, v) in crate::daemon::takes::detail_keys(t) {
                m.insert(k.into(), v);
            }
        }
    }
    if let Some(e) = &r.error {
        m.insert("blocksnap:error".into(), json!(e));
    }
    m
}

// ------------------------------------------------------------------ handlers

async fn list(d: Shared, t: String, q: BTreeMap<String, String>) -> ApiResult<Vec<Snapshot>> {
    let p = list_params(&q)?;
    let f = SnapshotFilter {
        status: p.status,
        volume_id: p.volume_id,
        name: p.display_name,
        page: ops::page(p.offset, p.limit),
        ..SnapshotFilter::default()
    };
    run(&d, move |ops| ops.list_snapshots(&ops::Caller::new(t), &f)).await
}

async fn snapshots_list(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    let items = list(d, t, q).await?;
    Ok(Json(
        json!({ "snapshots": items.iter().map(|s| summary(&s.record)).collect::<Vec<_>>() }),
    ))
}

async fn snapshots_detail(
    State(d): State<Shared>,
    axum::Extension(Tenant(t)): axum::Extension<Tenant>,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    let items = list(d, t.clone(), q).await?;
    Ok(Json(
        json!({ "snapshots": items.iter().map(|s| detail(s, &t)).collect::<Vec<_>>() }),
    ))
}

async fn snapshot_show(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let t = tenant.0.clone();
    let s = run(&d, move |ops| ops.snapshot(&tenant.caller(), &id)).await?;
    Ok(Json(json!({ "snapshot": detail(&s, &t) })))
}

#[derive(Debug, Deserialize)]
pub(super) struct SnapshotCreate {
    volume_id: String,
    #[serde(default)]
    force: Option<Value>,
    /// blocksnap's own: store every block (after the device shrank).
    #[serde(default)]
    full: Option<Value>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

async fn snapshot_create(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: SnapshotCreate = parse(&headers, body, "snapshot").await?;
    let force = parse_force(req.force.as_ref())?;
    let full = parse_full(req.full.as_ref())?;
    let req = CreateSnapshot {
        volume_id: req.volume_id,
        force,
        full,
        name: req.display_name,
        description: req.display_description,
        metadata: req.metadata.unwrap_or_default(),
    };
    let s = run(&d, move |ops| ops.create_snapshot(&tenant.caller(), req)).await?;
    Ok(Json(json!({ "snapshot": summary(&s.record) })))
}

#[derive(Debug, Deserialize)]
struct SnapshotUpdate {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    display_description: Option<String>,
}

async fn snapshot_update(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    // v1 answers an unknown snapshot before it reads the body.
    let (c, i) = (tenant.clone().caller(), id.clone());
    run(&d, move |ops| ops.snapshot(&c, &i)).await?;
    let req: SnapshotUpdate = parse(&headers, body, "snapshot").await?;
    let req = UpdateSnapshot {
        name: req.display_name,
        description: req.display_description,
    };
    let t = tenant.0.clone();
    let s = run(&d, move |ops| {
        ops.update_snapshot(&tenant.caller(), &id, req)
    })
    .await?;
    Ok(Json(json!({ "snapshot": detail(&s, &t) })))
}

async fn snapshot_delete(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    run(&d, move |ops| ops.delete_snapshot(&tenant.caller(), &id)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::api::body::typed;

    #[test]
    fn typed_errors_name_the_field() {
        let e = typed::<SnapshotCreate>("snapshot", json!({"volume_id": "x", "display_name": 5}))
            .unwrap_err();
        assert!(e.message.contains("snapshot.display_name"), "{}", e.message);
        // Fields v1 does not know are ignored, as Cinder ignores them.
        let r = typed::<SnapshotCreate>("snapshot", json!({"volume_id": "x", "colour": "red"}))
            .unwrap();
        assert_eq!(r.volume_id, "x");
        let e = typed::<SnapshotCreate>("snapshot", json!({})).unwrap_err();
        assert!(e.message.contains("volume_id"), "{}", e.message);
    }
}
