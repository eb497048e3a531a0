//! Arbitrary HTTP requests through the daemon's router (parsing, routing,
//! authentication, every handler): no panic, no 500, and every error in the
//! reference's format.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use blocksnap::config::Config;
use blocksnap::daemon::api::{self, Peer};
use blocksnap::daemon::Daemon;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct World {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
        let dir = std::path::PathBuf::from(base).join(format!("blocksnap-fuzz-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        cleanup_at_exit(dir.clone());
        let img = dir.join("vol.img");
        std::fs::write(&img, vec![7u8; 64 << 10]).unwrap();
        let text = format!(
            "[daemon]\nsocket = \"{d}/s.sock\"\nstate_dir = \"{d}/state\"\nmax_made_volumes = 0\n[[tokens]]\ntenant = \"t\"\ntoken = \"fuzz-token\"\n[[volumes]]\nid = \"vol\"\ndevice = \"{img}\"\nquiesce = \"none\"\n",
            d = dir.display(),
            img = img.display()
        );
        let config = Config::parse(&dir.join("c.toml"), &text).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let router = rt.block_on(async {
            let engine = blocksnap::daemon::engine::HostEngine::new(
                Arc::new(blocksnap::quiesce::Host),
                &config,
            );
            let d = Daemon::start(
                config,
                engine,
                Box::new(|_| {
                    let s = blocksnap::daemon::store::MemStore::new();
                    Ok(Arc::new(s) as Arc<dyn blocksnap::daemon::store::Store>)
                }),
            )
            .unwrap();
            api::router(d)
        });
        World { rt, router }
    })
}

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let w = world();
    let flags = data[0];
    let method = METHODS[(data[1] as usize) % METHODS.len()];
    let rest = &data[2..];
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let raw_path = String::from_utf8_lossy(&rest[..split]);
    let body = rest.get(split + 1..).unwrap_or(&[]).to_vec();
    let path = if flags & 1 != 0 {
        format!("/v1/t/{raw_path}")
    } else {
        format!("/{raw_path}")
    };
    let Ok(uri) = path.parse::<axum::http::Uri>() else {
        return;
    };
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if flags & 2 != 0 {
        req = req.header("x-auth-token", "fuzz-token");
    }
    if flags & 4 != 0 {
        req = req.header("content-type", "application/json");
    }
    let Ok(mut req) = req.body(Body::from(body)) else {
        return;
    };
    req.extensions_mut().insert(Peer {
        uid: Some(0),
        pid: None,
    });
    let resp = w.rt.block_on(w.router.clone().oneshot(req)).unwrap();
    let status = resp.status();
    assert!(status.as_u16() != 500, "internal error for {method} {path}");
    assert!(resp.headers().contains_key("x-compute-request-id"));
    // HEAD answers carry no body.
    if method != "HEAD" && (status.is_client_error() || status.is_server_error()) {
        let bytes =
            w.rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                .unwrap();
        let v: serde_json_value::Value =
            serde_json_value::from_slice(&bytes).expect("error body is JSON");
        let m = v.as_object().expect("error body is an object");
        assert_eq!(m.len(), 1);
        let inner = m.values().next().unwrap();
        assert_eq!(inner["code"].as_u64(), Some(status.as_u16() as u64));
    }
});

mod serde_json_value {
    pub use serde_json::{from_slice, Value};
}

/// Remove the fuzzing directory when libFuzzer exits (it calls exit()).
fn cleanup_at_exit(dir: std::path::PathBuf) {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let _ = DIR.set(dir);
    extern "C" fn remove() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    // SAFETY: registers a plain function with no arguments to run at exit.
    unsafe { libc::atexit(remove) };
}
