//! Host names and origins as the server compares them: the name in a `Host` header, a browser's `Origin`, and
//! the `--allowed-hosts` and `--cors-origins` entries, normalized once so that they compare as plain strings.

/// The host name of a `Host` value: lowercase, without its port or a final dot.
pub fn name_of(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rfind(']') {
        Some(end) => &host[..=end],
        None => host.split(':').next().unwrap_or_default(),
    };
    name.trim_end_matches('.').to_owned()
}

/// `scheme://host[:port]`, as browsers write `Origin` (lowercase, no default port); `Err` for anything else.
pub fn normal_origin(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text.trim()).map_err(|e| format!("{text:?} is not an origin ({e})"))?;
    let origin = url.origin();
    if !origin.is_tuple() || !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?} is not an http or https origin"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!("{text:?} has more than an origin: write scheme://host[:port] only"));
    }
    Ok(origin.ascii_serialization())
}

/// One `--cors-origins` entry, normalized: an origin (`https://app.example.com`, `http://localhost:3000`) or `*`.
pub fn origin_setting(text: &str) -> Result<String, String> {
    if text.trim() == "*" {
        return Ok("*".into());
    }
    normal_origin(text)
}

/// One `--allowed-hosts` entry, normalized: a host name or address (a port is ignored), or `*`.
pub fn host_setting(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text == "*" {
        return Ok("*".into());
    }
    let name = name_of(text);
    let plain = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'))
        && !text.contains('/');
    if !plain {
        return Err(format!("{text:?} is not a host name (write it as in a URL, without scheme or path)"));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_normalized_and_checked() {
        assert_eq!(origin_setting("https://App.Example.com:443"), Ok("https://app.example.com".into()));
        assert_eq!(origin_setting("http://localhost:3000/"), Ok("http://localhost:3000".into()));
        assert_eq!(origin_setting("*"), Ok("*".into()));
        for bad in ["app.example.com", "https://app.example.com/path", "ftp://x", "null"] {
            assert!(origin_setting(bad).is_err(), "{bad}");
        }
        assert_eq!(host_setting("Box.Local:8080"), Ok("box.local".into()));
        assert_eq!(host_setting("[::1]"), Ok("[::1]".into()));
        for bad in ["http://x", "", "a b"] {
            assert!(host_setting(bad).is_err(), "{bad}");
        }
    }
}
