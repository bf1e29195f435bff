//! Every `DITFLEET_*` variable the tree reads is documented: a name found in the sources (Rust,
//! shell, Makefile, Helm templates, Python fixtures) must appear in README.md or docs/*.md.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Folders that are not sources: build outputs, virtualenvs, git, generated fuzz data.
const SKIP: &[&str] = &[
    "target",
    ".git",
    ".venv",
    ".test-venv",
    ".deploy-venv",
    ".run",
    ".whl",
    ".bench",
    ".gpu",
    "corpus",
    "artifacts",
    "coverage",
    "node_modules",
];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() {
            if !SKIP.contains(&name.as_str()) {
                walk(&p, out);
            }
        } else if name == "env_vars_documented.rs" {
            // This test's own example strings.
        } else if ["rs", "sh", "py", "tpl", "yaml", "yml"]
            .iter()
            .any(|x| name.ends_with(&format!(".{x}")))
            || name == "Makefile"
            || name.starts_with("Dockerfile")
        {
            out.push(p);
        }
    }
}

/// `DITFLEET_[A-Z0-9_]+` names in `text`, without a trailing `_` (a prefix being built).
fn names(text: &str, out: &mut BTreeSet<String>) {
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("DITFLEET_") {
        let start = i + off;
        let mut end = start + "DITFLEET_".len();
        while end < b.len() && (b[end].is_ascii_uppercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        let name = text[start..end].trim_end_matches('_');
        let before_ok = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if before_ok && name.len() > "DITFLEET".len() + 1 {
            out.insert(name.to_string());
        }
        i = end;
    }
}

#[test]
fn every_ditfleet_variable_in_the_sources_is_documented() {
    let root = root();
    let mut files = Vec::new();
    for d in [
        "common",
        "scheduler",
        "worker",
        "tests",
        "scripts",
        "helm",
        "k8s",
        "docker",
        "bench",
        "deploy-tests",
        "fuzz",
    ] {
        walk(&root.join(d), &mut files);
    }
    files.push(root.join("Makefile"));
    assert!(
        files.len() > 50,
        "found only {} source files under {}",
        files.len(),
        root.display()
    );
    let mut used = BTreeSet::new();
    for f in &files {
        if let Ok(t) = std::fs::read_to_string(f) {
            names(&t, &mut used);
        }
    }
    let mut docs = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    for e in std::fs::read_dir(root.join("docs")).expect("docs/").flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push_str(&std::fs::read_to_string(e.path()).expect("doc"));
        }
    }
    let mut documented = BTreeSet::new();
    names(&docs, &mut documented);
    let missing: Vec<&String> = used.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{} DITFLEET_* variables are read by the tree but documented nowhere in README.md or docs/*.md: {missing:?}",
        missing.len()
    );
    assert!(
        used.contains("DITFLEET_AMQP_URL") && used.len() > 40,
        "scan found too little: {used:?}"
    );
}

#[test]
fn the_scanner_finds_names_and_ignores_prefixes_and_longer_words() {
    let mut s = BTreeSet::new();
    names(
        "env DITFLEET_A_B=1 \"DITFLEET_C\" format!(\"DITFLEET_{x}\") XDITFLEET_NO DITFLEET_",
        &mut s,
    );
    assert_eq!(
        s.into_iter().collect::<Vec<_>>(),
        vec!["DITFLEET_A_B", "DITFLEET_C"]
    );
}
