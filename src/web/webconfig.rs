//! The agent's web configuration file in the format of Prometheus's
//! exporter-toolkit (what node_exporter's `--web.config.file` reads):
//! `tls_server_config` (certificate, key, client CA and client
//! authentication policy, TLS versions), `http_server_config.headers` and
//! `basic_auth_users` (user → bcrypt hash).
//!
//! [`WebConfigSource`] keeps the file loaded and re-reads it when it, or a
//! certificate, key or CA file it names, changes (checked at most once a
//! second, on a new connection or request); a bad new version is logged and
//! the last good one stays in force. TLS is switched on or off only at start.
//!
//! Options of the format that gpuops does not implement (cipher suites,
//! curves, client SAN matching, rate limits) are refused with an error
//! rather than ignored: a file must never look more secure than it is.
//! This module does no network I/O and never logs a password hash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderName, HeaderValue};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::Deserialize;
use sha2::Digest as _;

use crate::web::TlsSource;

/// How often the file is checked for changes, at most.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A loaded, validated web configuration.
pub struct WebConfig {
    /// `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// User → bcrypt hash; empty means no authentication.
    pub users: BTreeMap<String, String>,
    /// Added to every response (`http_server_config.headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("headers", &self.headers)
            .finish()
    }
}

/// A problem in the web configuration file, naming the file and the key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {key}: {message}", file.display())]
pub struct WebConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

/// The web configuration file, kept current.
pub struct WebConfigSource {
    path: PathBuf,
    state: Mutex<SourceState>,
}

struct SourceState {
    checked: Instant,
    fingerprint: Fingerprint,
    current: Arc<WebConfig>,
    /// The last error logged (logged again only when it changes).
    last_error: Option<String>,
}

impl WebConfigSource {
    /// Loads `path`; an error here is fatal for the caller (bad file at start).
    pub fn open(path: &Path) -> Result<Arc<WebConfigSource>, WebConfigError> {
        let (config, fingerprint) = load(path)?;
        Ok(Arc::new(WebConfigSource {
            path: path.to_path_buf(),
            state: Mutex::new(SourceState {
                checked: Instant::now(),
                fingerprint,
                current: Arc::new(config),
                last_error: None,
            }),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration in force, re-read first if the file (or a file it
    /// names) changed and the last check is over [`RELOAD_CHECK`] old.
    pub fn current(&self) -> Arc<WebConfig> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.checked.elapsed() < RELOAD_CHECK {
            return s.current.clone();
        }
        s.checked = Instant::now();
        let text = read_text(&self.path).unwrap_or_default();
        if fingerprint(&self.path, &text) == s.fingerprint {
            return s.current.clone();
        }
        match load(&self.path) {
            Ok((config, fp)) if config.tls.is_some() != s.current.tls.is_some() => {
                let msg = "TLS cannot be switched on or off while running (restart the agent); keeping the previous web configuration".to_string();
                if s.last_error.as_deref() != Some(&msg) {
                    tracing::error!(file = %self.path.display(), "{msg}");
                    s.last_error = Some(msg);
                }
                // Do not look at this version again until it changes.
                s.fingerprint = fp;
            }
            Ok((config, fp)) => {
                tracing::info!(
                    file = %self.path.display(),
                    tls = config.tls.is_some(),
                    users = config.users.len(),
                    "web configuration reloaded"
                );
                s.current = Arc::new(config);
                s.fingerprint = fp;
                s.last_error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                if s.last_error.as_deref() != Some(&msg) {
                    tracing::error!(error = %msg, "bad web configuration, keeping the previous one");
                    s.last_error = Some(msg);
                }
            }
        }
        s.current.clone()
    }

    /// For the server: the TLS configuration of each new connection, or
    /// `None` when the file started without TLS.
    pub fn tls_source(self: &Arc<Self>) -> Option<TlsSource> {
        let first = self.current().tls.clone()?;
        let me = self.clone();
        Some(Arc::new(move || {
            me.current().tls.clone().unwrap_or_else(|| first.clone())
        }))
    }
}

/// What the reload check compares: the file's text and the size, time and
/// inode of every file it names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    text: [u8; 32],
    files: Vec<(PathBuf, Option<FileStamp>)>,
}

/// Modification time, size and inode of a file.
type FileStamp = (SystemTime, u64, u64);

fn fingerprint(path: &Path, text: &str) -> Fingerprint {
    let named = serde_norway::from_str::<RawFile>(text)
        .ok()
        .and_then(|f| f.tls_server_config)
        .map(|t| {
            [t.cert_file, t.key_file, t.client_ca_file]
                .into_iter()
                .flatten()
                .map(|f| resolve(path, &f))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Fingerprint {
        text: sha2::Sha256::digest(text.as_bytes()).into(),
        files: named
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt as _;
                    (
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        m.len(),
                        m.ino(),
                    )
                });
                (p, meta)
            })
            .collect(),
    }
}

fn read_text(path: &Path) -> Result<String, WebConfigError> {
    std::fs::read_to_string(path).map_err(|e| WebConfigError {
        file: path.to_path_buf(),
        key: "(file)".into(),
        message: format!("cannot read: {e}"),
    })
}

/// Relative names in the file are relative to the file's directory.
fn resolve(config: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads and validates the file at `path`.
fn load(path: &Path) -> Result<(WebConfig, Fingerprint), WebConfigError> {
    let text = read_text(path)?;
    let fp = fingerprint(path, &text);
    let config = parse(path, &text)?;
    Ok((config, fp))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    rate_limit: Option<serde_norway::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
    client_auth_type: Option<String>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers exporter-toolkit allows in `http_server_config.headers`.
const ALLOWED_HEADERS: &[&str] = &[
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
];

/// Validates the text of a web configuration file (`path` names it in errors
/// and anchors relative file names).
pub fn parse(path: &Path, text: &str) -> Result<WebConfig, WebConfigError> {
    let err = |key: &str, message: String| WebConfigError {
        file: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let raw: RawFile = if text.trim().is_empty() {
        RawFile::default()
    } else {
        serde_norway::from_str(text).map_err(|e| {
            let key = e
                .to_string()
                .split(':')
                .next()
                .filter(|k| !k.contains(' '))
                .unwrap_or("(document)")
                .to_string();
            err(&key, e.to_string())
        })?
    };
    if raw.rate_limit.is_some() {
        return Err(err("rate_limit", "not supported by gpuops".into()));
    }

    let mut users = BTreeMap::new();
    for (user, hash) in raw.basic_auth_users.unwrap_or_default() {
        let key = format!("basic_auth_users.{user}");
        if user.is_empty() || user.contains(':') {
            return Err(err(
                &key,
                "a user name must be non-empty and without ':'".into(),
            ));
        }
        if hash.parse::<bcrypt::HashParts>().is_err() {
            return Err(err(
                &key,
                "not a bcrypt hash (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')".into(),
            ));
        }
        users.insert(user, hash);
    }

    let mut headers = Vec::new();
    if let Some(http) = raw.http_server_config {
        let _ = http.http2; // HTTP/1.1 is served either way.
        for (name, value) in http.headers.unwrap_or_default() {
            let key = format!("http_server_config.headers.{name}");
            let Some(allowed) = ALLOWED_HEADERS
                .iter()
                .find(|h| h.eq_ignore_ascii_case(&name))
            else {
                return Err(err(
                    &key,
                    format!("not one of {}", ALLOWED_HEADERS.join(", ")),
                ));
            };
            let ok = match *allowed {
                "X-Frame-Options" => {
                    ["deny", "sameorigin"].contains(&value.to_ascii_lowercase().as_str())
                }
                "X-Content-Type-Options" => value.eq_ignore_ascii_case("nosniff"),
                _ => true,
            };
            let parsed = HeaderValue::from_str(&value).ok().filter(|_| ok);
            match parsed {
                Some(v) if !value.is_empty() => {
                    headers.push((HeaderName::from_static(lower(allowed)), v))
                }
                Some(_) => {}
                None => return Err(err(&key, format!("invalid value {value:?}"))),
            }
        }
    }

    let tls = match raw.tls_server_config {
        None => None,
        Some(t) => tls_config(path, t, &err)?,
    };
    Ok(WebConfig {
        tls,
        users,
        headers,
    })
}

fn lower(name: &'static str) -> &'static str {
    match name {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}

/// The client certificate policies, by their Go names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

fn tls_config(
    path: &Path,
    t: RawTls,
    err: &dyn Fn(&str, String) -> WebConfigError,
) -> Result<Option<Arc<rustls::ServerConfig>>, WebConfigError> {
    const P: &str = "tls_server_config";
    for (key, unsupported) in [
        ("client_allowed_sans", t.client_allowed_sans.is_some()),
        (
            "cipher_suites",
            t.cipher_suites.as_ref().is_some_and(|c| !c.is_empty()),
        ),
        (
            "curve_preferences",
            t.curve_preferences.as_ref().is_some_and(|c| !c.is_empty()),
        ),
    ] {
        if unsupported {
            return Err(err(
                &format!("{P}.{key}"),
                "not supported by gpuops (rustls chooses safe suites and curves)".into(),
            ));
        }
    }
    let _ = t.prefer_server_cipher_suites; // Go ignores it too since 1.18.

    let pem = |inline: Option<String>,
               file: Option<String>,
               inline_key: &str,
               file_key: &str|
     -> Result<Option<(Vec<u8>, String)>, WebConfigError> {
        match (inline, file) {
            (Some(_), Some(_)) => Err(err(
                &format!("{P}.{file_key}"),
                format!("give {inline_key} or {file_key}, not both"),
            )),
            (Some(text), None) => Ok(Some((text.into_bytes(), format!("{P}.{inline_key}")))),
            (None, Some(f)) if f.is_empty() => Ok(None),
            (None, Some(f)) => {
                let p = resolve(path, &f);
                std::fs::read(&p)
                    .map(|b| Some((b, format!("{P}.{file_key}"))))
                    .map_err(|e| {
                        err(
                            &format!("{P}.{file_key}"),
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })
            }
            (None, None) => Ok(None),
        }
    };
    let auth = match t.client_auth_type.as_deref().unwrap_or("NoClientCert") {
        "" | "NoClientCert" => ClientAuth::NoClientCert,
        "RequestClientCert" => ClientAuth::RequestClientCert,
        "RequireAnyClientCert" => ClientAuth::RequireAnyClientCert,
        "VerifyClientCertIfGiven" => ClientAuth::VerifyClientCertIfGiven,
        "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerifyClientCert,
        other => return Err(err(
            &format!("{P}.client_auth_type"),
            format!("must be NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert, got {other:?}"),
        )),
    };

    let cert = pem(t.cert, t.cert_file, "cert", "cert_file")?;
    let key = pem(t.key, t.key_file, "key", "key_file")?;
    let ca = pem(t.client_ca, t.client_ca_file, "client_ca", "client_ca_file")?;

    let (cert, key) = match (cert, key) {
        (None, None) => {
            if ca.is_some() || auth != ClientAuth::NoClientCert {
                return Err(err(
                    &format!("{P}.cert_file"),
                    "client certificates need TLS: set cert_file and key_file".into(),
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(err(
                &format!("{P}.key_file"),
                "missing (cert_file is set)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                &format!("{P}.cert_file"),
                "missing (key_file is set)".into(),
            ))
        }
        (Some(c), Some(k)) => (c, k),
    };

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.0)
        .collect::<Result<_, _>>()
        .map_err(|e| err(&cert.1, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(err(&cert.1, "no certificate in it".into()));
    }
    let private = PrivateKeyDer::from_pem_slice(&key.0)
        .map_err(|e| err(&key.1, format!("no PEM private key in it: {e}")))?;

    let version = |key: &str, v: Option<String>, default: u8| -> Result<u8, WebConfigError> {
        match v.as_deref() {
            None | Some("") => Ok(default),
            Some("TLS12") => Ok(12),
            Some("TLS13") => Ok(13),
            Some(v @ ("TLS10" | "TLS11")) => Err(err(
                &format!("{P}.{key}"),
                format!("{v} is not supported (TLS12 or TLS13)"),
            )),
            Some(v) => Err(err(
                &format!("{P}.{key}"),
                format!("must be TLS12 or TLS13, got {v:?}"),
            )),
        }
    };
    let min = version("min_version", t.min_version, 12)?;
    let max = version("max_version", t.max_version, 13)?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect();
    if versions.is_empty() {
        return Err(err(
            &format!("{P}.max_version"),
            "is below min_version".into(),
        ));
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &ca {
        None => None,
        Some((bytes, key)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(bytes) {
                let c = c.map_err(|e| err(key, format!("not PEM certificates: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| err(key, format!("not a usable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(err(key, "no certificate in it".into()));
            }
            Some((Arc::new(roots), key.clone()))
        }
    };
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match auth {
        ClientAuth::NoClientCert => {
            if roots.is_some() {
                return Err(err(
                    &format!("{P}.client_auth_type"),
                    "client_ca_file is set but client_auth_type is NoClientCert (use RequireAndVerifyClientCert)".into(),
                ));
            }
            None
        }
        ClientAuth::RequestClientCert | ClientAuth::RequireAnyClientCert => {
            Some(Arc::new(AnyClientCert {
                mandatory: auth == ClientAuth::RequireAnyClientCert,
                algorithms: provider.signature_verification_algorithms,
            }))
        }
        ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert => {
            let Some((roots, _)) = roots else {
                return Err(err(
                    &format!("{P}.client_ca_file"),
                    format!("needed by client_auth_type {auth:?}"),
                ));
            };
            let mut b = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            if auth == ClientAuth::VerifyClientCertIfGiven {
                b = b.allow_unauthenticated();
            }
            Some(b.build().map_err(|e| {
                err(
                    &format!("{P}.client_ca_file"),
                    format!("cannot build a verifier: {e}"),
                )
            })?)
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| err(&format!("{P}.min_version"), e.to_string()))?;
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(v) => builder.with_client_cert_verifier(v),
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|e| err(&key.1, format!("cannot be used with the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// `RequestClientCert` / `RequireAnyClientCert`: a certificate is asked for
/// (and required for the latter) but not checked against any CA; the
/// handshake signature is still verified, so the peer holds its key.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> String {
        match parse(Path::new("/etc/gpuops/web.yml"), text) {
            Ok(c) => format!("{c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn web_config_errors_name_the_file_and_key() {
        let hash = "$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze";
        for (text, expect) in [
            ("", "WebConfig { tls: false, users: [], headers: [] }".to_string()),
            (
                &format!("basic_auth_users:\n  alice: '{hash}'\n"),
                "WebConfig { tls: false, users: [\"alice\"], headers: [] }".into(),
            ),
            (
                "basic_auth_users:\n  alice: plain\n",
                "/etc/gpuops/web.yml: basic_auth_users.alice: not a bcrypt hash (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')".into(),
            ),
            (
                "tls_server_config:\n  client_auth_type: Sometimes\n",
                "/etc/gpuops/web.yml: tls_server_config.client_auth_type: must be NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert, got \"Sometimes\"".into(),
            ),
            (
                "tls_server_config:\n  cert_file: /nonexistent/x.crt\n  key_file: /nonexistent/x.key\n",
                "/etc/gpuops/web.yml: tls_server_config.cert_file: cannot read /nonexistent/x.crt: No such file or directory (os error 2)".into(),
            ),
            (
                "tls_server_config:\n  cert_file: x.crt\n",
                "/etc/gpuops/web.yml: tls_server_config.cert_file: cannot read /etc/gpuops/x.crt: No such file or directory (os error 2)".into(),
            ),
            (
                "tls_server_config:\n  client_allowed_sans: [a]\n",
                "/etc/gpuops/web.yml: tls_server_config.client_allowed_sans: not supported by gpuops (rustls chooses safe suites and curves)".into(),
            ),
            (
                "rate_limit:\n  interval: 1s\n",
                "/etc/gpuops/web.yml: rate_limit: not supported by gpuops".into(),
            ),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
                "WebConfig { tls: false, users: [], headers: [(\"x-frame-options\", \"deny\")] }".into(),
            ),
            (
                "http_server_config:\n  headers:\n    X-Powered-By: me\n",
                "/etc/gpuops/web.yml: http_server_config.headers.X-Powered-By: not one of Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, X-XSS-Protection, Strict-Transport-Security".into(),
            ),
        ] {
            assert_eq!(check(text), expect, "for {text:?}");
        }
        let unknown = check("tls_server_config:\n  certfile: a\n");
        assert!(
            unknown.starts_with("/etc/gpuops/web.yml: tls_server_config")
                && unknown.contains("certfile"),
            "{unknown}"
        );
    }
}
