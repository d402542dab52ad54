//! Page and resume tokens under arbitrary input: whatever a client sends as a token, decoding
//! answers `Ok` or a `TokenError` and never panics; every token the server issues decodes to
//! what it was made from; and a token altered in any single character is refused, never read
//! as a different position.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mip_runtime::token::{TokenError, decode, encode};
use proptest::prelude::*;

/// The token kinds the services issue, with the number of values each carries: CRM resume
/// tokens, CRM `ListCustomers` page tokens, Inventory `ListPackageRequests` page tokens and
/// integration `ListDeadLetters` page tokens.
const ISSUED_KINDS: [(u8, usize); 4] = [(1, 2), (2, 3), (3, 2), (4, 1)];

/// The characters of unpadded URL-safe base64, the only ones an issued token contains.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Decodes `token` as a token of `kind` with `n` values (0 to 4), whatever `n` is.
fn decode_n(kind: u8, n: usize, token: &str) -> Result<Vec<u64>, TokenError> {
    match n {
        0 => decode::<0>(kind, token).map(Vec::from),
        1 => decode::<1>(kind, token).map(Vec::from),
        2 => decode::<2>(kind, token).map(Vec::from),
        3 => decode::<3>(kind, token).map(Vec::from),
        4 => decode::<4>(kind, token).map(Vec::from),
        _ => unreachable!("tokens here carry at most 4 values"),
    }
}

/// What decoding the raw token bytes must give, written from the format's description (version
/// 1, kind, big-endian values, CRC-32 of all of it) rather than from the decoder.
fn expected(kind: u8, n: usize, bytes: &[u8]) -> Result<Vec<u64>, TokenError> {
    if bytes.len() < 6 {
        return Err(TokenError::Malformed);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc || body[0] != 1 {
        return Err(TokenError::Malformed);
    }
    if body[1] != kind {
        return Err(TokenError::WrongKind);
    }
    if body.len() != 2 + 8 * n {
        return Err(TokenError::Malformed);
    }
    Ok(body[2..]
        .chunks_exact(8)
        .map(|chunk| u64::from_be_bytes(chunk.try_into().unwrap()))
        .collect())
}

/// Token bytes with a correct checksum over an arbitrary version, kind and payload, so that the
/// checks after the checksum (version, kind, length) are reached too.
fn checksummed() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u8), any::<u8>()],
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..48),
    )
        .prop_map(|(version, kind, payload)| {
            let mut bytes = vec![version, kind];
            bytes.extend_from_slice(&payload);
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_be_bytes());
            bytes
        })
}

/// Any kind and 0 to 4 values, including the kinds the services issue with their arity.
fn token_parts() -> impl Strategy<Value = (u8, Vec<u64>)> {
    prop_oneof![
        (any::<u8>(), prop::collection::vec(any::<u64>(), 0..=4)),
        prop::sample::select(ISSUED_KINDS.to_vec()).prop_flat_map(|(kind, n)| {
            (Just(kind), prop::collection::vec(any::<u64>(), n..=n))
        }),
    ]
}

/// 256 cases per property. Failures are not written to a file in the source tree: proptest
/// prints the smallest failing input, which is what a fix needs.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary text (any Unicode, any length) is refused or decoded, and a decoded token is
    /// exactly what the server would have issued for those values: there is no second spelling
    /// of a position.
    #[test]
    fn arbitrary_text_decodes_or_is_refused_without_panicking(
        text in prop_oneof![any::<String>(), "[A-Za-z0-9_-]{0,64}", "\\PC{0,4096}"],
        kind in any::<u8>(),
    ) {
        for n in 0..=4 {
            if let Ok(values) = decode_n(kind, n, &text) {
                prop_assert_eq!(encode(kind, &values), text.trim());
            }
        }
    }

    /// Arbitrary bytes behind valid base64, with or without a valid checksum, decode exactly as
    /// the format says: malformed, wrong kind, or the values.
    #[test]
    fn arbitrary_bytes_decode_exactly_as_the_format_says(
        bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..64), checksummed()],
        kind in any::<u8>(),
    ) {
        let token = URL_SAFE_NO_PAD.encode(&bytes);
        for n in 0..=4 {
            prop_assert_eq!(decode_n(kind, n, &token), expected(kind, n, &bytes), "n = {}", n);
        }
    }

    /// Every token decodes to the values it was made from, for its own kind and number of
    /// values, and is refused as any other kind.
    #[test]
    fn every_token_round_trips_and_is_refused_as_another_kind(
        (kind, values) in token_parts(),
        other in any::<u8>(),
    ) {
        let token = encode(kind, &values);
        prop_assert!(token.bytes().all(|b| ALPHABET.contains(&b)), "{} is not URL-safe", token);
        prop_assert_eq!(decode_n(kind, values.len(), &token), Ok(values.clone()));
        prop_assert_eq!(decode_n(kind, values.len(), &format!(" {token}\n")), Ok(values.clone()));
        if other != kind {
            prop_assert_eq!(decode_n(other, values.len(), &token), Err(TokenError::WrongKind));
        }
    }

    /// Replacing any one character of a token with any other character is refused.
    ///
    /// Another base64 character flips at most 6 adjacent bits, which CRC-32 always detects (it
    /// catches every error burst shorter than 32 bits), or only the unused low bits of the
    /// last character, which strict base64 refuses; so that is always `Malformed`. Any other
    /// character is not base64 (`Malformed`), except white space at either end, which is
    /// trimmed: the token is then one character short, decodes to a different number of bytes,
    /// and cannot have the length of a token with that many values, so it is refused too.
    #[test]
    fn any_single_character_change_is_refused(
        (kind, values) in token_parts(),
        position in any::<prop::sample::Index>(),
        replacement in prop_oneof![
            prop::sample::select(ALPHABET.to_vec()).prop_map(char::from),
            any::<char>(),
            Just(' '),
        ],
    ) {
        let token = encode(kind, &values);
        let mut chars: Vec<char> = token.chars().collect();
        let at = position.index(chars.len());
        prop_assume!(chars[at] != replacement);
        chars[at] = replacement;
        let altered: String = chars.into_iter().collect();
        let result = decode_n(kind, values.len(), &altered);
        if replacement.is_ascii() && ALPHABET.contains(&(replacement as u8)) {
            prop_assert_eq!(result, Err(TokenError::Malformed), "{} became {}", token, altered);
        } else {
            prop_assert!(result.is_err(), "{} became {} and decoded to {:?}", token, altered, result);
        }
    }
}

/// The argument above, checked exhaustively: every position, every other base64 character,
/// for tokens of every length the services use. Whether CRC-32 misses an error depends only on
/// which bits flip, not on the token's values, so one token per length covers them all.
#[test]
fn every_base64_substitution_is_malformed_for_every_token_length() {
    for n in 0..=4 {
        let values: Vec<u64> = (0..n)
            .map(|i| 0x0123_4567_89ab_cdef_u64.rotate_left(i * 7))
            .collect();
        let token = encode(9, &values);
        for at in 0..token.len() {
            for &c in ALPHABET {
                if token.as_bytes()[at] == c {
                    continue;
                }
                let mut altered = token.clone().into_bytes();
                altered[at] = c;
                let altered = String::from_utf8(altered).unwrap();
                assert_eq!(
                    decode_n(9, values.len(), &altered),
                    Err(TokenError::Malformed),
                    "{token} with position {at} changed to {altered}"
                );
            }
        }
    }
}
