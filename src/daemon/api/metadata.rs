//! v1 snapshot metadata: /v1/{tenant}/snapshots/{id}/metadata[/{key}].

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::body::{parse, ApiResult};
use super::errors::ApiError;
use super::{run, ApiPath, Shared, Tenant};
use crate::daemon::ops::{MetadataChange, OpError};

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/{tenant}/snapshots/{id}/metadata",
            get(meta_get_all).post(meta_merge).put(meta_replace),
        )
        .route(
            "/v1/{tenant}/snapshots/{id}/metadata/{key}",
            get(meta_get).put(meta_put).delete(meta_delete),
        )
}

/// v1 answers an unknown snapshot before it reads the body.
async fn exists(d: &Shared, tenant: &Tenant, id: &str) -> ApiResult<()> {
    let (c, i) = (tenant.clone().caller(), id.to_string());
    run(d, move |ops| ops.snapshot(&c, &i)).await.map(drop)
}

async fn change(
    d: &Shared,
    tenant: Tenant,
    id: String,
    change: MetadataChange,
) -> ApiResult<BTreeMap<String, String>> {
    run(d, move |ops| {
        ops.change_snapshot_metadata(&tenant.caller(), &id, change)
    })
    .await
}

async fn meta_get_all(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let m = run(&d, move |ops| ops.snapshot_metadata(&tenant.caller(), &id)).await?;
    Ok(Json(json!({ "metadata": m })))
}

async fn meta_merge(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    exists(&d, &tenant, &id).await?;
    let m: BTreeMap<String, String> = parse(&headers, body, "metadata").await?;
    let out = change(&d, tenant, id, MetadataChange::Merge(m)).await?;
    Ok(Json(json!({ "metadata": out })))
}

async fn meta_replace(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    exists(&d, &tenant, &id).await?;
    let m: BTreeMap<String, String> = parse(&headers, body, "metadata").await?;
    let out = change(&d, tenant, id, MetadataChange::Replace(m)).await?;
    Ok(Json(json!({ "metadata": out })))
}

async fn meta_get(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let m = run(&d, move |ops| ops.snapshot_metadata(&tenant.caller(), &id)).await?;
    let v = m
        .get(&key)
        .ok_or_else(|| ApiError::from(OpError::MetadataItemNotFound))?;
    Ok(Json(json!({ "meta": { key: v } })))
}

async fn meta_put(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    exists(&d, &tenant, &id).await?;
    let m: BTreeMap<String, String> = parse(&headers, body, "meta").await?;
    if m.len() > 1 {
        return Err(ApiError::bad_request(
            "Request body contains too many items",
        ));
    }
    let Some(value) = m.get(&key).cloned() else {
        return Err(ApiError::bad_request("Request body and URI mismatch"));
    };
    change(
        &d,
        tenant,
        id,
        MetadataChange::Set {
            key: key.clone(),
            value: value.clone(),
        },
    )
    .await?;
    Ok(Json(json!({ "meta": { key: value } })))
}

async fn meta_delete(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Response> {
    change(&d, tenant, id, MetadataChange::Delete(key)).await?;
    Ok(StatusCode::OK.into_response())
}
