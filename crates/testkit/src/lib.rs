//! What the services' tests share: protobuf-shaped bytes to feed every request type, a private
//! PostgreSQL server with a database per test ([`postgres`], [`backend_tests!`]),
//! and the list of request types a contract has, so a test can insist it covers them all.
//!
//! Only a dev-dependency: nothing here ships in `mip`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Bytes shaped like a protobuf message: up to 8 fields numbered 1 to `max_field` (a contract's
/// fields, and an unknown one past them), each with any wire type and a value from `leaf`
/// where a value is bytes. Many of them decode and reach the handler with odd values; others
/// fail on a wrong wire type, a length that lies about what follows, or invalid UTF-8.
pub fn protobuf_bytes(
    max_field: u32,
    leaf: impl Strategy<Value = Vec<u8>>,
) -> impl Strategy<Value = Vec<u8>> {
    let field = (1..=max_field, 0..5u8, any::<u64>(), leaf);
    prop::collection::vec(field, 0..8).prop_map(|fields| {
        let mut out = Vec::new();
        for (number, kind, number_value, bytes) in fields {
            match kind {
                0 => {
                    encode_key(number, WireType::Varint, &mut out);
                    encode_varint(number_value, &mut out);
                }
                1 => {
                    encode_key(number, WireType::SixtyFourBit, &mut out);
                    out.extend_from_slice(&number_value.to_le_bytes());
                }
                2 => {
                    encode_key(number, WireType::ThirtyTwoBit, &mut out);
                    out.extend_from_slice(&(number_value as u32).to_le_bytes());
                }
                3 => {
                    // A length that may lie about what follows.
                    encode_key(number, WireType::LengthDelimited, &mut out);
                    encode_varint(number_value % 1024, &mut out);
                    out.extend_from_slice(&bytes);
                }
                _ => {
                    encode_key(number, WireType::LengthDelimited, &mut out);
                    encode_varint(bytes.len() as u64, &mut out);
                    out.extend_from_slice(&bytes);
                }
            }
        }
        out
    })
}

/// The full names of every method's request type in an encoded descriptor set.
pub fn request_types(descriptor_set: &[u8]) -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(descriptor_set)
        .expect("the build's descriptor set decodes");
    set.file
        .iter()
        .flat_map(|file| &file.service)
        .flat_map(|service| &service.method)
        .map(|method| method.input_type().trim_start_matches('.').to_owned())
        .collect()
}

/// Any Unicode (control characters, lone combining marks, emoji), white space around, and
/// runs of one character up to 20,000 long.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        "[ \\t\\n]{0,3}\\PC{0,20}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]\\PC{0,20}",
        (any::<char>(), 0..20_000usize).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

/// How a call ended, as the properties compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted.
    Ok,
    /// INVALID_ARGUMENT naming these fields, in this order.
    Invalid(Vec<String>),
    /// Refused with this code (not INVALID_ARGUMENT).
    Refused(Code),
}

impl Outcome {
    /// INVALID_ARGUMENT naming `fields`, in this order.
    pub fn invalid(fields: &[&str]) -> Self {
        Outcome::Invalid(fields.iter().map(|f| (*f).to_owned()).collect())
    }

    /// How `result` ended.
    pub fn of<T>(result: &Result<T, Status>) -> Self {
        match result {
            Ok(_) => Outcome::Ok,
            Err(status) if status.code() == Code::InvalidArgument => Outcome::Invalid(
                status
                    .get_details_bad_request()
                    .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
                    .unwrap_or_default(),
            ),
            Err(status) => Outcome::Refused(status.code()),
        }
    }
}

/// The property tests' settings: `cases` cases, and no failure files written into the source
/// tree (a failing input is printed instead).
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

pub mod postgres;

/// A new, empty PostgreSQL database on the test process's shared server, as a store's
/// [`mip_runtime::store::Database`]; `None` (after one skip line) where PostgreSQL is missing.
pub fn postgres_database() -> Option<mip_runtime::store::Database> {
    let server = postgres::PgServer::shared()?;
    Some(
        mip_runtime::store::Database::from_url(&server.create_database(), 8)
            .expect("a test database URL parses"),
    )
}

/// Runs the same test against every backend: each `async fn name(db: Database) { .. }` becomes
/// a module `name` with the tests `sqlite` (a temporary directory) and `postgres` (a fresh
/// database on the test process's own server, skipped where PostgreSQL is missing).
#[macro_export]
macro_rules! backend_tests {
    ($( $(#[doc = $doc:literal])* async fn $name:ident($db:ident: Database) $body:block )*) => {
        $(
            $(#[doc = $doc])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let dir = tempfile::tempdir().expect("temp dir");
                    let $db = mip_runtime::store::Database::Sqlite {
                        dir: dir.path().to_path_buf(),
                        durability: mip_runtime::sqlite::Durability::Normal,
                    };
                    $body
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let Some($db) = $crate::postgres_database() else {
                        return;
                    };
                    $body
                }
            }
        )*
    };
}
