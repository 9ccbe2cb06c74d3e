//! Ready handlers for the three job kinds workbroker was built for. Each is
//! behind a cargo feature of the same name (all on by default).
//!
//! | kind | handler | payload |
//! |------|---------|---------|
//! | `diff` | [`diff::DiffHandler`] | [`crate::jobs::DiffJob`] |
//! | `sync` | [`sync::SyncHandler`] | [`crate::jobs::SyncJob`] |
//! | `index` | [`index::IndexHandler`] | [`crate::jobs::IndexJob`] |

#[cfg(feature = "diff")]
pub mod diff;
#[cfg(feature = "index")]
pub mod index;
#[cfg(feature = "sync")]
pub mod sync;

/// Checks a digest-like name used in paths and URLs: 1 to 200 characters of
/// `[A-Za-z0-9:._-]`, not starting with a dot.
#[cfg(any(feature = "diff", feature = "sync"))]
pub(crate) fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b':' | b'.' | b'_' | b'-'))
}
