//! URLs to object stores, and shard listing with WebDataset brace ranges and globs.
//!
//! Supported: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (also
//! `abfs://`, `abfss://`, `azure://`), `file:///abs/path`, a plain local path, and
//! `memory:///prefix` (one store per process, for tests). Credentials come from each
//! cloud's standard environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
//!
//! Hazard: URLs may carry secrets (an Azure SAS token in the query string). Use
//! [`redact_url`] for anything that reaches a log, an error or an output file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::limit::LimitStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, RetryConfig};
use url::Url;

pub mod retry;

pub use retry::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot open store for `{url}`: {source}")]
    Open { url: String, source: object_store::Error },
    #[error("cannot list `{url}`: {source}")]
    List { url: String, source: object_store::Error },
    #[error("no shard matches `{url}`")]
    NoMatch { url: String },
    #[error("{count} shard(s) named by `{url}` do not exist, first: {first}")]
    Missing { url: String, count: usize, first: String },
}

/// How stores talk to the network: request timeout, retries, requests in flight.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub request_timeout: Duration,
    pub max_retries: usize,
    /// Process-wide cap on requests in flight to one bucket (a `LimitStore` shared by
    /// every URL into it that is opened with the same options).
    pub max_requests: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            request_timeout: Duration::from_secs(60),
            max_retries: 10,
            max_requests: 64,
        }
    }
}

/// An object store and a folder-like prefix inside it.
#[derive(Debug, Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// The prefix within the store; empty for a bucket root.
    pub prefix: Path,
    /// The URL without credentials, for messages.
    pub display: String,
}

impl Location {
    /// The path of `relative` (slash-separated) below this location's prefix.
    pub fn child(&self, relative: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// `relative` appended to the display URL.
    pub fn display_child(&self, relative: &str) -> String {
        format!("{}/{}", self.display.trim_end_matches('/'), relative)
    }

    /// Path of `path` relative to this location's prefix, if it lies below it.
    pub fn relative(&self, path: &Path) -> Option<String> {
        let parts: Vec<_> = path
            .prefix_match(&self.prefix)?
            .map(|p| p.as_ref().to_string())
            .collect();
        Some(parts.join("/"))
    }
}

/// Strips userinfo and query string (where SAS tokens and signatures live) from a URL;
/// anything else is returned as written.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u)
            if u.scheme().len() > 1 && (u.query().is_some() || !u.username().is_empty() || u.password().is_some()) =>
        {
            let had_query = u.query().is_some();
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            let mut s = u.to_string();
            if had_query {
                s.push_str("?<redacted>");
            }
            s
        }
        _ => url.to_string(),
    }
}

/// Opens the store that `url` points into; the URL must not contain wildcards.
pub fn open(url: &str, options: &StoreOptions) -> Result<Location, StorageError> {
    let invalid = |reason: String| StorageError::InvalidUrl {
        url: redact_url(url),
        reason,
    };
    let parsed = to_url(url).map_err(invalid)?;
    let display = redact_url(parsed.as_str());
    let (scheme, prefix) = ObjectStoreScheme::parse(&parsed).map_err(|e| invalid(e.to_string()))?;
    let open_err = |source| StorageError::Open {
        url: display.clone(),
        source,
    };
    let retry = RetryConfig {
        max_retries: options.max_retries,
        ..RetryConfig::default()
    };
    let timeout = format!("{}ms", options.request_timeout.as_millis());
    // Each cloud's builder: credentials and client settings (AWS_ALLOW_HTTP, ...) from its
    // environment, then the URL, retries and the request timeout, behind the process-wide
    // cap on requests in flight. Hazard: `with_client_options` would replace the client
    // settings read from the environment; set single keys instead.
    macro_rules! cloud {
        ($builder:ty) => {
            Arc::new(LimitStore::new(
                <$builder>::from_env()
                    .with_url(parsed.as_str())
                    .with_retry(retry)
                    .with_config("timeout".parse().expect("a client key"), &timeout)
                    .build()
                    .map_err(open_err)?,
                options.max_requests,
            ))
        };
    }
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::Local => Arc::new(LocalFileSystem::new()),
        ObjectStoreScheme::Memory => memory_store(),
        ObjectStoreScheme::AmazonS3 | ObjectStoreScheme::GoogleCloudStorage | ObjectStoreScheme::MicrosoftAzure => {
            // One client, and so one request limit, per bucket and settings for the whole
            // process, however often URLs into it are opened.
            let key = format!(
                "{}|{timeout}|{}|{}",
                store_root(&parsed, &prefix),
                options.max_retries,
                options.max_requests
            );
            let mut stores = cloud_stores().lock().unwrap_or_else(|e| e.into_inner());
            if let Some(store) = stores.get(&key) {
                store.clone()
            } else {
                let store: Arc<dyn ObjectStore> = match scheme {
                    ObjectStoreScheme::AmazonS3 => cloud!(object_store::aws::AmazonS3Builder),
                    ObjectStoreScheme::GoogleCloudStorage => cloud!(object_store::gcp::GoogleCloudStorageBuilder),
                    _ => cloud!(object_store::azure::MicrosoftAzureBuilder),
                };
                stores.insert(key, store.clone());
                store
            }
        }
        other => return Err(invalid(format!("{other:?} URLs are not supported"))),
    };
    Ok(Location { store, prefix, display })
}

/// `url` without the part inside the bucket (`prefix`): what a store client is built
/// for. Keeps the user and the query (an Azure SAS token), so different credentials
/// never share a client. Never print it.
fn store_root(url: &Url, prefix: &Path) -> String {
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    let keep = segments.len().saturating_sub(prefix.parts().count());
    let mut root = url.clone();
    root.set_fragment(None);
    root.set_path(&segments[..keep].join("/"));
    root.to_string()
}

/// The cloud stores opened so far, by scheme, bucket and client settings.
///
/// Hazard: credentials are read from the environment when a bucket's store is first
/// built; a process that changes them afterwards keeps talking with the old ones.
fn cloud_stores() -> &'static Mutex<HashMap<String, Arc<dyn ObjectStore>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    STORES.get_or_init(Mutex::default)
}

/// The single in-memory store behind every `memory://` URL of this process.
fn memory_store() -> Arc<dyn ObjectStore> {
    static STORE: OnceLock<Arc<InMemory>> = OnceLock::new();
    STORE.get_or_init(|| Arc::new(InMemory::new())).clone()
}

/// Turns a URL or a plain (possibly relative, possibly not yet existing) path into a URL.
fn to_url(url: &str) -> Result<Url, String> {
    let looks_like_url = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.len() > 1 && scheme.chars().all(|c| c.is_ascii_alphanumeric()));
    if looks_like_url {
        return Url::parse(url).map_err(|e| e.to_string());
    }
    let absolute = std::path::absolute(url).map_err(|e| e.to_string())?;
    let mut u = Url::from_file_path(&absolute).map_err(|_| "not an absolute path".to_string())?;
    if url.ends_with('/') && !u.path().ends_with('/') {
        u.set_path(&format!("{}/", u.path()));
    }
    Ok(u)
}

/// Runs a read-only store operation again when it fails transiently. The store clients
/// retry requests, but not a response body that breaks mid-read (a listing, a small
/// object); this covers those. Not-found and precondition errors are final.
pub async fn retrying<T, F, Fut>(what: &str, op: F) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, object_store::Error>>,
{
    retry::retry(what, Backoff::STORE_READ, is_final, op).await
}

/// Whether a store error says something about the object, not the connection, so that
/// trying again cannot help.
pub fn is_final(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
    )
}

/// One shard found by listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRef {
    /// Stable name of the shard: its path below the listing root, extension removed.
    /// Output files and commit markers are named after it.
    pub id: String,
    pub path: Path,
    pub size: u64,
    /// For shards made of separate objects (folder input): one object per sample, in
    /// order; empty for shards that are one object (tar, Parquet).
    pub members: Arc<Vec<Member>>,
}

/// One object that is one sample of a grouped shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub path: Path,
    pub size: u64,
    pub key: String,
    pub label: Option<i64>,
}

/// Lists the shards that `url` names, sorted by path.
///
/// `url` may end in `/` (every object below it with `extension`), name one object, or
/// hold WebDataset brace ranges (`shard-{000000..000099}.tar`, `{a,b}`) and globs
/// (`*` and `?` within one path segment, `**` across segments). Objects named
/// literally (after brace expansion) must exist: a gap is an error, not a silent skip.
pub async fn list_shards(
    url: &str,
    extension: &str,
    options: &StoreOptions,
) -> Result<(Location, Vec<ShardRef>), StorageError> {
    let (base, pattern) = split_pattern(url);
    if pattern.is_empty() && !base.ends_with('/') {
        return list_single_or_folder(base, extension, options).await;
    }
    let root = open(base, options)?;
    let patterns = if pattern.is_empty() {
        vec![format!("**/*{extension}")]
    } else {
        expand_braces(pattern).map_err(|reason| StorageError::InvalidUrl {
            url: redact_url(url),
            reason,
        })?
    };
    let (literals, globs): (Vec<String>, Vec<String>) = patterns.into_iter().partition(|p| !has_wildcard(p));
    let literals: BTreeSet<String> = literals.into_iter().collect();

    let listing: Vec<_> = retrying(&format!("listing {}", root.display), || {
        root.store.list(Some(&root.prefix)).try_collect()
    })
    .await
    .map_err(|source| StorageError::List {
        url: root.display.clone(),
        source,
    })?;
    let mut found: BTreeMap<String, ShardRef> = BTreeMap::new();
    for meta in listing {
        let Some(rel) = root.relative(&meta.location) else {
            continue;
        };
        if literals.contains(&rel) || globs.iter().any(|g| glob_match(g, &rel)) {
            let id = rel.strip_suffix(extension).unwrap_or(&rel).to_string();
            found.insert(
                rel,
                ShardRef {
                    id,
                    path: meta.location,
                    size: meta.size,
                    members: Arc::default(),
                },
            );
        }
    }
    let missing: Vec<&String> = literals.iter().filter(|l| !found.contains_key(*l)).collect();
    if let Some(first) = missing.first() {
        return Err(StorageError::Missing {
            url: redact_url(url),
            count: missing.len(),
            first: root.display_child(first),
        });
    }
    if found.is_empty() {
        return Err(StorageError::NoMatch { url: redact_url(url) });
    }
    Ok((root, found.into_values().collect()))
}

/// A URL without wildcards names one object, or else a folder of shards.
async fn list_single_or_folder(
    url: &str,
    extension: &str,
    options: &StoreOptions,
) -> Result<(Location, Vec<ShardRef>), StorageError> {
    let object = open(url, options)?;
    match retrying(&format!("reading {}", object.display), || {
        object.store.head(&object.prefix)
    })
    .await
    {
        Ok(meta) => {
            let (parent, name) = url.rsplit_once('/').unwrap_or((".", url));
            let root = open(&format!("{parent}/"), options)?;
            let id = name.strip_suffix(extension).unwrap_or(name).to_string();
            let shard = ShardRef {
                id,
                path: meta.location,
                size: meta.size,
                members: Arc::default(),
            };
            Ok((root, vec![shard]))
        }
        Err(object_store::Error::NotFound { .. }) => {
            Box::pin(list_shards(&format!("{url}/"), extension, options)).await
        }
        Err(source) => Err(StorageError::List {
            url: object.display,
            source,
        }),
    }
}

/// Splits a URL at the last `/` before its first brace or wildcard:
/// (`s3://b/x/`, `shard-{0..9}.tar`). Without wildcards the pattern is empty.
fn split_pattern(url: &str) -> (&str, &str) {
    // Skip the scheme's `://` so `?`-free URLs are never split inside it.
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[start..].find(['{', '*', '?', '[']) {
        None => (url, ""),
        Some(i) => {
            let cut = url[..start + i].rfind('/').map(|j| j + 1).unwrap_or(start);
            (&url[..cut], &url[cut..])
        }
    }
}

fn has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Expands WebDataset-style braces: `{000..003}` (zero-padded numeric ranges, as in
/// `braceexpand`) and `{a,b,c}`. Several groups multiply.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err("unmatched `}`".into());
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| "unmatched `{`".to_string())?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let options: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (start, end): (u64, u64) = (
            a.parse().map_err(|_| format!("`{{{body}}}`: `{a}` is not a number"))?,
            b.parse().map_err(|_| format!("`{{{body}}}`: `{b}` is not a number"))?,
        );
        if end < start {
            return Err(format!("`{{{body}}}`: the range runs backwards"));
        }
        if end - start > 10_000_000 {
            return Err(format!("`{{{body}}}`: the range is too long"));
        }
        let width = if a.starts_with('0') && a.len() > 1 { a.len() } else { 0 };
        (start..=end).map(|n| format!("{n:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let tails = expand_braces(tail)?;
    let mut out = Vec::with_capacity(options.len() * tails.len());
    for option in &options {
        for t in &tails {
            out.push(format!("{head}{option}{t}"));
        }
    }
    Ok(out)
}

/// Glob match over slash-separated paths: `*` and `?` stay within a segment, `**` spans
/// segments.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = if p.get(2) == Some(&b'/') { &p[3..] } else { &p[2..] };
                (0..=s.len()).any(|i| (i == 0 || s[i - 1] == b'/') && go(rest, &s[i..])) || go(&p[2..], s)
            }
            Some(b'*') => {
                let mut i = 0;
                loop {
                    if go(&p[1..], &s[i..]) {
                        return true;
                    }
                    if i == s.len() || s[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some(b'?') => !s.is_empty() && s[0] != b'/' && go(&p[1..], &s[1..]),
            Some(c) => s.first() == Some(c) && go(&p[1..], &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    #[test]
    fn braces_expand_like_braceexpand() {
        assert_eq!(
            expand_braces("s-{000..002}.tar").unwrap(),
            vec!["s-000.tar", "s-001.tar", "s-002.tar"]
        );
        assert_eq!(expand_braces("{a,b}/{1..2}").unwrap(), vec!["a/1", "a/2", "b/1", "b/2"]);
        assert!(expand_braces("x-{3..1}").is_err());
        assert!(expand_braces("x-{1..2").is_err());
    }

    #[test]
    fn globs_respect_segments() {
        assert!(glob_match("shard-*.tar", "shard-000.tar"));
        assert!(!glob_match("*.tar", "a/shard.tar"));
        assert!(glob_match("**/*.tar", "a/b/shard.tar"));
        assert!(glob_match("**/*.tar", "shard.tar"));
        assert!(glob_match("s-??.tar", "s-01.tar"));
        assert!(!glob_match("s-??.tar", "s-1.tar"));
    }

    #[test]
    fn pattern_splits_at_last_slash_before_wildcard() {
        assert_eq!(split_pattern("s3://b/x/s-{0..3}.tar"), ("s3://b/x/", "s-{0..3}.tar"));
        assert_eq!(split_pattern("data/*/a.tar"), ("data/", "*/a.tar"));
        assert_eq!(split_pattern("s3://b/x/"), ("s3://b/x/", ""));
    }

    #[test]
    fn store_roots_name_the_bucket_not_the_prefix() {
        let root = |url: &str| {
            let url = Url::parse(url).unwrap();
            let (_, prefix) = ObjectStoreScheme::parse(&url).unwrap();
            store_root(&url, &prefix)
        };
        assert_eq!(root("s3://bucket/a/b/"), root("s3://bucket/c"));
        assert_ne!(root("s3://bucket/a"), root("s3://other/a"));
        assert_eq!(
            root("https://s3.us-east-1.amazonaws.com/bucket/a/b"),
            "https://s3.us-east-1.amazonaws.com/bucket"
        );
        assert_ne!(
            root("az://c/x?sig=1"),
            root("az://c/x?sig=2"),
            "other credentials, other client"
        );
    }

    #[test]
    fn redaction_drops_query_and_userinfo() {
        let r = redact_url("az://user:pw@container/x?sig=SECRET&sv=1");
        assert!(!r.contains("SECRET") && !r.contains("pw"), "{r}");
        assert!(r.contains("container/x"));
        assert_eq!(redact_url("s3://b/shard-{0..9}.tar"), "s3://b/shard-{0..9}.tar");
    }

    #[tokio::test]
    async fn lists_ranges_globs_and_reports_gaps() {
        let loc = open("memory:///listing-test/", &StoreOptions::default()).unwrap();
        for name in ["s-000.tar", "s-001.tar", "s-002.tar", "other.txt", "sub/s-009.tar"] {
            loc.store
                .put(&loc.child(name), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        let opts = StoreOptions::default();
        let (_, shards) = list_shards("memory:///listing-test/s-{000..002}.tar", ".tar", &opts)
            .await
            .unwrap();
        let ids: Vec<_> = shards.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s-000", "s-001", "s-002"]);

        let (_, shards) = list_shards("memory:///listing-test/", ".tar", &opts).await.unwrap();
        assert_eq!(shards.len(), 4, "a folder lists every .tar below it");

        let (_, shards) = list_shards("memory:///listing-test/s-00*.tar", ".tar", &opts)
            .await
            .unwrap();
        assert_eq!(shards.len(), 3);

        let (_, shards) = list_shards("memory:///listing-test/s-001.tar", ".tar", &opts)
            .await
            .unwrap();
        assert_eq!(shards.len(), 1);

        let (_, shards) = list_shards("memory:///listing-test/sub", ".tar", &opts).await.unwrap();
        assert_eq!(shards[0].id, "s-009", "a folder without a trailing slash");

        let err = list_shards("memory:///listing-test/s-{000..004}.tar", ".tar", &opts)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Missing { count: 2, .. }), "{err}");
        let err = list_shards("memory:///listing-test/none-*.tar", ".tar", &opts)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::NoMatch { .. }), "{err}");
    }
}
