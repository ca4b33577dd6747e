//! The agent's `--web.config.file` (exporter-toolkit format) on the real
//! binary: a TLS handshake with a CA and certificates made in the test,
//! mutual TLS, basic auth (right, wrong, missing), `/v1/events` behind the
//! same auth as `/metrics`, hot reload of the file, and a clear error for a
//! bad file at start. The client is reqwest (rustls).
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary

use crate::support::free_port;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Agent {
    child: std::process::Child,
    port: u16,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_command(dir: &Path, web_config: &Path, port: u16) -> Command {
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/full");
    let toml = dir.join("agent.toml");
    std::fs::write(&toml, "[collectors]\ngpu = false\n").unwrap();
    std::fs::write(
        dir.join("kmsg"),
        "3,1,50000000,-;Out of memory: Killed process 77 (trainer) total-vm:10kB, anon-rss:5kB, file-rss:0kB\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuops"));
    cmd.current_dir(dir)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .arg("agent")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(&toml)
        .arg("--web.config.file")
        .arg(web_config)
        .arg("--procfs")
        .arg(host.join("proc"))
        .arg("--sysfs")
        .arg(host.join("sys"))
        .arg("--rootfs")
        .arg(host.join("root"))
        .arg("--kmsg")
        .arg(dir.join("kmsg"));
    cmd
}

/// Starts the agent with `web_config` and waits until its port accepts.
fn start(dir: &Path, web_config: &Path) -> Agent {
    let port = free_port();
    let child = agent_command(dir, web_config, port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent { child, port };
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "agent never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// A CA, and certificates it signs.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes the server certificate, key and CA into `dir`; returns the CA.
fn server_pki(dir: &Path) -> Pki {
    let pki = Pki::new("gpuops test ca");
    let (cert, key) = pki.leaf(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("server.crt"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
    pki
}

fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

async fn status(
    client: &reqwest::Client,
    url: &str,
    auth: Option<(&str, &str)>,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut req = client.get(url);
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[tokio::test]
async fn tls_handshake_with_a_generated_ca() {
    let (_d, dir) = tempdir();
    let pki = server_pki(&dir);
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\n",
    )
    .unwrap();
    let agent = start(&dir, &web);
    let c = client(&pki.ca_pem, None);
    let resp = status(
        &c,
        &format!("https://127.0.0.1:{}/metrics", agent.port),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("gpuops_build_info"));
    // A client that does not trust the CA fails the handshake.
    let other = Pki::new("some other ca");
    let untrusting = client(&other.ca_pem, None);
    assert!(status(
        &untrusting,
        &format!("https://127.0.0.1:{}/healthz", agent.port),
        None
    )
    .await
    .is_err());
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new();
    let r = status(
        &plain,
        &format!("http://127.0.0.1:{}/metrics", agent.port),
        None,
    )
    .await;
    assert!(r.is_err() || r.unwrap().status() != 200);
}

#[tokio::test]
async fn mtls_require_and_verify_client_cert() {
    let (_d, dir) = tempdir();
    let pki = server_pki(&dir);
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n",
    )
    .unwrap();
    let agent = start(&dir, &web);
    let url = format!("https://127.0.0.1:{}/metrics", agent.port);
    let (cert, key) = pki.leaf(&["prometheus"]);
    let with_cert = client(&pki.ca_pem, Some((&cert, &key)));
    assert_eq!(status(&with_cert, &url, None).await.unwrap().status(), 200);

    let without = client(&pki.ca_pem, None);
    assert!(
        status(&without, &url, None).await.is_err(),
        "a client without a certificate was served"
    );
    let stranger = Pki::new("stranger ca");
    let (cert, key) = stranger.leaf(&["mallory"]);
    let wrong_ca = client(&pki.ca_pem, Some((&cert, &key)));
    assert!(
        status(&wrong_ca, &url, None).await.is_err(),
        "a client certificate from another CA was accepted"
    );
}

#[tokio::test]
async fn basic_auth_right_and_wrong() {
    let (_d, dir) = tempdir();
    let pki = server_pki(&dir);
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\nbasic_auth_users:\n  prometheus: '{}'\n",
            hash("scrape-s3cret")
        ),
    )
    .unwrap();
    let agent = start(&dir, &web);
    let c = client(&pki.ca_pem, None);
    let url = format!("https://127.0.0.1:{}/metrics", agent.port);

    let ok = status(&c, &url, Some(("prometheus", "scrape-s3cret")))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-frame-options"], "deny");
    // Cached: the second scrape with the same credentials is cheap, and still right.
    let again = status(&c, &url, Some(("prometheus", "scrape-s3cret")))
        .await
        .unwrap();
    assert_eq!(again.status(), 200);

    for auth in [
        Some(("prometheus", "wrong")),
        Some(("nobody", "scrape-s3cret")),
        None,
    ] {
        let r = status(&c, &url, auth).await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Basic"), "{challenge}");
        assert_eq!(r.headers()["x-frame-options"], "deny");
    }
}

#[tokio::test]
async fn events_require_auth_when_configured() {
    let (_d, dir) = tempdir();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!("basic_auth_users:\n  ops: '{}'\n", hash("ev3nts")),
    )
    .unwrap();
    let agent = start(&dir, &web);
    let c = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", agent.port);
    for path in [
        "/v1/events",
        "/metrics",
        "/healthz",
        "/readyz",
        "/",
        "/nope",
    ] {
        let r = status(&c, &format!("{base}{path}"), None).await.unwrap();
        assert_eq!(r.status(), 401, "{path} without credentials");
        let body = r.text().await.unwrap();
        assert!(!body.contains("trainer"), "{path} leaked events: {body}");
    }
    // The fixture host booted in 2023: ask for events since then.
    let url = format!("{base}/v1/events?since=1600000000");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = status(&c, &url, Some(("ops", "ev3nts"))).await.unwrap();
        assert_eq!(r.status(), 200);
        if r.text().await.unwrap().contains("trainer") {
            break;
        }
        assert!(Instant::now() < until, "the OOM event never showed up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn web_config_hot_reload() {
    let (_d, dir) = tempdir();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!("basic_auth_users:\n  ops: '{}'\n", hash("old-pass")),
    )
    .unwrap();
    let agent = start(&dir, &web);
    let c = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/metrics", agent.port);
    let code = |auth| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            status(&c, &url, Some(auth))
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(code(("ops", "old-pass")).await, 200);
    assert_eq!(code(("ops", "new-pass")).await, 401);

    std::fs::write(
        &web,
        format!("basic_auth_users:\n  ops: '{}'\n", hash("new-pass")),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        code(("ops", "old-pass")).await,
        401,
        "old password still accepted"
    );
    assert_eq!(code(("ops", "new-pass")).await, 200, "new password refused");

    // A broken file keeps the last good configuration.
    std::fs::write(&web, "basic_auth_users:\n  ops: not-a-hash\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(code(("ops", "new-pass")).await, 200);
    assert_eq!(code(("ops", "old-pass")).await, 401);
}

#[test]
fn bad_web_config_at_start_names_file_and_key() {
    let (_d, dir) = tempdir();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerify\n",
    )
    .unwrap();
    let out = agent_command(&dir, &web, free_port())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&web.display().to_string())
            && err.contains("tls_server_config.client_auth_type"),
        "{err}"
    );
}

#[test]
fn check_config_validates_the_web_config_file() {
    let (_d, dir) = tempdir();
    let web = dir.join("web.yml");
    std::fs::write(&web, "basic_auth_users:\n  ops: plain-text\n").unwrap();
    let toml = dir.join("agent.toml");
    std::fs::write(
        &toml,
        format!("web_config_file = {:?}\n", web.display().to_string()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["check-config", "--agent"])
        .arg(&toml)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("basic_auth_users.ops: not a bcrypt hash"),
        "{err}"
    );

    std::fs::write(
        &web,
        format!("basic_auth_users:\n  ops: '{}'\n", hash("pw")),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["check-config", "--agent"])
        .arg(&toml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (web configuration)"));
}

#[tokio::test]
async fn certificate_rotation_by_replacing_files() {
    let (_d, dir) = tempdir();
    let old = server_pki(&dir);
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
    )
    .unwrap();
    let agent = start(&dir, &web);
    let url = format!("https://127.0.0.1:{}/healthz", agent.port);
    assert!(status(&client(&old.ca_pem, None), &url, None).await.is_ok());

    // A new certificate from a new CA, renamed over the old files.
    let new = Pki::new("rotated ca");
    let (cert, key) = new.leaf(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("server.crt.new"), cert).unwrap();
    std::fs::write(dir.join("server.key.new"), key).unwrap();
    std::fs::rename(dir.join("server.key.new"), dir.join("server.key")).unwrap();
    std::fs::rename(dir.join("server.crt.new"), dir.join("server.crt")).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Fresh clients: new connections get the new certificate.
    assert!(status(&client(&new.ca_pem, None), &url, None).await.is_ok());
    assert!(status(&client(&old.ca_pem, None), &url, None)
        .await
        .is_err());
}

#[tokio::test]
async fn bot_runs_a_node_step_on_an_agent_behind_mtls_and_basic_auth() {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt as _;

    use gpuops::runbook::engine::{self, Executor, StepExecutor as _, StepStatus};

    let (_d, dir) = tempdir();
    let _pki = server_pki(&dir);
    let clients = Pki::new("gpuops clients");
    let (bot_cert, bot_key) = clients.leaf(&["gpuops-bot"]);
    std::fs::write(dir.join("client-ca.crt"), &clients.ca_pem).unwrap();
    std::fs::write(dir.join("bot.crt"), bot_cert).unwrap();
    std::fs::write(dir.join("bot-client.key"), bot_key).unwrap();
    std::fs::write(dir.join("agents.pass"), "s3cret-bot-pass\n").unwrap();
    for secret in ["bot-client.key", "agents.pass"] {
        std::fs::set_permissions(dir.join(secret), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: client-ca.crt\n  client_auth_type: RequireAndVerifyClientCert\nbasic_auth_users:\n  gpuops-bot: {}\n",
            hash("s3cret-bot-pass")
        ),
    )
    .unwrap();
    let runbooks = dir.join("runbooks");
    std::fs::create_dir_all(&runbooks).unwrap();
    std::fs::write(
        runbooks.join("tls-test.yaml"),
        "id: tls-test\ntitle: TLS test\nparams:\n  node: { pattern: '[a-z0-9-]{1,63}', from_label: node }\nsteps:\n  - { name: who, phase: investigate, kind: command, target: node, timeout: 5s, run: [echo, \"hello {{node}}\"] }\n",
    )
    .unwrap();
    let signer = gpuops::exec_auth::ExecSigner::generate();
    let key = dir.join("exec.key");
    std::fs::write(&key, signer.private_pem().unwrap().expose()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("exec.pub"), signer.public_key().to_pem().unwrap()).unwrap();

    let port = free_port();
    let child = agent_command(&dir, &web, port)
        .args(["--node-name", "tls-node", "--exec-public-key"])
        .arg(dir.join("exec.pub"))
        .arg("--runbooks")
        .arg(&runbooks)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Agent { child, port };
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "agent never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let instance = format!("127.0.0.1:{port}");
    let bot_toml = |auth: &str| {
        format!(
            "[agents]\nsigning_key_file = {:?}\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\n{auth}[[agents.nodes]]\ninstance = \"{instance}\"\nnode = \"tls-node\"\nurl = \"https://127.0.0.1:{port}\"\n",
            key.display().to_string(),
            dir.join("ca.crt").display().to_string(),
            dir.join("bot.crt").display().to_string(),
            dir.join("bot-client.key").display().to_string(),
        )
    };
    let rb = gpuops::runbook::load_file(&runbooks.join("tls-test.yaml")).unwrap();
    let labels: BTreeMap<String, String> = [
        ("instance".to_string(), instance.clone()),
        ("node".to_string(), "tls-node".to_string()),
    ]
    .into_iter()
    .collect();
    let plan = engine::plan(&rb, &BTreeMap::new(), &labels).unwrap();
    let bot_path = dir.join("bot.toml");
    let run = |text: String| {
        let plan = plan.clone();
        let bot_path = bot_path.clone();
        async move {
            let cfg = gpuops::config::BotConfig::from_str(&bot_path, &text).unwrap();
            let exec = Executor::for_bot(&cfg);
            exec.execute(&plan, &plan.steps[0]).await
        }
    };
    let with_auth = format!(
        "basic_auth_username = \"gpuops-bot\"\nbasic_auth_password_file = {:?}\n",
        dir.join("agents.pass").display().to_string()
    );
    let out = run(bot_toml(&with_auth)).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert_eq!(out.output, "hello tls-node\n");
    // Without the password the agent refuses before the signature is read.
    let out = run(bot_toml("")).await;
    assert_eq!(out.status, StepStatus::Error, "{out:?}");
    assert!(out.output.contains("HTTP 401"), "{}", out.output);
}
