//! Error text that may reach clients (job status, events, DLQ headers) without leaking secrets or
//! the infrastructure: URLs (with their credentials), absolute paths and host:port addresses are
//! replaced by placeholders. Operators find the full error in the service's log.

/// Rewrites `text` for clients: every URL becomes `<url>`, every absolute path `<path>`, every
/// `host:port` (IPv4 or dotted name) `<host>`, and `user:password@` pairs `<credentials>@`.
pub fn public_reason(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, token) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&redact_token(token));
    }
    out
}

fn is_wrapper(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '`' | '(' | ')' | '[' | ']' | '{' | '}' | '<' | '>' | ',' | ';'
    )
}

fn redact_token(token: &str) -> String {
    // Keep surrounding quotes/brackets/punctuation, classify the core.
    let start = token.find(|c: char| !is_wrapper(c)).unwrap_or(token.len());
    let end = token
        .rfind(|c: char| !is_wrapper(c) && c != '.' && c != ':')
        .map(|i| i + token[i..].chars().next().map_or(1, char::len_utf8))
        .unwrap_or(start)
        .max(start);
    let (pre, core, post) = (&token[..start], &token[start..end], &token[end..]);
    let replaced = if core.contains("://") {
        Some("<url>".to_string())
    } else if core.starts_with('/') && core.len() > 1 {
        Some("<path>".to_string())
    } else if let Some((_, host)) = core.split_once('@').filter(|(u, _)| u.contains(':')) {
        Some(format!(
            "<credentials>@{}",
            if host_port(host) { "<host>" } else { host }
        ))
    } else if host_port(core) {
        Some("<host>".to_string())
    } else {
        None
    };
    match replaced {
        Some(r) => format!("{pre}{r}{post}"),
        None => token.to_string(),
    }
}

/// `name.domain:port`, `1.2.3.4:port` or `[v6]:port`.
fn host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || host.is_empty() {
        return false;
    }
    (host.contains('.') || host == "localhost" || host.ends_with(']'))
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_paths_hosts_and_credentials_are_replaced() {
        let r = public_reason(
            "Error performing PUT http://AKIA:sEcReT@127.0.0.1:40123/bucket/k.png in 2ms: (connect 10.0.0.7:9000 refused), file '/var/lib/models/flux/ae.safetensors' missing; redis=admin:hunter2@redis.svc:6379",
        );
        for secret in [
            "sEcReT",
            "127.0.0.1",
            "40123",
            "10.0.0.7",
            "/var/lib",
            "hunter2",
            "redis.svc",
        ] {
            assert!(!r.contains(secret), "{secret} leaked in {r}");
        }
        assert!(r.contains("Error performing PUT <url> in 2ms"), "{r}");
        assert!(r.contains("(connect <host> refused),"), "{r}");
        assert!(r.contains("file '<path>' missing;"), "{r}");
    }

    #[test]
    fn ordinary_reasons_are_kept() {
        for s in [
            "gave up after 3 attempts",
            "deadline: must be an RFC 3339 time such as 2026-01-31T12:00:00Z",
            "width: must be a multiple of 16 between 256 and 4096, got 1000",
            "worker w-1 shut down at step 3",
            "out of memory: tried to allocate 2.5 GiB",
        ] {
            assert_eq!(public_reason(s), s);
        }
    }
}
