//! The `index` handler: apply publish / yank / unyank of a package version
//! to a registry index kept in a git repository, in the crates.io layout.
//!
//! Layout: a package's file is at `1/<name>`, `2/<name>`,
//! `3/<first char>/<name>`, or `<first two>/<next two>/<name>` for longer
//! names, all lowercase ([`index_path`]). It holds one JSON object per line,
//! one line per version, with `"yanked": true|false`.
//!
//! The handler keeps a local checkout between jobs. Before each job it
//! fetches the remote branch and hard-resets the checkout to it, applies the
//! change, and — only if the file changed — commits (`Publish foo 1.0.0`,
//! `Yank foo 1.0.0`, `Unyank foo 1.0.0`) and pushes. Every job is
//! idempotent: re-running it leaves the same index and makes no commit. A
//! rejected or failed push is retried ([`JobError::Retry`]); the next
//! attempt starts again from the remote's state, so a push that lost a race
//! is rebased naturally.
//!
//! Enqueue index jobs with [`publish`], [`yank`] and [`unyank`]: they set the
//! package name (lowercase) as ordering key, so the broker runs the jobs of
//! one package one at a time, in enqueue order — a yank and an unyank of one
//! version can never apply out of order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::JobBuilder;
use crate::jobs::{IndexJob, IndexResult, PublishVersion, VersionRef, index_job};
use crate::worker::{Handler, JobContext, JobError, Output};

/// The job kind this handler serves.
pub const KIND: &str = "index";
/// The payload version this handler understands.
pub const CURRENT_VERSION: u32 = 1;

/// Why an index operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A git operation failed.
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    /// Reading or writing the checkout failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The push was refused by the remote.
    #[error("push rejected: {0}")]
    PushRejected(String),
    /// The job cannot be applied (bad name, unknown version, conflicting
    /// metadata, corrupt index line).
    #[error("{0}")]
    Invalid(String),
}

/// The path of a package's file in the index (lowercase), or `None` for an
/// invalid name.
pub fn index_path(name: &str) -> Option<String> {
    if !valid_name(name) {
        return None;
    }
    let name = name.to_ascii_lowercase();
    Some(match name.len() {
        1 => format!("1/{name}"),
        2 => format!("2/{name}"),
        3 => format!("3/{}/{name}", &name[..1]),
        _ => format!("{}/{}/{name}", &name[..2], &name[2..4]),
    })
}

/// Package names: 1 to 64 of `[A-Za-z0-9_-]`, starting with a letter.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|character: char| character.is_ascii_alphabetic())
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Versions: 1 to 128 of `[0-9A-Za-z.+-]`.
fn valid_version(vers: &str) -> bool {
    !vers.is_empty()
        && vers.len() <= 128
        && vers.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'+' | b'-'))
}

/// A job publishing a version (ordering key: the lowercase package name).
pub fn publish(queue: impl Into<String>, version: PublishVersion) -> JobBuilder {
    let key = version.name.to_ascii_lowercase();
    JobBuilder::new(queue, KIND)
        .message(&IndexJob { version: CURRENT_VERSION, action: Some(index_job::Action::Publish(version)) })
        .ordering_key(key)
}

/// A job yanking a version (ordering key: the lowercase package name).
pub fn yank(queue: impl Into<String>, name: &str, vers: &str) -> JobBuilder {
    set_yanked(queue, name, vers, true)
}

/// A job unyanking a version (ordering key: the lowercase package name).
pub fn unyank(queue: impl Into<String>, name: &str, vers: &str) -> JobBuilder {
    set_yanked(queue, name, vers, false)
}

fn set_yanked(queue: impl Into<String>, name: &str, vers: &str, yanked: bool) -> JobBuilder {
    let reference = VersionRef { name: name.to_owned(), vers: vers.to_owned() };
    let action = if yanked { index_job::Action::Yank(reference) } else { index_job::Action::Unyank(reference) };
    JobBuilder::new(queue, KIND)
        .message(&IndexJob { version: CURRENT_VERSION, action: Some(action) })
        .ordering_key(name.to_ascii_lowercase())
}

/// One line of a package's index file (fields of the crates.io index;
/// unknown fields are kept as they are).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Package name.
    pub name: String,
    /// Version.
    pub vers: String,
    /// Dependencies.
    #[serde(default)]
    pub deps: Vec<IndexDependency>,
    /// SHA-256 of the archive.
    pub cksum: String,
    /// Features.
    #[serde(default)]
    pub features: BTreeMap<String, Vec<String>>,
    /// True once yanked.
    #[serde(default)]
    pub yanked: bool,
    /// The `links` value.
    #[serde(default)]
    pub links: Option<String>,
    /// Minimum supported Rust version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rust_version: Option<String>,
    /// Fields this handler does not know.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One dependency in an index line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexDependency {
    /// Name as used in code.
    pub name: String,
    /// Version requirement.
    pub req: String,
    /// Enabled features.
    #[serde(default)]
    pub features: Vec<String>,
    /// Optional dependency.
    #[serde(default)]
    pub optional: bool,
    /// Default features enabled.
    #[serde(default = "default_true")]
    pub default_features: bool,
    /// Target cfg, if any.
    #[serde(default)]
    pub target: Option<String>,
    /// `normal`, `dev` or `build`.
    #[serde(default = "normal_kind")]
    pub kind: String,
    /// Other registry's index URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Real package name when renamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Fields this handler does not know.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_true() -> bool {
    true
}

fn normal_kind() -> String {
    "normal".to_owned()
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

impl IndexEntry {
    /// The entry of a publish request (not yanked).
    pub fn from_publish(version: &PublishVersion) -> Self {
        Self {
            name: version.name.clone(),
            vers: version.vers.clone(),
            deps: version
                .deps
                .iter()
                .map(|dependency| IndexDependency {
                    name: dependency.name.clone(),
                    req: dependency.req.clone(),
                    features: dependency.features.clone(),
                    optional: dependency.optional,
                    default_features: dependency.default_features,
                    target: non_empty(&dependency.target),
                    kind: non_empty(&dependency.kind).unwrap_or_else(normal_kind),
                    registry: non_empty(&dependency.registry),
                    package: non_empty(&dependency.package),
                    extra: serde_json::Map::new(),
                })
                .collect(),
            cksum: version.cksum.clone(),
            features: version.features.iter().map(|(name, list)| (name.clone(), list.values.clone())).collect(),
            yanked: false,
            links: non_empty(&version.links),
            rust_version: non_empty(&version.rust_version),
            extra: serde_json::Map::new(),
        }
    }

    /// True when both describe the same release (ignoring `yanked`).
    fn same_release(&self, other: &Self) -> bool {
        let mut left = self.clone();
        let mut right = other.clone();
        left.yanked = false;
        right.yanked = false;
        left.extra.clear();
        right.extra.clear();
        left == right
    }
}

/// A change to one package's index file.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Add a version.
    Publish(IndexEntry),
    /// Set the yanked mark of a version.
    SetYanked {
        /// Package name.
        name: String,
        /// Version.
        vers: String,
        /// The new mark.
        yanked: bool,
    },
}

impl Change {
    fn name(&self) -> &str {
        match self {
            Self::Publish(entry) => &entry.name,
            Self::SetYanked { name, .. } => name,
        }
    }

    fn commit_message(&self) -> String {
        match self {
            Self::Publish(entry) => format!("Publish {} {}", entry.name, entry.vers),
            Self::SetYanked { name, vers, yanked: true } => format!("Yank {name} {vers}"),
            Self::SetYanked { name, vers, yanked: false } => format!("Unyank {name} {vers}"),
        }
    }
}

/// Applies a change to the text of a package's file; `None` when the file
/// already reflects it (idempotence).
pub fn apply_change(current: &str, change: &Change) -> Result<Option<String>, Error> {
    let mut entries = Vec::new();
    for (number, line) in current.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: IndexEntry = serde_json::from_str(line)
            .map_err(|error| Error::Invalid(format!("index line {} does not parse: {error}", number + 1)))?;
        entries.push(entry);
    }
    match change {
        Change::Publish(new_entry) => {
            if let Some(existing) = entries.iter().find(|entry| entry.vers == new_entry.vers) {
                if existing.same_release(new_entry) {
                    return Ok(None);
                }
                return Err(Error::Invalid(format!(
                    "{} {} is already published with different metadata",
                    new_entry.name, new_entry.vers
                )));
            }
            if let Some(existing) = entries.first()
                && !existing.name.eq_ignore_ascii_case(&new_entry.name)
            {
                return Err(Error::Invalid(format!(
                    "the index file belongs to {}, not {}",
                    existing.name, new_entry.name
                )));
            }
            entries.push(new_entry.clone());
        }
        Change::SetYanked { name, vers, yanked } => {
            let Some(entry) = entries.iter_mut().find(|entry| entry.vers == *vers) else {
                return Err(Error::Invalid(format!("{name} {vers} is not in the index")));
            };
            if entry.yanked == *yanked {
                return Ok(None);
            }
            entry.yanked = *yanked;
        }
    }
    let mut text = String::new();
    for entry in &entries {
        let line = serde_json::to_string(entry)
            .map_err(|error| Error::Invalid(format!("serializing an index line: {error}")))?;
        text.push_str(&line);
        text.push('\n');
    }
    Ok(Some(text))
}

/// Settings of an [`IndexHandler`].
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// URL or path of the remote repository.
    pub remote_url: String,
    /// Where the local checkout lives (created if missing).
    pub checkout: PathBuf,
    /// Branch of the index (default `main`).
    pub branch: String,
    /// Commit author name.
    pub author_name: String,
    /// Commit author email.
    pub author_email: String,
    /// Delay before retrying after a failed push (default 1 s).
    pub push_retry_after: Duration,
}

impl IndexConfig {
    /// Settings with defaults for everything but the remote and checkout.
    pub fn new(remote_url: impl Into<String>, checkout: impl Into<PathBuf>) -> Self {
        Self {
            remote_url: remote_url.into(),
            checkout: checkout.into(),
            branch: "main".to_owned(),
            author_name: "workbroker index".to_owned(),
            author_email: "index@workbroker.invalid".to_owned(),
            push_retry_after: Duration::from_secs(1),
        }
    }
}

/// The `index` handler; see the [module docs](self).
pub struct IndexHandler {
    config: Arc<IndexConfig>,
    repository: Arc<Mutex<Option<git2::Repository>>>,
}

impl std::fmt::Debug for IndexHandler {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("IndexHandler").field("config", &self.config).finish_non_exhaustive()
    }
}

/// What applying one change did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Commit at the tip of the remote branch afterwards.
    pub commit: String,
    /// False when nothing needed to change.
    pub changed: bool,
    /// The package file's path.
    pub path: String,
}

impl IndexHandler {
    /// A handler; the checkout is opened or cloned on the first job.
    pub fn new(config: IndexConfig) -> Self {
        Self { config: Arc::new(config), repository: Arc::default() }
    }

    /// Applies one change: fetch, reset, edit, commit, push.
    pub async fn apply(&self, change: Change) -> Result<Applied, Error> {
        let config = self.config.clone();
        let repository = self.repository.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = repository.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if guard.is_none() {
                *guard = Some(open_checkout(&config)?);
            }
            let Some(repo) = guard.as_ref() else {
                return Err(Error::Invalid("no checkout".to_owned()));
            };
            let result = apply_blocking(repo, &config, &change);
            if matches!(result, Err(Error::Git(_)) | Err(Error::Io(_))) {
                // Open afresh next time, in case the checkout is damaged.
                *guard = None;
            }
            result
        })
        .await
        .map_err(|error| Error::Io(std::io::Error::other(error)))?
    }

    fn change_of(job: &JobContext) -> Result<Change, JobError> {
        let payload: IndexJob = job.decode()?;
        if payload.version != CURRENT_VERSION {
            return Err(JobError::permanent(format!(
                "unsupported index payload version {} (this worker knows {CURRENT_VERSION})",
                payload.version
            )));
        }
        let change = match payload.action {
            Some(index_job::Action::Publish(version)) => {
                if version.cksum.len() != 64
                    || !version.cksum.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
                {
                    return Err(JobError::permanent("cksum must be 64 lowercase hex digits"));
                }
                Change::Publish(IndexEntry::from_publish(&version))
            }
            Some(index_job::Action::Yank(reference)) => {
                Change::SetYanked { name: reference.name, vers: reference.vers, yanked: true }
            }
            Some(index_job::Action::Unyank(reference)) => {
                Change::SetYanked { name: reference.name, vers: reference.vers, yanked: false }
            }
            None => return Err(JobError::permanent("the job has no action")),
        };
        let (name, vers) = match &change {
            Change::Publish(entry) => (&entry.name, &entry.vers),
            Change::SetYanked { name, vers, .. } => (name, vers),
        };
        if !valid_name(name) {
            return Err(JobError::permanent(format!("invalid package name {name:?}")));
        }
        if !valid_version(vers) {
            return Err(JobError::permanent(format!("invalid version {vers:?}")));
        }
        Ok(change)
    }
}

impl Handler for IndexHandler {
    async fn handle(&self, job: JobContext) -> Result<Output, JobError> {
        let change = Self::change_of(&job)?;
        let message = change.commit_message();
        match self.apply(change).await {
            Ok(applied) => {
                tracing::info!(change = %message, changed = applied.changed, commit = %applied.commit, "index updated");
                Ok(Output::message(&IndexResult {
                    commit: applied.commit,
                    changed: applied.changed,
                    path: applied.path,
                }))
            }
            Err(Error::Invalid(reason)) => Err(JobError::permanent(reason)),
            Err(error @ Error::PushRejected(_)) => {
                tracing::warn!(change = %message, %error, "push failed; will retry");
                Err(JobError::retry_after(error.to_string(), self.config.push_retry_after))
            }
            Err(error) => Err(JobError::retry(error.to_string())),
        }
    }
}

fn remote_ref(config: &IndexConfig) -> String {
    format!("refs/remotes/origin/{}", config.branch)
}

fn local_ref(config: &IndexConfig) -> String {
    format!("refs/heads/{}", config.branch)
}

/// Opens the checkout, or creates it with `origin` pointing at the remote.
fn open_checkout(config: &IndexConfig) -> Result<git2::Repository, Error> {
    let repo = if config.checkout.join(".git").exists() {
        git2::Repository::open(&config.checkout)?
    } else {
        std::fs::create_dir_all(&config.checkout)?;
        git2::Repository::init(&config.checkout)?
    };
    match repo.find_remote("origin") {
        Ok(remote) if remote.url().ok() == Some(config.remote_url.as_str()) => {}
        Ok(_) => repo.remote_set_url("origin", &config.remote_url)?,
        Err(_) => {
            repo.remote("origin", &config.remote_url)?;
        }
    }
    Ok(repo)
}

/// Fetches the branch and makes the checkout exactly the remote's state.
fn fetch_and_reset(repo: &git2::Repository, config: &IndexConfig) -> Result<Option<git2::Oid>, Error> {
    let refspec = format!("+{}:{}", local_ref(config), remote_ref(config));
    repo.find_remote("origin")?.fetch(&[refspec.as_str()], None, None)?;
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout.force().remove_untracked(true);
    match repo.refname_to_id(&remote_ref(config)) {
        Ok(tip) => {
            repo.reference(&local_ref(config), tip, true, "reset to the remote")?;
            repo.set_head(&local_ref(config))?;
            repo.checkout_head(Some(&mut checkout))?;
            Ok(Some(tip))
        }
        Err(error) if error.code() == git2::ErrorCode::NotFound => {
            // An empty remote: start from an empty tree.
            repo.set_head(&local_ref(config))?;
            if let Ok(mut reference) = repo.find_reference(&local_ref(config)) {
                reference.delete()?;
            }
            let mut index = repo.index()?;
            index.clear()?;
            index.write()?;
            remove_worktree_files(&config.checkout)?;
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

fn remove_worktree_files(root: &Path) -> Result<(), Error> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_name() == ".git" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn apply_blocking(repo: &git2::Repository, config: &IndexConfig, change: &Change) -> Result<Applied, Error> {
    let path =
        index_path(change.name()).ok_or_else(|| Error::Invalid(format!("invalid package name {:?}", change.name())))?;
    let tip = fetch_and_reset(repo, config)?;
    let file = config.checkout.join(&path);
    let current = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error.into()),
    };
    let Some(updated) = apply_change(&current, change)? else {
        return Ok(Applied { commit: tip.map(|tip| tip.to_string()).unwrap_or_default(), changed: false, path });
    };
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&file, updated)?;
    let mut index = repo.index()?;
    index.add_path(Path::new(&path))?;
    index.write()?;
    let tree = repo.find_tree(index.write_tree()?)?;
    let signature = git2::Signature::now(&config.author_name, &config.author_email)?;
    let parent = tip.map(|tip| repo.find_commit(tip)).transpose()?;
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let message = change.commit_message();
    let commit = repo.commit(Some(&local_ref(config)), &signature, &signature, &message, &tree, &parents)?;
    push(repo, config)?;
    Ok(Applied { commit: commit.to_string(), changed: true, path })
}

fn push(repo: &git2::Repository, config: &IndexConfig) -> Result<(), Error> {
    let mut rejected: Option<String> = None;
    {
        let mut callbacks = git2::RemoteCallbacks::new();
        callbacks.push_update_reference(|reference, status| {
            if let Some(status) = status {
                rejected = Some(format!("{reference}: {status}"));
            }
            Ok(())
        });
        let mut options = git2::PushOptions::new();
        options.remote_callbacks(callbacks);
        let refspec = format!("{}:{}", local_ref(config), local_ref(config));
        repo.find_remote("origin")?
            .push(&[refspec.as_str()], Some(&mut options))
            .map_err(|error| Error::PushRejected(error.message().to_owned()))?;
    }
    match rejected {
        Some(reason) => Err(Error::PushRejected(reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_crates_io_layout() {
        assert_eq!(index_path("a").as_deref(), Some("1/a"));
        assert_eq!(index_path("ab").as_deref(), Some("2/ab"));
        assert_eq!(index_path("abc").as_deref(), Some("3/a/abc"));
        assert_eq!(index_path("Serde").as_deref(), Some("se/rd/serde"));
        assert_eq!(index_path("cargo-edit").as_deref(), Some("ca/rg/cargo-edit"));
        assert_eq!(index_path("../x"), None);
        assert_eq!(index_path("1abc"), None);
        assert_eq!(index_path(""), None);
    }

    fn entry(vers: &str) -> IndexEntry {
        IndexEntry::from_publish(&PublishVersion {
            name: "demo".to_owned(),
            vers: vers.to_owned(),
            cksum: "a".repeat(64),
            ..Default::default()
        })
    }

    #[test]
    fn publish_yank_unyank_are_idempotent() {
        let published = apply_change("", &Change::Publish(entry("1.0.0"))).expect("apply").expect("changed");
        assert_eq!(
            published,
            format!(
                "{{\"name\":\"demo\",\"vers\":\"1.0.0\",\"deps\":[],\"cksum\":\"{}\",\"features\":{{}},\"yanked\":false,\"links\":null}}\n",
                "a".repeat(64)
            )
        );
        assert_eq!(apply_change(&published, &Change::Publish(entry("1.0.0"))).expect("apply"), None);
        let yank = Change::SetYanked { name: "demo".to_owned(), vers: "1.0.0".to_owned(), yanked: true };
        let yanked = apply_change(&published, &yank).expect("apply").expect("changed");
        assert!(yanked.contains("\"yanked\":true"));
        assert_eq!(apply_change(&yanked, &yank).expect("apply"), None);
        let mut other = entry("1.0.0");
        other.cksum = "b".repeat(64);
        assert!(matches!(apply_change(&published, &Change::Publish(other)), Err(Error::Invalid(_))));
        let missing = Change::SetYanked { name: "demo".to_owned(), vers: "9.9.9".to_owned(), yanked: true };
        assert!(matches!(apply_change(&published, &missing), Err(Error::Invalid(_))));
    }

    #[test]
    fn unknown_fields_survive_a_rewrite() {
        let line = format!(
            "{{\"name\":\"demo\",\"vers\":\"1.0.0\",\"deps\":[],\"cksum\":\"{}\",\"features\":{{}},\"yanked\":false,\"links\":null,\"v\":2,\"features2\":{{\"x\":[\"dep:y\"]}}}}\n",
            "a".repeat(64)
        );
        let yank = Change::SetYanked { name: "demo".to_owned(), vers: "1.0.0".to_owned(), yanked: true };
        let updated = apply_change(&line, &yank).expect("apply").expect("changed");
        assert!(updated.contains("\"features2\":{\"x\":[\"dep:y\"]}"), "{updated}");
        assert!(updated.contains("\"v\":2"));
    }
}
