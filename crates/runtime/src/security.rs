//! Who may talk to a server, and how the platform's services talk to each other: TLS
//! (optionally mutual) on every listener and every outgoing channel, and bearer tokens.
//!
//! Everything is off by default, so `mip all` runs on loopback with nothing set. Files are read
//! and checked once at start-up, so a wrong path or a malformed PEM stops the service with an
//! error naming the file instead of failing every handshake later.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a client has to finish the TLS handshake before its connection is dropped, so
/// half-open connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, &'static str> {
        parse_token(text.trim())
    }
}

/// clap's parser of `--auth-token`: takes any text, so that a bad token is refused by
/// [`SecurityOptions::load`] with an error that does not quote it (clap's own error would).
fn unchecked_secret(text: &str) -> Result<Secret, String> {
    Ok(Secret(text.trim().to_owned()))
}

/// A token is sent as `authorization: Bearer <token>`, so it must be a non-empty header value
/// without spaces.
fn parse_token(text: &str) -> Result<Secret, &'static str> {
    if text.is_empty() {
        return Err("the token is empty");
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token may hold only visible ASCII characters, without spaces");
    }
    Ok(Secret(text.to_owned()))
}

/// TLS and token flags, shared by every server (and by the integration service's clients).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityOptions {
    /// PEM certificate chain this service presents. Turns TLS on (needs --tls-key). The
    /// integration service also presents it to CRM and Inventory as its client certificate.
    #[arg(long, env = "MIP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "MIP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to. Turns on mutual TLS: a
    /// client without a valid certificate is refused during the handshake.
    #[arg(long, env = "MIP_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM CA certificates trusted when this service calls another (the integration service
    /// calling CRM and Inventory). Turns TLS on for those calls.
    #[arg(long, env = "MIP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// File of bearer tokens, one per line (blank lines and `#` comments are skipped). Calls
    /// must send `authorization: Bearer <token>` with one of them, or get UNAUTHENTICATED;
    /// several lines allow rotation. Clients send the first.
    #[arg(long, env = "MIP_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<PathBuf>,

    /// A bearer token given directly. Prefer the environment variable or --auth-token-file:
    /// a command line is visible to every user of the machine.
    #[arg(long, env = "MIP_AUTH_TOKEN", hide_env_values = true, value_parser = unchecked_secret)]
    pub auth_token: Option<Secret>,

    /// Let reflection (service listing, `grpcurl describe`) answer without a token. The health
    /// check always answers without one, so probes need no secret.
    #[arg(long, env = "MIP_REFLECTION_PUBLIC")]
    pub reflection_public: bool,
}

/// Why the TLS or token configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file was for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file was read but does not hold what it should.
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        /// What the file was for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The token given by `--auth-token` or `MIP_AUTH_TOKEN` is not usable.
    #[error("--auth-token (MIP_AUTH_TOKEN): {reason}")]
    Token {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An address is not a valid endpoint.
    #[error("invalid address {addr:?}: {source}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it is invalid.
        source: tonic::transport::Error,
    },
    /// TLS could not be set up on a channel.
    #[error("TLS set-up for {addr} failed: {source}")]
    Tls {
        /// The address being called.
        addr: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
}

/// The loaded form of [`SecurityOptions`]: certificates parsed, tokens read.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// This service's certificate and key, when TLS is on.
    identity: Option<Identity>,
    /// CAs that client certificates must chain to (mutual TLS).
    client_ca: Option<Certificate>,
    /// CAs trusted for outgoing calls; TLS on those calls when set.
    server_ca: Option<Certificate>,
    /// Accepted tokens; the first is the one sent. Empty: no authentication.
    tokens: Arc<[Secret]>,
    /// Whether reflection answers without a token.
    reflection_public: bool,
}

impl SecurityOptions {
    /// Reads and checks every configured file.
    pub fn load(&self) -> Result<Security, SecurityError> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read_certificates("TLS certificate", cert)?,
                read_private_key(key)?,
            )),
            _ => None,
        };
        let client_ca = self
            .tls_client_ca
            .as_deref()
            .map(|path| read_certificates("client CA file", path).map(Certificate::from_pem))
            .transpose()?;
        let server_ca = self
            .tls_ca
            .as_deref()
            .map(|path| read_certificates("CA file", path).map(Certificate::from_pem))
            .transpose()?;
        let tokens: Vec<Secret> = match (&self.auth_token_file, &self.auth_token) {
            (Some(path), _) => read_tokens(path)?,
            (None, Some(token)) => {
                // The reason never quotes the token.
                let token = parse_token(token.expose())
                    .map_err(|reason| SecurityError::Token { reason })?;
                vec![token]
            }
            (None, None) => Vec::new(),
        };
        Ok(Security {
            identity,
            client_ca,
            server_ca,
            tokens: tokens.into(),
            reflection_public: self.reflection_public,
        })
    }
}

impl Security {
    /// Client-side security for a probe or tool: trust `ca`, present `identity` if given.
    pub fn client(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, SecurityError> {
        let options = SecurityOptions {
            tls_ca: ca.map(Path::to_path_buf),
            tls_cert: identity.map(|(cert, _)| cert.to_path_buf()),
            tls_key: identity.map(|(_, key)| key.to_path_buf()),
            ..SecurityOptions::default()
        };
        options.load()
    }

    /// The server's TLS configuration, when TLS is on.
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        let mut config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(ca.clone());
        }
        Some(config)
    }

    /// Whether calls must carry a token.
    pub fn requires_token(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether reflection answers without a token.
    pub fn reflection_public(&self) -> bool {
        self.reflection_public
    }

    /// Whether `header` (the value of `authorization`) carries an accepted token. Compared in
    /// constant time, so timing does not leak how much of a guess was right (only whether its
    /// length is right).
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(bearer_token) else {
            return false;
        };
        self.tokens.iter().fold(false, |found, token| {
            found | bool::from(token.expose().as_bytes().ct_eq(presented))
        })
    }

    /// An endpoint for calling `addr` (`HOST:PORT` or a URL): `https` with the configured CA
    /// and client certificate when TLS is on for outgoing calls, `http` otherwise.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, SecurityError> {
        let url = if addr.contains("://") {
            addr.to_owned()
        } else if self.server_ca.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(url).map_err(|source| SecurityError::Address {
            addr: addr.to_owned(),
            source,
        })?;
        let Some(ca) = &self.server_ca else {
            return Ok(endpoint);
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(ca.clone());
        if let Some(identity) = &self.identity {
            tls = tls.identity(identity.clone());
        }
        endpoint
            .tls_config(tls)
            .map_err(|source| SecurityError::Tls {
                addr: addr.to_owned(),
                source,
            })
    }

    /// Adds this service's token to outgoing calls (does nothing when there is none).
    pub fn authenticator(&self) -> Authenticator {
        let header = self.tokens.first().map(|token| {
            MetadataValue::try_from(format!("Bearer {}", token.expose()))
                .expect("tokens are checked to be valid header values when loaded")
        });
        Authenticator { header }
    }
}

/// A client interceptor that sends the bearer token with every call.
#[derive(Clone, Default)]
pub struct Authenticator {
    /// `Bearer <token>`, or `None` when authentication is off.
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("token", &self.header.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// A channel to another service that carries this service's token.
pub type AuthenticatedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Authenticator>;

/// The token in `Bearer <token>` (the scheme is case-insensitive, as HTTP says).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
        .filter(|token| !token.is_empty())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a PEM file that must hold at least one certificate.
fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    let pem = read(what, path)?;
    let invalid = |reason: String| SecurityError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|e| invalid(format!("not a valid PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(pem)
}

/// Reads a PEM file that must hold a private key.
fn read_private_key(path: &Path) -> Result<Vec<u8>, SecurityError> {
    let what = "TLS key";
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| SecurityError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: format!("holds no PEM private key: {e}"),
    })?;
    Ok(pem)
}

/// Reads a token file: one token per line; blank lines and `#` comments skipped.
fn read_tokens(path: &Path) -> Result<Vec<Secret>, SecurityError> {
    let what = "auth token file";
    let text = read(what, path)?;
    let invalid = |reason: String| SecurityError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let text = String::from_utf8(text).map_err(|_| invalid("is not UTF-8 text".into()))?;
    let mut tokens = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The reason never quotes the line: it is a secret.
        let token = parse_token(line).map_err(|e| invalid(format!("line {}: {e}", number + 1)))?;
        tokens.push(token);
    }
    if tokens.is_empty() {
        return Err(invalid("holds no token".into()));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tokens(tokens: &[&str]) -> Security {
        Security {
            tokens: tokens.iter().map(|t| Secret((*t).to_owned())).collect(),
            ..Security::default()
        }
    }

    #[test]
    fn only_a_listed_bearer_token_is_accepted() {
        let security = with_tokens(&["old-token", "new-token"]);
        assert!(security.accepts(Some(b"Bearer new-token")));
        assert!(security.accepts(Some(b"bearer old-token")));
        assert!(!security.accepts(Some(b"Bearer new-toke")));
        assert!(!security.accepts(Some(b"Bearer new-token2")));
        assert!(!security.accepts(Some(b"Basic new-token")));
        assert!(!security.accepts(Some(b"new-token")));
        assert!(!security.accepts(Some(b"Bearer ")));
        assert!(!security.accepts(None));
    }

    #[test]
    fn secrets_never_print() {
        let secret: Secret = "s3cr3t".parse().unwrap();
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        let options = SecurityOptions {
            auth_token: Some(secret),
            ..SecurityOptions::default()
        };
        assert!(!format!("{options:?}").contains("s3cr3t"));
        let authenticator = options.load().unwrap().authenticator();
        assert!(!format!("{authenticator:?}").contains("s3cr3t"));
    }

    #[test]
    fn token_files_skip_comments_and_refuse_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# rotated 2026-11\n\n  first  \nsecond\n").unwrap();
        let tokens = read_tokens(&path).unwrap();
        assert_eq!(
            tokens,
            vec![Secret("first".into()), Secret("second".into())]
        );

        std::fs::write(&path, "has a space\n").unwrap();
        let error = read_tokens(&path).unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
        assert!(
            !error.contains("has a space"),
            "the error quoted the secret: {error}"
        );

        std::fs::write(&path, "# nothing here\n").unwrap();
        assert!(
            read_tokens(&path)
                .unwrap_err()
                .to_string()
                .contains("holds no token")
        );
    }

    #[test]
    fn unreadable_or_malformed_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = read_certificates("TLS certificate", &missing)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("cannot read TLS certificate"), "{error}");
        assert!(error.contains("missing.pem"), "{error}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let error = read_certificates("TLS certificate", &garbage)
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no PEM certificate"), "{error}");
        let error = read_private_key(&garbage).unwrap_err().to_string();
        assert!(error.contains("holds no PEM private key"), "{error}");
    }

    #[test]
    fn outgoing_calls_use_https_only_with_a_ca() {
        let plain = Security::default().endpoint("127.0.0.1:1").unwrap();
        assert_eq!(plain.uri().scheme_str(), Some("http"));
    }
}
