//! API v2 and v3 beside v1 on the real daemon, over the raw socket: what
//! the clients' tests (tests/openstack_clients.rs) do not reach. Cinder's
//! status codes and shapes per microversion, list paging and counting,
//! liberal requests, revert as Cinder defines it, volume metadata in every
//! version with 3.15's ETags.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

const VOL: &str = "c849a193-5275-4527-9e5a-69b2a05933aa";

struct Api<'a> {
    d: &'a DaemonProc,
    version: &'a str,
    microversion: Option<&'a str>,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        let mut headers = Vec::new();
        let mv;
        if let Some(v) = self.microversion {
            mv = format!("volume {v}");
            headers.push(("OpenStack-API-Version", mv.as_str()));
        }
        try_http(
            &self.d.socket,
            method,
            &format!("/{}/{TENANT}{path}", self.version),
            Some(TOKEN),
            body.as_deref(),
            &headers,
        )
        .unwrap()
    }
}

fn at<'a>(d: &'a DaemonProc, version: &'a str, microversion: Option<&'a str>) -> Api<'a> {
    Api {
        d,
        version,
        microversion,
    }
}

fn daemon(dir: &Path) -> DaemonProc {
    let img = dir.join("vol.img");
    make_image(&img, 8 << 20, 3);
    DaemonProc::start("", &volume_toml(VOL, &img, "display_name = \"data\""))
}

fn create_snapshot(a: &Api, name: &str, extra: Value) -> String {
    let mut body = json!({"snapshot": {"volume_id": VOL, "name": name}});
    if let (Some(s), Value::Object(e)) = (body["snapshot"].as_object_mut(), extra) {
        s.extend(e);
    }
    let r = a.call("POST", "/snapshots", Some(&body));
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    assert_eq!(a.d.wait_snapshot(&id)["status"], "available");
    id
}

#[test]
fn v3_snapshots_as_cinder_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let v352 = at(&d, "v3", Some("3.52"));
    let v340 = at(&d, "v3", Some("3.40"));

    // Unknown fields are ignored; a known field with a bad value is a 400
    // that names it.
    let r = v352.call(
        "POST",
        "/snapshots",
        Some(&json!({"snapshot": {"volume_id": VOL, "name": 7}})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error().1.contains("snapshot.name"), "{}", r.body);
    let r = v352.call("POST", "/snapshots", Some(&json!({"snap": {}})));
    assert_eq!(r.status, 400);
    assert_eq!(r.error().1, "Invalid input for field snapshot: is required");
    let r = v352.call(
        "POST",
        "/snapshots",
        Some(
            &json!({"snapshot": {"volume_id": VOL, "name": "a", "description": "first",
            "metadata": {"k": "v"}, "force": false, "user_id": null, "colour": "red"}}),
        ),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.header("OpenStack-API-Version"), Some("volume 3.52"));
    let s = r.json()["snapshot"].clone();
    assert_eq!(
        (s["name"].as_str(), s["description"].as_str()),
        (Some("a"), Some("first"))
    );
    assert_eq!(s["status"], "creating");
    assert_eq!(s["updated_at"], Value::Null);
    assert!(s.get("display_name").is_none(), "v3 says name: {s}");
    assert!(
        s.get("user_id").is_some() && s.get("group_snapshot_id").is_some(),
        "{s}"
    );
    assert!(
        s.get("os-extended-snapshot-attributes:progress").is_none(),
        "the create answer is Cinder's detail view: {s}"
    );
    let a = s["id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_snapshot(&a)["status"], "available");
    let b = create_snapshot(&v352, "b", json!({}));
    let c = create_snapshot(&v352, "c", json!({"metadata": {"k": "v"}}));

    // Show per microversion: user_id from 3.41, the extended attributes.
    let show =
        |api: &Api| api.call("GET", &format!("/snapshots/{a}"), None).json()["snapshot"].clone();
    let s = show(&v352);
    assert_eq!(s["os-extended-snapshot-attributes:progress"], "100%");
    assert_eq!(s["os-extended-snapshot-attributes:project_id"], TENANT);
    assert!(s.get("user_id").is_some());
    assert!(show(&v340).get("user_id").is_none());
    assert!(show(&v340).get("group_snapshot_id").is_some());
    assert!(
        show(&at(&d, "v3", None)).get("group_snapshot_id").is_none(),
        "3.0 has neither"
    );

    // Rename: Cinder's names; the answer is the detail view.
    let r = v352.call(
        "PUT",
        &format!("/snapshots/{a}"),
        Some(&json!({"snapshot": {"name": "a2", "description": "renamed", "status": "error"}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["snapshot"]["name"], "a2");
    assert_ne!(r.json()["snapshot"]["updated_at"], Value::Null);
    assert_eq!(
        show(&v352)["status"],
        "available",
        "status is not a field a client sets"
    );

    // Lists: newest first, limit and a next link carrying the marker.
    let r = v352.call("GET", "/snapshots?limit=2", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let ids: Vec<&str> = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [c.as_str(), b.as_str()]);
    let next = v["snapshots_links"][0]["href"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        next.starts_with(&format!("http://localhost/v3/{TENANT}/snapshots?")),
        "{next}"
    );
    assert!(
        next.contains(&format!("marker={b}")) && next.contains("limit=2"),
        "{next}"
    );
    let path = next.trim_start_matches(&format!("http://localhost/v3/{TENANT}"));
    let v = v352.call("GET", path, None).json();
    assert_eq!(v["snapshots"][0]["id"], a.as_str(), "{v}");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1);
    assert!(v.get("snapshots_links").is_none(), "{v}");
    assert!(
        v["snapshots"][0]
            .get("os-extended-snapshot-attributes:progress")
            .is_none(),
        "summary: {v}"
    );
    // Sorting, filters, count (3.45).
    let v = v352
        .call(
            "GET",
            "/snapshots/detail?sort=name:asc&with_count=true&all_tenants=1",
            None,
        )
        .json();
    let names: Vec<&str> = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a2", "b", "c"]);
    assert_eq!(v["count"], 3);
    assert!(v["snapshots"][0]
        .get("os-extended-snapshot-attributes:progress")
        .is_some());
    let v = v340.call("GET", "/snapshots?with_count=true", None).json();
    assert!(v.get("count").is_none(), "count is 3.45's: {v}");
    let v = v352
        .call("GET", "/snapshots?metadata=%7B%27k%27%3A+%27v%27%7D", None)
        .json();
    let ids: Vec<&str> = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [c.as_str(), a.as_str()], "metadata={{'k': 'v'}}");
    let v = v352.call("GET", "/snapshots?name=b", None).json();
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1);
    let v = v352.call("GET", "/snapshots?name~=2", None).json();
    assert_eq!(v["snapshots"][0]["id"], a.as_str(), "{v}");
    let r = v352.call("GET", "/snapshots?colour=red", None);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error().1,
        "Invalid filters colour are found in query options."
    );
    let r = v352.call("GET", "/snapshots?limit=x", None);
    assert_eq!(r.error().1, "limit param must be an integer");
    let r = v352.call(
        "GET",
        "/snapshots?marker=3f1cf53a-3b5b-4b8a-9b8a-0b6a6c1f0c55",
        None,
    );
    assert_eq!(r.status, 400, "{}", r.body);

    // Snapshot metadata, the same routes as v1.
    let r = v352.call(
        "POST",
        &format!("/snapshots/{b}/metadata"),
        Some(&json!({"metadata": {"x": "1"}})),
    );
    assert_eq!(r.json(), json!({"metadata": {"x": "1"}}));
    let r = v352.call("GET", &format!("/snapshots/{b}/metadata/x"), None);
    assert_eq!(r.json(), json!({"meta": {"x": "1"}}));

    // Delete: 202; a microversion out of range: 406.
    let r = v352.call("DELETE", &format!("/snapshots/{b}"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(d.wait_snapshot(&b).is_null());
    let r = at(&d, "v3", Some("3.53")).call("GET", "/snapshots", None);
    assert_eq!(r.status, 406);
    assert_eq!(r.header("OpenStack-API-Version"), Some("volume 3.53"));
    // And v1 still answers as it always did.
    let r = d.call("GET", &format!("/snapshots/{a}"), None);
    assert_eq!(r.json()["snapshot"]["display_name"], "a2");
    assert!(r.json()["snapshot"].get("name").is_none());
}

#[test]
fn volumes_metadata_and_revert_in_v2_and_v3() {
    if !root("volumes_metadata_and_revert_in_v2_and_v3") {
        return;
    }
    let src = Loop::new(24 << 20);
    write_at(&src.dev, 0, &random_bytes(8, 24 << 20));
    let d = DaemonProc::start("", &volume_toml(VOL, &src.dev, "quiesce = \"none\""));
    let v2 = at(&d, "v2", None);
    let v352 = at(&d, "v3", Some("3.52"));

    // The plain list: id, name, links.
    let v = v2.call("GET", "/volumes", None).json();
    let vol = &v["volumes"][0];
    assert_eq!(vol["id"], VOL);
    let mut keys: Vec<&String> = vol.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["id", "links", "name"]);
    assert_eq!(
        vol["links"][0]["href"],
        format!("http://localhost/v2/{TENANT}/volumes/{VOL}")
    );
    let shown = v352.call("GET", &format!("/volumes/{VOL}"), None).json()["volume"].clone();
    for k in [
        "multiattach",
        "shared_targets",
        "group_id",
        "os-vol-tenant-attr:tenant_id",
        "bootable",
    ] {
        assert!(shown.get(k).is_some(), "{k} missing: {shown}");
    }
    assert_eq!(shown["status"], "available");

    // A volume from a snapshot (v2): 202 with the detail view; a request
    // with the fields v2 clients send.
    let s1 = create_snapshot(&v352, "s1", json!({}));
    let r = v2.call(
        "POST",
        "/volumes",
        Some(
            &json!({"volume": {"snapshot_id": s1, "name": "copy", "size": null,
            "consistencygroup_id": null, "backup_id": null, "availability_zone": null,
            "volume_type": null, "metadata": {}, "imageRef": null, "source_volid": null},
            "OS-SCH-HNT:scheduler_hints": {"same_host": []}}),
        ),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let made = r.json()["volume"]["id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["volume"]["snapshot_id"], s1.as_str());
    assert_eq!(r.json()["volume"]["name"], "copy");
    let v = d.wait_volume(&made, &["creating"]);
    assert_eq!(v["status"], "available", "{v}");
    let r = v352.call(
        "POST",
        "/volumes",
        Some(&json!({"volume": {"snapshot_id": s1, "backup_id": "b"}})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error().1.contains("volume.backup_id"), "{}", r.body);

    // Volume metadata in every version; ETags from 3.15.
    let r = d.call(
        "POST",
        &format!("/volumes/{made}/metadata"),
        Some(r#"{"metadata": {"role": "copy"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["metadata"]["role"], "copy");
    let r = d.call("GET", &format!("/volumes/{made}/metadata/role"), None);
    assert_eq!(r.json(), json!({"meta": {"role": "copy"}}));
    assert!(r.header("Etag").is_none());
    let r = v352.call("GET", &format!("/volumes/{made}/metadata"), None);
    let all = r.json()["metadata"].clone();
    assert!(all.get("blocksnap:device").is_some(), "{all}");
    let tag = r.header("Etag").expect("an ETag from 3.15").to_string();
    assert!(at(&d, "v3", Some("3.14"))
        .call("GET", &format!("/volumes/{made}/metadata"), None)
        .header("Etag")
        .is_none());
    // Put back all but role, as cinderclient's `metadata unset` does,
    // once with a stale tag and once with the current one.
    let mut rest = all.clone();
    rest.as_object_mut().unwrap().remove("role");
    let put = |tag: &str| {
        let body = json!({"metadata": rest}).to_string();
        try_http(
            &d.socket,
            "PUT",
            &format!("/v3/{TENANT}/volumes/{made}/metadata"),
            Some(TOKEN),
            Some(&body),
            &[("OpenStack-API-Version", "volume 3.52"), ("If-Match", tag)],
        )
        .unwrap()
    };
    assert_eq!(put("0123456789abcdef0123456789abcdef").status, 412);
    let r = put(&tag);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["metadata"].get("role").is_none());
    assert_eq!(
        r.json()["metadata"]["blocksnap:device"],
        all["blocksnap:device"]
    );
    let r = v2.call(
        "PUT",
        &format!("/volumes/{made}/metadata/blocksnap:device"),
        Some(&json!({"meta": {"blocksnap:device": "/dev/sda"}})),
    );
    assert_eq!(r.status, 400, "the daemon's own items stay: {}", r.body);

    // Delete: openstacksdk's cascade=False&force=False is fine; cascading
    // or forcing is not offered.
    let r = v352.call("DELETE", &format!("/volumes/{made}?cascade=True"), None);
    assert_eq!(r.status, 400);
    let r = v352.call("DELETE", &format!("/volumes/{made}?force=true"), None);
    assert_eq!(r.status, 403);
    let r = v352.call(
        "DELETE",
        &format!("/volumes/{made}?cascade=False&force=False"),
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(d.wait_volume(&made, &["deleting"]).is_null());

    // Revert: v3 from 3.40, to the latest snapshot only.
    let at_s1 = read_all(&src.dev);
    write_at(&src.dev, 4096, b"changed");
    let s2 = create_snapshot(&v352, "s2", json!({}));
    let at_s2 = read_all(&src.dev);
    write_at(&src.dev, 8192, b"changed again");
    let revert = |api: &Api, snap: &str| {
        api.call(
            "POST",
            &format!("/volumes/{VOL}/action"),
            Some(&json!({"revert": {"snapshot_id": snap}})),
        )
    };
    let r = revert(&at(&d, "v3", Some("3.39")), &s2);
    assert_eq!(r.status, 404, "{}", r.body);
    let r = revert(&v352, &s1);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error().1,
        format!("Specified snapshot {s1} is None or not the latest one of volume {VOL}.")
    );
    let r = revert(&v352, &s2);
    assert_eq!(r.status, 202, "{}", r.body);
    d.wait_volume(VOL, &["reverting"]);
    assert_same(&read_all(&src.dev), &at_s2, "reverted through v3");
    assert!(at_s1 != at_s2);
    // v2 serves the same revert (blocksnap's, as in v1).
    let r = revert(&v2, &s2);
    assert_eq!(r.status, 202, "{}", r.body);
    d.wait_volume(VOL, &["reverting"]);
}
