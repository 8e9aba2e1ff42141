//! The metrics endpoint: one thread running a readiness loop (mio) over
//! every open connection, so a client that sends nothing or trickles bytes
//! holds one slot and never the thread. Connections are capped (the oldest
//! goes first) and each has one deadline for its whole life, so memory and
//! threads stay bounded whatever clients do. One request per connection.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::config::Web;
use super::metrics::{to_prometheus_text, Metrics};
use super::web::{self, Auth, Verdict};
use crate::error::{Context, Result};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A request head larger than this is not a scrape (431).
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers a request may carry; more is not a scrape (431).
const MAX_HEADERS: usize = 32;
/// Open connections at most; a new one closes the oldest. A scrape lives
/// milliseconds, so the oldest is a client that is not scraping.
const MAX_CONNS: usize = 256;
/// From accept to close, whatever the client does: well over a scrape's
/// few milliseconds, under Prometheus' default 10 s scrape timeout.
const DEADLINE: Duration = Duration::from_secs(5);
/// A rendered body is reused for this long: a burst of scrapes costs one
/// rendering, and bodies held by slow readers are shared.
const BODY_REUSE: Duration = Duration::from_millis(100);
const LISTENER: Token = Token(usize::MAX);
/// The bcrypt thread has answers.
const WAKER: Token = Token(usize::MAX - 1);

/// What the server shares with the agent loop.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Set once tracing is attached and the policy applied: /healthz says 200.
    pub ready: AtomicBool,
}

/// Binds `addr` now (so a busy port, or TLS files that cannot be used, are
/// startup errors) and serves on a thread.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>, config: &Web) -> Result<SocketAddr> {
    let tls = config.tls.as_ref().map(web::server_config).transpose()?;
    // mio's bind: a 1024-deep accept queue (std's is 128), so a burst of
    // connections does not drop a scrape's SYN into a 1 s retry.
    let listener = TcpListener::bind(addr).ctx(format!("listening on {addr} for metrics"))?;
    let local = listener.local_addr().ctx("reading the metrics address")?;
    let poll = Poll::new().ctx("creating the metrics poller")?;
    let auth = if config.users.is_empty() {
        None
    } else {
        let waker = mio::Waker::new(poll.registry(), WAKER).ctx("creating the metrics waker")?;
        Some(Auth::start(config.users.clone(), move || {
            let _ = waker.wake();
        })?)
    };
    let mut server = Server {
        listener,
        poll,
        conns: BTreeMap::new(),
        next: 0,
        shared,
        bodies: Bodies::default(),
        tls,
        auth,
    };
    server
        .poll
        .registry()
        .register(&mut server.listener, LISTENER, Interest::READABLE)
        .ctx("registering the metrics listener")?;
    thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            // This thread only talks to the network: it keeps no capability.
            if let Err(e) = crate::host::caps::keep_only(&[]) {
                eprintln!("socklens: metrics endpoint not started: {e}");
                return;
            }
            server.run();
        })
        .ctx("starting the metrics thread")?;
    Ok(local)
}

/// The parts of a request the server looks at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub accept: String,
    pub authorization: String,
}

/// What a request head read so far amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes needed.
    Partial,
    Done(Request),
    /// Refused with this status line.
    Bad(&'static str),
}

const BAD_REQUEST: &str = "400 Bad Request";
const TOO_LARGE: &str = "431 Request Header Fields Too Large";

/// Parses the bytes a client sent so far. A scrape is one GET or HEAD with
/// no body: a body, or a second request behind the first, is refused.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Parsed::Bad(TOO_LARGE),
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Bad(TOO_LARGE),
        Err(_) => return Parsed::Bad(BAD_REQUEST),
    };
    if head_len > MAX_HEAD {
        return Parsed::Bad(TOO_LARGE);
    }
    if buf.len() > head_len {
        return Parsed::Bad(BAD_REQUEST);
    }
    let (mut accept, mut authorization) = (String::new(), String::new());
    for h in req.headers.iter() {
        let body = (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
            || h.name.eq_ignore_ascii_case("transfer-encoding");
        if body {
            return Parsed::Bad(BAD_REQUEST);
        }
        if h.name.eq_ignore_ascii_case("accept") {
            accept = String::from_utf8_lossy(h.value).trim().to_owned();
        }
        if h.name.eq_ignore_ascii_case("authorization") {
            authorization = String::from_utf8_lossy(h.value).into_owned();
        }
    }
    Parsed::Done(Request {
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        accept,
        authorization,
    })
}

/// Whether the client asked for OpenMetrics (Prometheus does by default).
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|r| {
        let mut params = r.split(';').map(str::trim);
        let media = params.next().unwrap_or_default();
        let q_zero = params.any(|p| p.replace(' ', "") == "q=0");
        media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
    })
}

/// The last rendering of each format, reused for [`BODY_REUSE`].
#[derive(Default)]
struct Bodies {
    om: Option<(Instant, Arc<[u8]>)>,
    text: Option<(Instant, Arc<[u8]>)>,
}

impl Bodies {
    fn get(&mut self, metrics: &Metrics, openmetrics: bool) -> Arc<[u8]> {
        let now = Instant::now();
        let slot = if openmetrics {
            &mut self.om
        } else {
            &mut self.text
        };
        if let Some((at, body)) = slot {
            if now.duration_since(*at) < BODY_REUSE {
                return Arc::clone(body);
            }
        }
        let om = metrics.openmetrics();
        let body: Arc<[u8]> = if openmetrics {
            om.into_bytes().into()
        } else {
            to_prometheus_text(&om).into_bytes().into()
        };
        *slot = Some((now, Arc::clone(&body)));
        body
    }
}

/// (status, content type, body) for a request.
fn respond(req: &Request, shared: &Shared, bodies: &mut Bodies) -> Response {
    let path = req.path.split('?').next().unwrap_or_default();
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text("405 Method Not Allowed", "GET only\n");
    }
    match path {
        "/metrics" => {
            let om = wants_openmetrics(&req.accept);
            Response {
                status: "200 OK",
                ctype: if om { OPENMETRICS } else { PROMETHEUS_TEXT },
                extra: "",
                body: bodies.get(&shared.metrics, om),
            }
        }
        "/healthz" if shared.ready.load(Ordering::Relaxed) => Response::text("200 OK", "ok\n"),
        "/healthz" => Response::text("503 Service Unavailable", "starting\n"),
        _ => Response::text("404 Not Found", "socklens agent: /metrics, /healthz\n"),
    }
}

struct Response {
    status: &'static str,
    ctype: &'static str,
    /// More header lines, each ending in CRLF.
    extra: &'static str,
    body: Arc<[u8]>,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Self {
            status,
            ctype: "text/plain",
            extra: "",
            body: Arc::from(body.as_bytes()),
        }
    }

    fn unauthorized() -> Self {
        Self {
            extra: "WWW-Authenticate: Basic realm=\"socklens\"\r\n",
            ..Self::text("401 Unauthorized", "unauthorized\n")
        }
    }

    fn head(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.ctype,
            self.body.len(),
            self.extra
        )
        .into_bytes()
    }
}

/// Where a connection is in its one exchange.
enum Phase {
    /// Reading the request head into `buf`.
    Reading,
    /// Waiting for the bcrypt thread's verdict on its password.
    Verifying(Request),
    /// Writing `head` then `body` from `sent`.
    Writing {
        head: Vec<u8>,
        body: Arc<[u8]>,
        sent: usize,
    },
    /// Response sent and our side shut: reading until the client closes,
    /// so unread bytes do not turn the close into a reset that loses it.
    Draining,
}

struct Conn {
    stream: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    deadline: Instant,
    buf: Vec<u8>,
    phase: Phase,
}

/// What a read from the client brought.
enum Input {
    More,
    /// Nothing to read now.
    Blocked,
    Eof,
}

impl Conn {
    /// Reads what the client sent (decrypted) into `buf`, keeping at most
    /// `limit` bytes of it.
    fn fill(&mut self, limit: usize) -> io::Result<Input> {
        let mut chunk = [0u8; 2048];
        let Some(tls) = &mut self.tls else {
            return match self.stream.read(&mut chunk) {
                Ok(0) => Ok(Input::Eof),
                Ok(n) => {
                    keep(&mut self.buf, &chunk[..n], limit);
                    Ok(Input::More)
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Input::Blocked),
                Err(e) if e.kind() == ErrorKind::Interrupted => Ok(Input::More),
                Err(e) => Err(e),
            };
        };
        let eof = match tls.read_tls(&mut self.stream) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Input::Blocked),
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(Input::More),
            Err(e) => return Err(e),
        };
        if let Err(e) = tls.process_new_packets() {
            // The alert goes out best effort; the connection ends either way.
            let _ = tls.write_tls(&mut self.stream);
            return Err(io::Error::other(e));
        }
        loop {
            match tls.reader().read(&mut chunk) {
                Ok(0) => return Ok(Input::Eof),
                Ok(n) => keep(&mut self.buf, &chunk[..n], limit),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(if eof { Input::Eof } else { Input::More })
    }

    /// Writes as much of `data` as the socket takes now: bytes consumed.
    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return match self.stream.write(data) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
                Err(e) => Err(e),
            };
        };
        let n = tls.writer().write(data)?;
        self.flush()?;
        Ok(n)
    }

    /// Pushes pending TLS records out: Ok(true) when none are left.
    fn flush(&mut self) -> io::Result<bool> {
        let Some(tls) = &mut self.tls else {
            return Ok(true);
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Appends `data` to `buf` up to one byte past `limit` (enough to say 431).
fn keep(buf: &mut Vec<u8>, data: &[u8], limit: usize) {
    let room = (limit + 1).saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

struct Server {
    listener: TcpListener,
    poll: Poll,
    /// By token; tokens grow with accept order, so the first is the oldest.
    conns: BTreeMap<usize, Conn>,
    next: usize,
    shared: Arc<Shared>,
    bodies: Bodies,
    tls: Option<Arc<rustls::ServerConfig>>,
    auth: Option<Auth>,
}

impl Server {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .conns
                .values()
                .next()
                .map(|c| c.deadline.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    eprintln!("socklens: metrics endpoint stopped: {e}");
                    return;
                }
            }
            for ev in &events {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => self.verdicts(),
                    Token(t) => self.step(t),
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of descriptors: free the oldest slot and try again;
                // with none to free, the next connection retries.
                Err(_) if self.conns.is_empty() => return,
                Err(_) => {
                    self.close_oldest();
                    continue;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                self.close_oldest();
            }
            let tls = match &self.tls {
                None => None,
                Some(cfg) => match rustls::ServerConnection::new(Arc::clone(cfg)) {
                    Ok(c) => Some(Box::new(c)),
                    Err(_) => continue,
                },
            };
            let token = self.next;
            self.next = (self.next + 1) % (usize::MAX - 2);
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(token),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            let conn = Conn {
                stream,
                tls,
                deadline: Instant::now() + DEADLINE,
                buf: Vec::new(),
                phase: Phase::Reading,
            };
            self.conns.insert(token, conn);
        }
    }

    fn close_oldest(&mut self) {
        if let Some((_, c)) = self.conns.pop_first() {
            self.close(c);
        }
    }

    fn close(&self, mut c: Conn) {
        let _ = self.poll.registry().deregister(&mut c.stream);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        for t in expired {
            if let Some(c) = self.conns.remove(&t) {
                self.close(c);
            }
        }
    }

    /// Answers the connections whose password the bcrypt thread checked.
    fn verdicts(&mut self) {
        let answers = self.auth.as_mut().map(Auth::answers).unwrap_or_default();
        for (token, allowed) in answers {
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            let Phase::Verifying(req) = std::mem::replace(&mut c.phase, Phase::Draining) else {
                continue;
            };
            let resp = if allowed {
                respond(&req, &self.shared, &mut self.bodies)
            } else {
                Response::unauthorized()
            };
            c.phase = writing(resp, req.method == "HEAD");
            self.step(token);
        }
    }

    /// Advances one connection as far as its socket allows.
    fn step(&mut self, token: usize) {
        let Some(mut c) = self.conns.remove(&token) else {
            return;
        };
        match self.advance(token, &mut c) {
            Ok(true) => self.close(c),
            Ok(false) => {
                self.conns.insert(token, c);
            }
            Err(_) => self.close(c),
        }
    }

    /// Ok(true) when the exchange is over.
    fn advance(&mut self, token: usize, c: &mut Conn) -> io::Result<bool> {
        if let Phase::Reading = c.phase {
            loop {
                match c.fill(MAX_HEAD)? {
                    Input::Eof => return Ok(true),
                    Input::Blocked => break,
                    Input::More if c.buf.len() > MAX_HEAD => break,
                    Input::More => {}
                }
            }
            // A TLS handshake answers before any request arrives.
            if !c.flush()? {
                return Ok(false);
            }
            c.phase = match parse(&c.buf) {
                Parsed::Partial => return Ok(false),
                Parsed::Done(req) => self.answer(token, req),
                Parsed::Bad(status) => {
                    writing(Response::text(status, "not a scrape request\n"), false)
                }
            };
            c.buf = Vec::new();
        }
        if let Phase::Verifying(_) = c.phase {
            return Ok(false);
        }
        if let Phase::Writing { head, body, sent } = &mut c.phase {
            let (head, body) = (std::mem::take(head), Arc::clone(body));
            let mut done = *sent;
            let total = head.len() + body.len();
            while done < total {
                let rest = if done < head.len() {
                    &head[done..]
                } else {
                    &body[done - head.len()..]
                };
                match c.send(rest)? {
                    0 => {
                        c.phase = Phase::Writing {
                            head,
                            body,
                            sent: done,
                        };
                        return Ok(false);
                    }
                    n => done += n,
                }
            }
            if let Some(tls) = &mut c.tls {
                tls.send_close_notify();
            }
            c.phase = Phase::Draining;
        }
        if !c.flush()? {
            return Ok(false);
        }
        let _ = c.stream.shutdown(Shutdown::Write);
        let mut sink = [0u8; 2048];
        loop {
            match c.stream.read(&mut sink) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The phase after a well-formed request: its answer, or a wait for bcrypt.
    fn answer(&mut self, token: usize, req: Request) -> Phase {
        let head_only = req.method == "HEAD";
        let Some(auth) = &mut self.auth else {
            return writing(respond(&req, &self.shared, &mut self.bodies), head_only);
        };
        match auth.check(token, &req.authorization) {
            Verdict::Allowed => writing(respond(&req, &self.shared, &mut self.bodies), head_only),
            Verdict::Denied => writing(Response::unauthorized(), head_only),
            Verdict::Busy => writing(
                Response::text("429 Too Many Requests", "too many logins at once\n"),
                head_only,
            ),
            Verdict::Pending => Phase::Verifying(req),
        }
    }
}

fn writing(resp: Response, head_only: bool) -> Phase {
    Phase::Writing {
        head: resp.head(),
        body: if head_only {
            Arc::from(&[][..])
        } else {
            resp.body
        },
        sent: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_accept_header_gets_openmetrics_and_others_the_text_format() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(prom));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn healthz_follows_readiness_and_unknown_paths_are_404() {
        let shared = Shared {
            metrics: Arc::new(Metrics::new()),
            ready: AtomicBool::new(false),
        };
        let mut bodies = Bodies::default();
        let get = |path: &str| Request {
            method: "GET".into(),
            path: path.into(),
            accept: String::new(),
            authorization: String::new(),
        };
        let mut status = |path: &str| respond(&get(path), &shared, &mut bodies).status;
        assert!(status("/healthz").starts_with("503"));
        shared.ready.store(true, Ordering::Relaxed);
        assert!(status("/healthz").starts_with("200"));
        assert!(status("/nope").starts_with("404"));
        let resp = respond(&get("/metrics"), &shared, &mut bodies);
        assert_eq!(resp.ctype, PROMETHEUS_TEXT);
        let body = String::from_utf8_lossy(&resp.body);
        assert!(
            body.contains("socklens_config_last_reload_success 1"),
            "{body}"
        );
    }

    #[test]
    fn a_scrape_parses_and_bodies_pipelines_and_oversized_heads_are_refused() {
        let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n";
        let Parsed::Done(req) = parse(scrape) else {
            panic!("a scrape must parse");
        };
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("GET", "/metrics")
        );
        assert_eq!(req.accept, "text/plain");
        assert_eq!(parse(&scrape[..20]), Parsed::Partial);
        let twice = [&scrape[..], &scrape[..]].concat();
        assert_eq!(parse(&twice), Parsed::Bad(BAD_REQUEST));
        let body = b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(parse(body), Parsed::Bad(BAD_REQUEST));
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Parsed::Bad(BAD_REQUEST));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(long.as_bytes()), Parsed::Bad(TOO_LARGE));
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(many.as_bytes()), Parsed::Bad(TOO_LARGE));
    }
}
