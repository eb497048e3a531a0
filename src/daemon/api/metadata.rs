//! Metadata of snapshots and volumes, the same in every version:
//! /{v1,v2,v3}/{tenant}/{snapshots,volumes}/{id}/metadata[/{key}].
//!
//! Bodies are `{"metadata": {...}}` for the whole set and `{"meta": {k: v}}`
//! for one item in v1, v2 and v3 alike. From 3.15 a volume's metadata
//! carries an ETag and a PUT with `If-Match` that no longer matches is
//! refused 412 (Cinder's lost-update guard, which cinderclient's `metadata
//! unset` uses).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::body::{parse, ApiResult};
use super::errors::ApiError;
use super::{run, ApiPath, Shared, Tenant};
use crate::daemon::microversion::Microversion;
use crate::daemon::ops::{MetadataChange, OpError, Ops};
use crate::daemon::views::cinder::Api;

/// What the metadata belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Snapshot,
    Volume,
}

/// Volume metadata ETags (Cinder's `ETAGS` microversion).
const ETAGS: Microversion = Microversion::new(3, 15);

pub(super) fn routes() -> Router<Shared> {
    let mut r = Router::new();
    for v in ["v1", "v2", "v3"] {
        for (collection, target) in [("snapshots", Target::Snapshot), ("volumes", Target::Volume)] {
            let one = Router::new()
                .route(
                    &format!("/{v}/{{tenant}}/{collection}/{{id}}/metadata"),
                    get(get_all).post(merge).put(replace),
                )
                .route(
                    &format!("/{v}/{{tenant}}/{collection}/{{id}}/metadata/{{key}}"),
                    get(get_one).put(put_one).delete(delete_one),
                )
                .route_layer(Extension(target));
            r = r.merge(one);
        }
    }
    r
}

fn read(
    ops: &Ops,
    t: &Tenant,
    target: Target,
    id: &str,
) -> Result<BTreeMap<String, String>, OpError> {
    let c = t.clone().caller();
    match target {
        Target::Snapshot => ops.snapshot_metadata(&c, id),
        Target::Volume => ops.volume_metadata(&c, id),
    }
}

async fn current(
    d: &Shared,
    t: &Tenant,
    target: Target,
    id: &str,
) -> ApiResult<BTreeMap<String, String>> {
    let (t, id) = (t.clone(), id.to_string());
    run(d, move |ops| read(&ops, &t, target, &id)).await
}

async fn change(
    d: &Shared,
    t: Tenant,
    target: Target,
    id: String,
    change: MetadataChange,
) -> ApiResult<BTreeMap<String, String>> {
    run(d, move |ops| {
        let c = t.caller();
        match target {
            Target::Snapshot => ops.change_snapshot_metadata(&c, &id, change),
            Target::Volume => ops.change_volume_metadata(&c, &id, change),
        }
    })
    .await
}

/// The ETag of a metadata set: a digest of its JSON body.
pub fn etag(m: &BTreeMap<String, String>) -> String {
    let body = serde_json::to_vec(&json!({ "metadata": m })).unwrap_or_default();
    let digest = Sha256::digest(&body);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether an `If-Match` header names `tag` (or is `*`).
fn if_match_names(header: &str, tag: &str) -> bool {
    header.split(',').map(str::trim).any(|t| {
        let t = t.strip_prefix("W/").unwrap_or(t).trim_matches('"');
        t == "*" || t == tag
    })
}

/// From 3.15, a volume metadata PUT whose If-Match names an older state
/// is refused 412 with no body, as Cinder does.
async fn precondition(
    d: &Shared,
    t: &Tenant,
    target: Target,
    id: &str,
    api: Option<Api>,
    headers: &HeaderMap,
) -> ApiResult<Option<Response>> {
    let checked = target == Target::Volume && api.is_some_and(|a| a.has(ETAGS));
    let Some(want) = headers.get("if-match").filter(|_| checked) else {
        return Ok(None);
    };
    let now = etag(&current(d, t, target, id).await?);
    if if_match_names(want.to_str().unwrap_or(""), &now) {
        Ok(None)
    } else {
        Ok(Some(StatusCode::PRECONDITION_FAILED.into_response()))
    }
}

async fn get_all(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(target): Extension<Target>,
    api: Option<Extension<Api>>,
    ApiPath((_, id)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let m = current(&d, &tenant, target, &id).await?;
    let tag = etag(&m);
    let mut resp = Json(json!({ "metadata": m })).into_response();
    if target == Target::Volume && api.is_some_and(|Extension(a)| a.has(ETAGS)) {
        if let Ok(v) = HeaderValue::from_str(&tag) {
            resp.headers_mut().insert("etag", v);
        }
    }
    Ok(resp)
}

async fn merge(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(target): Extension<Target>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    // An unknown snapshot or volume is answered before the body is read.
    current(&d, &tenant, target, &id).await?;
    let m: BTreeMap<String, String> = parse(&headers, body, "metadata").await?;
    let out = change(&d, tenant, target, id, MetadataChange::Merge(m)).await?;
    Ok(Json(json!({ "metadata": out })))
}

async fn replace(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(target): Extension<Target>,
    api: Option<Extension<Api>>,
    ApiPath((_, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    current(&d, &tenant, target, &id).await?;
    // The body is read before a 412, so the client is not cut off while
    // it sends it.
    let m: BTreeMap<String, String> = parse(&headers, body, "metadata").await?;
    let api = api.map(|Extension(a)| a);
    if let Some(refused) = precondition(&d, &tenant, target, &id, api, &headers).await? {
        return Ok(refused);
    }
    let out = change(&d, tenant, target, id, MetadataChange::Replace(m)).await?;
    Ok(Json(json!({ "metadata": out })).into_response())
}

async fn get_one(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(target): Extension<Target>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let m = current(&d, &tenant, target, &id).await?;
    let v = m
        .get(&key)
        .ok_or_else(|| ApiError::from(OpError::MetadataItemNotFound))?;
    Ok(Json(json!({ "meta": { key: v } })))
}

async fn put_one(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(target): Extension<Target>,
    api: Option<Extension<Api>>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    current(&d, &tenant, target, &id).await?;
    let m: BTreeMap<String, String> = parse(&headers, body, "meta").await?;
    let api = api.map(|Extension(a)| a);
    if let Some(refused) = precondition(&d, &tenant, target, &id, api, &headers).await? {
        return Ok(refused);
    }
    if m.len() > 1 {
        return Err(ApiError::bad_request(
            "Request body contains too many items",
        ));
    }
    let Some(value) = m.get(&key).cloned() else {
        return Err(ApiError::bad_request("Request body and URI mismatch"));
    };
    let set = MetadataChange::Set {
        key: key.clone(),
        value: value.clone(),
    };
    change(&d, tenant, target, id, set).await?;
    Ok(Json(json!({ "meta": { key: value } })).into_response())
}

async fn delete_one(
    State(d): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Extension(target): Extension<Target>,
    ApiPath((_, id, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Response> {
    change(&d, tenant, target, id, MetadataChange::Delete(key)).await?;
    Ok(StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_follow_the_content_and_if_match_reads_like_webob() {
        let a = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let b = BTreeMap::from([("k".to_string(), "w".to_string())]);
        assert_eq!(etag(&a), etag(&a.clone()));
        assert_ne!(etag(&a), etag(&b));
        assert_eq!(etag(&a).len(), 32);
        let t = etag(&a);
        assert!(if_match_names(&t, &t));
        assert!(if_match_names(&format!("\"{t}\""), &t));
        assert!(if_match_names(&format!("\"x\", W/\"{t}\""), &t));
        assert!(if_match_names("*", &t));
        assert!(!if_match_names(&etag(&b), &t));
        assert!(!if_match_names("", &t));
    }
}
