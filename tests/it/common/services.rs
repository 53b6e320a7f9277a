//! Real services for the end-to-end tests: a Tansu broker on a free loopback
//! port, a private PostgreSQL schema, and `sluice run` as a child process.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Tansu broker, killed on drop: in-memory, or durable (SQLite in a
/// folder) so that it can be killed and restarted with its topics.
pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    port: u16,
    storage: String,
    /// The port clients are told to connect to (a TLS terminator's, in front of the broker).
    advertised_port: u16,
    /// Whether clients must authenticate (SASL/SCRAM).
    authentication: bool,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with("memory://tansu/".to_string())
    }

    /// A broker keeping its topics, offsets and groups in `dir`.
    pub fn start_durable(dir: &Path) -> Broker {
        Broker::start_with(format!("sqlite:///{}", dir.join("tansu.db").display()))
    }

    fn start_with(storage: String) -> Broker {
        let port = free_port();
        let mut broker = Broker {
            child: None,
            addr: format!("127.0.0.1:{port}"),
            port,
            storage,
            advertised_port: port,
            authentication: false,
        };
        broker.restart();
        broker
    }

    /// Starts the broker again (same port, same storage) after [`Broker::kill`].
    pub fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let log = std::env::temp_dir().join(format!("tansu-{}.log", self.port));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                &self.storage,
            ])
            .args(self.authentication.then_some("--authentication"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu must be installed: scripts/install-tansu.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start on {}", self.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates a SCRAM-SHA-512 user (while authentication is off).
    pub fn create_user(&self, name: &str, password: &str) {
        let out = Command::new("tansu")
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://{}", self.addr),
                "--mechanism",
                "scram512",
                name,
                password,
            ])
            .output()
            .expect("tansu user create");
        assert!(out.status.success(), "tansu user create failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Restarts the broker on the same storage, advertising `port` (a TLS
    /// terminator in front of it), requiring SASL when `authentication`.
    pub fn restart_behind(&mut self, port: u16, authentication: bool) {
        self.kill();
        self.advertised_port = port;
        self.authentication = authentication;
        self.restart();
    }

    /// SIGKILL: the broker vanishes without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        create_topic_at(&self.addr, &[], name, partitions).await
    }

    /// Produces `values` (no key) and waits for every delivery.
    ///
    /// One record per batch: Tansu 0.6.0 answers a fetch that starts in the
    /// middle of a multi-record batch with the *next* batch, skipping the rest
    /// of the first (Kafka returns the containing batch and the client drops
    /// the records before the offset). A consumer resuming from a committed
    /// offset mid-batch would then miss records through no fault of its own.
    pub async fn produce(&self, topic: &str, values: &[Vec<u8>]) {
        produce_to(&self.addr, topic, values, &[]).await;
    }

    /// Reads `topic` from the beginning until `expected` messages arrived or `timeout` passed.
    pub fn consume(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<OwnedMessage> {
        consume_from(&self.addr, &[], topic, expected, timeout)
    }

    /// The committed offset of `group` for each partition of `topic` (-1: none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.addr).set("group.id", group).create().unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        // Tansu 0.6.0's watermarks are unreliable, so the end offsets are
        // counted by the tests from the records themselves (see `end_offsets`).
        (0..partitions)
            .map(|p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }
}

/// Creates topic `name` on the broker at `addr`, with extra client properties (TLS, SASL).
pub async fn create_topic_at(addr: &str, properties: &[(&str, &str)], name: &str, partitions: i32) {
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let admin: AdminClient<DefaultClientContext> = config.set("bootstrap.servers", addr).create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

/// [`Broker::consume`] from the broker at `addr`, with extra consumer properties (TLS, SASL).
pub fn consume_from(
    addr: &str,
    properties: &[(&str, &str)],
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", addr)
        .set("group.id", format!("test-reader-{}", free_port()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    // Anything beyond the expected count shows up here too.
    while let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
        out.push(m.detach());
    }
    out
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// [`Broker::produce`] to the broker at `addr`, with extra producer
/// properties; returns where each record went (partition, offset).
pub async fn produce_to(addr: &str, topic: &str, values: &[Vec<u8>], properties: &[(&str, &str)]) -> Vec<(i32, i64)> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", addr).set("enable.idempotence", "true").set("batch.num.messages", "1");
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let producer: FutureProducer = config.create().unwrap();
    let mut pending = Vec::new();
    for v in values {
        pending.push(producer.send_result(FutureRecord::<(), [u8]>::to(topic).payload(v)).map_err(|(e, _)| e).unwrap());
    }
    let mut placed = Vec::new();
    for p in pending {
        let delivered = p.await.unwrap().map_err(|(e, _)| e).unwrap();
        placed.push((delivered.partition, delivered.offset));
    }
    placed
}

/// One past the last offset of each partition a feed wrote to: the end of
/// the input a pipeline must commit (Tansu's watermarks are unreliable).
pub type Ends = std::collections::BTreeMap<i32, i64>;

/// The source offsets the offsets table `table` holds for `pipeline`'s sink
/// `sink` (`[state]` for a state store of its own), per partition of `topic`.
pub async fn committed_offsets(
    client: &tokio_postgres::Client,
    table: &str,
    pipeline: &str,
    sink: &str,
    topic: &str,
) -> Ends {
    let sql = format!("SELECT partition, next_offset FROM {table} WHERE pipeline = $1 AND sink = $2 AND topic = $3");
    match client.query(&sql, &[&pipeline, &sink, &topic]).await {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(_) => Ends::new(), // not created yet
    }
}

/// The barrier before asserting on a pipeline's output: waits until the
/// offsets table holds every partition of `ends` at its end, so that
/// every record of the input is committed with what it made (a double
/// count or a lost record would be there by then). False after [`WAIT_COMMIT`].
pub async fn wait_committed(
    client: &tokio_postgres::Client,
    table: &str,
    (pipeline, sink): (&str, &str),
    topic: &str,
    ends: &Ends,
) -> bool {
    wait_until(WAIT_COMMIT, || async {
        let stored = committed_offsets(client, table, pipeline, sink, topic).await;
        ends.iter().all(|(p, end)| stored.get(p).is_some_and(|at| at >= end))
    })
    .await
}

/// How long [`wait_committed`] waits.
pub const WAIT_COMMIT: Duration = Duration::from_secs(120);

/// Waits until the pipeline commits a batch past `before` (the sum of the
/// offsets [`committed_offsets`] held): the chain in place has run.
pub async fn wait_batch_committed(
    client: &tokio_postgres::Client,
    table: &str,
    (pipeline, sink): (&str, &str),
    topic: &str,
    before: i64,
) -> bool {
    wait_until(WAIT_COMMIT, || async {
        committed_offsets(client, table, pipeline, sink, topic).await.values().sum::<i64>() > before
    })
    .await
}

/// Produces `values` to partition `partition` of `topic`.
pub async fn produce_at(addr: &str, topic: &str, partition: i32, values: &[Vec<u8>]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", addr).create().unwrap();
    for v in values {
        let record = FutureRecord::<(), [u8]>::to(topic).partition(partition).payload(v);
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    }
}

/// One past the last offset of each partition among `messages` (0: none).
pub fn end_offsets(messages: &[OwnedMessage], partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| messages.iter().filter(|m| m.partition() == p).map(|m| m.offset() + 1).max().unwrap_or(0))
        .collect()
}

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A private schema in the local PostgreSQL, dropped on drop.
pub struct PgSchema {
    pub client: tokio_postgres::Client,
    pub name: String,
}

impl PgSchema {
    pub async fn create(prefix: &str) -> PgSchema {
        let (client, connection) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL must run at 127.0.0.1:5432 (see README)");
        tokio::spawn(connection);
        let name = format!("{prefix}_{}_{}", std::process::id(), free_port());
        client.batch_execute(&format!("CREATE SCHEMA {name}")).await.unwrap();
        PgSchema { client, name }
    }

    pub async fn count(&self, table: &str) -> i64 {
        match self.client.query_one(&format!("SELECT count(*) FROM {}.{table}", self.name), &[]).await {
            Ok(row) => row.get(0),
            Err(_) => 0, // not created yet
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Best effort, on a fresh connection: the test's runtime may be gone.
        let _ = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {name} CASCADE"),
            ])
            .output();
    }
}

/// `sluice run` as a child process, killed on drop unless stopped.
pub struct SluiceProcess {
    child: Option<Child>,
    /// Where its log (stderr) goes.
    pub log: PathBuf,
}

impl SluiceProcess {
    pub fn run(pipelines: &[&Path], brokers: &str) -> SluiceProcess {
        SluiceProcess::run_with(pipelines, brokers, &[])
    }

    /// `sluice run` with extra environment variables.
    pub fn run_with(pipelines: &[&Path], brokers: &str, env: &[(&str, &str)]) -> SluiceProcess {
        SluiceProcess::run_args(&[], pipelines, brokers, env)
    }

    /// `sluice ARGS run` (e.g. `--log-format json`) with extra environment variables.
    pub fn run_args(args: &[&str], pipelines: &[&Path], brokers: &str, env: &[(&str, &str)]) -> SluiceProcess {
        let log = std::env::temp_dir().join(format!("sluice-test-{}.log", free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .envs(env.iter().copied())
            .args(args)
            .arg("--cache-dir")
            .arg(super::test_cache_dir())
            .arg("run")
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(pipelines)
            .env("SLUICE_BROKERS", brokers)
            .env("SLUICE_PG_URL", PG_URL)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        eprintln!("sluice log: {}", log.display());
        SluiceProcess { child: Some(child), log }
    }

    /// The admin listener's address, from the log (text or JSON).
    pub async fn admin_addr(&self) -> String {
        assert!(self.wait_log("admin listener ready", 0).await, "no admin listener");
        let log = std::fs::read_to_string(&self.log).unwrap();
        let line = log.lines().find(|l| l.contains("admin listener ready")).unwrap();
        match line.split_once("addr=") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap().to_string(),
            None => line.split("\"addr\":\"").nth(1).unwrap().split('"').next().unwrap().to_string(),
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the log has more than `before` lines containing `needle`.
    pub async fn wait_log(&self, needle: &str, before: usize) -> bool {
        wait_until(Duration::from_secs(60), || async { self.log_count(needle) > before }).await
    }

    /// SIGKILL: no goodbye, no final commit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits: the graceful path. Returns the exit code.
    /// Stops the instance gracefully (SIGTERM) and returns its exit code
    /// (`None`: killed by a signal). An instance still starting is first
    /// waited for (its admin listener up), or for its exit: a stop is asked
    /// of a running instance, as an operator's would be.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() && self.log_count("admin listener ready") == 0 {
            assert!(Instant::now() < deadline, "the instance never started (log: {})", self.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        child.wait().unwrap().code()
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Writes a pipeline file into `dir` and returns its path.
pub fn write_pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The value of the Prometheus sample `series` (name and labels, as
/// written) at the admin listener `addr`, if present.
pub fn metric(addr: &str, series: &str) -> Option<f64> {
    let (_, body) = http(addr, "GET", "/metrics");
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A minimal HTTP/1.1 request: returns (status code, body).
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, &[])
}

/// A TCP server on a free loopback port that accepts every connection and
/// never says anything (a hung peer); returns its address.
pub fn silent_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    addr
}

/// [`http`] with extra headers; a `Host` among them replaces the address.
pub fn http_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(request(addr, method, path, headers).as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    parse_response(&response)
}

/// An HTTP/1.1 request's text.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        text.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text + "Content-Length: 0\r\nConnection: close\r\n\r\n"
}

/// An HTTP response's status code and body.
pub fn parse_response(response: &str) -> (u16, String) {
    let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// A private PostgreSQL server (initdb in a temporary folder, a free port),
/// which a test may stop and start without disturbing the shared one.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    /// Serves TLS with `server.crt`/`server.key` in its folder.
    tls: bool,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        PrivatePostgres::init(None)
    }

    /// A server that offers TLS with this certificate and key (PEM).
    pub fn start_with_tls(cert: &Path, key: &Path) -> PrivatePostgres {
        PrivatePostgres::init(Some((cert, key)))
    }

    fn init(tls: Option<(&Path, &Path)>) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().unwrap();
        let pg = PrivatePostgres { dir, port: free_port(), bin, tls: tls.is_some() };
        if let Some((cert, key)) = tls {
            std::fs::copy(cert, pg.dir.path().join("server.crt")).unwrap();
            std::fs::copy(key, pg.dir.path().join("server.key")).unwrap();
            Command::new("chmod").arg("600").arg(pg.dir.path().join("server.key")).status().unwrap();
        }
        // initdb refuses to run as root: the cluster belongs to `postgres` then.
        if is_root() {
            Command::new("chown").args(["-R", "postgres"]).arg(pg.dir.path()).status().unwrap();
        }
        let data = pg.dir.path().join("data");
        let out = pg
            .as_owner(pg.bin.join("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        pg.start_server();
        pg
    }

    fn as_owner(&self, program: PathBuf) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let out = self
            .as_owner(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn start_server(&self) {
        let dir = self.dir.path().display();
        let mut options = format!("-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off", self.port);
        if self.tls {
            options.push_str(&format!(" -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key"));
        }
        self.pg_ctl(&["-w", "-o", &options, "start"]);
    }

    /// Stops the server at once (`immediate`: like a crash).
    pub fn stop_server(&self) {
        self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.as_owner(self.bin.join("pg_ctl")).arg("-D").arg(&data).args(["-m", "immediate", "stop"]).output();
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// A paced feed: `frames` produced to `topic` in chunks of `chunk`, with
/// `pause` after each, on a task of its own; it ends with the [`Ends`] it
/// wrote up to.
pub fn paced_feed(
    addr: &str,
    topic: &'static str,
    frames: Vec<Vec<u8>>,
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Ends> {
    let addr = addr.to_string();
    tokio::spawn(async move {
        let mut ends = Ends::new();
        for part in frames.chunks(chunk) {
            for (partition, offset) in produce_to(&addr, topic, part, &[]).await {
                let end = ends.entry(partition).or_default();
                *end = (*end).max(offset + 1);
            }
            tokio::time::sleep(pause).await;
        }
        ends
    })
}

/// `kills` times: waits until `progress` grows, lets a random 0.2–1.5 s
/// pass (seeded by `seed`), kills `sluice` with SIGKILL and starts it
/// again on `files`. Returns the last one started.
pub async fn kill_9_while_progressing<F, Fut>(
    mut sluice: SluiceProcess,
    files: &[&Path],
    brokers: &str,
    kills: usize,
    seed: u64,
    mut progress: F,
) -> SluiceProcess
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for kill in 1..=kills {
        let before = progress().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while progress().await <= before {
            assert!(Instant::now() < deadline, "no progress before kill {kill}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        sluice.kill9();
        eprintln!("kill -9 #{kill} at {}", progress().await);
        sluice = SluiceProcess::run(files, brokers);
    }
    sluice
}
