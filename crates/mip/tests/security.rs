//! The platform with security on, as a deployment would run it: TLS with client certificates
//! (mutual TLS) on every server, a bearer token on every call, and the integration service
//! using both to reach CRM and Inventory. Certificates are made at test time with rcgen.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Process, free_port, run_mip, run_mip_with_stderr};
use mip_proto::crm::v1::CreateCustomerRequest;
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::inventory::v1::ListPackageRequestsRequest;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_runtime::security::{AuthenticatedChannel, Security, SecurityOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic_health::pb::health_check_response::ServingStatus;

/// The token the platform accepts.
const TOKEN: &str = "s3cret-platform-token-for-tests";

/// How long the platform may take to start or to deliver a package.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate authority and what it signed, written as PEM files.
struct Pki {
    /// Keeps the files alive.
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost signed by it (also used as the
    /// integration service's client certificate), a client certificate, and an unrelated CA.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = certificate_authority("mip test CA", dir.path(), "ca");
        issue(&ca, &["127.0.0.1", "localhost"], dir.path(), "server");
        issue(&ca, &[], dir.path(), "client");
        certificate_authority("someone else's CA", dir.path(), "other-ca");
        std::fs::write(
            dir.path().join("tokens"),
            format!("# test token\n{TOKEN}\n"),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client-side security: trust `ca`, present the client certificate if `with_certificate`,
    /// send `token` if given.
    fn client(&self, ca: &str, with_certificate: bool, token: Option<&str>) -> Security {
        SecurityOptions {
            tls_ca: Some(self.path(&format!("{ca}.pem"))),
            tls_cert: with_certificate.then(|| self.path("client.pem")),
            tls_key: with_certificate.then(|| self.path("client-key.pem")),
            auth_token: token.map(|t| t.parse().unwrap()),
            ..SecurityOptions::default()
        }
        .load()
        .unwrap()
    }
}

fn certificate_authority(name: &str, dir: &Path, file: &str) -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let certificate = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), certificate.pem()).unwrap();
    Issuer::new(params, key)
}

fn issue(ca: &Issuer<'static, KeyPair>, names: &[&str], dir: &Path, file: &str) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.distinguished_name.push(DnType::CommonName, file);
    let certificate = params.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), certificate.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
}

/// `mip all` with mutual TLS and the token file, on free ports.
struct SecurePlatform {
    process: Process,
    crm: String,
    inventory: String,
    _data: tempfile::TempDir,
}

impl SecurePlatform {
    async fn start(pki: &Pki) -> Self {
        let data = tempfile::tempdir().unwrap();
        let [crm, inventory, integration] = [free_port(), free_port(), free_port()];
        let path = |name: &str| pki.path(name).display().to_string();
        let args: Vec<String> = [
            "all",
            "--crm-listen",
            &format!("127.0.0.1:{crm}"),
            "--inventory-listen",
            &format!("127.0.0.1:{inventory}"),
            "--integration-listen",
            &format!("127.0.0.1:{integration}"),
            "--data-dir",
            &data.path().display().to_string(),
            "--durability",
            "normal",
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server-key.pem"),
            "--tls-client-ca",
            &path("ca.pem"),
            "--tls-ca",
            &path("ca.pem"),
            "--auth-token-file",
            &path("tokens"),
        ]
        .map(str::to_owned)
        .to_vec();
        let mut process = Process::spawn("mip all", &args, &BTreeMap::new(), data.path());
        Self {
            crm: format!("127.0.0.1:{crm}"),
            inventory: format!("127.0.0.1:{inventory}"),
            process: {
                // Health needs TLS and a client certificate, but no token.
                let probe = pki.client("ca", true, None);
                let deadline = Instant::now() + CONVERGE_TIMEOUT;
                let addr = format!("127.0.0.1:{integration}");
                loop {
                    let status =
                        mip_runtime::probe::check(&addr, "", Duration::from_secs(1), &probe).await;
                    if matches!(status, Ok(ServingStatus::Serving)) {
                        break;
                    }
                    assert!(process.exited().is_none(), "mip all exited while starting");
                    assert!(
                        Instant::now() < deadline,
                        "mip all did not start: {status:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                process
            },
            _data: data,
        }
    }

    async fn crm(
        &self,
        security: &Security,
    ) -> Result<CrmServiceClient<AuthenticatedChannel>, String> {
        let channel = connect(&self.crm, security).await?;
        Ok(CrmServiceClient::new(channel))
    }

    async fn inventory(
        &self,
        security: &Security,
    ) -> Result<InventoryServiceClient<AuthenticatedChannel>, String> {
        let channel = connect(&self.inventory, security).await?;
        Ok(InventoryServiceClient::new(channel))
    }
}

/// Connects eagerly, so a refused handshake shows here.
async fn connect(addr: &str, security: &Security) -> Result<AuthenticatedChannel, String> {
    let channel = security
        .endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(InterceptedService::new(channel, security.authenticator()))
}

fn customer(n: u32) -> CreateCustomerRequest {
    CreateCustomerRequest {
        name: format!("Secure Customer {n}"),
        email: format!("secure-{n}@example.com"),
        request_id: String::new(),
    }
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("the test took too long");
}

#[tokio::test]
async fn with_mutual_tls_and_a_token_every_customer_still_gets_a_package() {
    bounded(async {
        let pki = Pki::new();
        let platform = SecurePlatform::start(&pki).await;
        let trusted = pki.client("ca", true, Some(TOKEN));

        let mut crm = platform.crm(&trusted).await.unwrap();
        let created = crm.create_customer(customer(1)).await.unwrap().into_inner();

        let mut inventory = platform.inventory(&trusted).await.unwrap();
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let packages = inventory
                .list_package_requests(ListPackageRequestsRequest {
                    customer_id: created.id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .package_requests;
            if !packages.is_empty() {
                assert_eq!(packages.len(), 1, "{packages:?}");
                break;
            }
            assert!(Instant::now() < deadline, "no package for {}", created.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let log = platform.process.log_tail(usize::MAX);
        assert!(!log.contains(TOKEN), "the token appeared in the log");
    })
    .await;
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated_but_health_is_open() {
    bounded(async {
        let pki = Pki::new();
        let platform = SecurePlatform::start(&pki).await;

        for token in [None, Some("wrong-token")] {
            // The reason tells a program which of the two it is; each service names its own
            // domain.
            let reason = if token.is_none() {
                "AUTH_TOKEN_MISSING"
            } else {
                "AUTH_TOKEN_INVALID"
            };
            let mut crm = platform.crm(&pki.client("ca", true, token)).await.unwrap();
            let status = crm.create_customer(customer(2)).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{token:?}: {status:?}"
            );
            assert_eq!(
                mip_runtime::status::reason(&status).as_deref(),
                Some(reason)
            );
            assert_eq!(
                mip_runtime::status::domain(&status).as_deref(),
                Some("crm.mip.example.com")
            );
            let mut inventory = platform
                .inventory(&pki.client("ca", true, token))
                .await
                .unwrap();
            let status = inventory
                .list_package_requests(ListPackageRequestsRequest::default())
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{token:?}: {status:?}"
            );
            assert_eq!(
                mip_runtime::status::reason(&status).as_deref(),
                Some(reason)
            );
            assert_eq!(
                mip_runtime::status::domain(&status).as_deref(),
                Some("inventory.mip.example.com")
            );
        }

        let probe = pki.client("ca", true, None);
        let status = mip_runtime::probe::check(&platform.crm, "", Duration::from_secs(5), &probe)
            .await
            .unwrap();
        assert_eq!(status, ServingStatus::Serving);
    })
    .await;
}

#[tokio::test]
async fn a_server_signed_by_an_unknown_ca_is_refused() {
    bounded(async {
        let pki = Pki::new();
        let platform = SecurePlatform::start(&pki).await;
        let error = platform
            .crm(&pki.client("other-ca", true, Some(TOKEN)))
            .await
            .unwrap_err();
        assert!(
            error.contains("UnknownIssuer") || error.contains("certificate"),
            "{error}"
        );
    })
    .await;
}

/// The connection was closed under the call (the TLS layer refused it), so no service ever
/// answered: the status is the client's own, with the transport error as its source.
fn assert_refused_by_transport(status: &tonic::Status) {
    let transport = std::error::Error::source(status)
        .and_then(|source| source.downcast_ref::<tonic::transport::Error>());
    assert!(transport.is_some(), "{status:?}");
}

#[tokio::test]
async fn without_a_client_certificate_mutual_tls_refuses_the_connection() {
    bounded(async {
        let pki = Pki::new();
        let platform = SecurePlatform::start(&pki).await;
        // TLS 1.3 finishes the client's side of the handshake before the server checks the
        // certificate, so the refusal may arrive with the first call instead of at connect.
        match platform.crm(&pki.client("ca", false, Some(TOKEN))).await {
            Err(_refused_at_connect) => {}
            Ok(mut crm) => {
                let status = crm
                    .create_customer(customer(3))
                    .await
                    .expect_err("a client without a certificate was served");
                assert_refused_by_transport(&status);
            }
        }

        // Plain text to a TLS port fails too, rather than hanging.
        if let Ok(mut crm) = platform.crm(&Security::default()).await {
            let status = crm.create_customer(customer(4)).await.unwrap_err();
            assert_refused_by_transport(&status);
        }
    })
    .await;
}

#[test]
fn configuration_errors_name_the_file_and_never_print_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let data = dir.path().join("data");
    let (status, _, stderr) = run_mip_with_stderr(
        &[
            "crm",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
            "--tls-cert",
            &missing.display().to_string(),
            "--tls-key",
            &missing.display().to_string(),
        ],
        &BTreeMap::new(),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("cannot read TLS certificate") && stderr.contains("missing.pem"),
        "{stderr}"
    );

    // A token that cannot be sent is refused without being quoted.
    let bad = "bad token with spaces";
    let env = BTreeMap::from([("MIP_AUTH_TOKEN".to_owned(), bad.to_owned())]);
    let (status, _, stderr) = run_mip_with_stderr(
        &[
            "crm",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
        ],
        &env,
    );
    assert!(!status.success());
    assert!(stderr.contains("--auth-token (MIP_AUTH_TOKEN)"), "{stderr}");
    assert!(
        !stderr.contains(bad),
        "the error quoted the token: {stderr}"
    );

    let env = BTreeMap::from([("MIP_AUTH_TOKEN".to_owned(), TOKEN.to_owned())]);
    let (status, help) = run_mip(&["all", "--help"], &env);
    assert!(status.success());
    assert!(help.contains("--auth-token"), "{help}");
    assert!(!help.contains(TOKEN), "--help printed the token");
}
