//! Private helper services for end-to-end tests: an S3-compatible server (moto), RabbitMQ users
//! made with `rabbitmqctl`, and a raw HTTP client.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The repository root (the tests crate's parent).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits until something listens on 127.0.0.1:`port`.
pub fn wait_port(port: u16, what: &str, timeout: Duration) {
    let start = Instant::now();
    while !port_open(port) {
        assert!(
            start.elapsed() < timeout,
            "{what} did not listen on 127.0.0.1:{port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A private moto S3 server (PyPI `moto[server]`, installed into `.test-venv` by
/// `scripts/setup.sh`), stopped when dropped.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    pub fn start() -> Moto {
        let venv = workspace_root().join(".test-venv/bin/moto_server");
        let exe = if venv.exists() {
            venv
        } else {
            PathBuf::from(std::env::var("DITFLEET_MOTO_SERVER").unwrap_or_else(|_| {
                panic!(
                    "{} is missing: run scripts/setup.sh (make test does) to install moto[server]",
                    venv.display()
                )
            }))
        };
        let port = free_port();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        wait_port(port, "moto_server", Duration::from_secs(60));
        Moto { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let (code, body) = http_request(self.port, "PUT", &format!("/{bucket}"), b"").expect("moto answers");
        assert_eq!(
            code,
            200,
            "creating bucket {bucket}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Reads an object with a signed request (an independent S3 client, not the worker's store).
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>, String> {
        use object_store::ObjectStore as _;
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("AKIADITFLEETREADER")
            .with_secret_access_key("reader-secret")
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| e.to_string())?;
        let r = s3
            .get_opts(&object_store::path::Path::from(key), Default::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.bytes().await.map_err(|e| e.to_string())?.to_vec())
    }

    /// Environment for a worker that stores results in `s3://bucket/prefix` on this server.
    pub fn worker_env(&self, bucket: &str, prefix: &str, secret: &str) -> Vec<(String, String)> {
        vec![
            ("DITFLEET_RESULT_URL".into(), format!("s3://{bucket}/{prefix}")),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), "AKIADITFLEETTEST".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), secret.into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 request with a binary body: (status code, body). `None` when nothing answers.
pub fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .ok()?;
    s.write_all(body).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = buf[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Some((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// Runs `rabbitmqctl` against the shared local node (the tests run as root, like `make test`).
pub fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (RabbitMQ is installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A RabbitMQ user on vhost `/` with the given permission regexes, deleted when dropped.
pub struct RabbitUser {
    pub name: String,
    pub password: String,
}

impl RabbitUser {
    pub fn create(name: &str, password: &str, configure: &str, write: &str, read: &str) -> RabbitUser {
        rabbitmqctl(&["add_user", name, password]);
        let u = RabbitUser {
            name: name.to_string(),
            password: password.to_string(),
        };
        rabbitmqctl(&["set_permissions", "-p", "/", name, configure, write, read]);
        u
    }

    /// Sets the user's topic permissions on `exchange` of vhost `/` (`rabbitmqctl
    /// set_topic_permissions`); deleting the user removes them.
    pub fn set_topic_permissions(&self, exchange: &str, write: &str, read: &str) {
        rabbitmqctl(&[
            "set_topic_permissions",
            "-p",
            "/",
            &self.name,
            exchange,
            write,
            read,
        ]);
    }

    /// `amqp://name:password@127.0.0.1:5672/%2f`
    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// A private certificate authority and a server certificate for 127.0.0.1/localhost, made with
/// the openssl CLI in `dir`.
pub struct TestCa {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &std::path::Path) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let p = |n: &str| dir.join(n).display().to_string();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ditfleet test CA",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("san.ext"),
            "-out",
            &p("server.pem"),
        ]);
        TestCa {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// A child process killed when dropped.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private `redis-server` with a plain port and a TLS port (certificate of `ca`).
pub fn private_tls_redis(ca: &TestCa) -> (Daemon, u16, u16) {
    let (plain, tls) = (free_port(), free_port());
    let child = Command::new("redis-server")
        .args([
            "--port",
            &plain.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-port",
            &tls.to_string(),
            "--tls-cert-file",
            &ca.server_cert.display().to_string(),
            "--tls-key-file",
            &ca.server_key.display().to_string(),
            "--tls-ca-cert-file",
            &ca.ca_cert.display().to_string(),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let d = Daemon(child);
    wait_port(plain, "private redis-server", Duration::from_secs(20));
    wait_port(tls, "private redis-server TLS", Duration::from_secs(20));
    (d, plain, tls)
}

/// A private RabbitMQ node (its own node name, ports and data directory; the shared node on 5672
/// is not touched) with a plain listener and a TLS listener using the certificate of `ca`.
/// Stopped and removed when dropped.
pub struct PrivateRabbit {
    pub plain: u16,
    pub tls: u16,
    dir: PathBuf,
    launcher: Child,
}

impl PrivateRabbit {
    pub fn start(ca: &TestCa) -> PrivateRabbit {
        let (plain, tls, dist) = (free_port(), free_port(), free_port());
        let id = uuid::Uuid::new_v4().to_string()[..8].to_string();
        let dir = std::env::temp_dir().join(format!("ditfleet-rabbit-{id}"));
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        for (from, to) in [
            (&ca.ca_cert, "ca.pem"),
            (&ca.server_cert, "server.pem"),
            (&ca.server_key, "server.key"),
        ] {
            std::fs::copy(from, dir.join(to)).unwrap();
        }
        let d = dir.display();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{plain}\nlisteners.ssl.default = 127.0.0.1:{tls}\n\
                 ssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // Run as root, rabbitmq-server switches to the rabbitmq user, which must own the files.
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
            let _ = Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq", &d.to_string()])
                .status();
        }
        let node = format!("ditfleet-test-{id}@localhost");
        let launcher = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", plain.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_MNESIA_DIR", dir.join("mnesia").join(&id))
            .env(
                "RABBITMQ_FEATURE_FLAGS_FILE",
                dir.join("mnesia").join("feature_flags"),
            )
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server runs (scripts/setup.sh installs RabbitMQ)");
        let r = PrivateRabbit {
            plain,
            tls,
            dir,
            launcher,
        };
        wait_port(plain, "private RabbitMQ node", Duration::from_secs(120));
        wait_port(tls, "private RabbitMQ node TLS listener", Duration::from_secs(30));
        r
    }

    /// `amqp://guest:guest@127.0.0.1:<plain>/%2f`
    pub fn plain_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.plain)
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        // The node writes its Erlang VM's pid; stop that VM (this node's only).
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let pid = pid.trim();
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                let _ = Command::new("kill").args(["-TERM", pid]).status();
            }
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.launcher.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
