//! A private, restartable RabbitMQ node for tests that restart the broker (the shared node on
//! 5672 is never touched).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Where the broker's scripts are (`DITFLEET_RABBITMQ_BIN` overrides).
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

fn rabbit_bin(name: &str) -> PathBuf {
    let dir = std::env::var("DITFLEET_RABBITMQ_BIN").unwrap_or_else(|_| RABBIT_BIN.into());
    let p = Path::new(&dir).join(name);
    assert!(
        p.exists(),
        "{} missing: the test starts a private RabbitMQ node with the broker's own scripts (set DITFLEET_RABBITMQ_BIN)",
        p.display()
    );
    p
}

/// A RabbitMQ node of one test only, which the test may stop and start (whole node or only the
/// RabbitMQ application) without touching the shared broker on 5672.
pub struct RestartableRabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl RestartableRabbit {
    pub fn new(root: &Path) -> Self {
        let dir = root.join("rabbitmq");
        for d in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n").unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let cookie = dir.join("home/.erlang.cookie");
        std::fs::write(
            &cookie,
            format!("DITFLEETTEST{}", uuid::Uuid::new_v4().simple()).to_uppercase(),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        Self {
            node: format!(
                "ditfleet-test-{}-{}@localhost",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..6]
            ),
            port: free_port(),
            dist_port: free_port(),
            dir,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn command(&self, bin: &str) -> Command {
        let mut c = Command::new(rabbit_bin(bin));
        let d = &self.dir;
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(d);
        c
    }

    pub fn ctl(&self, args: &[&str]) -> bool {
        self.command("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.out")).unwrap();
        let child = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server starts");
        self.child = Some(child);
        let start = Instant::now();
        while !self.ctl(&["await_startup", "--timeout", "5"]) {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "private RabbitMQ exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "private RabbitMQ did not start"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Stops the RabbitMQ application (the Erlang node stays up): the broker closes every client
    /// connection and stops listening, as in `rabbitmqctl stop_app` on a production node.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "rabbitmqctl stop_app");
    }

    /// Starts the RabbitMQ application again and waits until it has booted.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "rabbitmqctl start_app");
        assert!(
            self.ctl(&["await_startup", "--timeout", "60"]),
            "rabbitmqctl await_startup"
        );
    }

    pub fn stop(&mut self) {
        self.ctl(&["stop"]);
        if let Some(mut c) = self.child.take() {
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RestartableRabbit {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}
