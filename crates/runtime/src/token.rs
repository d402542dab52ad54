//! Opaque tokens for paging and resuming.
//!
//! A token is a handful of integers: a format version, a kind (so a page token of one method is
//! never taken for another's, nor for a resume token), the caller's values, and a CRC-32 over
//! all of it, encoded as URL-safe base64. The checksum turns typos and truncation into a clear
//! "malformed" error instead of a silently different position. Tokens are not secret and not
//! signed: they only carry positions the caller could read anyway.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Format version written into every token.
const VERSION: u8 = 1;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64, the wrong length, a bad checksum, or an unknown version.
    #[error("token is malformed")]
    Malformed,
    /// A well-formed token of another kind (for example a page token used as a resume token).
    #[error("token was issued for a different request")]
    WrongKind,
}

/// The kind of CRM's resume tokens, `[log id, position]`. Kept beside the format so the
/// integration service can tell which change log a saved checkpoint belongs to (clients
/// outside the platform treat tokens as opaque).
pub const CRM_RESUME: u8 = 1;

/// The change log a CRM resume token was issued by, if `token` is one.
pub fn crm_resume_log(token: &str) -> Option<u64> {
    decode::<2>(CRM_RESUME, token)
        .ok()
        .map(|[log_id, _]| log_id)
}

/// Encodes `values` as an opaque token of `kind`.
pub fn encode(kind: u8, values: &[u64]) -> String {
    let mut bytes = Vec::with_capacity(2 + values.len() * 8 + 4);
    bytes.push(VERSION);
    bytes.push(kind);
    for value in values {
        bytes.extend_from_slice(&value.to_be_bytes());
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a token of `kind` holding exactly `N` values.
pub fn decode<const N: usize>(kind: u8, token: &str) -> Result<[u64; N], TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| TokenError::Malformed)?;
    if bytes.len() < 6 {
        return Err(TokenError::Malformed);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_be_bytes(crc.try_into().map_err(|_| TokenError::Malformed)?);
    if crc32fast::hash(body) != crc || body[0] != VERSION {
        return Err(TokenError::Malformed);
    }
    if body[1] != kind {
        return Err(TokenError::WrongKind);
    }
    let values = &body[2..];
    if values.len() != N * 8 {
        return Err(TokenError::Malformed);
    }
    let mut out = [0u64; N];
    for (slot, chunk) in out.iter_mut().zip(values.chunks_exact(8)) {
        *slot = u64::from_be_bytes(chunk.try_into().map_err(|_| TokenError::Malformed)?);
    }
    Ok(out)
}

/// A stable fingerprint of request parameters, stored in page tokens so a token is only
/// accepted with the parameters it was issued for.
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    u64::from(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips() {
        let token = encode(7, &[42, u64::MAX]);
        assert_eq!(decode::<2>(7, &token), Ok([42, u64::MAX]));
    }

    #[test]
    fn altered_token_is_malformed() {
        let token = encode(1, &[5]);
        let mut chars: Vec<char> = token.chars().collect();
        chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        assert_eq!(decode::<1>(1, &altered), Err(TokenError::Malformed));
        assert_eq!(decode::<1>(1, "not a token!"), Err(TokenError::Malformed));
        assert_eq!(
            decode::<1>(1, &token[..token.len() - 2]),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn token_of_other_kind_is_refused() {
        let token = encode(1, &[5]);
        assert_eq!(decode::<1>(2, &token), Err(TokenError::WrongKind));
    }

    #[test]
    fn fingerprint_separates_parts() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
    }
}
