//! Version discovery, answered without a token as Cinder does: `GET /` is
//! 300 Multiple Choices with every version (v1.0, v2.0, v3.0); `GET /v3/`,
//! `/v2/`, `/v1/` (with or without the slash) and `GET /v3/{project_id}`
//! are 200 with that one version. python-cinderclient 9 reads `GET /`
//! before any command to learn the highest microversion; openstacksdk
//! (keystoneauth) reads `GET /v3` and then the endpoint itself,
//! `/v3/{project_id}`.
//!
//! The shapes are Cinder's (cinder/api/versions.py and
//! cinder/api/views/versions.py; the v1.0 and v2.0 entries as Cinder served
//! them before it dropped those APIs: no microversions, so `version` and
//! `min_version` are empty strings).

use serde_json::{json, Value};

use super::microversion::{self, Microversion};

/// When blocksnap's v3 API last changed (Cinder's `UPDATED`).
pub const V3_UPDATED: &str = "2026-11-29T00:00:00Z";

/// The API versions blocksnap serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Major {
    V1,
    V2,
    V3,
}

impl Major {
    pub const ALL: [Major; 3] = [Major::V1, Major::V2, Major::V3];

    /// The URL's first segment: `v1`, `v2`, `v3`.
    pub fn segment(self) -> &'static str {
        match self {
            Major::V1 => "v1",
            Major::V2 => "v2",
            Major::V3 => "v3",
        }
    }

    pub fn from_segment(s: &str) -> Option<Major> {
        Major::ALL.into_iter().find(|m| m.segment() == s)
    }

    fn id(self) -> &'static str {
        match self {
            Major::V1 => "v1.0",
            Major::V2 => "v2.0",
            Major::V3 => "v3.0",
        }
    }

    fn number(self) -> u8 {
        match self {
            Major::V1 => 1,
            Major::V2 => 2,
            Major::V3 => 3,
        }
    }
}

/// The base URL links are built on: `http://` and the request's Host
/// header (Cinder uses the request's host URL). Over the Unix socket curl
/// sends `localhost`; through a TCP bridge, the bridge's address. A Host
/// header that is not a plain host[:port] is replaced by `localhost`.
pub fn base_url(host: Option<&str>) -> String {
    let ok = |h: &str| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
    };
    match host {
        Some(h) if ok(h) => format!("http://{h}"),
        _ => "http://localhost".to_string(),
    }
}

/// One entry of the versions document.
pub fn version_entry(base: &str, major: Major, max: Microversion) -> Value {
    // v1 and v2 have no microversions. blocksnap serves them in full, so
    // they are SUPPORTED (Cinder said DEPRECATED when it meant to drop them).
    let (status, version, min_version, updated) = match major {
        Major::V1 => (
            "SUPPORTED",
            String::new(),
            String::new(),
            "2016-05-02T20:25:19Z",
        ),
        Major::V2 => (
            "SUPPORTED",
            String::new(),
            String::new(),
            "2017-02-25T12:00:00Z",
        ),
        Major::V3 => (
            "CURRENT",
            max.to_string(),
            microversion::MIN.to_string(),
            V3_UPDATED,
        ),
    };
    json!({
        "id": major.id(),
        "status": status,
        "version": version,
        "min_version": min_version,
        "updated": updated,
        "links": [
            {
                "rel": "describedby",
                "type": "text/html",
                "href": "https://docs.openstack.org/",
            },
            {
                "rel": "self",
                "href": format!("{}/{}/", base.trim_end_matches('/'), major.segment()),
            },
        ],
        "media-types": [{
            "base": "application/json",
            "type": format!("application/vnd.openstack.volume+json;version={}", major.number()),
        }],
    })
}

/// `GET /`: every version, sorted by id as Cinder sorts them (answered 300).
pub fn versions_document(base: &str) -> Value {
    json!({
        "versions": Major::ALL
            .iter()
            .map(|m| version_entry(base, *m, microversion::MAX))
            .collect::<Vec<_>>()
    })
}

/// `GET /vN/` and `GET /v3/{project_id}`: that version alone (answered 200).
pub fn version_document(base: &str, major: Major) -> Value {
    json!({ "versions": [version_entry(base, major, microversion::MAX)] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cinder's api-ref sample versions/version-show-response.json, with its
    /// host, `version` and `updated` replaced by ours.
    const CINDER_VERSION_SHOW: &str = r#"{
        "versions": [
            {
                "id": "v3.0",
                "links": [
                    {
                        "href": "https://docs.openstack.org/",
                        "rel": "describedby",
                        "type": "text/html"
                    },
                    {
                        "href": "http://127.0.0.1:44895/v3/",
                        "rel": "self"
                    }
                ],
                "media-types": [
                    {
                        "base": "application/json",
                        "type": "application/vnd.openstack.volume+json;version=3"
                    }
                ],
                "min_version": "3.0",
                "status": "CURRENT",
                "updated": "UPDATED",
                "version": "MAX"
            }
        ]
    }"#;

    #[test]
    fn the_v3_document_is_cinders_sample() {
        let want: Value = serde_json::from_str(
            &CINDER_VERSION_SHOW
                .replace("UPDATED", V3_UPDATED)
                .replace("MAX", &microversion::MAX.to_string()),
        )
        .unwrap();
        let got = version_document(&base_url(Some("127.0.0.1:44895")), Major::V3);
        assert_eq!(got, want);
    }

    #[test]
    fn the_versions_document_lists_all_three_in_order() {
        let v = versions_document("http://localhost");
        let list = v["versions"].as_array().unwrap();
        let ids: Vec<&str> = list.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["v1.0", "v2.0", "v3.0"]);
        for (e, n) in list.iter().zip(1..) {
            assert_eq!(e["links"][1]["href"], format!("http://localhost/v{n}/"));
            assert_eq!(
                e["media-types"][0]["type"],
                format!("application/vnd.openstack.volume+json;version={n}")
            );
            for key in [
                "status",
                "version",
                "min_version",
                "updated",
                "links",
                "media-types",
            ] {
                assert!(e.get(key).is_some(), "{key} missing in {e}");
            }
        }
        assert_eq!(list[0]["version"], "");
        assert_eq!(list[1]["min_version"], "");
        assert_eq!(list[2]["version"], microversion::MAX.to_string());
        assert_eq!(list[2]["status"], "CURRENT");
    }

    #[test]
    fn host_headers_are_checked_before_they_become_links() {
        assert_eq!(base_url(None), "http://localhost");
        assert_eq!(base_url(Some("127.0.0.1:8776")), "http://127.0.0.1:8776");
        assert_eq!(base_url(Some("[::1]:8776")), "http://[::1]:8776");
        assert_eq!(base_url(Some("evil/\"><x")), "http://localhost");
        assert_eq!(base_url(Some("")), "http://localhost");
        assert_eq!(Major::from_segment("v2"), Some(Major::V2));
        assert_eq!(Major::from_segment("v4"), None);
    }
}
