//! Names that come from outside the fleet (job ids, tenants, model versions, worker ids, adapter
//! names) and the paths, object keys and Redis/AMQP keys built from them.
//!
//! Two layers, so that no single check is load-bearing:
//! 1. the contract: every such name starts with an ASCII letter or digit and uses a small
//!    charset ([`is_name`]), so `.`, `..`, `.hidden`, `-flag`, separators, NUL and wildcards are
//!    rejected where the name enters the fleet (the job schema, [`crate::job::JobSpec::validate`],
//!    configuration);
//! 2. the builders: [`segment`] checks again that a name is one plain path segment before it is
//!    used, and [`join_within`] refuses a joined path that is not strictly inside its root. A
//!    store that is handed a bad name fails the call; it never writes or deletes elsewhere.

use std::path::{Component, Path, PathBuf};

/// A name that may not be used as a path segment or key part, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} cannot be used as a path or key segment: {why}")]
pub struct UnsafeName {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

/// Whether `s` is a well-formed external name: 1..=`max` bytes, the first an ASCII letter or
/// digit, the rest ASCII letters, digits or one of `extra`.
pub fn is_name(s: &str, max: usize, extra: &[char]) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= max
        && chars.all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// `name` as exactly one plain path segment (also a safe S3 key segment and a safe topic word
/// list): not empty, not `.` or `..`, no leading dot, no `/`, `\`, NUL or control characters.
/// `what` names the kind of name for the error (`job id`, `model version`).
pub fn segment<'a>(what: &'static str, name: &'a str) -> Result<&'a str, UnsafeName> {
    let bad = |why| UnsafeName {
        what,
        name: name.chars().take(64).collect(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name == "." || name == ".." {
        return Err(bad("it names a directory itself"));
    }
    if name.starts_with('.') {
        return Err(bad("it starts with a dot"));
    }
    if name.contains(['/', '\\']) {
        return Err(bad("it contains a path separator"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(bad("it contains a control character"));
    }
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(name),
        _ => Err(bad("it is not a single path component")),
    }
}

/// `root/<part>/<part>…`, each part checked by [`segment`], and the result checked to lie strictly
/// inside `root` (lexically: no part can climb, and none is absolute).
pub fn join_within(root: &Path, what: &'static str, parts: &[&str]) -> Result<PathBuf, UnsafeName> {
    let mut p = root.to_path_buf();
    for part in parts {
        p.push(segment(what, part)?);
    }
    if p == root || !p.starts_with(root) {
        return Err(UnsafeName {
            what,
            name: parts.join("/"),
            why: "the path would leave its folder",
        });
    }
    Ok(p)
}

/// [`UnsafeName`] as an I/O error (the stores' error type).
impl From<UnsafeName> for std::io::Error {
    fn from(e: UnsafeName) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names that must never become a path segment, including the fleet's own key shapes.
    const HOSTILE: &[&str] = &[
        "",
        ".",
        "..",
        "...",
        ".hidden",
        "../x",
        "x/../..",
        "a/b",
        "/abs",
        "a\\b",
        "..\\x",
        "a\0b",
        "line\nbreak",
    ];

    #[test]
    fn hostile_names_are_refused_as_segments_and_never_leave_the_root() {
        let root = Path::new("/srv/results");
        for name in HOSTILE {
            assert!(segment("job id", name).is_err(), "{name:?} accepted");
            assert!(join_within(root, "job id", &[name]).is_err(), "{name:?} joined");
            assert!(
                join_within(root, "job id", &["checkpoints", name]).is_err(),
                "{name:?} joined below checkpoints"
            );
        }
    }

    #[test]
    fn ordinary_names_and_the_fleets_key_shapes_stay_one_segment_inside_the_root() {
        let root = Path::new("/srv/results");
        for name in [
            "job-1",
            "7f3c2a9e-render-0001",
            "a..b",
            "x.",
            "ditfleet:job:victim",
            "job.victim.done",
            "flux-dev@v2",
            "invalid-0123456789abcdef",
        ] {
            assert_eq!(segment("job id", name).unwrap(), name);
            let p = join_within(root, "job id", &["checkpoints", name]).unwrap();
            assert_eq!(p, root.join("checkpoints").join(name));
            assert_eq!(p.parent().unwrap(), root.join("checkpoints"));
        }
    }

    #[test]
    fn names_start_with_a_letter_or_digit_and_use_only_their_charset() {
        let extra = ['.', '_', ':', '-'];
        for ok in ["a", "0", "job-1", "a..b", "x:y", &"a".repeat(128)] {
            assert!(is_name(ok, 128, &extra), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".x",
            "-x",
            "_x",
            ":x",
            "a b",
            "a/b",
            "a*",
            &"a".repeat(129),
        ] {
            assert!(!is_name(bad, 128, &extra), "{bad:?}");
        }
    }
}
