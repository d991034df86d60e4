//! The installation directory: `--home DIR`, else `$ICE_HOME`, else `./.ice`.
//!
//! ```text
//! <home>/config.toml            what this installation is (format, log URL, checkpoint origin)
//! <home>/ice.db                 the embedded log (sqlite:ice.db)
//! <home>/keys/checkpoint.key    the checkpoint signing key (mode 0600)
//! <home>/keys/checkpoint.pub    its verifier key, to hand to auditors
//! <home>/policies/*.cedar       the Cedar policies that decide agents' requests
//!                               (`ice init` writes a commented starter, default.cedar)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use ice_authority::{PolicySet, Schema};
use ice_log::EventLog;
use ice_log::checkpoint::{NoteSigner, NoteVerifier};
use ice_log::sqlite::{Mode, SqliteLog};
use serde::{Deserialize, Serialize};

/// The marker that makes a directory an ICE home.
const HOME_FORMAT: u32 = 1;

/// The home's policy directory, relative to the home.
pub const POLICY_DIR: &str = "policies";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format of the home directory.
    pub home_format: u32,
    /// Where the log lives: `sqlite:PATH` (relative to the home).
    pub log: String,
    /// The checkpoint origin line and signing key name.
    pub origin: String,
    /// `[[operators]]`: who may call the operator HTTP API (`ice serve`), each token kept only
    /// as its SHA-256 (`ice token add --operator NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<TokenEntry>,
    /// `[[agents]]`: agents' tokens, for MCP at `/mcp` (refused on operator endpoints;
    /// `ice token add --agent NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<TokenEntry>,
    /// `[[metrics_readers]]`: tokens that may read `/metrics` of `ice serve` and nothing else
    /// (a Prometheus scraper's; `ice token add --metrics NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_readers: Vec<TokenEntry>,
    /// `[telemetry]`: OpenTelemetry export from `ice serve` (off unless an endpoint is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySection>,
}

/// `[telemetry]` of `config.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// The OTLP/HTTP collector (`http://127.0.0.1:4318`); traces go to `/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// Headers sent with each export, each read from an environment variable when `ice serve`
    /// starts (`{ "x-api-key" = "OTLP_KEY" }`): a collector's key stays out of config.toml.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers_env: std::collections::BTreeMap<String, String>,
}

/// One token of `[[operators]]` or `[[agents]]`: whose it is and its SHA-256 (hex); the token
/// itself is shown once, when it is made, and never stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The operator's (or agent's) name; an operator's actions are recorded as `operator:NAME`.
    pub name: String,
    /// SHA-256 of the token, 64 hex characters.
    pub token_sha256: String,
}

pub struct Home {
    pub dir: PathBuf,
    pub config: Config,
    /// Whether a log other than the configured one was opened (`--log`): the checkpoint this
    /// installation keeps is its own log's, not that one's.
    other_log: std::sync::atomic::AtomicBool,
}

/// Resolve the home directory from the flag, the environment, or the default.
pub fn resolve(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("ICE_HOME") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(".ice"),
    }
}

impl Home {
    /// Create a new home: config, keys and an empty log.
    pub fn init(dir: &Path, origin: Option<String>) -> Result<Home> {
        let existed = Home::check_new(dir)?;
        Home::make(dir, origin).inspect_err(|_| {
            // What was made goes again (the directory was empty or absent), so the same
            // command can be run once its cause (a full disk, say) is fixed.
            if existed {
                if let Ok(entries) = dir.read_dir() {
                    for e in entries.flatten() {
                        let p = e.path();
                        let _ = if p.is_dir() && !p.is_symlink() {
                            std::fs::remove_dir_all(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                    }
                }
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        })
    }

    /// Refuse a place that cannot become a new home; whether the (empty) directory exists.
    fn check_new(dir: &Path) -> Result<bool> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {
                if dir.join("config.toml").exists() {
                    bail!(
                        "{} is already an ICE home (config.toml exists); nothing was changed",
                        dir.display()
                    );
                }
                let mut entries = dir
                    .read_dir()
                    .with_context(|| format!("reading the directory {}", dir.display()))?;
                if entries.next().is_some() {
                    bail!(
                        "{} exists and is not empty; `ice init` only creates a new home",
                        dir.display()
                    );
                }
            }
            Ok(m) => bail!(
                "{} is {}, not a directory; `ice init --home DIR` creates a new home in DIR, a directory that does not exist yet or is empty; nothing was changed",
                dir.display(),
                if m.is_file() {
                    "a file"
                } else {
                    "not a regular file or directory"
                }
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        }
        Ok(true)
    }

    /// Make a home in `dir`, absent or empty.
    fn make(dir: &Path, origin: Option<String>) -> Result<Home> {
        let origin = match origin {
            Some(o) => o,
            None => {
                let mut id = [0u8; 6];
                getrandom::fill(&mut id).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
                format!("ice.local/{}", hex::encode(id))
            }
        };
        let signer = NoteSigner::generate(&origin)
            .map_err(|e| anyhow!("checkpoint origin {origin:?}: {e}"))?;
        std::fs::create_dir_all(dir.join("keys"))
            .with_context(|| format!("creating {}", dir.display()))?;
        write_private(
            &dir.join("keys/checkpoint.key"),
            &format!("{}\n", signer.to_secret_string()),
        )?;
        std::fs::write(
            dir.join("keys/checkpoint.pub"),
            format!("{}\n", signer.verifier()),
        )
        .with_context(|| format!("writing {}", dir.join("keys/checkpoint.pub").display()))?;
        let config = Config {
            home_format: HOME_FORMAT,
            log: "sqlite:ice.db".into(),
            origin,
            operators: Vec::new(),
            agents: Vec::new(),
            metrics_readers: Vec::new(),
            telemetry: None,
        };
        let text = toml::to_string(&config).context("encoding config.toml")?;
        SqliteLog::create(&dir.join("ice.db"))
            .with_context(|| format!("creating the log in {}", dir.display()))?;
        create_policy_dir(&dir.join(POLICY_DIR))?;
        // config.toml last: a home is a home only once everything else is in place.
        std::fs::write(dir.join("config.toml"), text)
            .with_context(|| format!("writing {}/config.toml", dir.display()))?;
        Ok(Home {
            dir: dir.to_path_buf(),
            config,
            other_log: Default::default(),
        })
    }

    /// Open an existing home; refuses a directory that is not one, and a config.toml with a
    /// token entry that cannot be used (see [`Home::credentials`]): every command that reads
    /// the config says so, not only `ice serve`, which uses the tokens.
    pub fn open(dir: &Path) -> Result<Home> {
        let h = Home::open_unchecked_tokens(dir)?;
        h.credentials()?;
        Ok(h)
    }

    /// The home directory, for `ice token revoke`, which edits config.toml as TOML: it is an
    /// ICE home's (a directory with a config.toml), whatever its entries hold, since a bad
    /// entry's removal may be what makes the config read again.
    pub fn dir_for_edit(dir: &Path) -> Result<PathBuf> {
        Home::config_text(dir)?;
        Ok(dir.to_path_buf())
    }

    fn config_text(dir: &Path) -> Result<String> {
        if let Ok(m) = std::fs::metadata(dir)
            && !m.is_dir()
        {
            bail!(
                "{} is not a directory, so not an ICE home; point --home / ICE_HOME at the installation's directory",
                dir.display()
            );
        }
        let cfg = dir.join("config.toml");
        match std::fs::metadata(&cfg) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} is not an ICE home (no config.toml); create one with `ice init --home {}` or point --home / ICE_HOME at one",
                dir.display(),
                dir.display()
            ),
            _ => read_text(&cfg, MAX_CONFIG_BYTES),
        }
    }

    /// [`Home::open`] without checking the token entries.
    pub fn open_unchecked_tokens(dir: &Path) -> Result<Home> {
        let cfg = dir.join("config.toml");
        let text = Home::config_text(dir)?;
        let config: Config =
            toml::from_str(&text).map_err(|e| config_error(&cfg, &text, e.message(), e.span()))?;
        if config.home_format != HOME_FORMAT {
            bail!(
                "{}: home_format {} is not supported (this ice reads {HOME_FORMAT})",
                cfg.display(),
                config.home_format
            );
        }
        Ok(Home {
            dir: dir.to_path_buf(),
            config,
            other_log: Default::default(),
        })
    }

    /// Open the log named by `url` (or the config's), read-only or for appends.
    pub async fn log(&self, url: Option<&str>, mode: Mode) -> Result<Arc<dyn EventLog>> {
        if url.is_some_and(|u| u != self.config.log) {
            self.other_log
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let url = url.unwrap_or(&self.config.log);
        open_log_url(url, mode, Some(&self.dir)).await
    }

    /// The directory whose `*.cedar` files are this installation's policies.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join(POLICY_DIR)
    }

    /// The policy directory, or an error saying that it is missing and how to create it (homes
    /// made before ICE kept policies have none).
    pub fn existing_policy_dir(&self) -> Result<PathBuf> {
        let dir = self.policy_dir();
        if !dir.exists() {
            bail!(
                "{} does not exist: this installation has no policy directory (it was made before \
                 ICE kept policies in the home); create it with `ice policy init --home {}`, which \
                 writes the commented starter policy {}, or with `mkdir {}` and your own *.cedar files",
                dir.display(),
                self.dir.display(),
                crate::policy::STARTER_POLICY_FILE,
                dir.display()
            );
        }
        Ok(dir)
    }

    /// Read, check and index this installation's policies against `schema`. Any error refuses
    /// the whole set, and the error lists every diagnostic as `FILE:LINE:COL: error: …`. The
    /// runtime commands decide requests with the set this returns.
    pub fn policies(&self, schema: &Schema) -> Result<PolicySet> {
        crate::policy::load(&self.existing_policy_dir()?, schema)
    }

    pub fn signer(&self) -> Result<NoteSigner> {
        let p = self.dir.join("keys/checkpoint.key");
        let s = read_text(&p, MAX_KEY_BYTES).context("reading the signing key")?;
        let signer = NoteSigner::parse(&s).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        // A checkpoint is kept forever: one signed by a key whose public half auditors do not
        // have would make the log fail verification for good. Sign only with the home's pair.
        let public = self.dir.join("keys/checkpoint.pub");
        let theirs = self.verifier()?.to_string();
        let ours = signer.verifier().to_string();
        if ours != theirs {
            bail!(
                "{} is not the signing half of {} (it verifies as {ours}, the home's public key is {theirs}): a checkpoint it signed would not verify, so nothing was signed; put back the key that matches",
                p.display(),
                public.display()
            );
        }
        Ok(signer)
    }

    pub fn verifier(&self) -> Result<NoteVerifier> {
        read_verifier(&self.dir.join("keys/checkpoint.pub"))
    }

    /// Where this installation keeps the last checkpoint it signed, outside the log (see
    /// [`ice_log::verify::SignedRecord`]): signing refuses a log that did not grow from it, and
    /// `ice verify` checks against it.
    /// `None` once a log other than the configured one was opened (`--log URL`): the record is
    /// that log's only.
    pub fn signed_record(&self) -> Option<ice_log::verify::SignedRecord> {
        (!self.other_log.load(std::sync::atomic::Ordering::SeqCst))
            .then(|| ice_log::verify::SignedRecord::at(self.dir.join("keys/last-checkpoint")))
    }

    /// The tokens `[[operators]]`, `[[agents]]` and `[[metrics_readers]]` list, for the
    /// operator API, `/mcp` and `/metrics`. An entry that cannot be used (a bad name, a
    /// `token_sha256` that is not 64 hex characters, a token another entry has: see
    /// [`ice_api::Credentials::add`]) is an error naming config.toml, the entry and what is
    /// wrong.
    pub fn credentials(&self) -> Result<ice_api::Credentials> {
        let file = self.dir.join("config.toml");
        let mut c = ice_api::Credentials::new();
        for (role, table, flag, entries) in [
            (
                ice_api::Role::Operator,
                "operators",
                "operator",
                &self.config.operators,
            ),
            (ice_api::Role::Agent, "agents", "agent", &self.config.agents),
            (
                ice_api::Role::Metrics,
                "metrics_readers",
                "metrics",
                &self.config.metrics_readers,
            ),
        ] {
            for (i, e) in entries.iter().enumerate() {
                c.add(role, &e.name, &e.token_sha256).map_err(|why| {
                    anyhow!(
                        "{}: [[{table}]] entry {}: {why}; fix or remove the entry (`ice token revoke --{flag} NAME` removes every token of NAME)",
                        file.display(),
                        i + 1
                    )
                })?;
            }
        }
        Ok(c)
    }
}

/// Create a policy directory holding the starter policy ([`crate::policy::STARTER_POLICY`]);
/// refuses a directory that already exists, so no policy is ever overwritten. Returns the
/// starter file's path.
pub fn create_policy_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir(dir).with_context(|| {
        if dir.exists() {
            format!("{} already exists; nothing was changed", dir.display())
        } else {
            format!("creating {}", dir.display())
        }
    })?;
    let file = dir.join(crate::policy::STARTER_POLICY_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(crate::policy::STARTER_POLICY.as_bytes())?;
            f.sync_all()
        })
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

pub fn read_verifier(path: &Path) -> Result<NoteVerifier> {
    let s = read_text(path, MAX_KEY_BYTES).context("reading the verifier key")?;
    NoteVerifier::parse(&s).map_err(|e| anyhow!("{}: {e}", path.display()))
}

#[cfg(unix)]
fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

#[cfg(not(unix))]
fn write_private(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

/// The most a home's config.toml may hold.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The most a key file (`keys/checkpoint.key`, `.pub`, `--key`) may hold.
pub const MAX_KEY_BYTES: u64 = 64 << 10;

/// [`read_regular`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_regular(path, max)?)
        .map_err(|_| anyhow!("{}: not UTF-8 text", path.display()))
}

/// The bytes of a file ICE reads (given on the command line, or one of the home's): a regular
/// file of at most `max` bytes (a device or a pipe has no size to check and may never end).
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{}: more than {max} bytes", path.display());
    }
    Ok(bytes)
}

/// Open a log by URL: `sqlite:PATH` (relative to `base`, the home, when given),
/// `postgres://USER@HOST:PORT/DB[?schema=NAME]` (tables in schema NAME, default `ice`), or
/// `nats://HOST:PORT[?prefix=NAME]` (streams and buckets named from NAME, default `ice`).
/// A shared backend is created on first use by a command that writes; opened to read
/// (`Mode::ReadOnly`: `verify`, `migrate --from`, …) it must already hold a log, and nothing is
/// created (a mistyped schema or prefix is an error, not an empty log that verifies).
pub async fn open_log_url(url: &str, mode: Mode, base: Option<&Path>) -> Result<Arc<dyn EventLog>> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        let p = Path::new(path);
        let p = match base {
            Some(b) if !p.is_absolute() => b.join(p),
            _ => p.to_path_buf(),
        };
        let log = SqliteLog::open(&p, mode).with_context(|| format!("opening the log {url}"))?;
        return Ok(Arc::new(log));
    }
    // A second `@` in the authority leaves where the password ends to each client library's
    // reading (one took part of a password for the host, and printed it): refused, and the
    // URL not repeated.
    if let Some(s) = url.find("://") {
        let authority = &url[s + 3..];
        let authority = &authority[..authority.find(['/', '?']).unwrap_or(authority.len())];
        if authority.matches('@').count() > 1 {
            bail!(
                "the log URL has more than one `@` before its host: write an `@` inside a user name or password as %40"
            );
        }
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (conn, schema) = split_param(url, "schema");
        let schema = Some(schema.as_deref().unwrap_or("ice"));
        let log = match mode {
            Mode::ReadOnly => ice_log::postgres::PgLog::connect_existing(&conn, schema).await,
            Mode::ReadWrite => ice_log::postgres::PgLog::connect(&conn, schema).await,
        }
        .map_err(|e| opening_failed(url, e.into()))?;
        return Ok(Arc::new(log));
    }
    if url.starts_with("nats://") {
        let (conn, prefix) = split_param(url, "prefix");
        let prefix = prefix.as_deref().unwrap_or("ice");
        let log = match mode {
            Mode::ReadOnly => ice_log::nats::NatsLog::connect_existing(&conn, prefix).await,
            Mode::ReadWrite => ice_log::nats::NatsLog::connect(&conn, prefix).await,
        }
        .map_err(|e| opening_failed(url, e.into()))?;
        return Ok(Arc::new(log));
    }
    // Not repeated: a connection string of another form (`host=… password=…`) may hold a
    // password where no pattern here would find it.
    bail!(
        "the log URL is not of a known form; use sqlite:PATH, postgres://… or nats://… (it is not repeated here, as it may hold a password)"
    )
}

/// `url` without its query parameter `name`, and that parameter's value.
fn split_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut value = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_string());
                false
            }
            _ => !kv.is_empty(),
        })
        .collect();
    let conn = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (conn, value)
}

/// The damage an error reports (a `LogError::Corrupt` anywhere in its chain), if any.
pub(crate) fn corrupt_in(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<ice_log::LogError>() {
            Some(ice_log::LogError::Corrupt { what }) => Some(what.clone()),
            _ => None,
        })
}

/// Opening a shared log failed: the error, with the URL's password kept out of every part of
/// it (the client libraries' own messages repeat the URL they were given).
fn opening_failed(url: &str, e: anyhow::Error) -> anyhow::Error {
    let hide = |mut text: String| {
        for secret in secrets(url) {
            text = text.replace(&secret, "***");
        }
        text
    };
    let place = format!("opening the log {}", redact(url));
    // Damage stays a `LogError::Corrupt` (its text kept clear of secrets too), so that
    // `verify` and `checkpoint` give their verdict on it (exit 5), as for the embedded log.
    if let Some(what) = corrupt_in(&e) {
        return anyhow::Error::new(ice_log::LogError::Corrupt { what: hide(what) }).context(place);
    }
    anyhow!("{place}: {}", hide(format!("{e:#}")))
}

/// The secrets a log URL carries: in its user info (`user:PASSWORD@`, or a NATS `TOKEN@`) and
/// as a `password=`, `token=` or `secret=` query parameter.
fn secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    // The user info is in the authority: after `://`, before the path or query (an `@` in
    // the query is not one).
    if let Some(s) = url.find("://")
        && let authority = &url[s + 3..]
        && let authority = &authority[..authority.find(['/', '?']).unwrap_or(authority.len())]
        && let Some(at) = authority.rfind('@')
    {
        let info = &authority[..at];
        match info.split_once(':') {
            Some((_, pw)) if !pw.is_empty() => out.push(pw.to_string()),
            None if url.starts_with("nats://") && !info.is_empty() => out.push(info.to_string()),
            _ => {}
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for kv in query.split('&') {
            if let Some((k, v)) = kv.split_once('=')
                && matches!(k, "password" | "token" | "secret")
                && !v.is_empty()
            {
                out.push(v.to_string());
            }
        }
    }
    out
}

/// A URL with any password replaced, for messages.
pub(crate) fn redact(url: &str) -> String {
    let mut text = url.to_string();
    for secret in secrets(url) {
        text = text.replace(&secret, "***");
    }
    text
}

/// Whether `text` holds something that may be a credential (`ice_` in any case, what `ice
/// token add` prints; a `Bearer` or `token` word, which every `token_sha256` line has).
fn token_like(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("ice_") || t.contains("bearer") || t.contains("token")
}

/// `config.toml` is not a valid ICE config: the file, line and column, what is wrong, and the
/// line itself unless it may hold a token. (The TOML reader's own rendering repeats the line,
/// and `token_sha256 = ice_…`, a token pasted unquoted where its digest belongs, is such an
/// error: the token would be printed by every command.)
pub(crate) fn config_error(
    file: &Path,
    text: &str,
    message: &str,
    span: Option<std::ops::Range<usize>>,
) -> anyhow::Error {
    let message: Vec<String> = message
        .trim()
        .split(' ')
        .map(|w| {
            if w.to_ascii_lowercase().contains("ice_") {
                format!("[{} characters not shown]", w.chars().count())
            } else {
                w.to_string()
            }
        })
        .collect();
    let message = message.join(" ").replace('\n', "; ");
    let Some(at) = span.map(|s| s.start.min(text.len())) else {
        return anyhow!("{} is not a valid ICE config: {message}", file.display());
    };
    let at = (0..=at)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let before = &text[..at];
    let line_no = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[start..at].chars().count() + 1;
    let line = text[start..].lines().next().unwrap_or("");
    let shown = if !token_like(line) {
        line.to_string()
    } else if let Some((key, value)) = line.split_once('=') {
        format!(
            "{}= … ({} characters, not shown: it may be a token)",
            key,
            value.trim().chars().count()
        )
    } else {
        format!(
            "({} characters, not shown: it may hold a token)",
            line.chars().count()
        )
    };
    anyhow!(
        "{}:{line_no}:{col}: not a valid ICE config: {message}\n    {shown}",
        file.display()
    )
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_log_urls_secrets_are_redacted_and_nothing_else() {
        for (url, shown) in [
            (
                "postgres://u:pw@h:5432/db?user=a@b",
                "postgres://u:***@h:5432/db?user=a@b",
            ),
            (
                "postgres://u@h/db?password=pw",
                "postgres://u@h/db?password=***",
            ),
            ("nats://tok@h:4222?prefix=p", "nats://***@h:4222?prefix=p"),
            ("nats://u:pw@h:4222", "nats://u:***@h:4222"),
            // An `@` after the authority is not user information.
            ("nats://h:4222?prefix=a@b", "nats://h:4222?prefix=a@b"),
            ("postgres://u@h/db?note=x@y", "postgres://u@h/db?note=x@y"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
