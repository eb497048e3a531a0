//! Reading requests liberally, as Cinder does: a request body's fields that
//! the API does not know are ignored (clients send `attach_status`,
//! `user_id`, `consistencygroup_id`, `OS-SCH-HNT:scheduler_hints`, ...);
//! a known field with a value of the wrong kind is a 400 that names it.
//! Per API version, the field names differ (`display_name` in v1; `name`
//! or `display_name` in v2 and v3, `name` winning when both are given, as
//! in Cinder's controllers).
//!
//! Also the v2/v3 list parameters: `limit`, `marker`, `offset`, `sort` or
//! `sort_key`/`sort_dir`, `with_count` (3.45) and the filters, with
//! Cinder's messages.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::super::microversion::features;
use super::super::store::{Page, SortDir, SortKey};
use super::cinder::Api;

/// A request field with a bad value, or a bad list parameter: always 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `Invalid input for field snapshot.name: ...`.
    #[error("Invalid input for field {field}: {problem}")]
    Field { field: String, problem: String },
    /// A list parameter, in Cinder's words.
    #[error("{0}")]
    Param(String),
}

impl RequestError {
    fn field(field: impl fmt::Display, problem: impl Into<String>) -> RequestError {
        RequestError::Field {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// A JSON value named for a message: its kind and, when short, itself.
fn describe(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= 40 {
        text
    } else {
        match v {
            Value::String(_) => "a long string".into(),
            Value::Array(_) => "a list".into(),
            Value::Object(_) => "an object".into(),
            _ => text.chars().take(40).collect(),
        }
    }
}

/// The fields of one request object (`{"snapshot": {...}}`'s inner object).
#[derive(Debug)]
pub struct Fields {
    key: &'static str,
    map: Map<String, Value>,
}

impl Fields {
    /// `v` must be an object.
    pub fn new(key: &'static str, v: Value) -> Result<Fields, RequestError> {
        match v {
            Value::Object(map) => Ok(Fields { key, map }),
            other => Err(RequestError::field(
                key,
                format!("expected an object, not {}", describe(&other)),
            )),
        }
    }

    fn name(&self, field: &str) -> String {
        format!("{}.{field}", self.key)
    }

    /// Whether the field is there with a value other than null.
    pub fn given(&self, field: &str) -> bool {
        self.map.get(field).is_some_and(|v| !v.is_null())
    }

    pub fn raw(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// A string or null.
    pub fn string(&self, field: &str) -> Result<Option<String>, RequestError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(RequestError::field(
                self.name(field),
                format!("expected a string, not {}", describe(other)),
            )),
        }
    }

    pub fn required_string(&self, field: &str) -> Result<String, RequestError> {
        self.string(field)?
            .ok_or_else(|| RequestError::field(self.name(field), "is required"))
    }

    /// The first of `fields` that is given (`["name", "display_name"]`).
    pub fn first_string(&self, fields: &[&str]) -> Result<Option<String>, RequestError> {
        for f in fields {
            if let Some(s) = self.string(f)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// An object of strings, or null (Cinder's schema: string values).
    pub fn metadata(&self, field: &str) -> Result<Option<BTreeMap<String, String>>, RequestError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        other => {
                            return Err(RequestError::field(
                                format!("{}.{k}", self.name(field)),
                                format!("expected a string, not {}", describe(other)),
                            ))
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(other) => Err(RequestError::field(
                self.name(field),
                format!("expected an object of strings, not {}", describe(other)),
            )),
        }
    }

    /// A boolean the way Cinder reads `force`: a JSON bool, 0/1, or a
    /// string true/false/yes/no/y/n/on/off/t/f/1/0 in any case. `bad` makes
    /// the refusal (the v1 reference has its own message for force).
    pub fn boolish(
        &self,
        field: &str,
        bad: impl Fn(&str) -> RequestError,
    ) -> Result<Option<bool>, RequestError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse_bool(v).map(Some).ok_or_else(|| match v {
                Value::String(s) => bad(s),
                other => bad(&other.to_string()),
            }),
        }
    }

    /// A size in GB: a whole number, as a JSON number or a string of digits.
    pub fn size_gb(&self, field: &str) -> Result<Option<u64>, RequestError> {
        let bad = |v: &Value| {
            RequestError::field(
                self.name(field),
                format!("expected a whole number of GB, not {}", describe(v)),
            )
        };
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| bad(v)),
            Some(v @ Value::String(s)) => s.trim().parse::<u64>().map(Some).map_err(|_| bad(v)),
            Some(other) => Err(bad(other)),
        }
    }
}

/// Cinder's (oslo's) boolean strings.
pub fn parse_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "on" | "t" => Some(true),
            "false" | "no" | "n" | "0" | "off" | "f" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The v1 reference's refusal of a bad `force`.
pub fn bad_force(s: &str) -> RequestError {
    RequestError::Param(format!("Invalid value '{s}' for force. "))
}

pub fn bad_full(s: &str) -> RequestError {
    RequestError::Param(format!("Invalid value '{s}' for full. "))
}

// ------------------------------------------------------------------ bodies

/// The names a version gives to a name and a description.
fn name_fields(api: Option<Api>) -> (&'static [&'static str], &'static [&'static str]) {
    match api {
        None => (&["display_name"], &["display_description"]),
        Some(_) => (
            &["name", "display_name"],
            &["description", "display_description"],
        ),
    }
}

/// `POST /snapshots`: what the operation needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotCreate {
    pub volume_id: String,
    pub force: bool,
    /// A full snapshot (blocksnap's extension, as in v1).
    pub full: bool,
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Read `{"snapshot": {...}}`'s inner object; `api` None is v1.
pub fn snapshot_create(api: Option<Api>, v: Value) -> Result<SnapshotCreate, RequestError> {
    let f = Fields::new("snapshot", v)?;
    let (names, descriptions) = name_fields(api);
    Ok(SnapshotCreate {
        volume_id: f.required_string("volume_id")?,
        force: f.boolish("force", bad_force)?.unwrap_or(false),
        full: f.boolish("full", bad_full)?.unwrap_or(false),
        name: f.first_string(names)?,
        description: f.first_string(descriptions)?,
        metadata: f.metadata("metadata")?.unwrap_or_default(),
    })
}

/// `PUT /snapshots/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
}

pub fn snapshot_update(api: Option<Api>, v: Value) -> Result<SnapshotUpdate, RequestError> {
    let f = Fields::new("snapshot", v)?;
    let (names, descriptions) = name_fields(api);
    Ok(SnapshotUpdate {
        name: f.first_string(names)?,
        description: f.first_string(descriptions)?,
    })
}

/// `POST /volumes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeCreate {
    pub snapshot_id: Option<String>,
    pub size_gb: Option<u64>,
    /// Cloning a volume or an image: refused by the operation.
    pub source_volid: Option<String>,
    pub image_ref: Option<String>,
    /// Restore this backup into the new volume (v3; Cinder's 3.47).
    pub backup_id: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// `volume.backup_id` as Cinder's v3 controller reads it: at every
/// microversion (its schemas up to 3.46 let unknown fields through
/// unchecked, and the controller has taken `backup_id` without a version
/// check since the jsonschema change, cinder commit 48b8973ae), checked to
/// be a UUID from 3.47 (`optional_uuid` in create_volume_v347); an empty
/// value asks for nothing (`if backup_id:`). v2's controller never had it:
/// ignored there, as v1 ignores it.
fn backup_source(api: Option<Api>, f: &Fields) -> Result<Option<String>, RequestError> {
    let Some(api @ Api::V3(_)) = api else {
        return Ok(None);
    };
    let Some(v) = f.raw("backup_id") else {
        return Ok(None);
    };
    if api.has(features::VOLUME_CREATE_FROM_BACKUP) {
        return match v {
            Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => Ok(Some(s.clone())),
            other => Err(RequestError::field(
                f.name("backup_id"),
                format!("expected a backup's UUID, not {}", describe(other)),
            )),
        };
    }
    // Before 3.47 nothing checks it: Python's `if backup_id:` skips what
    // is false, and looks up anything else (which no backup is named).
    let falsy = match v {
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Null => true,
    };
    Ok(match v {
        _ if falsy => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    })
}

pub fn volume_create(api: Option<Api>, v: Value) -> Result<VolumeCreate, RequestError> {
    let f = Fields::new("volume", v)?;
    let (names, descriptions) = name_fields(api);
    let image_ref = match api {
        None => f.string("imageRef")?,
        Some(_) => f.first_string(&["imageRef", "image_id"])?,
    };
    if api.is_some() {
        // Sources blocksnap has none of: a volume cannot come from them.
        let unsupported = |field: &str, what: &str| -> Result<(), RequestError> {
            match f.string(field)? {
                Some(_) => Err(RequestError::field(
                    f.name(field),
                    format!("blocksnap has no {what}; a volume comes from a snapshot (snapshot_id), a backup (backup_id, v3) or is blank (size)"),
                )),
                None => Ok(()),
            }
        };
        unsupported("consistencygroup_id", "consistency groups")?;
        unsupported("group_id", "groups")?;
        if f.boolish("multiattach", |s| {
            RequestError::field("volume.multiattach", format!("expected a boolean, not {s}"))
        })? == Some(true)
        {
            return Err(RequestError::field(
                "volume.multiattach",
                "blocksnap volumes cannot be attached to several hosts",
            ));
        }
    }
    Ok(VolumeCreate {
        snapshot_id: f.string("snapshot_id")?,
        size_gb: f.size_gb("size")?,
        source_volid: f.string("source_volid")?,
        image_ref,
        backup_id: backup_source(api, &f)?,
        name: f.first_string(names)?,
        description: f.first_string(descriptions)?,
        metadata: f.metadata("metadata")?.unwrap_or_default(),
    })
}

/// `PUT /volumes/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
}

pub fn volume_update(api: Option<Api>, v: Value) -> Result<VolumeUpdate, RequestError> {
    let f = Fields::new("volume", v)?;
    let (names, descriptions) = name_fields(api);
    Ok(VolumeUpdate {
        name: f.first_string(names)?,
        description: f.first_string(descriptions)?,
        metadata: f.metadata("metadata")?,
    })
}

/// `{"revert": {"snapshot_id": ...}}`'s inner object.
pub fn revert(v: Value) -> Result<String, RequestError> {
    Fields::new("revert", v)?.required_string("snapshot_id")
}

/// `{"metadata": {...}}` (`key` "metadata") or `{"meta": {...}}`.
pub fn metadata_body(
    key: &'static str,
    v: Value,
) -> Result<BTreeMap<String, String>, RequestError> {
    let wrapper = Fields {
        key: "",
        map: Map::from_iter([(key.to_string(), v)]),
    };
    match wrapper.metadata(key) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(RequestError::field(
            key,
            "expected an object of strings, not null",
        )),
        Err(RequestError::Field { field, problem }) => Err(RequestError::Field {
            field: field.trim_start_matches('.').to_string(),
            problem,
        }),
        Err(e) => Err(e),
    }
}

// ------------------------------------------------------------------ lists

/// Which collection a list is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collection {
    Snapshots,
    Volumes,
    Backups,
}

/// Largest and default page (Cinder's `osapi_max_limit`).
pub const MAX_LIMIT: usize = 1000;

/// A v2/v3 list request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListRequest {
    pub page: Page,
    pub name: Option<String>,
    /// `name~` (3.34): names containing this.
    pub name_like: Option<String>,
    pub status: Option<String>,
    pub volume_id: Option<String>,
    /// Items with all of these metadata items.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Volumes of this size in GB.
    pub size_gb: Option<u64>,
    /// Answer `count` too (3.45).
    pub with_count: bool,
    /// A filter nothing blocksnap serves can match (a group, a bootable
    /// volume, another availability zone): the list is empty.
    pub nothing_matches: bool,
}

impl Default for ListRequest {
    fn default() -> ListRequest {
        ListRequest {
            page: Page {
                limit: MAX_LIMIT,
                ..Page::default()
            },
            name: None,
            name_like: None,
            status: None,
            volume_id: None,
            metadata: None,
            size_gb: None,
            with_count: false,
            nothing_matches: false,
        }
    }
}

/// Query parameters that are not filters.
const NOT_FILTERS: &[&str] = &[
    "limit",
    "marker",
    "offset",
    "sort",
    "sort_key",
    "sort_dir",
    "with_count",
];

/// Filters Cinder's default resource_filters.json allows a project user.
fn allowed_filters(c: Collection) -> &'static [&'static str] {
    match c {
        Collection::Snapshots => &[
            "name",
            "status",
            "volume_id",
            "metadata",
            "availability_zone",
        ],
        Collection::Volumes => &[
            "name",
            "status",
            "metadata",
            "bootable",
            "migration_status",
            "availability_zone",
            "group_id",
            "size",
            "created_at",
            "updated_at",
        ],
        // Cinder's resource_filters.json and the backups controller's
        // non-admin options (both name, status, volume_id).
        Collection::Backups => &["name", "status", "volume_id"],
    }
}

/// Filters every client may send that mean nothing here: `all_tenants`
/// (cinderclient always sends it; Cinder ignores it for non-admins),
/// `project_id`.
const IGNORED_FILTERS: &[&str] = &["all_tenants", "project_id"];

fn sort_key(api: Api, c: Collection, k: &str) -> Result<SortKey, RequestError> {
    Ok(match k {
        "created_at" => SortKey::CreatedAt,
        "updated_at" => SortKey::UpdatedAt,
        "id" => SortKey::Id,
        "display_name" => SortKey::Name,
        // Backups sort by `name` from 3.37 (BACKUP_SORT_NAME); before, and
        // in v2, Cinder looks for a column `name` and refuses the key.
        "name" if c != Collection::Backups || api.has(features::BACKUP_SORT_NAME) => SortKey::Name,
        "status" => SortKey::Status,
        "size" => SortKey::Size,
        "volume_size" if c == Collection::Snapshots => SortKey::Size,
        other => {
            let name = if c == Collection::Backups && !api.has(features::BACKUP_SORT_NAME) {
                "display_name (name from microversion 3.37)"
            } else {
                "name"
            };
            return Err(RequestError::Param(format!(
                "Invalid input received: Invalid sort key {}: sort by created_at, updated_at, id, {name}, status or size",
                other.chars().filter(|c| !c.is_control()).take(64).collect::<String>()
            )));
        }
    })
}

fn sort_dir(d: &str) -> Result<SortDir, RequestError> {
    match d {
        "asc" => Ok(SortDir::Asc),
        "desc" => Ok(SortDir::Desc),
        _ => Err(RequestError::Param(
            "Invalid input received: Unknown sort direction, must be 'desc' or 'asc'.".into(),
        )),
    }
}

/// Cinder's `get_sort_params`: `sort=k1:d1,k2` or the deprecated
/// `sort_key`/`sort_dir`, never both; a key without a direction is
/// descending; the default is newest first.
fn sort_params(
    api: Api,
    c: Collection,
    q: &BTreeMap<String, String>,
) -> Result<Vec<(SortKey, SortDir)>, RequestError> {
    if q.contains_key("sort") && (q.contains_key("sort_key") || q.contains_key("sort_dir")) {
        return Err(RequestError::Param(
            "The 'sort_key' and 'sort_dir' parameters are deprecated and cannot be used with the 'sort' parameter.".into(),
        ));
    }
    let mut out = Vec::new();
    if let Some(s) = q.get("sort") {
        for part in s.trim().split(',') {
            let (k, d) = part.split_once(':').unwrap_or((part, ""));
            let d = d.trim();
            out.push((
                sort_key(api, c, k.trim())?,
                sort_dir(if d.is_empty() { "desc" } else { d })?,
            ));
        }
    } else {
        let k = q.get("sort_key").map(|s| s.trim()).unwrap_or("created_at");
        let d = q.get("sort_dir").map(|s| s.trim()).unwrap_or("desc");
        out.push((sort_key(api, c, k)?, sort_dir(d)?));
    }
    Ok(out)
}

/// `metadata={'k': 'v'}` as cinderclient sends it (a Python dict literal;
/// Cinder evaluates it with ast.literal_eval), or JSON.
fn metadata_filter(s: &str) -> Result<BTreeMap<String, String>, RequestError> {
    let bad = || {
        RequestError::Param(format!(
            "Invalid input received: metadata filter {} is not a dictionary of strings",
            s.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        ))
    };
    let v: Value = match serde_json::from_str(s) {
        Ok(v) => v,
        Err(_) => {
            let json = python_literal_to_json(s).ok_or_else(bad)?;
            serde_json::from_str(&json).map_err(|_| bad())?
        }
    };
    let Value::Object(m) = v else {
        return Err(bad());
    };
    m.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(bad()),
        })
        .collect()
}

/// A Python literal of strings in single or double quotes, braces, colons
/// and commas, turned into JSON; `None` if it holds anything else.
fn python_literal_to_json(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let quote = c;
                let mut text = String::new();
                loop {
                    match chars.next()? {
                        '\\' => text.push(chars.next()?),
                        ch if ch == quote => break,
                        ch => text.push(ch),
                    }
                }
                out.push_str(&serde_json::to_string(&text).ok()?);
            }
            '{' | '}' | ':' | ',' => out.push(c),
            c if c.is_whitespace() => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Read a v2/v3 list's query.
pub fn list_request(
    api: Api,
    c: Collection,
    q: &BTreeMap<String, String>,
) -> Result<ListRequest, RequestError> {
    let mut r = ListRequest::default();
    // limit: Cinder's messages; 0 is an empty page; above the maximum, the maximum.
    if let Some(v) = q.get("limit") {
        let n: i64 = v
            .trim()
            .parse()
            .map_err(|_| RequestError::Param("limit param must be an integer".into()))?;
        if n < 0 {
            return Err(RequestError::Param("limit param must be positive".into()));
        }
        r.page.limit = (n as u64).min(MAX_LIMIT as u64) as usize;
    }
    if let Some(v) = q.get("offset") {
        let n: i64 = v
            .trim()
            .parse()
            .map_err(|_| RequestError::Param("offset must be an integer".into()))?;
        if n < 0 {
            return Err(RequestError::Param("offset must be >= 0".into()));
        }
        r.page.offset = n as usize;
    }
    r.page.marker = q.get("marker").cloned();
    r.page.sort = sort_params(api, c, q)?;
    if api.has(features::SUPPORT_COUNT_INFO) {
        if let Some(v) = q.get("with_count") {
            r.with_count = parse_bool(&Value::String(v.clone())).ok_or_else(|| {
                RequestError::Param(format!(
                    "Invalid input received: Value '{}' for 'with_count' is not a boolean.",
                    v.chars()
                        .filter(|c| !c.is_control())
                        .take(64)
                        .collect::<String>()
                ))
            })?;
        }
    }
    // Filters. From 3.31 Cinder refuses the ones it does not allow; before,
    // and in v2, it drops them. `name~` (3.34) asks for names containing.
    let strict = api.has(super::super::microversion::Microversion::new(3, 31));
    let like = api.has(super::super::microversion::Microversion::new(3, 34));
    let mut invalid = Vec::new();
    for (k, v) in q {
        if NOT_FILTERS.contains(&k.as_str()) || IGNORED_FILTERS.contains(&k.as_str()) {
            continue;
        }
        let (base, is_like) = match k.strip_suffix('~') {
            Some(b) if like => (b, true),
            _ => (k.as_str(), false),
        };
        // Image metadata (3.4): no volume comes from an image. From 3.31
        // it is not an allowed filter, as in Cinder's default filters.
        if base == "glance_metadata" && !strict && c == Collection::Volumes {
            r.nothing_matches = true;
            continue;
        }
        // Cinder's backups controller drops display_name with the other
        // filters it does not know.
        let legacy_name = k == "display_name" && !strict && c != Collection::Backups;
        if !allowed_filters(c).contains(&base) && !legacy_name {
            if strict {
                invalid.push(k.clone());
            }
            continue;
        }
        match (base, is_like) {
            ("name", true) => r.name_like = Some(v.clone()),
            ("name", false) | ("display_name", false) => r.name = Some(v.clone()),
            ("status", false) => r.status = Some(v.clone()),
            ("volume_id", false) => r.volume_id = Some(v.clone()),
            ("metadata", false) => {
                let older = c == Collection::Snapshots
                    && matches!(api, Api::V3(_))
                    && !api.has(features::SNAPSHOT_LIST_METADATA_FILTER);
                if !older {
                    r.metadata = Some(metadata_filter(v)?);
                }
            }
            ("size", false) => {
                r.size_gb = Some(v.trim().parse().map_err(|_| {
                    RequestError::Param("Invalid input received: size must be an integer".into())
                })?)
            }
            ("availability_zone", false) => r.nothing_matches |= v != "nova",
            ("bootable", false) => {
                // Every blocksnap volume is not bootable.
                r.nothing_matches |= parse_bool(&Value::String(v.clone())) != Some(false)
            }
            // No groups, no migrations: no volume is in one.
            ("group_id", _) | ("migration_status", _) => r.nothing_matches = true,
            // Without 3.60's operators Cinder compares timestamps for
            // equality, to the microsecond: nothing a client could name.
            ("created_at", _) | ("updated_at", _) => r.nothing_matches = true,
            // Like filters on fields other than name: nothing to narrow.
            _ => {}
        }
    }
    if !invalid.is_empty() {
        return Err(RequestError::Param(format!(
            "Invalid filters {} are found in query options.",
            invalid
                .iter()
                .map(|s| s
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(64)
                    .collect::<String>())
                .collect::<Vec<_>>()
                .join(",")
        )));
    }
    Ok(r)
}

/// `POST /backups`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupCreate {
    pub volume_id: String,
    pub snapshot_id: Option<String>,
    pub incremental: bool,
    pub force: bool,
    pub name: Option<String>,
    pub description: Option<String>,
}

fn bad_bool(field: &'static str) -> impl Fn(&str) -> RequestError {
    move |s| {
        RequestError::field(
            format!("backup.{field}"),
            format!("expected a boolean, not {s}"),
        )
    }
}

pub fn backup_create(v: Value) -> Result<BackupCreate, RequestError> {
    let f = Fields::new("backup", v)?;
    Ok(BackupCreate {
        volume_id: f.required_string("volume_id")?,
        snapshot_id: f.string("snapshot_id")?,
        incremental: f
            .boolish("incremental", bad_bool("incremental"))?
            .unwrap_or(false),
        force: f.boolish("force", bad_bool("force"))?.unwrap_or(false),
        name: f.string("name")?,
        description: f.string("description")?,
    })
}

/// `POST /backups/{id}/restore`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupRestore {
    pub volume_id: Option<String>,
    pub name: Option<String>,
}

pub fn backup_restore(v: Value) -> Result<BackupRestore, RequestError> {
    let f = Fields::new("restore", v)?;
    Ok(BackupRestore {
        volume_id: f.string("volume_id")?,
        name: f.string("name")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::microversion::Microversion;
    use serde_json::json;

    fn v3(minor: u32) -> Option<Api> {
        Some(Api::V3(Microversion::new(3, minor)))
    }

    #[test]
    fn v1_creates_ignore_what_old_clients_send() {
        // python-cinderclient 4.3's `cinder create --snapshot-id ID 1` body.
        let body = json!({"size": 1, "snapshot_id": "6c2e4b36-6b6e-4c43-9f3e-3a0d0c1f0c55",
            "display_name": null, "display_description": null, "volume_type": null,
            "user_id": null, "project_id": null, "availability_zone": null,
            "status": "creating", "attach_status": "detached", "metadata": {},
            "imageRef": null, "source_volid": null});
        let r = volume_create(None, body).unwrap();
        assert_eq!(
            r.snapshot_id.as_deref(),
            Some("6c2e4b36-6b6e-4c43-9f3e-3a0d0c1f0c55")
        );
        assert_eq!(r.size_gb, Some(1));
        assert_eq!(r.name, None);
        // Newer clients' fields in v1: ignored; v1 knows display_name only.
        let r = volume_create(
            None,
            json!({"size": "2", "description": "x", "backup_id": null, "consistencygroup_id": null, "name": "n"}),
        )
        .unwrap();
        assert_eq!((r.size_gb, r.name, r.description), (Some(2), None, None));
        let r = snapshot_create(
            None,
            json!({"volume_id": "v", "colour": "red", "force": "YES"}),
        )
        .unwrap();
        assert!(r.force);
    }

    #[test]
    fn known_fields_with_bad_values_name_the_field() {
        let e = snapshot_create(None, json!({"volume_id": "v", "display_name": 7})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid input for field snapshot.display_name: expected a string, not 7"
        );
        let e = snapshot_create(v3(0), json!({"volume_id": "v", "name": ["a"]})).unwrap_err();
        assert!(e.to_string().contains("snapshot.name"), "{e}");
        let e = snapshot_create(v3(0), json!({"name": "x"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid input for field snapshot.volume_id: is required"
        );
        let e = snapshot_create(v3(0), json!({"volume_id": "v", "force": "maybe"})).unwrap_err();
        assert_eq!(e.to_string(), "Invalid value 'maybe' for force. ");
        let e = snapshot_create(v3(0), json!({"volume_id": "v", "full": "most"})).unwrap_err();
        assert_eq!(e.to_string(), "Invalid value 'most' for full. ");
        let r = snapshot_create(v3(0), json!({"volume_id": "v", "full": "true"})).unwrap();
        assert!(r.full && !r.force);
        let e =
            snapshot_create(v3(0), json!({"volume_id": "v", "metadata": {"k": 1}})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid input for field snapshot.metadata.k: expected a string, not 1"
        );
        let e = volume_create(v3(0), json!({"size": -1})).unwrap_err();
        assert!(e.to_string().contains("volume.size"), "{e}");
        let e = volume_create(v3(0), json!({"size": 1.5})).unwrap_err();
        assert!(e.to_string().contains("volume.size"), "{e}");
        let e = snapshot_create(v3(0), json!("volume")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Invalid input for field snapshot:"),
            "{e}"
        );
        let e = metadata_body("meta", json!({"k": {"x": 1}})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid input for field meta.k: expected a string, not {\"x\":1}"
        );
        assert_eq!(
            metadata_body("metadata", json!({"a": "b"})).unwrap().len(),
            1
        );
    }

    #[test]
    fn v3_creates_take_cinders_names() {
        // Cinder's api-ref volume-create-request.json.
        let body = json!({"size": 10, "availability_zone": null, "source_volid": null,
            "description": null, "multiattach": false, "snapshot_id": null, "backup_id": null,
            "name": null, "imageRef": null, "volume_type": null, "metadata": {},
            "consistencygroup_id": null});
        let r = volume_create(v3(52), body).unwrap();
        assert_eq!(
            r,
            VolumeCreate {
                size_gb: Some(10),
                ..VolumeCreate::default()
            }
        );
        // name wins over display_name, as in Cinder's controller.
        let r = snapshot_create(
            v3(0),
            json!({"volume_id": "v", "name": "new", "display_name": "old", "display_description": "d"}),
        )
        .unwrap();
        assert_eq!(
            (r.name.as_deref(), r.description.as_deref()),
            (Some("new"), Some("d"))
        );
        let r = snapshot_update(Some(Api::V2), json!({"name": "n", "description": "d"})).unwrap();
        assert_eq!(
            r,
            SnapshotUpdate {
                name: Some("n".into()),
                description: Some("d".into())
            }
        );
        for (field, value) in [
            ("consistencygroup_id", json!("c")),
            ("group_id", json!("g")),
            ("multiattach", json!(true)),
        ] {
            let e = volume_create(v3(52), json!({"size": 1, field: value})).unwrap_err();
            assert!(e.to_string().contains(&format!("volume.{field}")), "{e}");
        }
        let r = volume_create(v3(0), json!({"size": 1, "image_id": "img"})).unwrap();
        assert_eq!(r.image_ref.as_deref(), Some("img"));
        assert_eq!(
            revert(json!({"snapshot_id": "s", "extra": 1})).unwrap(),
            "s"
        );
        assert!(revert(json!({}))
            .unwrap_err()
            .to_string()
            .contains("revert.snapshot_id"));
    }

    fn q(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn list_paging_and_sorting_as_cinder() {
        let api = Api::V3(Microversion::new(3, 52));
        let s = Collection::Snapshots;
        let r = list_request(api, s, &q(&[])).unwrap();
        assert_eq!(r.page.limit, MAX_LIMIT);
        assert_eq!(r.page.sort, vec![(SortKey::CreatedAt, SortDir::Desc)]);
        let r = list_request(
            api,
            s,
            &q(&[("limit", "5000"), ("offset", "3"), ("marker", "m")]),
        )
        .unwrap();
        assert_eq!(
            (r.page.limit, r.page.offset, r.page.marker.as_deref()),
            (MAX_LIMIT, 3, Some("m"))
        );
        assert_eq!(
            list_request(api, s, &q(&[("limit", "0")]))
                .unwrap()
                .page
                .limit,
            0
        );
        for (k, v, msg) in [
            ("limit", "x", "limit param must be an integer"),
            ("limit", "-1", "limit param must be positive"),
            ("offset", "x", "offset must be an integer"),
            ("offset", "-2", "offset must be >= 0"),
        ] {
            assert_eq!(
                list_request(api, s, &q(&[(k, v)])).unwrap_err().to_string(),
                msg
            );
        }
        let r = list_request(api, s, &q(&[("sort", "name:asc,size")])).unwrap();
        assert_eq!(
            r.page.sort,
            vec![
                (SortKey::Name, SortDir::Asc),
                (SortKey::Size, SortDir::Desc)
            ]
        );
        let r = list_request(api, s, &q(&[("sort_key", "id"), ("sort_dir", "asc")])).unwrap();
        assert_eq!(r.page.sort, vec![(SortKey::Id, SortDir::Asc)]);
        let e = list_request(api, s, &q(&[("sort", "id"), ("sort_dir", "asc")])).unwrap_err();
        assert!(e
            .to_string()
            .contains("cannot be used with the 'sort' parameter"));
        let e = list_request(api, s, &q(&[("sort", "id:up")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid input received: Unknown sort direction, must be 'desc' or 'asc'."
        );
        assert!(list_request(api, s, &q(&[("sort", "colour")])).is_err());
    }

    #[test]
    fn with_count_from_3_45() {
        let s = Collection::Volumes;
        let at = |m| Api::V3(Microversion::new(3, m));
        assert!(
            list_request(at(45), s, &q(&[("with_count", "true")]))
                .unwrap()
                .with_count
        );
        assert!(
            !list_request(at(44), s, &q(&[("with_count", "true")]))
                .unwrap()
                .with_count
        );
        assert!(
            !list_request(at(52), s, &q(&[("with_count", "False")]))
                .unwrap()
                .with_count
        );
        let e = list_request(at(45), s, &q(&[("with_count", "maybe")])).unwrap_err();
        assert!(
            e.to_string().contains("'with_count' is not a boolean"),
            "{e}"
        );
    }

    #[test]
    fn filters_as_cinder_reads_them() {
        let s = Collection::Snapshots;
        let v = Collection::Volumes;
        let at = |m| Api::V3(Microversion::new(3, m));
        // cinderclient's snapshot-list sends all_tenants; ignored everywhere.
        let r = list_request(
            at(52),
            s,
            &q(&[
                ("all_tenants", "0"),
                ("name", "n"),
                ("status", "available"),
                ("volume_id", "vol"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (
                r.name.as_deref(),
                r.status.as_deref(),
                r.volume_id.as_deref()
            ),
            (Some("n"), Some("available"), Some("vol"))
        );
        // Unknown filters: dropped before 3.31 and in v2, refused from 3.31.
        assert!(list_request(at(30), s, &q(&[("colour", "red")])).is_ok());
        assert!(list_request(Api::V2, s, &q(&[("colour", "red")])).is_ok());
        assert_eq!(
            list_request(at(31), s, &q(&[("colour", "red"), ("bootable", "x")]))
                .unwrap_err()
                .to_string(),
            "Invalid filters bootable,colour are found in query options."
        );
        // v2's display_name.
        assert_eq!(
            list_request(Api::V2, v, &q(&[("display_name", "d")]))
                .unwrap()
                .name
                .as_deref(),
            Some("d")
        );
        // name~ from 3.34.
        assert_eq!(
            list_request(at(34), v, &q(&[("name~", "da")]))
                .unwrap()
                .name_like
                .as_deref(),
            Some("da")
        );
        assert!(list_request(at(33), v, &q(&[("name~", "da")])).is_err());
        // metadata as cinderclient sends it (a Python dict), or JSON.
        let m = BTreeMap::from([("k".to_string(), "v 1".to_string())]);
        assert_eq!(
            list_request(at(22), s, &q(&[("metadata", "{'k': 'v 1'}")]))
                .unwrap()
                .metadata,
            Some(m.clone())
        );
        assert_eq!(
            list_request(Api::V2, v, &q(&[("metadata", r#"{"k": "v 1"}"#)]))
                .unwrap()
                .metadata,
            Some(m)
        );
        assert_eq!(
            list_request(at(21), s, &q(&[("metadata", "{'k': 'v'}")]))
                .unwrap()
                .metadata,
            None
        );
        assert!(list_request(at(52), s, &q(&[("metadata", "{'k': 1}")])).is_err());
        assert!(list_request(at(52), s, &q(&[("metadata", "__import__('os')")])).is_err());
        // Filters nothing here can match.
        assert!(
            list_request(at(52), v, &q(&[("bootable", "true")]))
                .unwrap()
                .nothing_matches
        );
        assert!(
            !list_request(at(52), v, &q(&[("bootable", "false")]))
                .unwrap()
                .nothing_matches
        );
        assert!(
            list_request(at(52), v, &q(&[("group_id", "g")]))
                .unwrap()
                .nothing_matches
        );
        assert!(
            !list_request(at(52), v, &q(&[("availability_zone", "nova")]))
                .unwrap()
                .nothing_matches
        );
        assert_eq!(
            list_request(at(52), v, &q(&[("size", "3")]))
                .unwrap()
                .size_gb,
            Some(3)
        );
        assert!(
            list_request(at(4), v, &q(&[("glance_metadata", "{}")]))
                .unwrap()
                .nothing_matches
        );
        assert!(list_request(at(31), v, &q(&[("glance_metadata", "{}")])).is_err());
    }

    #[test]
    fn volume_create_backup_id_as_cinders_v3_controller() {
        let id = "0d7c3b3e-6b8a-4c55-9d55-2d4b1f8f6a01";
        // 3.47's request as cinderclient sends it.
        let r = volume_create(
            v3(47),
            json!({"size": null, "backup_id": id, "snapshot_id": null, "name": "r"}),
        )
        .unwrap();
        assert_eq!(
            r,
            VolumeCreate {
                backup_id: Some(id.into()),
                name: Some("r".into()),
                ..VolumeCreate::default()
            }
        );
        // From 3.47 the schema wants a UUID or null.
        for bad in [json!("b"), json!(""), json!(7)] {
            let e = volume_create(v3(47), json!({"backup_id": bad})).unwrap_err();
            assert!(
                e.to_string().starts_with(
                    "Invalid input for field volume.backup_id: expected a backup's UUID"
                ),
                "{e}"
            );
        }
        assert_eq!(
            volume_create(v3(52), json!({"size": 1, "backup_id": null}))
                .unwrap()
                .backup_id,
            None
        );
        // Before 3.47 Cinder's controller takes it unchecked: whatever is
        // true is looked up (and found or a 404), whatever is false skipped.
        assert_eq!(
            volume_create(v3(46), json!({"backup_id": id}))
                .unwrap()
                .backup_id
                .as_deref(),
            Some(id)
        );
        assert_eq!(
            volume_create(v3(0), json!({"backup_id": "b"}))
                .unwrap()
                .backup_id
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            volume_create(v3(46), json!({"backup_id": 7}))
                .unwrap()
                .backup_id
                .as_deref(),
            Some("7")
        );
        for falsy in [json!(""), json!(false), json!(0), json!([]), json!({})] {
            assert_eq!(
                volume_create(v3(46), json!({"size": 1, "backup_id": falsy}))
                    .unwrap()
                    .backup_id,
                None
            );
        }
        // v2's controller had no backup_id, v1 none either: ignored.
        assert_eq!(
            volume_create(Some(Api::V2), json!({"size": 1, "backup_id": id}))
                .unwrap()
                .backup_id,
            None
        );
        assert_eq!(
            volume_create(None, json!({"size": 1, "backup_id": id}))
                .unwrap()
                .backup_id,
            None
        );
    }

    #[test]
    fn backup_lists_as_cinders_backups_controller() {
        let b = Collection::Backups;
        let at = |m| Api::V3(Microversion::new(3, m));
        let r = list_request(
            at(52),
            b,
            &q(&[
                ("limit", "1"),
                ("marker", "m"),
                ("offset", "2"),
                ("sort", "name:asc,created_at"),
                ("name", "n"),
                ("status", "available"),
                ("volume_id", "vol"),
                ("all_tenants", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r,
            ListRequest {
                page: Page {
                    sort: vec![
                        (SortKey::Name, SortDir::Asc),
                        (SortKey::CreatedAt, SortDir::Desc)
                    ],
                    marker: Some("m".into()),
                    offset: 2,
                    limit: 1,
                },
                name: Some("n".into()),
                status: Some("available".into()),
                volume_id: Some("vol".into()),
                ..ListRequest::default()
            }
        );
        // Bad values of known parameters: 400s naming them.
        assert_eq!(
            list_request(at(52), b, &q(&[("limit", "x")]))
                .unwrap_err()
                .to_string(),
            "limit param must be an integer"
        );
        assert_eq!(
            list_request(at(52), b, &q(&[("sort_dir", "up")]))
                .unwrap_err()
                .to_string(),
            "Invalid input received: Unknown sort direction, must be 'desc' or 'asc'."
        );
        // `name` sorts backups from 3.37 (display_name always); before,
        // and in v2, Cinder has no column `name` to sort by.
        assert!(list_request(at(36), b, &q(&[("sort", "name")])).is_err());
        assert!(list_request(Api::V2, b, &q(&[("sort_key", "name")])).is_err());
        assert_eq!(
            list_request(at(36), b, &q(&[("sort_key", "display_name")]))
                .unwrap()
                .page
                .sort,
            vec![(SortKey::Name, SortDir::Desc)]
        );
        assert_eq!(
            list_request(at(37), b, &q(&[("sort", "name:asc")]))
                .unwrap()
                .page
                .sort,
            vec![(SortKey::Name, SortDir::Asc)]
        );
        // Snapshots' and volumes' name sort is unchanged.
        assert!(list_request(Api::V2, Collection::Volumes, &q(&[("sort", "name")])).is_ok());
        // with_count from 3.45.
        assert!(
            list_request(at(45), b, &q(&[("with_count", "1")]))
                .unwrap()
                .with_count
        );
        assert!(
            !list_request(at(44), b, &q(&[("with_count", "1")]))
                .unwrap()
                .with_count
        );
        // Filters other than name, status, volume_id: dropped before 3.31
        // and in v2 (display_name too), refused from 3.31, as Cinder does.
        let r = list_request(
            Api::V2,
            b,
            &q(&[("display_name", "d"), ("metadata", "{'k': 'v'}")]),
        )
        .unwrap();
        assert_eq!((r.name, r.metadata), (None, None));
        assert_eq!(
            list_request(at(31), b, &q(&[("size", "1")]))
                .unwrap_err()
                .to_string(),
            "Invalid filters size are found in query options."
        );
        assert_eq!(
            list_request(at(34), b, &q(&[("name~", "da")]))
                .unwrap()
                .name_like
                .as_deref(),
            Some("da")
        );
    }
}
