//! Cinder's v2 and v3 answers for snapshots and volumes: pure functions from
//! what an operation returns (a record and its live state) to JSON, shaped
//! as Cinder's view builders shape them (cinder/api/views/snapshots.py,
//! cinder/api/v3/views/snapshots.py, cinder/api/v3/views/volumes.py, the
//! extended-attribute extensions) for the microversion asked.
//!
//! Which view an answer uses, as in Cinder:
//! - snapshots: a plain list is `summary`; create and update answer
//!   `detail`; show and the detail list answer `detail` plus the
//!   `os-extended-snapshot-attributes:*` fields.
//! - volumes: a plain list is `summary` (id, name, links); create and
//!   update answer `detail`; show and the detail list add the
//!   `os-vol-tenant-attr:tenant_id` and `os-vol-host-attr:host` fields.
//!
//! Fields Cinder has and blocksnap has no notion of are there with the value
//! Cinder gives a volume without that thing (no attachments, no type, not
//! encrypted, not part of a group...). blocksnap's own extras
//! (`blocksnap:changed_bytes`, `blocksnap:error`, ...) are added to the
//! show/detail views as the v1 API adds them; clients ignore fields they do
//! not know.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::super::catalog::{SnapStatus, SnapshotRecord, VolumeKind};
use super::super::microversion::{features, Microversion};
use super::super::VolumeInfo;
use crate::util::format_timestamp;

/// One gigabyte as the API counts sizes.
const GB: u64 = 1 << 30;

/// Which API an answer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    V2,
    V3(Microversion),
}

impl Api {
    fn segment(self) -> &'static str {
        match self {
            Api::V2 => "v2",
            Api::V3(_) => "v3",
        }
    }

    /// Whether a v3 microversion feature is on (never for v2).
    pub fn has(self, feature: Microversion) -> bool {
        matches!(self, Api::V3(v) if v.at_least(feature))
    }
}

/// What every answer of one request shares.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub api: Api,
    /// `http://host[:port]` (see `discovery::base_url`).
    pub base: String,
    /// The project (tenant) in the request's URL.
    pub project: String,
    /// The host name shown as `os-vol-host-attr:host`.
    pub host: String,
}

impl Ctx {
    fn href(&self, collection: &str, id: &str) -> String {
        format!(
            "{}/{}/{}/{collection}/{id}",
            self.base,
            self.api.segment(),
            self.project
        )
    }

    fn bookmark(&self, collection: &str, id: &str) -> String {
        format!("{}/{}/{collection}/{id}", self.base, self.project)
    }

    pub(crate) fn links(&self, collection: &str, id: &str) -> Value {
        json!([
            { "rel": "self", "href": self.href(collection, id) },
            { "rel": "bookmark", "href": self.bookmark(collection, id) },
        ])
    }
}

/// A snapshot as an operation returns it.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotFacts<'a> {
    pub record: &'a SnapshotRecord,
    /// Percent done while it is being taken.
    pub progress: Option<f64>,
}

/// A volume as an operation returns it.
#[derive(Clone, Copy, Debug)]
pub struct VolumeFacts<'a> {
    pub info: &'a VolumeInfo,
    /// As the API names it: available, in-use, creating, reverting, ...
    pub status: &'a str,
    /// The device's size now (or the recorded one).
    pub size_bytes: u64,
    /// Percent done of a job running on it.
    pub progress: Option<f64>,
}

fn gb(bytes: u64) -> u64 {
    bytes.div_ceil(GB)
}

/// `null` for a record never changed since it was made, as Cinder's
/// `updated_at` is.
fn timestamp_or_null(us: i64) -> Value {
    if us == 0 {
        Value::Null
    } else {
        json!(format_timestamp(us))
    }
}

/// Empty text is `null` in Cinder's v2/v3 answers for volume names and
/// descriptions (Cinder stores what was given; blocksnap stores "" for
/// "none given").
fn text_or_null(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        json!(s)
    }
}

/// The progress text the v1 API also shows.
pub fn progress_text(s: SnapshotFacts<'_>) -> String {
    match s.record.status {
        SnapStatus::Available => "100%".to_string(),
        SnapStatus::Creating => match s.progress {
            Some(p) if p > 0.0 => format!("{p:.2}%"),
            _ => "0%".to_string(),
        },
        _ => "0%".to_string(),
    }
}

// ------------------------------------------------------------------ snapshots

/// Cinder's snapshot `summary`.
pub fn snapshot_summary(s: SnapshotFacts<'_>) -> Map<String, Value> {
    let r = s.record;
    let mut m = Map::new();
    m.insert("id".into(), json!(r.id));
    m.insert("created_at".into(), json!(format_timestamp(r.created_us)));
    m.insert("updated_at".into(), timestamp_or_null(r.updated_us));
    m.insert("name".into(), text_or_null(&r.display_name));
    m.insert("description".into(), text_or_null(&r.display_description));
    m.insert("volume_id".into(), json!(r.volume_id));
    m.insert("status".into(), json!(r.status.as_str()));
    m.insert("size".into(), json!(gb(r.size_bytes)));
    m.insert("metadata".into(), json!(r.metadata));
    m
}

/// Cinder's snapshot `detail` (create and update answers).
pub fn snapshot_detail(ctx: &Ctx, s: SnapshotFacts<'_>) -> Map<String, Value> {
    let mut m = snapshot_summary(s);
    if ctx.api.has(features::GROUP_SNAPSHOTS) {
        m.insert("group_snapshot_id".into(), Value::Null);
    }
    if ctx.api.has(features::SNAPSHOT_LIST_USER_ID) {
        // blocksnap knows projects (tenants), not users.
        m.insert("user_id".into(), Value::Null);
    }
    m
}

/// Show and the detail list: `detail` plus the extended attributes, and
/// blocksnap's own figures.
pub fn snapshot_show(ctx: &Ctx, s: SnapshotFacts<'_>) -> Map<String, Value> {
    let r = s.record;
    let mut m = snapshot_detail(ctx, s);
    m.insert(
        "os-extended-snapshot-attributes:progress".into(),
        json!(progress_text(s)),
    );
    m.insert(
        "os-extended-snapshot-attributes:project_id".into(),
        json!(r.tenant.as_deref().unwrap_or(&ctx.project)),
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

// ------------------------------------------------------------------ volumes

/// Cinder's volume `summary`: the plain list.
pub fn volume_summary(ctx: &Ctx, v: VolumeFacts<'_>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(v.info.id));
    m.insert("name".into(), text_or_null(&v.info.record.display_name));
    m.insert("links".into(), ctx.links("volumes", &v.info.id));
    m
}

/// Cinder's volume `detail` (create and update answers).
pub fn volume_detail(ctx: &Ctx, v: VolumeFacts<'_>) -> Map<String, Value> {
    let r = &v.info.record;
    let snapshot_id = match &r.kind {
        VolumeKind::Made { snapshot_id, .. } => json!(snapshot_id),
        VolumeKind::Configured => Value::Null,
    };
    let mut m = Map::new();
    m.insert("id".into(), json!(v.info.id));
    m.insert("status".into(), json!(v.status));
    m.insert("size".into(), json!(gb(v.size_bytes)));
    m.insert("availability_zone".into(), json!("nova"));
    m.insert("created_at".into(), json!(format_timestamp(r.created_us)));
    m.insert("updated_at".into(), timestamp_or_null(r.updated_us));
    m.insert("name".into(), text_or_null(&r.display_name));
    m.insert("description".into(), text_or_null(&r.display_description));
    m.insert("volume_type".into(), Value::Null);
    m.insert("snapshot_id".into(), snapshot_id);
    m.insert("source_volid".into(), Value::Null);
    m.insert("metadata".into(), json!(r.metadata));
    m.insert("links".into(), ctx.links("volumes", &v.info.id));
    m.insert("user_id".into(), Value::Null);
    m.insert("bootable".into(), json!("false"));
    m.insert("encrypted".into(), json!(false));
    m.insert("replication_status".into(), Value::Null);
    m.insert("consistencygroup_id".into(), Value::Null);
    m.insert("multiattach".into(), json!(false));
    m.insert("attachments".into(), json!([]));
    if ctx.api.has(features::GROUP_VOLUME) {
        m.insert("group_id".into(), Value::Null);
    }
    if ctx
        .api
        .has(features::VOLUME_SHARED_TARGETS_AND_SERVICE_FIELDS)
    {
        // No iSCSI or other targets at all, so none shared.
        m.insert("shared_targets".into(), json!(false));
        m.insert("service_uuid".into(), Value::Null);
    }
    m
}

/// Show and the detail list: `detail` plus the tenant and host attributes,
/// and blocksnap's own fields.
pub fn volume_show(ctx: &Ctx, v: VolumeFacts<'_>) -> Map<String, Value> {
    let mut m = volume_detail(ctx, v);
    m.insert(
        "os-vol-tenant-attr:tenant_id".into(),
        json!(v.info.tenant.as_deref().unwrap_or(&ctx.project)),
    );
    m.insert("os-vol-host-attr:host".into(), json!(ctx.host));
    if let Some(e) = &v.info.record.error {
        m.insert("blocksnap:error".into(), json!(e));
    }
    if let Some(p) = v.progress {
        m.insert("blocksnap:progress".into(), json!(format!("{p:.2}%")));
    }
    m
}

// ------------------------------------------------------------------ lists

/// The `<collection>_links` of a list: a `next` link when the page is full
/// (Cinder's `_get_collection_links`: as many items as the limit), with the
/// request's own query and the last item as the marker.
pub fn next_links(
    ctx: &Ctx,
    path: &str,
    query: &BTreeMap<String, String>,
    limit: usize,
    last_id: Option<&str>,
    returned: usize,
) -> Option<Value> {
    let last = last_id?;
    if returned == 0 || returned < limit {
        return None;
    }
    let mut q = query.clone();
    q.insert("marker".into(), last.to_string());
    let qs: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect();
    Some(json!([{
        "rel": "next",
        "href": format!(
            "{}/{}/{}/{path}?{}",
            ctx.base,
            ctx.api.segment(),
            ctx.project,
            qs.join("&")
        ),
    }]))
}

/// `application/x-www-form-urlencoded` as Python's urlencode writes it.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A list answer: `{"<collection>": [...], "<collection>_links": [...],
/// "count": N}`, the links only when there is a next page and the count only
/// when asked for (`with_count`, from 3.45).
pub fn list_body(
    collection: &str,
    items: Vec<Map<String, Value>>,
    links: Option<Value>,
    count: Option<usize>,
) -> Value {
    let mut m = Map::new();
    m.insert(
        collection.into(),
        Value::Array(items.into_iter().map(Value::Object).collect()),
    );
    if let Some(l) = links {
        m.insert(format!("{collection}_links"), l);
    }
    if let Some(c) = count {
        m.insert("count".into(), json!(c));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::catalog::{VolStatus, VolumeRecord};
    use crate::quiesce::Mode;
    use uuid::Uuid;

    const PROJECT: &str = "89afd400-b646-4bbc-b12b-c0a4d63e5bd3";

    fn ctx(api: Api) -> Ctx {
        Ctx {
            api,
            base: "http://127.0.0.1:45839".into(),
            project: PROJECT.into(),
            host: "storage-1".into(),
        }
    }

    fn v3(minor: u32) -> Api {
        Api::V3(Microversion::new(3, minor))
    }

    /// 2019-03-12T04:42:00.809352 in microseconds.
    const CREATED_US: i64 = 1_552_365_720_809_352;

    fn snapshot(status: SnapStatus) -> SnapshotRecord {
        SnapshotRecord {
            id: Uuid::parse_str("4a584cae-e4ce-429b-9154-d4c9eb8fda4c").unwrap(),
            volume_id: "b72c48f1-64b7-4cd8-9745-b12e0be82d37".into(),
            tenant: Some(PROJECT.into()),
            status,
            display_name: "snap-001".into(),
            display_description: "Daily backup".into(),
            metadata: BTreeMap::from([("key".to_string(), "v3".to_string())]),
            created_us: CREATED_US,
            updated_us: 0,
            size_bytes: 10 * GB,
            error: None,
            changed_bytes: 0,
            stored_bytes: 0,
            freeze_ms: 0.0,
            scheduled_us: None,
        }
    }

    /// Keys and values of `got` that `want` has, compared; `got` may have
    /// no key `want` lacks except those listed as blocksnap's own.
    fn assert_shape(got: &Map<String, Value>, want: &Value, ours: &[&str]) {
        let want = want.as_object().unwrap();
        for (k, w) in want {
            assert_eq!(got.get(k), Some(w), "field {k}: got {:?}", got.get(k));
        }
        for k in got.keys() {
            assert!(
                want.contains_key(k) || ours.contains(&k.as_str()),
                "field {k} is not in Cinder's sample"
            );
        }
    }

    #[test]
    fn snapshot_show_at_3_41_is_cinders_sample() {
        // api-ref/source/v3/samples/snapshots/v3.41/snapshot-show-response.json,
        // user_id null: blocksnap has no users.
        let want = json!({
            "created_at": "2019-03-12T04:42:00.809352",
            "description": "Daily backup",
            "id": "4a584cae-e4ce-429b-9154-d4c9eb8fda4c",
            "metadata": {"key": "v3"},
            "name": "snap-001",
            "os-extended-snapshot-attributes:progress": "0%",
            "os-extended-snapshot-attributes:project_id": PROJECT,
            "size": 10,
            "status": "creating",
            "updated_at": null,
            "volume_id": "b72c48f1-64b7-4cd8-9745-b12e0be82d37",
            "group_snapshot_id": null,
            "user_id": null
        });
        let r = snapshot(SnapStatus::Creating);
        let got = snapshot_show(
            &ctx(v3(41)),
            SnapshotFacts {
                record: &r,
                progress: None,
            },
        );
        assert_shape(&got, &want, &[]);
        assert_eq!(got.len(), want.as_object().unwrap().len());
    }

    #[test]
    fn snapshot_fields_follow_the_microversion() {
        let r = snapshot(SnapStatus::Creating);
        let s = SnapshotFacts {
            record: &r,
            progress: Some(37.5),
        };
        // Cinder's plain sample (3.0): no group_snapshot_id, no user_id.
        let want = json!({
            "created_at": "2019-03-12T04:42:00.809352",
            "description": "Daily backup",
            "id": "4a584cae-e4ce-429b-9154-d4c9eb8fda4c",
            "metadata": {"key": "v3"},
            "name": "snap-001",
            "size": 10,
            "status": "creating",
            "updated_at": null,
            "volume_id": "b72c48f1-64b7-4cd8-9745-b12e0be82d37"
        });
        for api in [Api::V2, v3(0), v3(13)] {
            let got = snapshot_detail(&ctx(api), s);
            assert_shape(&got, &want, &[]);
            assert_eq!(got.len(), 9, "{api:?}");
        }
        let got = snapshot_detail(&ctx(v3(14)), s);
        assert_eq!(got["group_snapshot_id"], Value::Null);
        assert!(!got.contains_key("user_id"));
        assert_eq!(snapshot_summary(s).len(), 9, "the list never has user_id");
        let got = snapshot_show(&ctx(Api::V2), s);
        assert_eq!(got["os-extended-snapshot-attributes:progress"], "37.50%");
    }

    #[test]
    fn available_snapshots_show_blocksnaps_figures() {
        let mut r = snapshot(SnapStatus::Available);
        r.updated_us = CREATED_US + 1_000_000;
        r.changed_bytes = 4096;
        r.display_description = String::new();
        let got = snapshot_show(
            &ctx(v3(52)),
            SnapshotFacts {
                record: &r,
                progress: None,
            },
        );
        assert_eq!(got["os-extended-snapshot-attributes:progress"], "100%");
        assert_eq!(got["updated_at"], "2019-03-12T04:42:01.809352");
        assert_eq!(got["blocksnap:changed_bytes"], 4096);
        assert_eq!(got["description"], Value::Null);
        assert_eq!(got["user_id"], Value::Null);
    }

    fn volume(tenant: Option<&str>) -> VolumeInfo {
        VolumeInfo {
            id: "f7223234-1afc-4d19-bfa3-d19deb6235ef".into(),
            device: None,
            configured: false,
            tenant: tenant.map(str::to_string),
            quiesce: Mode::Auto,
            block_size: None,
            max_freeze: std::time::Duration::from_secs(60),
            record: VolumeRecord {
                id: "f7223234-1afc-4d19-bfa3-d19deb6235ef".into(),
                kind: VolumeKind::Made {
                    image: "/var/lib/blocksnap/volumes/x.img".into(),
                    device: None,
                    snapshot_id: None,
                },
                tenant: tenant.map(str::to_string),
                status: VolStatus::Creating,
                display_name: String::new(),
                display_description: String::new(),
                metadata: BTreeMap::new(),
                created_us: 1_543_474_207_770_785,
                updated_us: 0,
                size_bytes: 10 * GB,
                error: None,
            },
        }
    }

    #[test]
    fn volume_show_at_3_48_is_cinders_sample() {
        // api-ref/source/v3/samples/volumes/v3.48/volume-show-response.json
        // less what only an admin sees (migration and provider fields);
        // volume_type null (blocksnap has no types), user_id null, no
        // targets so shared_targets false, host the daemon's.
        let want = json!({
            "attachments": [],
            "availability_zone": "nova",
            "bootable": "false",
            "consistencygroup_id": null,
            "created_at": "2018-11-29T06:50:07.770785",
            "description": null,
            "encrypted": false,
            "id": "f7223234-1afc-4d19-bfa3-d19deb6235ef",
            "links": [
                {
                    "href": "http://127.0.0.1:45839/v3/89afd400-b646-4bbc-b12b-c0a4d63e5bd3/volumes/f7223234-1afc-4d19-bfa3-d19deb6235ef",
                    "rel": "self"
                },
                {
                    "href": "http://127.0.0.1:45839/89afd400-b646-4bbc-b12b-c0a4d63e5bd3/volumes/f7223234-1afc-4d19-bfa3-d19deb6235ef",
                    "rel": "bookmark"
                }
            ],
            "metadata": {},
            "multiattach": false,
            "name": null,
            "os-vol-host-attr:host": "storage-1",
            "os-vol-tenant-attr:tenant_id": PROJECT,
            "replication_status": null,
            "size": 10,
            "snapshot_id": null,
            "source_volid": null,
            "status": "creating",
            "updated_at": null,
            "user_id": null,
            "volume_type": null,
            "group_id": null,
            "service_uuid": null,
            "shared_targets": false
        });
        let info = volume(Some(PROJECT));
        let v = VolumeFacts {
            info: &info,
            status: "creating",
            size_bytes: 10 * GB,
            progress: None,
        };
        let got = volume_show(&ctx(v3(48)), v);
        assert_shape(&got, &want, &[]);
        assert_eq!(got.len(), want.as_object().unwrap().len());
    }

    #[test]
    fn volume_fields_follow_the_api() {
        let mut info = volume(None);
        info.record.display_name = "data".into();
        let v = VolumeFacts {
            info: &info,
            status: "in-use",
            size_bytes: GB + 1,
            progress: Some(12.5),
        };
        let d2 = volume_detail(&ctx(Api::V2), v);
        assert!(!d2.contains_key("group_id") && !d2.contains_key("shared_targets"));
        assert_eq!(
            d2["links"][0]["href"],
            format!("http://127.0.0.1:45839/v2/{PROJECT}/volumes/{}", info.id)
        );
        assert_eq!(d2["size"], 2);
        assert_eq!(d2["status"], "in-use");
        let d13 = volume_detail(&ctx(v3(13)), v);
        assert_eq!(d13["group_id"], Value::Null);
        assert!(!d13.contains_key("shared_targets"));
        let show = volume_show(&ctx(v3(0)), v);
        assert_eq!(
            show["os-vol-tenant-attr:tenant_id"], PROJECT,
            "unowned: the caller's"
        );
        assert_eq!(show["blocksnap:progress"], "12.50%");
        // The plain list, as volumes-list-response.json.
        let s = volume_summary(&ctx(v3(0)), v);
        assert_eq!(s.keys().collect::<Vec<_>>(), ["id", "links", "name"]);
        assert_eq!(s["name"], "data");
    }

    #[test]
    fn lists_get_next_links_only_when_full() {
        let c = ctx(v3(45));
        let q = BTreeMap::from([
            ("limit".to_string(), "2".to_string()),
            ("name".to_string(), "a b".to_string()),
        ]);
        assert_eq!(next_links(&c, "snapshots", &q, 2, Some("x"), 1), None);
        assert_eq!(next_links(&c, "snapshots", &q, 2, None, 0), None);
        let l = next_links(&c, "snapshots/detail", &q, 2, Some("abc"), 2).unwrap();
        assert_eq!(
            l,
            json!([{"rel": "next", "href": format!("http://127.0.0.1:45839/v3/{PROJECT}/snapshots/detail?limit=2&marker=abc&name=a+b")}])
        );
        let body = list_body("snapshots", vec![], None, Some(0));
        assert_eq!(body, json!({"snapshots": [], "count": 0}));
        let body = list_body("volumes", vec![Map::new()], Some(l), None);
        assert!(body.get("volumes_links").is_some() && body.get("count").is_none());
    }
}
