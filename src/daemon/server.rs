//! The Unix socket: taken from systemd or bound here, served with hyper,
//! with a connection limit, header and request timeouts, peer credentials on
//! every request, systemd notifications and a graceful stop.

use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::api::{self, ApiError, Peer};
use super::{Daemon, StartError};

/// How long a client may take to send a request's headers (also the idle
/// limit of a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening socket and what to clean up when done.
#[derive(Debug)]
pub struct Listener {
    pub listener: UnixListener,
    /// Set when we bound the socket (removed on exit); `None` under systemd.
    pub bound: Option<PathBuf>,
    pub path: PathBuf,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Take the socket systemd passed (socket activation), or bind our own.
pub fn listen(d: &Daemon) -> Result<Listener, StartError> {
    let path = d.config.socket.clone();
    let sock_err = |source| StartError::Socket {
        path: path.clone(),
        source,
    };
    let fds: Vec<i32> = sd_notify::listen_fds()
        .map(|f| f.collect())
        .unwrap_or_default();
    if let Some(&fd) = fds.first() {
        // SAFETY: systemd passed this descriptor to us (LISTEN_FDS/LISTEN_PID
        // name this process) and nothing else in the process owns it; we
        // take ownership exactly once.
        let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        std_listener.set_nonblocking(true).map_err(sock_err)?;
        let listener = UnixListener::from_std(std_listener).map_err(sock_err)?;
        let actual = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or(path.clone());
        tracing::info!(socket = %actual.display(), "using the socket passed by systemd");
        return Ok(Listener {
            listener,
            bound: None,
            path: actual,
            _lock: None,
        });
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sock_err)?;
    }
    // A lock next to the socket tells a live daemon from a stale socket file.
    let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
    lock_name.push(".lock");
    let lock_path = path.with_file_name(lock_name);
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(sock_err)?;
    let lock_file = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StartError::SocketInUse { path: path.clone() })?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(StartError::SocketInUse { path: path.clone() });
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket left by a daemon that died");
        std::fs::remove_file(&path).map_err(sock_err)?;
    }
    let std_listener = std::os::unix::net::UnixListener::bind(&path).map_err(sock_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(d.config.socket_mode))
        .map_err(sock_err)?;
    if let Some((_, gid)) = &d.config.socket_group {
        nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(*gid)))
            .map_err(|e| sock_err(std::io::Error::from_raw_os_error(e as i32)))?;
    }
    std_listener.set_nonblocking(true).map_err(sock_err)?;
    let listener = UnixListener::from_std(std_listener).map_err(sock_err)?;
    Ok(Listener {
        listener,
        bound: Some(path.clone()),
        path,
        _lock: Some(lock_file),
    })
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(false, states);
}

/// Answer a connection over the limit with a 503 and close it.
async fn refuse(mut stream: tokio::net::UnixStream) {
    let body = api::error_body(503, "Too many connections; try again shortly").to_string();
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Compute-Request-Id: req-{}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        uuid::Uuid::new_v4()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(msg.as_bytes())).await;
}

/// Whole requests (body included) must complete within the configured time.
async fn request_timeout(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "The request took too long to arrive; it was abandoned",
        )
        .into_response(),
    }
}

/// Ask our own socket for /healthz: READY=1 is sent only once this answers.
async fn self_check(path: &Path) -> bool {
    for _ in 0..50 {
        if let Ok(mut s) = tokio::net::UnixStream::connect(path).await {
            use tokio::io::AsyncReadExt;
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            if tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
                .await
                .is_ok()
                && buf.starts_with(b"HTTP/1.1 200")
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn status_line(d: &Daemon, path: &Path) -> String {
    let n = d.running();
    if n == 0 {
        format!("serving on {}; idle", path.display())
    } else {
        format!("serving on {}; {n} operation(s) running", path.display())
    }
}

/// Serve until SIGTERM or SIGINT, then stop cleanly.
pub async fn run(d: Arc<Daemon>, l: Listener) -> std::io::Result<()> {
    let router = api::router(d.clone()).layer(axum::middleware::from_fn_with_state(
        d.config.request_timeout,
        request_timeout,
    ));
    let limit = Arc::new(Semaphore::new(d.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);

    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| Duration::from_micros(watchdog_usec / 2));
    let mut wd_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        let _ = stop_tx.send(true);
    });

    let path = l.path.clone();
    let ready_path = path.clone();
    let ready = tokio::spawn(async move {
        if self_check(&ready_path).await {
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("serving"),
            ]);
            tracing::info!(socket = %ready_path.display(), "ready");
        } else {
            tracing::error!(socket = %ready_path.display(), "the socket does not answer its own health check");
        }
    });

    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = stop_rx.changed() => break,
            accepted = l.listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream));
                    continue;
                };
                let peer = match stream.peer_cred() {
                    Ok(c) => Peer { uid: Some(c.uid()), pid: c.pid() },
                    Err(_) => Peer { uid: None, pid: None },
                };
                let router = router.clone();
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    req.extensions_mut().insert(peer);
                    router.clone().oneshot(req.map(axum::body::Body::new))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            _ = wd_tick.tick(), if watchdog.is_some() => {
                // The accept loop is what the watchdog vouches for: it only
                // pings while this loop keeps turning.
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
            _ = status_tick.tick() => {
                let s = status_line(&d, &path);
                if s != last_status {
                    notify(&[sd_notify::NotifyState::Status(&s)]);
                    last_status = s;
                }
            }
        }
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping"),
    ]);
    ready.abort();
    drop(l.listener);
    // Running scans stop, thaw and become error; other jobs get time to end.
    let d2 = d.clone();
    let finished =
        tokio::task::spawn_blocking(move || d2.stop_and_wait(crate::defaults::STOP_WAIT))
            .await
            .unwrap_or(false);
    if !finished {
        tracing::warn!("operations still running at exit; the next start marks them error");
    }
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("closing connections that did not finish in time");
    }
    if let Some(p) = &l.bound {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped");
    Ok(())
}
