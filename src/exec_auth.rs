//! Agent exec requests: the bot signs, the agent verifies.
//!
//! A request is a JSON body ([`SignedExec`]) that names the one agent it is
//! for (the agent's node name), the runbook, the step, the parameters, a
//! SHA-256 digest of the exact argv the agent will run, a timestamp, a nonce
//! and, for a step that needs approval, the approval (run, requester,
//! approver, time). The bot signs the raw body with its Ed25519 private key
//! ([`ExecSigner`]); agents hold only public keys ([`ExecVerifier`], several
//! at once for rotation), so a compromised agent can verify requests but
//! never sign one. An agent refuses a request for another node, one outside
//! the time window, one whose nonce it has seen, and (in
//! `runbook::agent_exec`) one whose argv digest differs from the argv it
//! renders from its own runbook file.
//!
//! Keys are PEM files in the formats OpenSSL writes (`openssl genpkey
//! -algorithm ed25519`): PKCS#8 for the private key, SPKI for the public key;
//! `gpuops keygen` writes both. This module reads key files but does no other
//! I/O, never logs, and never prints key material (`Debug` is redacted).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use axum::http::HeaderMap;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::signing::{Clock, SystemClock, WINDOW_SECS};

/// Hex Ed25519 signature over [`DOMAIN`] followed by the raw body.
pub const SIGNATURE_HEADER: &str = "x-gpuops-signature";
/// Which key signed (for logs; every configured key is tried).
pub const KEY_ID_HEADER: &str = "x-gpuops-key-id";
/// Prefixed to the body before signing, so a signature over an exec request
/// can never be taken for a signature over anything else.
pub const DOMAIN: &[u8] = b"gpuops-exec-v2\n";
/// The body's format version.
pub const VERSION: u8 = 2;
/// The DER of an Ed25519 `PrivateKeyInfo` (RFC 5208, RFC 8410) up to the
/// 32-byte seed: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 },
/// OCTET STRING { OCTET STRING (32 bytes) } }.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// Most nonces remembered; past this, requests are refused until old ones expire.
pub const NONCE_CACHE_MAX: usize = 100_000;
/// How far in the future (by the agent's clock) a request's timestamp may
/// be: clock skew between the bot and the agent. The restart guard (a request
/// signed before this agent started is refused) relies on it: a request
/// accepted before a restart carries a timestamp at most this far past the
/// moment it ran, so after a restart that took longer than this (systemd's
/// `RestartSec=5s` for an automatic restart) it is signed before the start.
pub const MAX_FUTURE_SKEW_SECS: i64 = 5;

/// The signed content of one exec request (the whole JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedExec {
    /// [`VERSION`].
    pub v: u8,
    /// The node name of the one agent this request is for.
    pub node: String,
    pub runbook: String,
    pub step: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// [`argv_digest`] of the argv the bot rendered; the agent renders its
    /// own from its runbook file and refuses on any difference.
    pub argv_sha256: String,
    /// Unix seconds when the bot signed.
    pub timestamp: i64,
    /// 32 random hex digits; an agent runs a nonce once.
    pub nonce: String,
    /// Present for a step that needs approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<SignedApproval>,
    /// What the signature allows: running the step (`exec`, also when
    /// absent, as bots before plans sign) or only planning it (`plan`).
    /// `/v1/exec` refuses a plan-signed request and `/v1/plan` an
    /// exec-signed one, so a captured plan request can never run anything.
    #[serde(default, skip_serializing_if = "Purpose::is_exec")]
    pub purpose: Purpose,
}

/// The one endpoint a signed request is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// `POST /v1/exec`: run the step.
    #[default]
    Exec,
    /// `POST /v1/plan`: say what the step would run, run nothing.
    Plan,
}

impl Purpose {
    pub fn is_exec(&self) -> bool {
        *self == Purpose::Exec
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Exec => "exec",
            Purpose::Plan => "plan",
        }
    }
}

/// Who approved a `needs_approval` step, carried inside the signed content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedApproval {
    /// The chat run id (`r…`).
    pub run: String,
    /// The step approved: the request's own step (an approval covering an
    /// approval group is signed anew for each step it covers).
    pub step: String,
    pub requested_by: String,
    pub approved_by: String,
    /// Unix seconds of the approval.
    pub approved_at: i64,
}

/// How long before the request an approval may have been given (a run's
/// later steps of the same approval group ride on it).
pub const APPROVAL_WINDOW_SECS: i64 = 3600;
/// How far after the request's timestamp an approval may be dated (clocks).
pub const APPROVAL_SKEW_SECS: i64 = 5;

/// The approval a `needs_approval` step must carry, checked against the
/// request it is inside: present, for this step, for a run id, approved by
/// someone other than the requester, and given within
/// [`APPROVAL_WINDOW_SECS`] before the request was signed. `Err` says why.
pub fn verify_approval(req: &SignedExec) -> Result<(), String> {
    let Some(a) = &req.approval else {
        return Err(format!(
            "runbook {} step {} needs approval and the request carries none",
            req.runbook, req.step
        ));
    };
    let run_ok = a.run.len() > 1
        && a.run.len() <= 64
        && a.run.starts_with('r')
        && a.run.bytes().all(|b| b.is_ascii_alphanumeric());
    if !run_ok {
        return Err(format!("the approval names no run ({:?})", a.run));
    }
    if a.step != req.step {
        return Err(format!(
            "the approval is for step {:?}, not step {}",
            a.step, req.step
        ));
    }
    if a.requested_by.trim().is_empty() || a.approved_by.trim().is_empty() {
        return Err("the approval must name who asked and who approved".into());
    }
    if a.approved_by == a.requested_by {
        return Err(format!(
            "the approval is by the requester {} (two-person rule)",
            a.approved_by
        ));
    }
    if a.approved_at > req.timestamp + APPROVAL_SKEW_SECS
        || a.approved_at < req.timestamp - APPROVAL_WINDOW_SECS
    {
        return Err(format!(
            "the approval time {} is outside the window of the request ({}s before it)",
            a.approved_at, APPROVAL_WINDOW_SECS
        ));
    }
    Ok(())
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecAuthError {
    #[error("missing header {0}")]
    Missing(&'static str),
    #[error("malformed header {0}")]
    Malformed(&'static str),
    #[error("signature does not match any configured public key")]
    BadSignature,
    #[error("signed body is not an exec request: {0}")]
    BadBody(String),
    #[error("request is for node {requested:?}, this is {this:?}")]
    WrongNode { requested: String, this: String },
    #[error("timestamp outside the {WINDOW_SECS}s window")]
    Stale,
    #[error("timestamp more than {MAX_FUTURE_SKEW_SECS}s in the future (check the clocks of the bot and this node)")]
    FromTheFuture,
    #[error("nonce already used")]
    Replayed,
    #[error("signed before this agent started (its nonce cache cannot know it)")]
    BeforeStart,
    #[error("too many requests in the replay window")]
    CacheFull,
    #[error("the request is signed for {signed}, not for {endpoint}")]
    WrongPurpose {
        signed: &'static str,
        endpoint: &'static str,
    },
}

impl ExecAuthError {
    /// Whether the request itself is unauthenticated (401) rather than
    /// authentic but not for this agent or malformed (403/400).
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(
            self,
            ExecAuthError::WrongNode { .. }
                | ExecAuthError::BadBody(_)
                | ExecAuthError::WrongPurpose { .. }
        )
    }
}

/// The SHA-256 (hex) of an argv, as JSON: `["a","b"]`.
pub fn argv_digest(argv: &[String]) -> String {
    // Serializing a slice of strings cannot fail.
    let json = serde_json::to_vec(argv).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

/// A short id for a public key: the first 16 hex digits of its SHA-256.
fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The bot's private signing key.
pub struct ExecSigner {
    key: SigningKey,
    id: String,
}

impl std::fmt::Debug for ExecSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExecSigner(key id {}, <redacted>)", self.id)
    }
}

impl ExecSigner {
    /// A new random key.
    pub fn generate() -> ExecSigner {
        ExecSigner::from_signing_key(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    fn from_signing_key(key: SigningKey) -> ExecSigner {
        let id = key_id(&key.verifying_key());
        ExecSigner { key, id }
    }

    /// A PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<ExecSigner, String> {
        SigningKey::from_pkcs8_pem(pem.trim())
            .map(ExecSigner::from_signing_key)
            .map_err(|_| {
                "not an Ed25519 private key in PKCS#8 PEM (gpuops keygen writes one)".into()
            })
    }

    /// Reads a private key file; relative names are looked up in
    /// `$CREDENTIALS_DIRECTORY` first. A file that others may read is refused.
    pub fn from_file(path: &Path) -> Result<ExecSigner, String> {
        let (read, pem) = crate::secret::read_credential(path)?;
        let pem = crate::secret::Secret::new(pem);
        crate::secret::check_private_file(&read)?;
        ExecSigner::from_pem(pem.expose()).map_err(|e| format!("{}: {e}", read.display()))
    }

    pub fn key_id(&self) -> &str {
        &self.id
    }

    pub fn public_key(&self) -> ExecPublicKey {
        ExecPublicKey::new(self.key.verifying_key())
    }

    /// The private key as PKCS#8 PEM (for `gpuops keygen` only), exactly
    /// as `openssl genpkey -algorithm ed25519` writes it: a version 1
    /// `PrivateKeyInfo` holding only the 32-byte seed (RFC 8410). The
    /// version 2 form with the public key inside, which the encoder of
    /// `ed25519-dalek` writes, is refused by `openssl pkey` (issue 20,
    /// finding 12); [`ExecSigner::from_pem`] still reads it.
    pub fn private_pem(&self) -> Result<crate::secret::Secret, String> {
        use base64::Engine as _;
        let mut der = Vec::with_capacity(ED25519_PKCS8_V1_PREFIX.len() + 32);
        der.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
        der.extend_from_slice(&self.key.to_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        der.fill(0);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(crate::secret::Secret::new(pem))
    }

    /// The body and headers of a signed request.
    pub fn sign(&self, req: &SignedExec) -> (Vec<u8>, [(&'static str, String); 2]) {
        // Serializing strings, integers and maps of strings cannot fail.
        let body = serde_json::to_vec(req).unwrap_or_default();
        let headers = self.sign_bytes(&body);
        (body, headers)
    }

    /// The headers signing `body` as it is (tests of malformed bodies).
    pub fn sign_bytes(&self, body: &[u8]) -> [(&'static str, String); 2] {
        let mut msg = Vec::with_capacity(DOMAIN.len() + body.len());
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(body);
        let sig = self.key.sign(&msg);
        [
            (SIGNATURE_HEADER, hex::encode(sig.to_bytes())),
            (KEY_ID_HEADER, self.id.clone()),
        ]
    }

    /// A request for `node` signed now, with a fresh nonce.
    pub fn request(
        node: &str,
        runbook: &str,
        step: &str,
        params: BTreeMap<String, String>,
        argv: &[String],
        approval: Option<SignedApproval>,
        now: i64,
    ) -> SignedExec {
        SignedExec {
            v: VERSION,
            node: node.to_string(),
            runbook: runbook.to_string(),
            step: step.to_string(),
            params,
            argv_sha256: argv_digest(argv),
            timestamp: now,
            nonce: hex::encode(rand::random::<[u8; 16]>()),
            approval,
            purpose: Purpose::Exec,
        }
    }

    /// [`ExecSigner::request`] for `/v1/plan` (no approval: planning runs nothing).
    pub fn plan_request(
        node: &str,
        runbook: &str,
        step: &str,
        params: BTreeMap<String, String>,
        now: i64,
    ) -> SignedExec {
        let mut req = ExecSigner::request(node, runbook, step, params, &[], None, now);
        req.purpose = Purpose::Plan;
        req
    }
}

/// A public key an agent accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct ExecPublicKey {
    key: VerifyingKey,
    id: String,
}

impl std::fmt::Debug for ExecPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExecPublicKey({})", self.id)
    }
}

impl ExecPublicKey {
    fn new(key: VerifyingKey) -> ExecPublicKey {
        ExecPublicKey {
            id: key_id(&key),
            key,
        }
    }

    /// An SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &str) -> Result<ExecPublicKey, String> {
        VerifyingKey::from_public_key_pem(pem.trim())
            .map(ExecPublicKey::new)
            .map_err(|_| "not an Ed25519 public key in PEM (gpuops keygen writes one)".into())
    }

    pub fn from_file(path: &Path) -> Result<ExecPublicKey, String> {
        let (read, text) = crate::secret::read_credential(path)?;
        ExecPublicKey::from_pem(&text).map_err(|e| format!("{}: {e}", read.display()))
    }

    pub fn to_pem(&self) -> Result<String, String> {
        self.key
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| format!("cannot encode the public key: {e}"))
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Verifies exec requests for one node: signature, node, window, nonce.
pub struct ExecVerifier<C: Clock = SystemClock> {
    keys: Vec<ExecPublicKey>,
    node: String,
    clock: C,
    nonces: Mutex<NonceCache>,
    /// When this verifier (the agent) started: a request signed earlier may
    /// have run before a restart, which emptied the nonce cache, so it is
    /// refused.
    started: i64,
}

#[derive(Default)]
struct NonceCache {
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl NonceCache {
    /// Forgets nonces whose timestamp left the window.
    fn expire(&mut self, now: i64) {
        while let Some((t, _)) = self.order.front() {
            if *t >= now - WINDOW_SECS {
                break;
            }
            if let Some((_, n)) = self.order.pop_front() {
                self.seen.remove(&n);
            }
        }
    }
}

impl ExecVerifier<SystemClock> {
    pub fn new(keys: Vec<ExecPublicKey>, node: impl Into<String>) -> ExecVerifier<SystemClock> {
        ExecVerifier::with_clock(keys, node, SystemClock)
    }
}

impl<C: Clock> ExecVerifier<C> {
    pub fn with_clock(
        keys: Vec<ExecPublicKey>,
        node: impl Into<String>,
        clock: C,
    ) -> ExecVerifier<C> {
        let started = clock.now_unix();
        ExecVerifier {
            keys,
            node: node.into(),
            clock,
            nonces: Mutex::new(NonceCache::default()),
            started,
        }
    }

    /// This agent's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The ids of the accepted keys (for the start-up log line).
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id()).collect()
    }

    /// Checks the headers that must be present before the body is read.
    pub fn precheck(&self, headers: &HeaderMap) -> Result<(), ExecAuthError> {
        header(headers, SIGNATURE_HEADER).map(|_| ())
    }

    /// Verifies a request on its raw bytes; on success its nonce is
    /// remembered for the window and the parsed content returned.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<SignedExec, ExecAuthError> {
        self.verify_for(headers, body, Purpose::Exec)
    }

    /// [`ExecVerifier::verify`] for the endpoint `endpoint`: a request signed
    /// for the other one is refused before its nonce is remembered.
    pub fn verify_for(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        endpoint: Purpose,
    ) -> Result<SignedExec, ExecAuthError> {
        let sig = header(headers, SIGNATURE_HEADER)?;
        let raw = hex::decode(sig).map_err(|_| ExecAuthError::Malformed(SIGNATURE_HEADER))?;
        let raw: [u8; 64] = raw
            .try_into()
            .map_err(|_| ExecAuthError::Malformed(SIGNATURE_HEADER))?;
        let signature = ed25519_dalek::Signature::from_bytes(&raw);
        let mut msg = Vec::with_capacity(DOMAIN.len() + body.len());
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(body);
        // Every configured key is tried (there are one or two); the key id
        // header only names the key in logs.
        let verified = self
            .keys
            .iter()
            .any(|k| k.key.verify_strict(&msg, &signature).is_ok());
        if !verified {
            return Err(ExecAuthError::BadSignature);
        }
        let req: SignedExec =
            serde_json::from_slice(body).map_err(|e| ExecAuthError::BadBody(e.to_string()))?;
        if req.v != VERSION {
            return Err(ExecAuthError::BadBody(format!(
                "version {} (this agent speaks {VERSION})",
                req.v
            )));
        }
        if req.node != self.node {
            return Err(ExecAuthError::WrongNode {
                requested: req.node,
                this: self.node.clone(),
            });
        }
        if req.purpose != endpoint {
            return Err(ExecAuthError::WrongPurpose {
                signed: req.purpose.as_str(),
                endpoint: endpoint.as_str(),
            });
        }
        let now = self.clock.now_unix();
        if req.timestamp > now + MAX_FUTURE_SKEW_SECS {
            return Err(ExecAuthError::FromTheFuture);
        }
        if now - req.timestamp > WINDOW_SECS {
            return Err(ExecAuthError::Stale);
        }
        if req.timestamp < self.started {
            return Err(ExecAuthError::BeforeStart);
        }
        if req.nonce.len() < 16
            || req.nonce.len() > 64
            || !req.nonce.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ExecAuthError::BadBody(
                "nonce must be 16-64 hex digits".into(),
            ));
        }
        let nonce = req.nonce.to_ascii_lowercase();
        let mut cache = self
            .nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.expire(now);
        if cache.seen.contains_key(&nonce) {
            return Err(ExecAuthError::Replayed);
        }
        if cache.seen.len() >= NONCE_CACHE_MAX {
            return Err(ExecAuthError::CacheFull);
        }
        // Expire by the later of the signed time and now, so a nonce signed in
        // the past cannot be forgotten early and replayed.
        let keep_from = req.timestamp.max(now);
        cache.seen.insert(nonce.clone(), keep_from);
        cache.order.push_back((keep_from, nonce));
        Ok(req)
    }

    /// Nonces currently remembered.
    pub fn nonces_remembered(&self) -> usize {
        self.nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seen
            .len()
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, ExecAuthError> {
    let v = headers.get(name).ok_or(ExecAuthError::Missing(name))?;
    let s = v
        .to_str()
        .map_err(|_| ExecAuthError::Malformed(name))?
        .trim();
    if s.is_empty() {
        return Err(ExecAuthError::Missing(name));
    }
    Ok(s)
}

/// This host's node name: the kernel's nodename up to the first dot.
pub fn local_node_name() -> String {
    let uname = rustix::system::uname();
    let full = uname.nodename().to_string_lossy().to_string();
    full.split('.').next().unwrap_or("").to_string()
}

/// Whether `s` can be a node name (a host name: letters, digits, `-`, `_`,
/// `.`; starting with a letter or digit; at most 253 characters).
pub fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `gpuops keygen`: writes `NAME.key` (0600, created new) and `NAME.pub`.
#[cfg(feature = "bot")]
pub fn keygen(args: crate::cli::KeygenArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if args.name.is_empty()
        || !args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        anyhow::bail!(
            "--name {:?}: use letters, digits, '-', '_' or '.'",
            args.name
        );
    }
    if let Some(tree) = git_work_tree_of(&args.out) {
        anyhow::bail!(
            "refusing to write a private key into the git work tree {} (nothing there keeps it out of a commit): give --out DIR outside it, e.g. --out /root/gpuops-keys",
            tree.display()
        );
    }
    if !args.out.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.out)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.out.display()))?;
    }
    let signer = ExecSigner::generate();
    let private = signer.private_pem().map_err(anyhow::Error::msg)?;
    let public = signer.public_key().to_pem().map_err(anyhow::Error::msg)?;
    let key_path = args.out.join(format!("{}.key", args.name));
    let pub_path = args.out.join(format!("{}.pub", args.name));
    let write = |path: &Path, text: &str, mode: u32| -> anyhow::Result<()> {
        if args.force {
            // A replaced file is removed first, so the new one gets `mode`.
            let _ = std::fs::remove_file(path);
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::anyhow!("{} exists (use --force to replace it)", path.display())
                } else {
                    anyhow::anyhow!("cannot create {}: {e}", path.display())
                }
            })?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    };
    if !args.force {
        for p in [&key_path, &pub_path] {
            if p.exists() {
                anyhow::bail!("{} exists (use --force to replace it)", p.display());
            }
        }
    }
    write(&key_path, private.expose(), 0o600)?;
    write(&pub_path, &public, 0o644)?;
    println!(
        "wrote {} (private: the bot's [agents] signing_key_file; keep it 0600) and {} (public: the agents' [exec] public_key_files); key id {}",
        key_path.display(),
        pub_path.display(),
        signer.key_id()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// The git work tree `dir` is in (a `.git` in it or a directory above it),
/// judged from the nearest existing ancestor of `dir`.
#[cfg(feature = "bot")]
fn git_work_tree_of(dir: &Path) -> Option<std::path::PathBuf> {
    let mut existing = dir.to_path_buf();
    if existing.as_os_str().is_empty() {
        existing = std::path::PathBuf::from(".");
    }
    while !existing.exists() {
        existing = match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
    }
    let abs = std::fs::canonicalize(&existing).ok()?;
    abs.ancestors()
        .find(|a| a.join(".git").exists())
        .map(Path::to_path_buf)
}

/// Whether `s` looks like `host:port` (or `[v6]:port`).
pub fn is_hostport(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && s.len() <= 255
        && port.parse::<u16>().is_ok_and(|p| p > 0)
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::FixedClock;
    use axum::http::HeaderValue;
    use std::sync::Arc;

    const NOW: i64 = 1_800_000_000;

    /// A request without `purpose` (a bot before plans) is for `/v1/exec`;
    /// one signed for planning is refused there, before its nonce is kept.
    #[test]
    fn purpose_defaults_to_exec_and_binds_the_endpoint() {
        let key = ExecSigner::generate();
        let v = ExecVerifier::with_clock(
            vec![key.public_key()],
            "node-a",
            Arc::new(FixedClock::new(NOW)),
        );
        let req = ExecSigner::request("node-a", "rb", "s", BTreeMap::new(), &[], None, NOW);
        let (body, headers) = key.sign(&req);
        assert!(!String::from_utf8_lossy(&body).contains("purpose"));
        let mut h = HeaderMap::new();
        for (k, val) in headers {
            h.insert(k, HeaderValue::from_str(&val).unwrap());
        }
        assert_eq!(
            v.verify_for(&h, &body, Purpose::Plan),
            Err(ExecAuthError::WrongPurpose {
                signed: "exec",
                endpoint: "plan"
            })
        );
        assert_eq!(v.nonces_remembered(), 0);
        assert_eq!(v.verify(&h, &body).unwrap().purpose, Purpose::Exec);
        let plan = ExecSigner::plan_request("node-a", "rb", "s", BTreeMap::new(), NOW);
        let (body, headers) = key.sign(&plan);
        let mut h = HeaderMap::new();
        for (k, val) in headers {
            h.insert(k, HeaderValue::from_str(&val).unwrap());
        }
        assert!(matches!(
            v.verify(&h, &body),
            Err(ExecAuthError::WrongPurpose { .. })
        ));
        assert_eq!(
            v.verify_for(&h, &body, Purpose::Plan).unwrap().purpose,
            Purpose::Plan
        );
    }

    /// Finding 6 (agent side): the approval inside a signed request must be
    /// for this very step, by someone other than the requester, and recent;
    /// before, any approval (even the requester's own, for another step, a
    /// day old) let a gated step run.
    #[test]
    fn signed_approval_must_be_for_this_step_by_another_person_and_recent() {
        let approval = |step: &str, by: &str, at: i64| SignedApproval {
            run: "r0a1b2c".into(),
            step: step.into(),
            requested_by: "slack:U1".into(),
            approved_by: by.into(),
            approved_at: at,
        };
        let req = |a: Option<SignedApproval>| {
            ExecSigner::request("node-a", "rb", "drain", BTreeMap::new(), &[], a, NOW)
        };
        assert!(verify_approval(&req(Some(approval("drain", "slack:U2", NOW)))).is_ok());
        assert!(verify_approval(&req(Some(approval("drain", "slack:U2", NOW - 600)))).is_ok());
        for (a, why) in [
            (None, "carries none"),
            (
                Some(approval("drop-caches", "slack:U2", NOW)),
                "not step drain",
            ),
            (Some(approval("drain", "slack:U1", NOW)), "two-person"),
            (Some(approval("drain", "", NOW)), "who approved"),
            (
                Some(approval("drain", "slack:U2", NOW - 86_400)),
                "outside the window",
            ),
            (
                Some(approval("drain", "slack:U2", NOW + 600)),
                "outside the window",
            ),
            (
                Some(SignedApproval {
                    run: String::new(),
                    ..approval("drain", "slack:U2", NOW)
                }),
                "names no run",
            ),
        ] {
            let e = verify_approval(&req(a)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn req(node: &str, now: i64) -> SignedExec {
        ExecSigner::request(
            node,
            "storage",
            "df",
            BTreeMap::new(),
            &["df".to_string(), "-h".to_string()],
            None,
            now,
        )
    }

    fn verifier(
        signer: &ExecSigner,
        node: &str,
    ) -> (ExecVerifier<Arc<FixedClock>>, Arc<FixedClock>) {
        let clock = Arc::new(FixedClock::new(NOW));
        (
            ExecVerifier::with_clock(vec![signer.public_key()], node, clock.clone()),
            clock,
        )
    }

    #[test]
    fn signed_request_verifies_once() {
        let s = ExecSigner::generate();
        let (v, _) = verifier(&s, "node-a");
        let (body, h) = s.sign(&req("node-a", NOW));
        let got = v.verify(&headers(&h), &body).unwrap();
        assert_eq!(got.node, "node-a");
        assert_eq!(v.verify(&headers(&h), &body), Err(ExecAuthError::Replayed));
    }

    #[test]
    fn exec_request_for_node_a_refused_on_node_b() {
        let s = ExecSigner::generate();
        let (b, _) = verifier(&s, "node-b");
        let (body, h) = s.sign(&req("node-a", NOW));
        assert_eq!(
            b.verify(&headers(&h), &body),
            Err(ExecAuthError::WrongNode {
                requested: "node-a".into(),
                this: "node-b".into()
            })
        );
        // Rewriting the node in the body breaks the signature.
        let forged = String::from_utf8(body)
            .unwrap()
            .replace("\"node-a\"", "\"node-b\"");
        assert_eq!(
            b.verify(&headers(&h), forged.as_bytes()),
            Err(ExecAuthError::BadSignature)
        );
    }

    #[test]
    fn other_key_stale_and_malformed_are_refused() {
        let s = ExecSigner::generate();
        let (v, clock) = verifier(&s, "n");
        let other = ExecSigner::generate();
        let (body, h) = other.sign(&req("n", NOW));
        assert_eq!(
            v.verify(&headers(&h), &body),
            Err(ExecAuthError::BadSignature)
        );
        let (body, h) = s.sign(&req("n", NOW - WINDOW_SECS - 1));
        assert_eq!(v.verify(&headers(&h), &body), Err(ExecAuthError::Stale));
        let (body, h) = s.sign(&req("n", NOW + WINDOW_SECS + 1));
        assert_eq!(
            v.verify(&headers(&h), &body),
            Err(ExecAuthError::FromTheFuture)
        );
        assert_eq!(
            v.verify(&HeaderMap::new(), b"{}"),
            Err(ExecAuthError::Missing(SIGNATURE_HEADER))
        );
        assert_eq!(
            v.verify(&headers(&[(SIGNATURE_HEADER, "zz".into())]), b"{}"),
            Err(ExecAuthError::Malformed(SIGNATURE_HEADER))
        );
        // Nonces are forgotten only after the window.
        let (body, h) = s.sign(&req("n", NOW));
        assert!(v.verify(&headers(&h), &body).is_ok());
        assert_eq!(v.nonces_remembered(), 1);
        clock.set(NOW + WINDOW_SECS + 1);
        let (body, h) = s.sign(&req("n", NOW + WINDOW_SECS + 1));
        assert!(v.verify(&headers(&h), &body).is_ok());
        assert_eq!(v.nonces_remembered(), 1);
    }

    #[test]
    fn request_signed_before_a_restart_is_refused() {
        // The nonce cache lives in memory: a request captured before the
        // agent restarted must not run again after it.
        let s = ExecSigner::generate();
        let (before, _) = verifier(&s, "n");
        let (body, h) = s.sign(&req("n", NOW));
        assert!(before.verify(&headers(&h), &body).is_ok());
        let restarted = ExecVerifier::with_clock(
            vec![s.public_key()],
            "n",
            Arc::new(FixedClock::new(NOW + 30)),
        );
        assert_eq!(
            restarted.verify(&headers(&h), &body),
            Err(ExecAuthError::BeforeStart)
        );
        let (body, h) = s.sign(&req("n", NOW + 30));
        assert!(restarted.verify(&headers(&h), &body).is_ok());
    }

    /// Finding 5 (issue 20): a request signed 120 s ahead was accepted, the
    /// agent restarted, and the same bytes were accepted again (its
    /// timestamp was after the new start time).
    #[test]
    fn exec_from_the_future_is_refused() {
        let s = ExecSigner::generate();
        let (v, _) = verifier(&s, "n");
        let (body, h) = s.sign(&req("n", NOW + 120));
        assert_eq!(
            v.verify(&headers(&h), &body),
            Err(ExecAuthError::FromTheFuture)
        );
        assert!(ExecAuthError::FromTheFuture.is_unauthenticated());
        let (body, h) = s.sign(&req("n", NOW + MAX_FUTURE_SKEW_SECS + 1));
        assert_eq!(
            v.verify(&headers(&h), &body),
            Err(ExecAuthError::FromTheFuture)
        );
        // Clock skew within the allowance is accepted.
        let (body, h) = s.sign(&req("n", NOW + MAX_FUTURE_SKEW_SECS));
        assert!(v.verify(&headers(&h), &body).is_ok());
    }

    #[test]
    fn exec_from_the_future_is_refused_again_after_a_restart() {
        let s = ExecSigner::generate();
        let (before, _) = verifier(&s, "n");
        // The most an agent accepts ahead of its clock ...
        let (ahead_body, ahead) = s.sign(&req("n", NOW + MAX_FUTURE_SKEW_SECS));
        assert!(before.verify(&headers(&ahead), &ahead_body).is_ok());
        // ... and the finding's 120 s, refused before the restart.
        let (far_body, far) = s.sign(&req("n", NOW + 120));
        assert!(before.verify(&headers(&far), &far_body).is_err());
        // An automatic restart takes at least RestartSec=5s (the skew).
        let restarted = ExecVerifier::with_clock(
            vec![s.public_key()],
            "n",
            Arc::new(FixedClock::new(NOW + MAX_FUTURE_SKEW_SECS + 1)),
        );
        assert_eq!(
            restarted.verify(&headers(&ahead), &ahead_body),
            Err(ExecAuthError::BeforeStart)
        );
        // The attack's bytes, replayed after a restart 30 s later.
        let restarted = ExecVerifier::with_clock(
            vec![s.public_key()],
            "n",
            Arc::new(FixedClock::new(NOW + 30)),
        );
        assert_eq!(
            restarted.verify(&headers(&far), &far_body),
            Err(ExecAuthError::FromTheFuture)
        );
        assert_eq!(
            restarted.verify(&headers(&ahead), &ahead_body),
            Err(ExecAuthError::BeforeStart)
        );
    }

    #[test]
    fn signature_case_variant_is_a_replay() {
        let s = ExecSigner::generate();
        let (v, _) = verifier(&s, "n");
        let (body, h) = s.sign(&req("n", NOW));
        assert!(v.verify(&headers(&h), &body).is_ok());
        let upper = [(h[0].0, h[0].1.to_ascii_uppercase()), h[1].clone()];
        assert_eq!(
            v.verify(&headers(&upper), &body),
            Err(ExecAuthError::Replayed)
        );
    }

    #[test]
    fn several_keys_for_rotation_and_key_id_hint() {
        let old = ExecSigner::generate();
        let new = ExecSigner::generate();
        let clock = Arc::new(FixedClock::new(NOW));
        let v = ExecVerifier::with_clock(vec![old.public_key(), new.public_key()], "n", clock);
        for s in [&old, &new] {
            let (body, h) = s.sign(&req("n", NOW));
            assert!(v.verify(&headers(&h), &body).is_ok());
            // A wrong key id hint still finds the key.
            let (body, h) = s.sign(&req("n", NOW));
            let wrong = [h[0].clone(), (KEY_ID_HEADER, "0000000000000000".into())];
            assert!(v.verify(&headers(&wrong), &body).is_ok());
        }
    }

    #[test]
    fn pem_round_trip() {
        let s = ExecSigner::generate();
        let pem = s.private_pem().unwrap();
        assert!(pem.expose().starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = ExecSigner::from_pem(pem.expose()).unwrap();
        assert_eq!(back.key_id(), s.key_id());
        let pubpem = s.public_key().to_pem().unwrap();
        assert!(pubpem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(ExecPublicKey::from_pem(&pubpem).unwrap(), s.public_key());
        assert!(ExecPublicKey::from_pem(pem.expose()).is_err());
        assert!(ExecSigner::from_pem(&pubpem).is_err());
        assert!(!format!("{s:?}").contains(pem.expose()));
    }

    /// Finding 12 (issue 20): `openssl pkey` could not read the `exec.key`
    /// that `gpuops keygen` wrote. The key is now the 48-byte version 1
    /// `PrivateKeyInfo` that `openssl genpkey -algorithm ed25519` writes.
    #[test]
    fn keygen_writes_the_private_key_openssl_writes() {
        use base64::Engine as _;
        let s = ExecSigner::generate();
        let pem = s.private_pem().unwrap();
        let lines: Vec<&str> = pem.expose().lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN PRIVATE KEY-----"));
        assert_eq!(lines.last(), Some(&"-----END PRIVATE KEY-----"));
        assert!(pem.expose().ends_with("-----END PRIVATE KEY-----\n"));
        let der = base64::engine::general_purpose::STANDARD
            .decode(lines[1..lines.len() - 1].concat())
            .unwrap();
        assert_eq!(der.len(), 48, "{}", hex::encode(&der));
        assert_eq!(hex::encode(&der[..16]), "302e020100300506032b657004220420");
        assert_eq!(&der[16..], s.key.to_bytes().as_slice());
        let pubpem = s.public_key().to_pem().unwrap();
        let lines: Vec<&str> = pubpem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN PUBLIC KEY-----"));
        assert_eq!(lines.last(), Some(&"-----END PUBLIC KEY-----"));
        let der = base64::engine::general_purpose::STANDARD
            .decode(lines[1..lines.len() - 1].concat())
            .unwrap();
        // SubjectPublicKeyInfo { AlgorithmIdentifier { 1.3.101.112 }, BIT STRING }.
        assert_eq!(hex::encode(&der[..12]), "302a300506032b6570032100");
        assert_eq!(&der[12..], s.public_key().key.as_bytes().as_slice());
    }

    /// Keys written by earlier versions (PKCS#8 version 2, with the public
    /// key inside) still load.
    #[test]
    fn keys_from_older_keygen_still_load() {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let s = ExecSigner::generate();
        let old = s
            .key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        assert_ne!(old.as_str(), s.private_pem().unwrap().expose());
        assert_eq!(ExecSigner::from_pem(&old).unwrap().key_id(), s.key_id());
    }

    /// `openssl pkey` reads both files and derives the same public key.
    #[test]
    #[ignore = "needs openssl: run by .ci/run"]
    #[allow(clippy::disallowed_methods)] // the test runs the real openssl
    fn openssl_reads_the_keys_keygen_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = ExecSigner::generate();
        let key = dir.path().join("exec.key");
        let public = dir.path().join("exec.pub");
        std::fs::write(&key, s.private_pem().unwrap().expose()).unwrap();
        std::fs::write(&public, s.public_key().to_pem().unwrap()).unwrap();
        let run = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let derived = run(&[
            "pkey".as_ref(),
            "-in".as_ref(),
            key.as_os_str(),
            "-pubout".as_ref(),
        ]);
        assert_eq!(derived, s.public_key().to_pem().unwrap());
        let read = run(&[
            "pkey".as_ref(),
            "-pubin".as_ref(),
            "-in".as_ref(),
            public.as_os_str(),
        ]);
        assert_eq!(read, s.public_key().to_pem().unwrap());
        // And a key openssl generates loads here.
        let generated = dir.path().join("openssl.key");
        run(&[
            "genpkey".as_ref(),
            "-algorithm".as_ref(),
            "ed25519".as_ref(),
            "-out".as_ref(),
            generated.as_os_str(),
        ]);
        let text = std::fs::read_to_string(&generated).unwrap();
        assert!(ExecSigner::from_pem(&text).is_ok());
    }

    #[test]
    fn argv_digest_distinguishes_splits() {
        let a = argv_digest(&["echo".into(), "a b".into()]);
        let b = argv_digest(&["echo".into(), "a".into(), "b".into()]);
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn node_names() {
        assert!(is_node_name("gpu-node-17"));
        assert!(is_node_name("gpu-node-17.example.com"));
        assert!(!is_node_name(""));
        assert!(!is_node_name("-x"));
        assert!(!is_node_name("a b"));
        assert!(!is_node_name("a:9949"));
    }
}
