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

/// The largest request head (request line and headers) read: past it the
/// client gets a 431. hyper's own default is about 400 KiB per connection.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// At most this many headers in a request (hyper's default), else 431.
pub const MAX_HEADERS: usize = 100;

/// Open files the daemon keeps for itself, whatever the connections: the
/// runtime, the journal, the listener, locks, the catalog and its temporary
/// files, mount tables, loop-control.
const BASE_FILES: u64 = 64;

/// Open files one running operation may hold at once: chain, side file and
/// its temporary, device, mount point, freeze marker, mount table, image.
const FILES_PER_OPERATION: u64 = 8;

/// The open-file limit, raised from soft to hard if it was lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub limit: u64,
    /// The soft limit before it was raised.
    pub was: u64,
}

/// Raise the soft RLIMIT_NOFILE to the hard one (systemd starts services
/// with a soft limit of 1024 unless LimitNOFILE= says otherwise).
pub fn raise_open_files_limit() -> std::io::Result<OpenFiles> {
    let (soft, hard) = crate::sys::nofile_limit()?;
    if soft < hard {
        crate::sys::set_nofile_limit(hard, hard)?;
    }
    let (now, _) = crate::sys::nofile_limit()?;
    Ok(OpenFiles {
        limit: now,
        was: soft,
    })
}

/// How many connections fit under an open-file limit of `limit`, leaving
/// room for the work itself: `operations` volumes that may each run one
/// operation at a time. Never more than `configured`, never less than 1.
pub fn connection_cap(limit: u64, configured: usize, operations: usize) -> usize {
    let reserve = BASE_FILES + FILES_PER_OPERATION * operations as u64;
    // A limit too small for the reserve: give connections a quarter.
    let room = if limit > reserve * 2 {
        limit - reserve
    } else {
        limit / 4
    };
    (configured as u64).min(room).max(1) as usize
}

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
    let lock_file = crate::util::private_options()
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

/// A whole HTTP/1.1 error response in the reference's format, for answers
/// given outside the router; the connection is closed after it.
pub fn error_response(code: u16, message: &str) -> Vec<u8> {
    let body = api::error_body(code, message).to_string();
    let reason = axum::http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Compute-Request-Id: req-{}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        uuid::Uuid::new_v4()
    )
    .into_bytes()
}

/// Answer a connection over the limit with a 503 and close it.
async fn refuse(mut stream: tokio::net::UnixStream, message: &str) {
    let msg = error_response(503, message);
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&msg)).await;
    // Take what the client already sent, without waiting for more: a socket
    // closed with unread data makes the client's next read fail with
    // ECONNRESET instead of ending cleanly after the answer.
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

/// What hyper answers by itself, before the router runs, when it cannot
/// parse a request (a garbage request line, too many or too large headers,
/// a URI too long): the status of such a response head, `None` for any
/// other bytes. Every response the router makes carries a request id; these
/// do not, and have no body.
fn automatic_error(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let code: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let has_id = head[..end]
        .split(|&b| b == b'\n')
        .any(|l| l.to_ascii_lowercase().starts_with(b"x-compute-request-id:"));
    (code >= 400 && !has_id).then_some(code)
}

/// The message for an answer hyper gives before the router runs.
fn automatic_error_message(code: u16) -> String {
    match code {
        400 => "Malformed request: the request line or a header could not be parsed".into(),
        414 => "The request URI is too long".into(),
        431 => format!(
            "Request header fields too large: at most {MAX_HEADERS} headers and {} KiB in all",
            MAX_HEAD_BYTES >> 10
        ),
        _ => "The request could not be read".into(),
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_millis(500);
/// At most this much is read and dropped while lingering: more than a
/// refused oversize body (a client still sending it would otherwise see its
/// connection reset before it reads the 413).
const LINGER_BYTES: usize = 16 << 20;

/// A connection's stream as hyper sees it, with hyper's own error answers
/// (empty bodies) replaced by JSON ones in the reference's format, and a
/// lingering close: an answer given before the request's body was read
/// (an error, a refusal) would otherwise close the socket with unread data,
/// and the client's read after the answer fails with ECONNRESET.
#[derive(Debug)]
struct JsonErrors<S> {
    inner: S,
    /// A replacement answer still to be written.
    pending: Vec<u8>,
    /// Once the write side is shut: until when, and how much, to drain.
    linger: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<S: tokio::io::AsyncWrite + Unpin> JsonErrors<S> {
    fn new(inner: S) -> JsonErrors<S> {
        JsonErrors {
            inner,
            pending: Vec::new(),
            linger: None,
        }
    }

    /// Write out what is pending before anything else.
    fn poll_pending(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        while !self.pending.is_empty() {
            match std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// If `buf` is an answer hyper made up, queue ours instead.
    fn replaced(&mut self, buf: &[u8]) -> bool {
        match automatic_error(buf) {
            Some(code) => {
                self.pending = error_response(code, &automatic_error_message(code));
                true
            }
            None => false,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for JsonErrors<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if self.replaced(buf) {
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        // hyper writes a response head as the first buffer of a write.
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if self.replaced(first) {
                return std::task::Poll::Ready(Ok(first.len()));
            }
        }
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        std::task::ready!(self.poll_pending(cx))?;
        let this = &mut *self;
        if this.linger.is_none() {
            std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        // The client sees the end of the answer; read what it still sends
        // until it closes too, for a moment at most.
        let Some((deadline, drained)) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        loop {
            if *drained >= LINGER_BYTES
                || std::future::Future::poll(deadline.as_mut(), cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Whether an accept failed because this process or the system ran out of
/// file descriptors (or socket memory): waiting helps, retrying at once not.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Whole requests (body included) must complete within the configured time.
async fn request_timeout(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            // Outside the router's request-id layer: add one here.
            let mut r = ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "The request took too long to arrive; it was abandoned",
            )
            .into_response();
            if let Ok(v) =
                axum::http::HeaderValue::from_str(&format!("req-{}", uuid::Uuid::new_v4()))
            {
                r.headers_mut().insert("x-compute-request-id", v);
            }
            r
        }
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

/// Accept failures for want of descriptors, logged once per burst rather
/// than once per attempt.
#[derive(Debug, Default)]
struct Exhausted {
    last: Option<std::time::Instant>,
    since: u64,
}

impl Exhausted {
    fn note(&mut self, e: &std::io::Error) {
        self.since += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            tracing::warn!(
                failures = self.since,
                "accept failed: {e}; answering waiting clients 503 and backing off \
                 ({} failure(s) since the last report)",
                self.since
            );
            self.last = Some(std::time::Instant::now());
            self.since = 0;
        }
    }
}

/// Serve until SIGTERM or SIGINT, then stop cleanly.
pub async fn run(d: Arc<Daemon>, l: Listener) -> std::io::Result<()> {
    let router = api::router(d.clone()).layer(axum::middleware::from_fn_with_state(
        d.config.request_timeout,
        request_timeout,
    ));
    // Connections may use what the open-file limit leaves after the work:
    // past it, accept() and the work itself would fail with EMFILE.
    let open_files = crate::sys::nofile_limit()
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let operations = d.config.volumes.len() + d.config.max_made_volumes;
    let max_connections = connection_cap(open_files, d.config.max_connections, operations);
    if max_connections < d.config.max_connections {
        tracing::warn!(
            open_files,
            max_connections,
            configured = d.config.max_connections,
            "open files: limit {open_files} leaves room for {max_connections} connection(s), \
             not the configured max_connections = {}; raise LimitNOFILE= to serve more",
            d.config.max_connections
        );
    } else {
        tracing::info!(
            open_files,
            max_connections,
            "open files: limit {open_files}, at most {max_connections} connection(s)"
        );
    }
    let limit = Arc::new(Semaphore::new(max_connections));
    // One descriptor held in reserve: when accept() fails for want of
    // descriptors, it is let go to take the waiting client and answer it
    // 503 instead of leaving it hanging.
    let mut spare = std::fs::File::open("/dev/null").ok();
    let mut exhausted = Exhausted::default();
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
            // Logged first, so the journal shows it before systemd's "Started".
            tracing::info!(socket = %ready_path.display(), "ready");
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("serving"),
            ]);
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
                    Err(e) if out_of_resources(&e) => {
                        exhausted.note(&e);
                        if spare.take().is_some() {
                            if let Ok(Ok((s, _))) = tokio::time::timeout(
                                Duration::from_millis(10),
                                l.listener.accept(),
                            )
                            .await
                            {
                                refuse(s, "The server is out of file descriptors; try again shortly").await;
                            }
                        }
                        // Back off briefly rather than spin on a listener
                        // that stays readable.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        spare = spare.or_else(|| std::fs::File::open("/dev/null").ok());
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    // Answered here, not in a task: a burst of refused
                    // clients then holds one descriptor at a time, not one
                    // each. Writing a few hundred bytes to a new connection
                    // does not block.
                    refuse(stream, "Too many connections; try again shortly").await;
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
                    .max_buf_size(MAX_HEAD_BYTES)
                    .max_header_size(MAX_HEAD_BYTES)
                    .max_headers(MAX_HEADERS)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(JsonErrors::new(stream)), svc);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_room_for_the_work() {
        // systemd's LimitNOFILE=65536: the configured 1024 fits.
        assert_eq!(connection_cap(65536, 1024, 65), 1024);
        // 256 descriptors, 3 volumes: 256 - 64 - 24.
        assert_eq!(connection_cap(256, 1024, 3), 168);
        // Too small for the reserve: a quarter, at least one.
        assert_eq!(connection_cap(600, 1024, 65), 150);
        assert_eq!(connection_cap(2, 1024, 65), 1);
    }

    #[test]
    fn only_hypers_own_error_heads_are_replaced() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sun, 29 Nov 2026 05:31:30 GMT\r\n\r\n";
        assert_eq!(automatic_error(hyper_431), Some(431));
        assert_eq!(
            automatic_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"),
            Some(400)
        );
        // The router's answers carry a request id; successes are left alone.
        assert_eq!(
            automatic_error(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nX-Compute-Request-Id: req-1\r\ncontent-length: 2\r\n\r\n{}"),
            None
        );
        assert_eq!(automatic_error(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(automatic_error(b"{\"snapshots\": []}"), None);
        // An incomplete head is not touched.
        assert_eq!(automatic_error(b"HTTP/1.1 400 Bad Request\r\n"), None);
        let r = String::from_utf8(error_response(431, "too large")).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{r}"
        );
        assert!(
            r.ends_with(r#"{"computeFault":{"code":431,"message":"too large"}}"#),
            "{r}"
        );
    }
}
