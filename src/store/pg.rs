//! The PostgreSQL backend: a pool of connections (deadpool-postgres over
//! tokio-postgres, TLS by rustls), one transaction per call, every call
//! within [`CALL_DEADLINE`]. Several bot replicas share one database: what
//! must happen once is decided in it (unique keys and upserts, row locks,
//! `FOR UPDATE SKIP LOCKED` claims with a lease), never by a check in one
//! process. The SQL is split by table group under `pg/`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Row;

use crate::config::bot::StoreConfig;
use crate::store::migrate::{self, POSTGRES};
use crate::store::{now, Error, Result, CALL_DEADLINE};

mod audit;
mod core;
mod lifecycle;
mod listen;
mod outbox;
mod paging;
mod reports;
mod runs;

/// How long a claimed outbox row stays with the replica that claimed it;
/// past that another replica takes it over (the claimer died).
pub const LEASE: Duration = Duration::from_secs(60);

/// The first key of the session advisory lock a live replica holds (the
/// second is `hashtext(replica)`): runs it owns are not "interrupted" by
/// another replica's start.
pub const OWNER_LOCK: i64 = 7262;

/// Connection settings, checked: the URL (password applied), TLS, pool.
#[derive(Clone)]
pub struct Settings {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    shown: String,
    pool_size: usize,
    connect_timeout: Duration,
}

impl Settings {
    /// From `[store]`: `url` (required here), `password_file`, `ca_file`.
    pub fn from_config(cfg: &StoreConfig) -> Result<Settings> {
        let Some(url) = &cfg.url else {
            return Err(Error::Schema("no [store] url is set".into()));
        };
        Settings::new(
            url.expose(),
            cfg.password.as_ref().map(|p| p.expose()),
            cfg.ca_file.as_deref(),
            cfg.pool_size,
            cfg.connect_timeout,
        )
    }

    /// Parses `url`; `password` (from a file) wins over one in the URL.
    pub fn new(
        url: &str,
        password: Option<&str>,
        ca_file: Option<&std::path::Path>,
        pool_size: usize,
        connect_timeout: Duration,
    ) -> Result<Settings> {
        let shown = crate::secret::redact_url(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::Schema(format!("[store] url {shown} is not a PostgreSQL URL: {e}"))
        })?;
        if let Some(p) = password {
            config.password(p.trim_end_matches(['\n', '\r']));
        } else if config.get_password().is_none() {
            // libpq's password file (PGPASSFILE, else ~/.pgpass), so that a
            // password never has to be on a command line.
            if let Some(p) = pgpass_password(&config)? {
                config.password(p);
            }
        }
        config.connect_timeout(connect_timeout);
        config.application_name("gpuops-bot");
        let loopback = config.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        });
        match config.get_ssl_mode() {
            SslMode::Disable if !loopback => {
                return Err(Error::Schema(format!(
                    "[store] url {shown}: sslmode=disable is only allowed for a loopback host or a Unix socket"
                )));
            }
            // Never fall back to plain text across a network.
            SslMode::Prefer if !loopback => {
                config.ssl_mode(SslMode::Require);
            }
            // The default on loopback: plain text, as libpq's "prefer" ends
            // up with a local server's self-signed (e.g. Debian's snakeoil)
            // certificate, which rustls would refuse.
            SslMode::Prefer => {
                config.ssl_mode(SslMode::Disable);
            }
            _ => {}
        }
        let tls = tls_connector(ca_file)?;
        Ok(Settings {
            config,
            tls,
            shown,
            pool_size,
            connect_timeout,
        })
    }
}

/// The password for `config`'s first host, port, database and user from
/// libpq's password file: `$PGPASSFILE`, else `~/.pgpass` (lines
/// `host:port:database:user:password`, `*` matching anything, `\:` and `\\`
/// escaped). Like libpq, a file group or others may read is refused.
fn pgpass_password(config: &tokio_postgres::Config) -> Result<Option<String>> {
    let path = match std::env::var_os("PGPASSFILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => std::path::PathBuf::from(h).join(".pgpass"),
            None => return Ok(None),
        },
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    if let Err(why) = crate::secret::check_private_file(&path) {
        // As libpq does: ignored, with a warning.
        tracing::warn!(problem = %why, "password file ignored");
        return Ok(None);
    }
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or("").to_string();
    let db = config.get_dbname().unwrap_or(&user).to_string();
    Ok(pgpass_lookup(
        &text,
        [host.as_str(), port.as_str(), db.as_str(), user.as_str()],
    ))
}

/// The password of the first line of a libpq password file matching
/// `want` (host, port, database, user).
fn pgpass_lookup(text: &str, want: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() == 5
            && fields[..4]
                .iter()
                .zip(want)
                .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod pgpass_tests {
    #[test]
    fn password_file_lines_match_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:gpuops:nope\ndb.example:*:gpuops:gpuops:pa\\:ss\\\\w:rd\n*:*:*:*:fallback\n";
        let want = ["db.example", "5432", "gpuops", "gpuops"];
        assert_eq!(
            super::pgpass_lookup(text, want).as_deref(),
            Some("pa:ss\\w:rd")
        );
        let other = ["x", "5432", "gpuops", "u"];
        assert_eq!(
            super::pgpass_lookup(text, other).as_deref(),
            Some("fallback")
        );
        assert_eq!(super::pgpass_lookup("h:1:d:u:p\n", other), None);
    }
}

/// rustls verifying the server against the system roots and `ca_file`.
fn tls_connector(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| Error::Schema(format!("[store] ca_file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::Schema(format!(
                "[store] ca_file {}: no PEM certificate in it",
                path.display()
            )));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| Error::Schema(format!("[store] ca_file {}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Schema(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A PostgreSQL store; cheap to clone.
#[derive(Clone)]
pub struct Pg {
    pool: Pool,
    settings: Arc<Settings>,
    /// Who claims outbox rows: host name, process id and a random suffix.
    replica: Arc<str>,
}

impl Pg {
    /// Builds the pool and checks that the database answers.
    pub async fn connect(settings: Settings) -> Result<Pg> {
        let mgr = Manager::from_config(
            settings.config.clone(),
            settings.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(settings.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CALL_DEADLINE))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| Error::Task(format!("cannot build the PostgreSQL pool: {e}")))?;
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let replica = format!(
            "{host}:{}:{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let pg = Pg {
            pool,
            settings: Arc::new(settings),
            replica: replica.into(),
        };
        pg.ping().await.map_err(|e| match e {
            Error::Unavailable(m) => {
                Error::Unavailable(format!("cannot connect to {}: {m}", pg.describe()))
            }
            e => e,
        })?;
        Ok(pg)
    }

    /// The URL without its password.
    pub fn describe(&self) -> String {
        self.settings.shown.clone()
    }

    /// This replica's name in `outbox.claimed_by`.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Runs `f` within [`CALL_DEADLINE`].
    pub(crate) async fn within<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(CALL_DEADLINE, f).await {
            Ok(r) => r,
            Err(_) => Err(Error::Deadline(CALL_DEADLINE)),
        }
    }

    /// A pooled connection (the caller applies the deadline).
    pub(crate) async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| {
            Error::Unavailable(format!("no connection to {}: {e}", self.settings.shown))
        })
    }

    /// Runs a blocking caller's `f` on a thread of its own with its own
    /// runtime and connection (the CLI has no runtime; a caller inside one
    /// must not block it).
    pub(crate) fn blocking<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Pg) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        let settings = (*self.settings).clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Task(format!("cannot start a runtime: {e}")))?;
                rt.block_on(async move {
                    let mut settings = settings;
                    settings.pool_size = 1;
                    let pg = Pg::connect(settings).await?;
                    f(pg).await
                })
            })
            .join()
            .map_err(|_| Error::Task("store thread panicked".into()))?
        })
    }

    /// The schema version recorded in the database (0: none).
    async fn version(&self, c: &Object) -> Result<i64> {
        let exists = c
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await?;
        if !get::<bool>(&exists, 0)? {
            return Ok(0);
        }
        let row = c
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await?;
        get(&row, 0)
    }

    /// Applies the migrations the database lacks, under an advisory lock
    /// (replicas starting together migrate once). Returns how many.
    pub async fn migrate(&self) -> Result<usize> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(7262000001)", &[])
                .await?;
            let exists = tx
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
                .await?;
            if !get::<bool>(&exists, 0)? {
                tx.batch_execute(
                    "CREATE TABLE schema_migrations (
                        version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
                )
                .await?;
            }
            let row = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                    &[],
                )
                .await?;
            let current: i64 = get(&row, 0)?;
            migrate::check_not_newer(current, POSTGRES)?;
            let mut n = 0;
            for (version, name, sql) in POSTGRES.iter().filter(|m| m.0 > current) {
                tx.batch_execute(sql).await.map_err(|e| {
                    Error::Schema(format!(
                        "postgres migration {version:04}_{name} failed: {}",
                        Error::from(e)
                    ))
                })?;
                tx.execute(
                    "INSERT INTO schema_migrations(version, name, applied_at) VALUES ($1, $2, $3)",
                    &[version, name, &now()],
                )
                .await?;
                n += 1;
            }
            tx.commit().await?;
            Ok(n)
        })
        .await
    }

    /// Refuses a database whose schema is not this build's
    /// (`migrate_on_start = false`).
    pub async fn check_schema(&self) -> Result<()> {
        self.within(async {
            let c = self.client().await?;
            let current = self.version(&c).await?;
            migrate::check_not_newer(current, POSTGRES)?;
            if current < migrate::latest(POSTGRES) {
                return Err(Error::Schema(format!(
                    "{} is at schema version {current}, this gpuops needs {}; run `gpuops store migrate`",
                    self.describe(),
                    migrate::latest(POSTGRES)
                )));
            }
            Ok(())
        })
        .await
    }

    /// Hands back every outbox row this replica still holds (at a graceful
    /// stop), so other replicas need not wait for the leases to end.
    pub async fn release_mine(&self) -> Result<u64> {
        self.exec(
            "UPDATE outbox SET claimed_by=NULL, lease_until=NULL WHERE claimed_by=$1",
            &[&&*self.replica],
        )
        .await
    }

    /// Answers when the database does (`/readyz`).
    pub async fn ping(&self) -> Result<()> {
        self.within(async {
            let c = self.client().await?;
            c.execute("SELECT 1", &[]).await?;
            Ok(())
        })
        .await
    }

    /// Rows in one of the store's tables.
    pub async fn count_rows(&self, table: &'static str) -> Result<i64> {
        let table = crate::store::copy::known_table(table)?;
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one(&format!("SELECT COUNT(*)::BIGINT FROM {table}"), &[])
                .await?;
            get(&row, 0)
        })
        .await
    }
}

/// One column of a row, as `T`; a type mismatch is an error, not a panic.
pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(Error::from)
}

/// `usize` → BIGINT.
pub(crate) fn big(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// For tests: the variable naming a PostgreSQL the tests may use.
pub const TEST_URL_VAR: &str = "GPUOPS_TEST_POSTGRES_URL";

/// For tests: creates a schema of its own in the database at `admin_url`
/// and returns a URL whose connections use it (`search_path`), so tests can
/// run in parallel on one server. The schema is left for the server's
/// throwaway data directory to take away.
#[doc(hidden)]
pub async fn fresh_schema_url(admin_url: &str) -> Result<String> {
    let (client, conn) = admin_url
        .parse::<tokio_postgres::Config>()
        .map_err(|e| Error::Schema(format!("{}: {e}", crate::secret::redact_url(admin_url))))?
        .connect(tokio_postgres::NoTls)
        .await?;
    let driver = tokio::spawn(conn);
    let schema = format!("t{:016x}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    drop(client);
    let _ = driver.await;
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    Ok(format!(
        "{admin_url}{sep}options=-c%20search_path%3D{schema}"
    ))
}

/// For tests: a fresh schema's URL in the PostgreSQL that [`TEST_URL_VAR`]
/// names. Fails (never skips) when the variable is unset.
#[doc(hidden)]
pub async fn test_url() -> Result<String> {
    let admin = std::env::var(TEST_URL_VAR).map_err(|_| {
        Error::Schema(format!(
            "{TEST_URL_VAR} is not set: PostgreSQL tests run under .ci/run (or `source .ci/postgres; pg_start`)"
        ))
    })?;
    fresh_schema_url(&admin).await
}

/// For tests: a migrated store at `url` (a loopback test server).
#[doc(hidden)]
pub async fn open_url(url: &str) -> Result<crate::store::Store> {
    let pg = Pg::connect(Settings::new(url, None, None, 8, Duration::from_secs(5))?).await?;
    pg.migrate().await?;
    Ok(crate::store::Store::postgres(pg))
}

/// For tests: a migrated store in a fresh schema (see [`test_url`]).
#[doc(hidden)]
pub async fn test_store() -> Result<crate::store::Store> {
    open_url(&test_url().await?).await
}

#[cfg(test)]
mod tests;
