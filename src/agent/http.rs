//! The metrics endpoint: a small HTTP/1.1 server on its own thread (one
//! request per connection; Prometheus reconnects per scrape at most), so a
//! slow scraper never stalls event reading.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::metrics::{to_prometheus_text, Metrics};
use crate::error::{Context, Result};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A request head larger than this is not a scrape.
const MAX_HEAD: u64 = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server shares with the agent loop.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Set once tracing is attached and the policy applied: /healthz says 200.
    pub ready: AtomicBool,
}

/// Binds `addr` now (so a busy port is a startup error) and serves on a thread.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).ctx(format!("listening on {addr} for metrics"))?;
    let local = listener.local_addr().ctx("reading the metrics address")?;
    thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // Best effort per request: a client that goes away is its problem.
                let _ = handle(stream, &shared);
            }
        })
        .ctx("starting the metrics thread")?;
    Ok(local)
}

/// The parts of a request the server looks at.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    accept: String,
}

fn read_request(stream: &TcpStream) -> io::Result<Request> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let mut req = Request {
        method: parts.next().unwrap_or_default().to_owned(),
        path: parts.next().unwrap_or_default().to_owned(),
        accept: String::new(),
    };
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("accept") {
                req.accept = value.trim().to_owned();
            }
        }
    }
    Ok(req)
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

/// (status, content type, body) for a request.
fn respond(req: &Request, shared: &Shared) -> (&'static str, &'static str, String) {
    let path = req.path.split('?').next().unwrap_or_default();
    if req.method != "GET" && req.method != "HEAD" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path {
        "/metrics" => {
            let om = shared.metrics.openmetrics();
            if wants_openmetrics(&req.accept) {
                ("200 OK", OPENMETRICS, om)
            } else {
                ("200 OK", PROMETHEUS_TEXT, to_prometheus_text(&om))
            }
        }
        "/healthz" if shared.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ok\n".into())
        }
        "/healthz" => ("503 Service Unavailable", "text/plain", "starting\n".into()),
        _ => (
            "404 Not Found",
            "text/plain",
            "socklens agent: /metrics, /healthz\n".into(),
        ),
    }
}

fn handle(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let req = read_request(&stream)?;
    let (status, ctype, body) = respond(&req, shared);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
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
        let get = |path: &str| Request {
            method: "GET".into(),
            path: path.into(),
            accept: String::new(),
        };
        assert!(respond(&get("/healthz"), &shared).0.starts_with("503"));
        shared.ready.store(true, Ordering::Relaxed);
        assert!(respond(&get("/healthz"), &shared).0.starts_with("200"));
        assert!(respond(&get("/nope"), &shared).0.starts_with("404"));
        let (_, ctype, body) = respond(&get("/metrics"), &shared);
        assert_eq!(ctype, PROMETHEUS_TEXT);
        assert!(
            body.contains("socklens_config_last_reload_success 1"),
            "{body}"
        );
    }
}
