//! `mip dev-certs`: a private CA, a server certificate, a client certificate and a token, so
//! that TLS, mutual TLS and token authentication can be tried without openssl or a PKI.
//!
//! For development and tests only: a real deployment gets its certificates from its own CA.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Names every server certificate covers: loopback, and the compose service names.
const DEFAULT_NAMES: &[&str] = &[
    "localhost",
    "127.0.0.1",
    "::1",
    "crm",
    "inventory",
    "integration",
];

/// The files written, relative to `--out`.
const FILES: &[&str] = &[
    "ca.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
    "token",
];

/// Flags of `mip dev-certs`.
#[derive(Debug, clap::Args)]
pub struct DevCertsArgs {
    /// Directory to write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem and
    /// token into. Created if missing.
    #[arg(long, default_value = "./certs")]
    out: PathBuf,

    /// Extra DNS names or IP addresses for the server certificate (it always covers
    /// localhost, 127.0.0.1, ::1, crm, inventory and integration).
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,

    /// Replace files that already exist.
    #[arg(long, conflicts_with = "keep")]
    force: bool,

    /// If every file already exists, keep them and succeed without writing (for a start-up
    /// step that runs on every start, as in docker-compose.secure.yml).
    #[arg(long)]
    keep: bool,
}

/// Writes the files; prints what it wrote and how to use them.
pub fn run(args: &DevCertsArgs) -> anyhow::Result<()> {
    if args.keep && FILES.iter().all(|f| args.out.join(f).exists()) {
        println!(
            "keeping the certificates and token in {}",
            args.out.display()
        );
        return Ok(());
    }
    if !args.force
        && let Some(existing) = FILES.iter().map(|f| args.out.join(f)).find(|p| p.exists())
    {
        anyhow::bail!(
            "{} already exists; pass --force to replace the files in {}",
            existing.display(),
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mip development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_certificate = ca_params.self_signed(&ca_key)?;
    let ca = Issuer::new(ca_params, ca_key);
    write(&args.out, "ca.pem", &ca_certificate.pem(), false)?;

    let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|n| (*n).to_owned()).collect();
    names.extend(args.names.iter().cloned());
    // The services present this certificate as servers and, calling each other, as clients.
    issue(
        &ca,
        names,
        "mip server",
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &args.out,
        "server",
    )?;
    issue(
        &ca,
        Vec::new(),
        "mip client",
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &args.out,
        "client",
    )?;

    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    write(&args.out, "token", &format!("{token}\n"), true)?;

    let dir = args.out.display();
    println!("wrote {} to {dir}", FILES.join(", "));
    println!(
        "serve with:  mip all --tls-cert {dir}/server.pem --tls-key {dir}/server-key.pem \
         --tls-client-ca {dir}/ca.pem --tls-ca {dir}/ca.pem --auth-token-file {dir}/token"
    );
    println!(
        "call with:   grpcurl -cacert {dir}/ca.pem -cert {dir}/client.pem -key {dir}/client-key.pem \
         -H \"authorization: Bearer $(cat {dir}/token)\" 127.0.0.1:50051 list"
    );
    Ok(())
}

/// Issues a certificate for `names`, signed by `ca`, as `<file>.pem` and `<file>-key.pem`.
fn issue(
    ca: &Issuer<'_, KeyPair>,
    names: Vec<String>,
    common_name: &str,
    usages: &[ExtendedKeyUsagePurpose],
    dir: &Path,
    file: &str,
) -> anyhow::Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names).context("invalid certificate name")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages.to_vec();
    let certificate = params.signed_by(&key, ca)?;
    write(dir, &format!("{file}.pem"), &certificate.pem(), false)?;
    write(dir, &format!("{file}-key.pem"), &key.serialize_pem(), true)
}

/// Writes `contents`; secrets are readable by their owner only.
fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> anyhow::Result<()> {
    let path = dir.join(name);
    // Replaced rather than truncated, so an old file's looser permissions do not carry over.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot replace {}", path.display()));
        }
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
