//! Who may see what: users with argon2 password hashes and vehicle scopes (read from a TOML
//! file), login throttling, and bounded server-side sessions behind a random cookie.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use serde::Deserialize;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "edweb_session";

/// Why the users file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The file could not be read.
    #[error("reading users file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a users file.
    #[error("parsing users file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's error, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A user entry is unusable.
    #[error("users file {path}: user {user:?}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The user's name.
        user: String,
        /// What is wrong.
        reason: String,
    },
    /// Hashing a password failed.
    #[error("hashing the password: {0}")]
    Hash(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    password_hash: String,
    vehicles: Vec<String>,
}

/// One user: the hash to check and the vehicles the user may see.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    password_hash: String,
    scope: Scope,
}

/// Vehicles a user may see: exact ids, `prefix*` patterns or `*`.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    patterns: Vec<String>,
}

impl Scope {
    /// A scope of these patterns.
    pub fn new(patterns: Vec<String>) -> Self {
        Self { patterns }
    }

    /// Whether `vehicle` is in scope.
    pub fn allows(&self, vehicle: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => vehicle.starts_with(prefix),
            None => p == vehicle,
        })
    }
}

/// Hashes `password` as an argon2id PHC string for the users file.
pub fn hash_password(password: &str) -> Result<String, UsersError> {
    let mut salt = [0_u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| UsersError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Hash(e.to_string()))
}

/// Reads and checks a users file.
pub fn read_users(path: &Path) -> Result<Vec<User>, UsersError> {
    let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: UsersFile = toml::from_str(&text).map_err(|e| UsersError::Parse {
        path: path.to_owned(),
        source: Box::new(e),
    })?;
    let invalid = |user: &str, reason: &str| UsersError::Invalid {
        path: path.to_owned(),
        user: user.to_owned(),
        reason: reason.to_owned(),
    };
    let mut users: Vec<User> = Vec::with_capacity(file.user.len());
    for u in file.user {
        let name_ok = !u.name.is_empty()
            && u.name.len() <= 64
            && u.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
        if !name_ok {
            return Err(invalid(&u.name, "names are 1-64 of A-Z a-z 0-9 - _ . @"));
        }
        if users.iter().any(|o| o.name == u.name) {
            return Err(invalid(&u.name, "listed twice"));
        }
        PasswordHash::new(&u.password_hash)
            .map_err(|e| invalid(&u.name, &format!("password_hash is not a PHC string: {e}")))?;
        if u.vehicles.is_empty() {
            return Err(invalid(
                &u.name,
                "vehicles is empty: the user could see nothing",
            ));
        }
        users.push(User {
            name: u.name,
            password_hash: u.password_hash,
            scope: Scope::new(u.vehicles),
        });
    }
    Ok(users)
}

/// A logged-in user, as handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    /// Login name.
    pub user: String,
    /// What the user may see.
    pub scope: Scope,
}

/// Why a login was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginRefused {
    /// Unknown user or wrong password (not told apart, to the client).
    BadCredentials,
    /// Too many failures; try again after this long.
    LockedOut(Duration),
}

#[derive(Debug)]
struct Held {
    session: Session,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct SessionTable {
    by_token: HashMap<String, Held>,
    order: VecDeque<String>,
    failures: HashMap<String, Failures>,
}

/// Users, sessions and login throttling.
#[derive(Debug)]
pub struct Auth {
    users: HashMap<String, User>,
    table: Mutex<SessionTable>,
    ttl: Duration,
    max_sessions: usize,
    max_failures: u32,
    lockout: Duration,
    /// Argon2 is deliberately expensive: at most two verifications run at once, so a login
    /// flood costs two cores' worth of waiting logins, not the live view.
    verifying: tokio::sync::Semaphore,
    /// Checked for unknown users, so their answer takes as long as a wrong password.
    dummy_hash: String,
}

impl Auth {
    /// Sessions for `users`.
    pub fn new(users: Vec<User>, cfg: &super::config::AuthConfig) -> Result<Arc<Self>, UsersError> {
        Ok(Arc::new(Self {
            users: users.into_iter().map(|u| (u.name.clone(), u)).collect(),
            table: Mutex::new(SessionTable::default()),
            ttl: cfg.session_ttl,
            max_sessions: cfg.max_sessions,
            max_failures: cfg.max_failures,
            lockout: cfg.lockout,
            verifying: tokio::sync::Semaphore::new(2),
            dummy_hash: hash_password("no user has this password")?,
        }))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SessionTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks a login; on success returns the new session's token.
    pub async fn login(&self, name: &str, password: &str) -> Result<String, LoginRefused> {
        let now = Instant::now();
        {
            let mut table = self.table();
            if let Some(until) = table
                .failures
                .get(name)
                .and_then(|f| f.locked_until)
                .filter(|until| *until > now)
            {
                return Err(LoginRefused::LockedOut(until - now));
            }
            // Every attempt counts as a failure until it succeeds, so concurrent guesses
            // cannot all slip past the bound before the first is judged. Only known users
            // are tracked, so the table is bounded by the users file.
            if self.users.contains_key(name) {
                let f = table.failures.entry(name.to_owned()).or_default();
                f.count += 1;
                if f.count >= self.max_failures {
                    f.count = 0;
                    f.locked_until = Some(now + self.lockout);
                }
            }
        }
        let user = self.users.get(name);
        let hash = user.map_or(self.dummy_hash.as_str(), |u| u.password_hash.as_str());
        let ok = {
            let _permit = self.verifying.acquire().await;
            let hash = hash.to_owned();
            let password = password.to_owned();
            tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false)
        };
        let mut table = self.table();
        let Some(user) = user.filter(|_| ok) else {
            return Err(LoginRefused::BadCredentials);
        };
        table.failures.remove(name);
        let mut raw = [0_u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        table.by_token.retain(|_, h| h.expires > now);
        let SessionTable {
            by_token, order, ..
        } = &mut *table;
        order.retain(|t| by_token.contains_key(t));
        while by_token.len() >= self.max_sessions {
            match order.pop_front() {
                Some(oldest) => {
                    by_token.remove(&oldest);
                }
                None => break,
            }
        }
        by_token.insert(
            token.clone(),
            Held {
                session: Session {
                    user: user.name.clone(),
                    scope: user.scope.clone(),
                },
                expires: now + self.ttl,
            },
        );
        order.push_back(token.clone());
        Ok(token)
    }

    /// The session of a cookie token, if it is live.
    pub fn session(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut table = self.table();
        match table.by_token.get(token) {
            Some(h) if h.expires > now => Some(h.session.clone()),
            Some(_) => {
                table.by_token.remove(token);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn logout(&self, token: &str) -> Option<Session> {
        self.table().by_token.remove(token).map(|h| h.session)
    }

    /// How long sessions last (the cookie's Max-Age).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn users_file(dir: &Path) -> PathBuf {
        let hash = hash_password("correct horse").unwrap();
        let path = dir.join("users.toml");
        std::fs::write(
            &path,
            format!(
                "[[user]]\nname = \"dr-lee\"\npassword_hash = \"{hash}\"\nvehicles = [\"amb-1\", \"north-*\"]\n"
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn scopes_match_ids_and_prefixes_only() {
        let s = Scope::new(vec!["amb-1".into(), "north-*".into()]);
        assert!(s.allows("amb-1") && s.allows("north-7"));
        assert!(!s.allows("amb-10") && !s.allows("south-1") && !s.allows(""));
        assert!(Scope::new(vec!["*".into()]).allows("anything"));
    }

    #[test]
    fn bad_users_files_are_refused_with_the_user_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.toml");
        for (text, want) in [
            (
                "[[user]]\nname = \"a b\"\npassword_hash = \"x\"\nvehicles = [\"*\"]\n",
                "names",
            ),
            (
                "[[user]]\nname = \"a\"\npassword_hash = \"plain\"\nvehicles = [\"*\"]\n",
                "PHC",
            ),
            (
                "[[user]]\nname = \"a\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\"\nvehicles = []\n",
                "see nothing",
            ),
            ("[[user]]\nname = \"a\"\n", "password_hash"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read_users(&path).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[tokio::test]
    async fn logins_are_checked_throttled_and_sessions_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let users = read_users(&users_file(dir.path())).unwrap();
        let cfg = crate::web::config::AuthConfig {
            max_sessions: 2,
            max_failures: 3,
            ..Default::default()
        };
        let auth = Auth::new(users, &cfg).unwrap();
        assert_eq!(
            auth.login("nobody", "correct horse").await,
            Err(LoginRefused::BadCredentials)
        );
        let t1 = auth.login("dr-lee", "correct horse").await.unwrap();
        let s = auth.session(&t1).unwrap();
        assert_eq!(s.user, "dr-lee");
        assert!(s.scope.allows("amb-1") && !s.scope.allows("amb-2"));
        let t2 = auth.login("dr-lee", "correct horse").await.unwrap();
        let t3 = auth.login("dr-lee", "correct horse").await.unwrap();
        assert!(
            auth.session(&t1).is_none(),
            "the oldest session ends at the bound"
        );
        assert!(auth.session(&t2).is_some() && auth.session(&t3).is_some());
        assert!(auth.logout(&t2).is_some() && auth.session(&t2).is_none());
        for _ in 0..3 {
            assert_eq!(
                auth.login("dr-lee", "wrong").await,
                Err(LoginRefused::BadCredentials)
            );
        }
        // Locked out: even the right password waits.
        assert!(matches!(
            auth.login("dr-lee", "correct horse").await,
            Err(LoginRefused::LockedOut(_))
        ));
        assert!(auth.session("not-a-token").is_none());
    }
}
