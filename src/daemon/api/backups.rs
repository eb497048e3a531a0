//! Cinder's backups API on v2 and v3: /{v2,v3}/{project_id}/backups
//! [/detail|/{id}|/{id}/restore], over the backup operations
//! (`ops::backups`). v1 (Rackspace's) has no backups.
//!
//! Lists page and filter as Cinder's backups controller does (the same
//! parameters as the snapshot and volume lists: `limit`, `marker`,
//! `offset`, `sort` or `sort_key`/`sort_dir`, `with_count` from 3.45, and
//! the filters name, status, volume_id), with a `backups_links` next link
//! when a page is full.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use super::body::ApiResult;
use super::cinder::{ctx, everything, list_answer, object, Listed};
use super::{run, ApiPath, ApiQuery, Shared, Tenant};
use crate::daemon::ops::{Backup, BackupFilter, CreateBackup, RestoreBackup};
use crate::daemon::views::cinder::{Api, Ctx};
use crate::daemon::views::request::{self, Collection};
use crate::util::format_timestamp;

pub(super) fn routes() -> Router<Shared> {
    let mut r = Router::new();
    for v in ["v2", "v3"] {
        r = r
            .route(
                &format!("/{v}/{{tenant}}/backups"),
                get(backups_list).post(backup_create),
            )
            .route(
                &format!("/{v}/{{tenant}}/backups/detail"),
                get(backups_detail),
            )
            .route(
                &format!("/{v}/{{tenant}}/backups/{{id}}"),
                get(backup_show).delete(backup_delete),
            )
            .route(
                &format!("/{v}/{{tenant}}/backups/{{id}}/restore"),
                post(backup_restore),
            );
    }
    r
}

fn text_or_null(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        json!(s)
    }
}

fn gb(bytes: u64) -> u64 {
    bytes.div_ceil(crate::defaults::GB)
}

/// Cinder's backup summary: id, name, links.
fn summary(c: &Ctx, b: &Backup) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(b.record.id));
    m.insert("name".into(), text_or_null(&b.record.name));
    m.insert("links".into(), c.links("backups", &b.record.id.to_string()));
    m
}

/// Cinder's backup detail, with blocksnap's own figures under
/// `blocksnap:` keys (Cinder has no progress for backups).
fn detail(c: &Ctx, b: &Backup) -> Map<String, Value> {
    let r = &b.record;
    let mut m = summary(c, b);
    m.insert("status".into(), json!(b.status));
    m.insert("description".into(), text_or_null(&r.description));
    m.insert("volume_id".into(), json!(r.volume_id));
    m.insert("snapshot_id".into(), json!(r.snapshot_id));
    m.insert("size".into(), json!(gb(r.size_bytes)));
    m.insert("object_count".into(), json!(r.object_count));
    let incremental = match r.status {
        crate::daemon::backups::BackupStatus::Creating => r.incremental,
        _ => r.parent_id.is_some(),
    };
    m.insert("is_incremental".into(), json!(incremental));
    m.insert("has_dependent_backups".into(), json!(b.has_dependents));
    m.insert("container".into(), json!(r.remote));
    m.insert("availability_zone".into(), Value::Null);
    m.insert("created_at".into(), json!(format_timestamp(r.created_us)));
    m.insert(
        "updated_at".into(),
        if r.updated_us == 0 {
            Value::Null
        } else {
            json!(format_timestamp(r.updated_us))
        },
    );
    m.insert(
        "data_timestamp".into(),
        json!(format_timestamp(r.data_timestamp_us)),
    );
    m.insert("fail_reason".into(), json!(r.fail_reason));
    if matches!(c.api, Api::V3(_)) {
        m.insert("metadata".into(), json!({}));
    }
    if let Some(p) = b.progress {
        m.insert("blocksnap:progress".into(), json!(format!("{p:.2}%")));
    }
    m.insert("blocksnap:parent_id".into(), json!(r.parent_id));
    m.insert("blocksnap:size_bytes".into(), json!(r.size_bytes));
    m.insert("blocksnap:changed_bytes".into(), json!(r.changed_bytes));
    m.insert("blocksnap:uploaded_bytes".into(), json!(r.uploaded_bytes));
    m
}

async fn list_any(
    d: Shared,
    api: Api,
    t: Tenant,
    headers: HeaderMap,
    q: BTreeMap<String, String>,
    detailed: bool,
) -> ApiResult<Json<Value>> {
    let lr = request::list_request(api, Collection::Backups, &q)?;
    let f = BackupFilter {
        status: lr.status.clone(),
        volume_id: lr.volume_id.clone(),
        name: lr.name.clone(),
        name_like: lr.name_like.clone(),
        page: lr.page.clone(),
    };
    let c = ctx(api, &headers, &t.0);
    let with_count = lr.with_count;
    let caller = t.caller();
    let listed = run(&d, move |ops| {
        let items = ops.list_backups(&caller, &f)?;
        let count = if with_count {
            let all = BackupFilter {
                page: everything(&f.page),
                ..f.clone()
            };
            Some(ops.list_backups(&caller, &all)?.len())
        } else {
            None
        };
        Ok(Listed { items, count })
    })
    .await?;
    let path = if detailed {
        "backups/detail"
    } else {
        "backups"
    };
    Ok(list_answer(
        &c,
        path,
        &q,
        &lr,
        listed,
        |b| b.record.id.to_string(),
        |b| {
            if detailed {
                detail(&c, b)
            } else {
                summary(&c, b)
            }
        },
    ))
}

async fn backups_list(
    State(d): State<Shared>,
    Extension(t): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    list_any(d, api, t, headers, q, false).await
}

async fn backups_detail(
    State(d): State<Shared>,
    Extension(t): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery,
) -> ApiResult<Json<Value>> {
    list_any(d, api, t, headers, q, true).await
}

async fn backup_show(
    State(d): State<Shared>,
    Extension(t): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let c = ctx(api, &headers, &t.0);
    let b = run(&d, move |ops| ops.backup(&t.caller(), &id)).await?;
    Ok(Json(json!({ "backup": detail(&c, &b) })))
}

async fn backup_create(
    State(d): State<Shared>,
    Extension(t): Extension<Tenant>,
    Extension(api): Extension<Api>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let r = request::backup_create(object(&headers, body, "backup").await?)?;
    let req = CreateBackup {
        volume_id: r.volume_id,
        snapshot_id: r.snapshot_id,
        incremental: r.incremental,
        force: r.force,
        name: r.name,
        description: r.description,
    };
    let c = ctx(api, &headers, &t.0);
    let b = run(&d, move |ops| ops.create_backup(&t.caller(), req)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "backup": summary(&c, &b) })),
    )
        .into_response())
}

async fn backup_delete(
    State(d): State<Shared>,
    Extension(t): Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    run(&d, move |ops| ops.delete_backup(&t.caller(), &id)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn backup_restore(
    State(d): State<Shared>,
    Extension(t): Extension<Tenant>,
    headers: HeaderMap,
    ApiPath((_, id)): ApiPath<(String, String)>,
    body: Body,
) -> ApiResult<Response> {
    let r = request::backup_restore(object(&headers, body, "restore").await?)?;
    let req = RestoreBackup {
        volume_id: r.volume_id,
        name: r.name,
    };
    let out = run(&d, move |ops| ops.restore_backup(&t.caller(), &id, req)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "restore": {
            "backup_id": out.backup_id,
            "volume_id": out.volume_id,
            "volume_name": out.volume_name,
        }})),
    )
        .into_response())
}
