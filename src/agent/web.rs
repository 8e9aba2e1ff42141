//! TLS and basic auth of the metrics endpoint, configured like Prometheus
//! exporters' web configuration (`tls_server_config`, `basic_auth_users`).
//! bcrypt runs on its own thread, so wrong passwords cannot stall scrapes;
//! a password that verified is remembered, so scrapes cost no bcrypt.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::config::{ClientAuth, Tls};
use crate::error::{Context, Error, Result};

/// Passwords waiting for bcrypt at most; more get 429.
const VERIFY_QUEUE: usize = 16;
/// Verified for unknown users too, so a reply's time does not tell them apart.
const DUMMY_HASH: &str = "$2b$10$CwTycUXWue0Thq9StjUM0uJ8.GSNWT1e/v1bLnU4Jq9Wub6iRlYBS";

fn pem_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{}: not a PEM {what}: {e}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = crate::host::trust::read_trusted_bytes(path).map_err(Error::Usage)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificate", e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "certificate", "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The rustls configuration for `tls` (files checked like every trusted file).
pub fn server_config(tls: &Tls) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&tls.cert_file)?;
    let key_bytes = crate::host::trust::read_trusted_bytes(&tls.key_file).map_err(Error::Usage)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| pem_error(&tls.key_file, "private key", e))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Usage(format!("tls_server_config: {e}")))?;
    let builder = match (&tls.client_ca_file, tls.client_auth) {
        (
            Some(ca),
            ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert,
        ) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| pem_error(ca, "CA certificate", e))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if tls.client_auth == ClientAuth::VerifyClientCertIfGiven {
                v.allow_unauthenticated()
            } else {
                v
            };
            let v = v
                .build()
                .map_err(|e| Error::Usage(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(v)
        }
        _ => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        Error::Usage(format!(
            "{} and {}: {e}",
            tls.cert_file.display(),
            tls.key_file.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// What an Authorization header amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Sent to the bcrypt thread; the answer comes from [`Auth::answers`].
    Pending,
    /// The bcrypt queue is full.
    Busy,
}

/// Basic auth against bcrypt hashes.
pub struct Auth {
    /// Each user's last password that verified.
    verified: HashMap<String, String>,
    jobs: SyncSender<(usize, String, String)>,
    done: Receiver<(usize, String, String, bool)>,
}

/// `user:password` of a `Basic` Authorization header.
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, b64) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Auth {
    /// Starts the bcrypt thread; `wake` is called when an answer is ready.
    pub fn start(
        users: BTreeMap<String, String>,
        wake: impl Fn() + Send + 'static,
    ) -> Result<Self> {
        let (jobs, queue) = mpsc::sync_channel::<(usize, String, String)>(VERIFY_QUEUE);
        let (answer, done) = mpsc::channel();
        thread::Builder::new()
            .name("metrics-auth".into())
            .spawn(move || {
                // Password checks need no privilege.
                if crate::host::caps::keep_only(&[]).is_err() {
                    return;
                }
                for (token, user, pass) in queue {
                    let hash = users.get(&user).map_or(DUMMY_HASH, String::as_str);
                    let ok =
                        bcrypt::verify(&pass, hash).unwrap_or(false) && users.contains_key(&user);
                    if answer.send((token, user, pass, ok)).is_err() {
                        return;
                    }
                    wake();
                }
            })
            .ctx("starting the metrics auth thread")?;
        Ok(Self {
            verified: HashMap::new(),
            jobs,
            done,
        })
    }

    /// Checks a request's Authorization header for connection `token`.
    pub fn check(&mut self, token: usize, header: &str) -> Verdict {
        let Some((user, pass)) = basic_credentials(header) else {
            return Verdict::Denied;
        };
        if self.verified.get(&user).is_some_and(|p| same(p, &pass)) {
            return Verdict::Allowed;
        }
        match self.jobs.try_send((token, user, pass)) {
            Ok(()) => Verdict::Pending,
            Err(TrySendError::Full(_)) => Verdict::Busy,
            Err(TrySendError::Disconnected(_)) => Verdict::Denied,
        }
    }

    /// Answers of the bcrypt thread: (connection token, allowed).
    pub fn answers(&mut self) -> Vec<(usize, bool)> {
        let mut out = Vec::new();
        loop {
            match self.done.try_recv() {
                Ok((token, user, pass, ok)) => {
                    if ok {
                        self.verified.insert(user, pass);
                    }
                    out.push((token, ok));
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_decode_and_the_dummy_hash_is_a_bcrypt_hash() {
        // "prom:secret"
        assert_eq!(
            basic_credentials("Basic cHJvbTpzZWNyZXQ="),
            Some(("prom".into(), "secret".into()))
        );
        assert_eq!(basic_credentials("Bearer cHJvbTpzZWNyZXQ="), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
        assert!(DUMMY_HASH.parse::<bcrypt::HashParts>().is_ok());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
