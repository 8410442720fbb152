//! Operations plumbing shared by the binaries: one Prometheus recorder per process, served on
//! any number of HTTP listeners, and log set-up.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[derive(Debug, thiserror::Error)]
/// Why the metrics endpoint could not start.
pub enum OpsError {
    #[error("another metrics recorder is installed in this process")]
    /// Another Prometheus recorder already owns this process.
    RecorderTaken,
    #[error("binding metrics endpoint {addr}: {source}")]
    /// The listener could not be bound.
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
}

static HANDLE: OnceLock<Result<PrometheusHandle, ()>> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Agent and ingest may share a
/// process (tests, the demo); both then report into the same registry.
pub fn prometheus() -> Result<PrometheusHandle, OpsError> {
    HANDLE
        .get_or_init(|| {
            // Latency histograms get buckets from 1 ms to 30 s instead of summaries, so they
            // aggregate across instances.
            let builder = PrometheusBuilder::new().set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]);
            let builder = match builder {
                Ok(b) => b,
                Err(_) => return Err(()),
            };
            builder.install_recorder().map_err(|_| ())
        })
        .clone()
        .map_err(|()| OpsError::RecorderTaken)
}

/// Serves `GET /metrics` in Prometheus text format on `addr` until `shutdown` resolves.
/// Returns the bound address (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, OpsError> {
    let handle = prometheus()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| OpsError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = handle.clone();
            async move {
                // Histograms are kept as buckets; upkeep drains their pending samples.
                h.run_upkeep();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    h.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

/// The wall clock as UTC nanoseconds since the Unix epoch, the unit of every capture and
/// arrival time in the protocol (0 before 1970, saturating in 2262).
pub fn now_utc_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Structured logs to stderr; `RUST_LOG` overrides `default_filter`. Safe to call twice.
pub fn init_logging(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// rustls needs one process-wide crypto provider (ring here); every binary and test calls
/// this before building a TLS config. A second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves on SIGHUP (`systemctl reload`); never elsewhere.
pub async fn reload_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            hup.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}

/// Resolves on ctrl-c or SIGTERM (systemd's stop signal).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Reading certificates and keys from PEM files, for both services and the tests.
pub mod pem {
    use std::path::{Path, PathBuf};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    #[derive(Debug, thiserror::Error)]
    /// Why certificates or a key could not be loaded.
    pub enum PemError {
        #[error("reading {path}: {source}")]
        /// The file could not be read or holds no valid PEM.
        Read {
            /// The file.
            path: PathBuf,
            #[source]
            /// rustls' PEM error.
            source: rustls::pki_types::pem::Error,
        },
        #[error("{path} holds no certificate")]
        /// The file holds no certificate.
        NoCertificate {
            /// The file.
            path: PathBuf,
        },
        /// A development certificate where `--allow-dev-pki` was not given.
        #[error(
            "{path} is from the development PKI (relay-devcerts); it is refused unless --allow-dev-pki is given (demos and tests only)"
        )]
        Development {
            /// The file.
            path: PathBuf,
        },
    }

    /// Every certificate in a PEM file (a chain: leaf first); at least one.
    pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| PemError::Read {
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(PemError::NoCertificate {
                path: path.to_owned(),
            });
        }
        Ok(certs)
    }

    /// Subject organisation of every certificate the development PKI (`relay-devcerts`) makes:
    /// how a service recognises one and refuses it outside development.
    pub const DEV_PKI_ORGANIZATION: &str = "Ambulance relay development PKI";

    /// Whether a certificate was made by the development PKI (its subject organisation is
    /// [`DEV_PKI_ORGANIZATION`]). An unparseable certificate is not called one.
    pub fn is_development(cert: &CertificateDer<'_>) -> bool {
        x509_parser::parse_x509_certificate(cert.as_ref()).is_ok_and(|(_, c)| {
            c.subject()
                .iter_organization()
                .any(|o| o.as_str().is_ok_and(|o| o == DEV_PKI_ORGANIZATION))
        })
    }

    /// When a certificate stops being valid (its notAfter, Unix seconds); `None` when it does
    /// not parse.
    pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
        x509_parser::parse_x509_certificate(cert.as_ref())
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp())
    }

    /// The earliest notAfter of the certificates in a PEM file (a chain or a CA bundle).
    pub fn earliest_expiry(path: &Path) -> Result<Option<i64>, PemError> {
        Ok(load_certs(path)?.iter().filter_map(not_after).min())
    }

    /// Refuses development certificates among the PEM `files` unless `allowed`
    /// (`--allow-dev-pki`, for demos and tests): a service in production must never trust or
    /// present a key that was generated on a developer's machine.
    pub fn refuse_development(files: &[&Path], allowed: bool) -> Result<(), PemError> {
        if allowed {
            return Ok(());
        }
        for path in files {
            if load_certs(path)?.iter().any(is_development) {
                return Err(PemError::Development {
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    /// The first private key in a PEM file.
    pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
        PrivateKeyDer::from_pem_file(path).map_err(|source| PemError::Read {
            path: path.to_owned(),
            source,
        })
    }
}

/// Files that hold keys or patient data: owner-only from the moment they exist.
pub mod private {
    use std::io;
    use std::path::Path;

    /// Creates `dir` and its missing parents owner-only (0700 on Unix).
    pub fn create_dir(dir: &Path) -> io::Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)
    }

    /// Makes sure `path` exists and only its owner can read or write it (0600 on Unix): a
    /// missing file is created empty with that mode (so it is never readable by others, not
    /// even briefly), an existing one has its mode tightened. Missing parent directories are
    /// created owner-only.
    pub fn prepare_file(path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        drop(options.open(path)?);
        #[cfg(unix)]
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(())
    }

    /// Writes `contents` to a file only its owner can read (see [`prepare_file`]).
    pub fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
        prepare_file(path)?;
        std::fs::write(path, contents)
    }

    #[cfg(test)]
    mod tests {
        #[cfg(unix)]
        #[test]
        fn files_and_directories_are_owner_only() {
            use super::*;
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("a/b/secret.key");
            write_file(&file, b"k").unwrap();
            assert_eq!(mode(&file), 0o600);
            assert_eq!(mode(&dir.path().join("a/b")), 0o700);
            let loose = dir.path().join("loose");
            std::fs::write(&loose, b"x").unwrap();
            std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
            prepare_file(&loose).unwrap();
            assert_eq!(mode(&loose), 0o600);
            assert_eq!(std::fs::read(&loose).unwrap(), b"x", "contents kept");
        }
    }
}

/// Configuration: one struct per service, read from a TOML file and overridden by flags, with
/// errors that name the file, the key and the value.
pub mod config {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// What a duration looks like in files and flags.
    pub const DURATION_HINT: &str = "a duration such as \"500ms\", \"10s\" or \"72h\"";

    /// Why a configuration was not accepted.
    #[derive(Debug, thiserror::Error)]
    pub enum ConfigError {
        /// The file could not be read.
        #[error("reading config {path}: {source}")]
        Read {
            /// The file.
            path: PathBuf,
            /// The operating system's error.
            #[source]
            source: std::io::Error,
        },
        /// The file is not TOML of this service's shape (syntax, unknown key, wrong type).
        #[error("parsing config {path}: {source}")]
        Parse {
            /// The file.
            path: PathBuf,
            /// toml's error, with line and column.
            #[source]
            source: Box<toml::de::Error>,
        },
        /// The file uses a key that an earlier version read and this one no longer does.
        #[error("config {path}: `{old}` is no longer read; use `{new}`, {hint}")]
        Renamed {
            /// The file.
            path: PathBuf,
            /// The old key (dotted path; `[]` stands for any element of an array).
            old: &'static str,
            /// Its replacement.
            new: &'static str,
            /// What the new key takes.
            hint: &'static str,
        },
        /// A value is outside its bounds.
        #[error("invalid config: {key} = {value}: {reason}")]
        Invalid {
            /// The key (dotted path).
            key: String,
            /// The value given.
            value: String,
            /// What it must be.
            reason: String,
        },
        /// The command line could not be parsed, or asked for `--help` or `--version` (call
        /// `exit()` on it to print what it holds).
        #[error(transparent)]
        Cli(#[from] clap::Error),
    }

    /// Refuses the first of `values` that is zero (durations, counts), naming its key.
    pub fn positive<T>(values: &[(&str, T)]) -> Result<(), ConfigError>
    where
        T: PartialEq + Default + std::fmt::Debug,
    {
        match values.iter().find(|(_, v)| *v == T::default()) {
            Some((key, value)) => invalid(key, value, "must be positive"),
            None => Ok(()),
        }
    }

    /// For binaries: the configuration their command line asks for (see [`load_from`]);
    /// `--help`, `--version` and command-line errors are printed and end the process.
    pub fn load_or_exit<C: ServiceConfig>(args: Vec<std::ffi::OsString>) -> Result<C, ConfigError> {
        exit_on_cli(load_from(args))
    }

    /// Refuses an out-of-bounds value, naming its key and the value.
    pub fn invalid<T>(
        key: &str,
        value: &dyn std::fmt::Debug,
        reason: &str,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            key: key.into(),
            value: format!("{value:?}"),
            reason: reason.into(),
        })
    }

    /// For binaries: a command-line error, `--help` or `--version` is printed and ends the
    /// process (as clap does); anything else is passed on.
    pub fn exit_on_cli<T>(result: Result<T, ConfigError>) -> Result<T, ConfigError> {
        match result {
            Err(ConfigError::Cli(e)) => e.exit(),
            other => other,
        }
    }

    /// A key that was renamed: `(old, new)`, dotted paths where `[]` matches every element of
    /// an array of tables (e.g. `bearers[].budget_period_s`).
    pub type Rename = (&'static str, &'static str);

    fn find_key(value: &toml::Value, path: &[&str]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return true;
        };
        let (name, each) = match first.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (*first, false),
        };
        let Some(v) = value.as_table().and_then(|t| t.get(name)) else {
            return false;
        };
        match (each, v) {
            (true, toml::Value::Array(items)) => items.iter().any(|i| find_key(i, rest)),
            (true, _) => false,
            (false, v) => find_key(v, rest),
        }
    }

    /// Parses TOML text; `path` only names the source in errors. A key listed in `renames`
    /// is refused with a message naming its replacement (the durations' new keys take
    /// [`DURATION_HINT`]).
    pub fn parse_toml<T: serde::de::DeserializeOwned>(
        text: &str,
        path: &Path,
        renames: &[Rename],
    ) -> Result<T, ConfigError> {
        let parse = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let value: toml::Value = toml::from_str(text).map_err(parse)?;
        for &(old, new) in renames {
            let parts: Vec<&str> = old.split('.').collect();
            if find_key(&value, &parts) {
                return Err(ConfigError::Renamed {
                    path: path.to_owned(),
                    old,
                    new,
                    hint: DURATION_HINT,
                });
            }
        }
        toml::from_str(text).map_err(parse)
    }

    /// Reads and parses a TOML file (see [`parse_toml`]).
    pub fn read_toml<T: serde::de::DeserializeOwned>(
        path: &Path,
        renames: &[Rename],
    ) -> Result<T, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse_toml(&text, path, renames)
    }

    /// A service's configuration: one struct for the TOML file and the flags (serde and
    /// clap), with its renamed keys and bounds.
    pub trait ServiceConfig:
        clap::Parser + serde::de::DeserializeOwned + serde::Serialize + Default
    {
        /// Keys of earlier versions and their replacements.
        const RENAMED: &'static [Rename];
        /// The file `--config` named, if any.
        fn config_file(&self) -> Option<&Path>;
        /// Checks every bound.
        fn validate(&self) -> Result<(), ConfigError>;
        /// Applies command-line shortcuts that are not keys (after file and flags merged).
        fn apply_shortcuts(&mut self) {}

        /// Parses a configuration file (renamed keys are refused with their replacement).
        fn from_file(path: &Path) -> Result<Self, ConfigError> {
            read_toml(path, Self::RENAMED)
        }

        /// Parses TOML text; `path` names it in errors.
        fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
            parse_toml(text, path, Self::RENAMED)
        }

        /// The configuration a command line asks for (see [`load_from`]).
        fn load_from<I, T>(args: I) -> Result<Self, ConfigError>
        where
            I: IntoIterator<Item = T>,
            T: Into<std::ffi::OsString> + Clone,
        {
            load_from(args)
        }
    }

    /// The Prometheus endpoint of a service (`[metrics]`).
    #[derive(
        Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, clap::Args,
    )]
    #[serde(deny_unknown_fields, default)]
    pub struct MetricsConfig {
        /// Prometheus endpoint (`GET /metrics`); none when absent.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[arg(id = "metrics.listen", long = "metrics-listen", value_name = "ADDR")]
        pub listen: Option<std::net::SocketAddr>,
    }

    /// The configuration a command line asks for: the defaults, overridden by the file that
    /// `--config` names, overridden by every other flag given (clap's update semantics: an
    /// absent flag keeps the file's value); then validated. `--help` and `--version` come
    /// back as [`ConfigError::Cli`].
    pub fn load_from<C, I, T>(args: I) -> Result<C, ConfigError>
    where
        C: ServiceConfig,
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut flags = C::default();
        flags.try_update_from(&args)?;
        let mut cfg = match flags.config_file() {
            Some(path) => C::from_file(path)?,
            None => C::default(),
        };
        cfg.try_update_from(&args)?;
        cfg.apply_shortcuts();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks a commented example file (see [`uncomment_example`]): as shipped and with every
    /// setting uncommented it must parse to the defaults, which must be valid, and every key
    /// of every section must appear in it. For the services' tests.
    pub fn check_example<C>(path: &Path) -> Result<(), String>
    where
        C: ServiceConfig + PartialEq + std::fmt::Debug,
    {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let as_shipped = C::from_toml(&text, path).map_err(|e| e.to_string())?;
        if as_shipped != C::default() {
            return Err(format!("{} as shipped is not the defaults", path.display()));
        }
        let uncommented = uncomment_example(&text);
        let every_key = C::from_toml(&uncommented, path).map_err(|e| e.to_string())?;
        if every_key != C::default() {
            return Err(format!(
                "{}: a value shown differs from its default:\n{every_key:#?}",
                path.display()
            ));
        }
        every_key.validate().map_err(|e| e.to_string())?;
        let shown: toml::Table = toml::from_str(&uncommented).map_err(|e| e.to_string())?;
        let defaults = toml::to_string(&C::default()).map_err(|e| e.to_string())?;
        let all: toml::Table = toml::from_str(&defaults).map_err(|e| e.to_string())?;
        for (section, value) in &all {
            // A section whose every default is "absent" (metrics) has nothing to show.
            let Some(want) = value.as_table().filter(|t| !t.is_empty()) else {
                continue;
            };
            let have = shown.get(section).and_then(toml::Value::as_table);
            for key in want.keys() {
                if !have.is_some_and(|h| h.contains_key(key)) {
                    return Err(format!("{section}.{key} missing from {}", path.display()));
                }
            }
        }
        Ok(())
    }

    /// Checks that every flag of `C` has help text and that its command is consistent (no
    /// clashing ids or names). For the services' tests.
    pub fn check_flags<C: ServiceConfig>() -> Result<(), String> {
        let cmd = C::command();
        cmd.clone().debug_assert();
        for arg in C::command_for_update().get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                return Err(format!("flag {id} has no help text"));
            }
        }
        Ok(())
    }

    /// Parses a flag's duration (`500ms`, `10s`, `72h`, `1h 30m`).
    pub fn parse_duration(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text).map_err(|e| format!("{e}; expected {DURATION_HINT}"))
    }

    /// The commented example file, with every setting line uncommented: example files show
    /// every key as `# key = default` (and prose as `## ...`), so this text must parse to
    /// the defaults.
    pub fn uncomment_example(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if !l.starts_with("##") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[derive(Debug, serde::Deserialize, PartialEq, Default)]
        #[serde(deny_unknown_fields, default)]
        struct Sample {
            #[serde(with = "humantime_serde_like")]
            wait: Duration,
            items: Vec<Item>,
        }

        #[derive(Debug, serde::Deserialize, PartialEq, Default)]
        #[serde(deny_unknown_fields, default)]
        struct Item {
            n: u32,
        }

        mod humantime_serde_like {
            use std::time::Duration;
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<Duration, D::Error> {
                let s: String = serde::Deserialize::deserialize(d)?;
                humantime::parse_duration(&s).map_err(serde::de::Error::custom)
            }
        }

        const RENAMES: &[Rename] = &[("wait_ms", "wait"), ("items[].n_s", "items[].n")];

        #[test]
        fn renamed_keys_are_refused_naming_the_new_one() {
            let p = Path::new("x.toml");
            let ok: Sample = parse_toml("wait = \"1s\"\n[[items]]\nn = 2", p, RENAMES).unwrap();
            assert_eq!(ok.wait, Duration::from_secs(1));
            let err = parse_toml::<Sample>("wait_ms = 5", p, RENAMES).unwrap_err();
            assert!(err.to_string().contains("use `wait`"), "{err}");
            let err = parse_toml::<Sample>("[[items]]\nn = 1\n[[items]]\nn_s = 3", p, RENAMES)
                .unwrap_err();
            assert!(err.to_string().contains("`items[].n_s`"), "{err}");
            let err = parse_toml::<Sample>("wiat = \"1s\"", p, RENAMES).unwrap_err();
            assert!(
                err.to_string().contains("wiat"),
                "unknown keys still named: {err}"
            );
        }

        #[test]
        fn durations_and_example_files() {
            assert_eq!(
                parse_duration("72h").unwrap(),
                Duration::from_secs(72 * 3600)
            );
            assert!(parse_duration("5 parsecs").unwrap_err().contains("500ms"));
            let text = "## prose stays\n# key = 1\nreal = 2\n#not = 3";
            assert_eq!(
                uncomment_example(text),
                "## prose stays\nkey = 1\nreal = 2\n#not = 3"
            );
        }
    }
}

/// Implements `From` for every redb error type on an error enum with a variant holding a
/// `redb::Error`, so `?` works on any redb call. Both services store with redb; the macro
/// expands in the caller, which depends on redb itself.
#[macro_export]
macro_rules! from_redb_errors {
    ($error:ty, $variant:ident) => {
        $crate::from_redb_errors!(
            @each $error, $variant,
            ::redb::DatabaseError,
            ::redb::TransactionError,
            ::redb::TableError,
            ::redb::StorageError,
            ::redb::CommitError
        );
    };
    (@each $error:ty, $variant:ident, $($t:ty),*) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                Self::$variant(e.into())
            }
        }
    )*};
}
