//! Block Storage API microversions (v3): the `OpenStack-API-Version: volume
//! X.Y` request header, the range blocksnap serves, and the header echoed on
//! every v3 answer. Parsing and messages follow Cinder
//! (cinder/api/openstack/wsgi.py, api_version_request.py).
//!
//! v1 and v2 have no microversions: their requests ignore the header and
//! their answers carry none (Cinder's "legacy endpoints").

use std::fmt;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The request and response header.
pub const HEADER: &str = "OpenStack-API-Version";
/// The service name inside it.
pub const SERVICE: &str = "volume";

/// A v3 microversion, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Microversion {
    pub major: u32,
    pub minor: u32,
}

impl Microversion {
    pub const fn new(major: u32, minor: u32) -> Microversion {
        Microversion { major, minor }
    }

    /// Cinder's format: `^([1-9]\d*)\.([1-9]\d*|0)$` (no leading zeros, no
    /// sign, no spaces).
    pub fn parse(s: &str) -> Option<Microversion> {
        let (a, b) = s.split_once('.')?;
        let part = |p: &str, zero_ok: bool| -> Option<u32> {
            let digits = !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit());
            let leading_zero = p.starts_with('0') && !(zero_ok && p == "0");
            if !digits || leading_zero {
                return None;
            }
            p.parse().ok()
        };
        Some(Microversion::new(part(a, false)?, part(b, true)?))
    }

    /// Whether this version is at least `v` (a feature's first version).
    pub fn at_least(self, v: Microversion) -> bool {
        self >= v
    }
}

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The first microversion of v3.
pub const MIN: Microversion = Microversion::new(3, 0);

/// The highest microversion blocksnap honours fully, advertised in the
/// version documents and taken for `latest`.
///
/// 3.52 is the last microversion before 3.53, from which Cinder itself
/// rejects request fields it does not know (jsonschema with
/// additionalProperties false on volume create and update); up to 3.52
/// Cinder ignores them, as blocksnap does in every version. Everything
/// 3.1-3.52 changes about the resources blocksnap serves (snapshots,
/// volumes, their metadata, revert, backups' list sort and volumes from
/// backups) is served as Cinder defines it; the versions that concern
/// resources blocksnap does not have (groups, messages, attachments,
/// services, pools, clusters) change nothing here. The list is in
/// docs/API.md.
pub const MAX: Microversion = Microversion::new(3, 52);

/// Microversions whose changes the views depend on (cinder/api/microversions.py).
pub mod features {
    use super::Microversion;
    /// `group_id` in volume details.
    pub const GROUP_VOLUME: Microversion = Microversion::new(3, 13);
    /// `group_snapshot_id` in snapshot details.
    pub const GROUP_SNAPSHOTS: Microversion = Microversion::new(3, 14);
    /// Snapshot list filter by metadata.
    pub const SNAPSHOT_LIST_METADATA_FILTER: Microversion = Microversion::new(3, 22);
    /// Sorting snapshots by name.
    pub const SNAPSHOT_SORT: Microversion = Microversion::new(3, 30);
    /// Sorting backups by `name` (Cinder maps it to display_name).
    pub const BACKUP_SORT_NAME: Microversion = Microversion::new(3, 37);
    /// `POST /volumes/{id}/action {"revert": ...}`.
    pub const VOLUME_REVERT: Microversion = Microversion::new(3, 40);
    /// `user_id` in snapshot details.
    pub const SNAPSHOT_LIST_USER_ID: Microversion = Microversion::new(3, 41);
    /// `with_count` and `count` in lists.
    pub const SUPPORT_COUNT_INFO: Microversion = Microversion::new(3, 45);
    /// `backup_id` in volume create.
    pub const VOLUME_CREATE_FROM_BACKUP: Microversion = Microversion::new(3, 47);
    /// `shared_targets` and `service_uuid` in volume details.
    pub const VOLUME_SHARED_TARGETS_AND_SERVICE_FIELDS: Microversion = Microversion::new(3, 48);
}

/// Why a request's microversion cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MicroversionError {
    /// The header's volume entry is not `X.Y`.
    #[error("API Version String {0} is of invalid format. Must be of format MajorNum.MinorNum.")]
    Invalid(String),
    /// The header has no `volume` entry.
    #[error("API version {0} is not supported on this method.")]
    NoVolumeEntry(String),
    /// Outside MIN..=MAX.
    #[error(
        "Version {requested} is not supported by the API. Minimum is {MIN} and maximum is {MAX}."
    )]
    Unsupported { requested: Microversion },
}

impl MicroversionError {
    /// Cinder answers an unsupported version 406 Not Acceptable, a
    /// malformed header 400.
    pub fn status(&self) -> StatusCode {
        match self {
            MicroversionError::Unsupported { .. } => StatusCode::NOT_ACCEPTABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The version to echo on the error answer, as Cinder does: the one
    /// asked for, when it was well formed.
    pub fn requested(&self) -> Option<Microversion> {
        match self {
            MicroversionError::Unsupported { requested } => Some(*requested),
            _ => None,
        }
    }
}

/// The microversion a v3 request asks for: none given is 3.0 (Cinder's
/// default), `latest` is MAX. The header may hold entries for several
/// services separated by commas (`compute 2.1, volume 3.40`).
pub fn negotiate(headers: &HeaderMap) -> Result<Microversion, MicroversionError> {
    let values: Vec<&str> = headers
        .get_all(HEADER)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    if values.is_empty() {
        return Ok(MIN);
    }
    let all = values.join(",");
    let entry = all
        .split(',')
        .map(str::trim)
        .find(|e| e.split_whitespace().next() == Some(SERVICE));
    let Some(entry) = entry else {
        return Err(MicroversionError::NoVolumeEntry("None".into()));
    };
    let mut words = entry.split_whitespace();
    words.next();
    let (Some(v), None) = (words.next(), words.next()) else {
        return Err(MicroversionError::Invalid(clean(entry)));
    };
    if v.eq_ignore_ascii_case("latest") {
        return Ok(MAX);
    }
    let requested = Microversion::parse(v).ok_or_else(|| MicroversionError::Invalid(clean(v)))?;
    if requested < MIN || requested > MAX {
        return Err(MicroversionError::Unsupported { requested });
    }
    Ok(requested)
}

/// A header value for a message: printable, at most 64 characters.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Put `OpenStack-API-Version: volume X.Y` and `Vary: OpenStack-API-Version`
/// on a v3 answer.
pub fn echo(headers: &mut HeaderMap, v: Microversion) {
    if let Ok(value) = HeaderValue::from_str(&format!("{SERVICE} {v}")) {
        headers.insert(HeaderName::from_static("openstack-api-version"), value);
        headers.append(axum::http::header::VARY, HeaderValue::from_static(HEADER));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("openstack-api-version", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_cinders_format_only() {
        assert_eq!(Microversion::parse("3.40"), Some(Microversion::new(3, 40)));
        assert_eq!(Microversion::parse("3.0"), Some(MIN));
        assert_eq!(
            Microversion::parse("10.100"),
            Some(Microversion::new(10, 100))
        );
        for bad in [
            "3", "3.", ".4", "03.1", "3.01", "0.1", "3.x", "+3.1", "3.1.2", " 3.1", "",
        ] {
            assert_eq!(Microversion::parse(bad), None, "{bad:?}");
        }
        assert!(Microversion::new(3, 9) < Microversion::new(3, 10));
        assert_eq!(Microversion::new(3, 40).to_string(), "3.40");
    }

    #[test]
    fn negotiates_as_cinder_does() {
        assert_eq!(negotiate(&HeaderMap::new()), Ok(MIN));
        assert_eq!(
            negotiate(&with(&["volume 3.40"])),
            Ok(Microversion::new(3, 40))
        );
        assert_eq!(negotiate(&with(&["volume latest"])), Ok(MAX));
        assert_eq!(
            negotiate(&with(&["compute 2.1, volume 3.41"])),
            Ok(Microversion::new(3, 41))
        );
        assert_eq!(
            negotiate(&with(&["compute 2.1", "volume 3.2"])),
            Ok(Microversion::new(3, 2))
        );
        assert_eq!(negotiate(&with(&[&format!("volume {MAX}")])), Ok(MAX));
    }

    #[test]
    fn refuses_with_cinders_messages_and_codes() {
        // cinderclient 9 asks for 3.71 only after reading the server's
        // maximum; asked directly, a higher version is 406.
        let e = negotiate(&with(&["volume 3.71"])).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_ACCEPTABLE);
        assert_eq!(
            e.to_string(),
            format!(
                "Version 3.71 is not supported by the API. Minimum is 3.0 and maximum is {MAX}."
            )
        );
        assert_eq!(e.requested(), Some(Microversion::new(3, 71)));
        let e = negotiate(&with(&["volume 2.0"])).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_ACCEPTABLE);
        let e = negotiate(&with(&["volume 3.x"])).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.to_string(),
            "API Version String 3.x is of invalid format. Must be of format MajorNum.MinorNum."
        );
        let e = negotiate(&with(&["compute 2.1"])).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.to_string(),
            "API version None is not supported on this method."
        );
        let e = negotiate(&with(&["volume 3.1 3.2"])).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn echoes_the_version_with_vary() {
        let mut h = HeaderMap::new();
        h.insert("vary", HeaderValue::from_static("Accept"));
        echo(&mut h, Microversion::new(3, 40));
        assert_eq!(h.get("openstack-api-version").unwrap(), "volume 3.40");
        let vary: Vec<&str> = h
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(vary, ["Accept", "OpenStack-API-Version"]);
    }

    #[test]
    fn the_advertised_maximum_serves_revert() {
        assert!(MAX.at_least(features::VOLUME_REVERT));
        assert!(
            MAX < Microversion::new(3, 53),
            "3.53 makes Cinder reject unknown fields"
        );
    }
}
