//! TLS for the connectivity tests: certificates made by the test (the
//! `openssl` command), a TLS terminator in front of the broker (Debian's
//! `socat`: Tansu's own TLS listener does not serve librdkafka), and a
//! private PostgreSQL serving TLS with the test's certificate.

use super::services::{free_port, PrivatePostgres};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A test PKI in a temporary folder:
/// - `ca.pem`: the CA that signed `server.pem` (SAN 127.0.0.1, localhost);
/// - `client-ca.pem`: the CA that signed `client.pem` (mutual TLS);
/// - `other-ca.pem`: a CA that signed nothing here (an untrusted chain).
pub struct Certs {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/test.sh does)");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Certs {
    pub fn generate() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "client-ca", "other-ca"] {
            let (keyfile, pem, subject) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=Sluice test {ca}"));
            let mut args = vec!["req", "-x509"];
            args.extend(key);
            args.extend(["-keyout", &keyfile, "-out", &pem, "-days", "2", "-subj", &subject]);
            openssl(d, &args);
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
        for (name, ca, cn) in [("server", "ca", "localhost"), ("client", "client-ca", "sluice")] {
            let (keyfile, csr, subject) = (format!("{name}.key"), format!("{name}.csr"), format!("/CN={cn}"));
            let mut args = vec!["req"];
            args.extend(key);
            args.extend(["-keyout", &keyfile, "-out", &csr, "-subj", &subject]);
            openssl(d, &args);
            let (ca_pem, ca_key, pem, ext) =
                (format!("{ca}.pem"), format!("{ca}.key"), format!("{name}.pem"), format!("{name}.ext"));
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_pem,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `socat` terminating TLS on a free port and forwarding to `backend`;
/// with `client_ca`, it asks for a client certificate signed by it.
pub struct TlsTerminator {
    child: Child,
    pub port: u16,
}

impl TlsTerminator {
    pub fn start(certs: &Certs, backend: &str, client_ca: Option<&Path>) -> TlsTerminator {
        TlsTerminator::start_on(free_port(), certs, backend, client_ca)
    }

    pub fn start_on(port: u16, certs: &Certs, backend: &str, client_ca: Option<&Path>) -> TlsTerminator {
        let verify = match client_ca {
            Some(ca) => format!("verify=1,cafile={}", ca.display()),
            None => "verify=0".to_string(),
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            certs.path("server.pem").display(),
            certs.path("server.key").display()
        );
        let child = Command::new("socat")
            .args([listen, format!("TCP:{backend}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat must be installed (scripts/test.sh does)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsTerminator { child, port }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private PostgreSQL serving TLS with the test CA's server certificate.
pub fn postgres_with_tls(certs: &Certs) -> PrivatePostgres {
    PrivatePostgres::start_with_tls(&certs.path("server.pem"), &certs.path("server.key"))
}
