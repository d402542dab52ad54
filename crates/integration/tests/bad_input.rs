//! The integration service's admin API under bad input, called through the service trait with
//! no network in between: arbitrary `page_size`, page tokens and event ids, and arbitrary bytes
//! decoded as every request type and handed to the handler. Nothing panics; each call is
//! accepted or refused exactly as `proto/integration/v1/integration.proto` says, whichever
//! store the service keeps its dead letters in.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_integration::Stats;
use mip_integration::deliver::{Action, Deliverer, RandomJitter, RetryPolicy};
use mip_integration::engine::Handler;
use mip_integration::service::IntegrationApi;
use mip_integration::store::{self, DeadLetter, IntegrationStore};
use mip_proto::integration::v1 as pb;
use mip_proto::integration::v1::integration_service_server::IntegrationService;
use mip_runtime::CancellationToken;
use mip_runtime::clock::SystemClock;
use mip_runtime::security::Authenticator;
use mip_runtime::sqlite::Durability;
use mip_runtime::store::Database;
use mip_runtime::token;
use mip_testkit::{Outcome, text};
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;
use tokio::runtime::Runtime;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Status};

/// Event ids of the dead letters every fixture starts with, in insertion order.
const DEAD_LETTERS: [&str; 3] = ["event-1", "event-2", "event-3"];

/// Kind of `ListDeadLetters` page tokens (`[after_id]`).
const PAGE_TOKEN_KIND: u8 = 4;

/// The admin API over a fresh store holding [`DEAD_LETTERS`], with a deliverer whose Inventory
/// refuses connections, so that every re-drive fails at once and stays on the list.
struct Fixture {
    /// Runs the async handlers; the properties themselves are synchronous.
    runtime: Runtime,
    /// The service under test.
    api: IntegrationApi<dyn IntegrationStore>,
    /// The SQLite store's directory, if it is SQLite; removed on drop.
    _dir: Option<tempfile::TempDir>,
    /// A genuine page token (after the first dead letter).
    page_token: String,
}

/// One fixture per backend: SQLite in a temporary directory, and PostgreSQL where it is
/// installed (a fresh database), so every property holds on both.
fn fixtures() -> Vec<Fixture> {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = Database::Sqlite {
        dir: dir.path().to_path_buf(),
        durability: Durability::Normal,
    };
    let mut fixtures = vec![Fixture::new(&sqlite, Some(dir))];
    if let Some(postgres) = mip_testkit::postgres_database() {
        fixtures.push(Fixture::new(&postgres, None));
    }
    fixtures
}

impl Fixture {
    fn new(database: &Database, dir: Option<tempfile::TempDir>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let store = runtime.block_on(async {
            let store = store::open(database, &CancellationToken::new())
                .await
                .expect("store");
            store.ready().await.expect("store ready");
            store
        });
        // A port nothing listens on: bound, read, released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("an ephemeral port");
        let (api, page_token) = runtime.block_on(async {
            let now = SystemTime::now();
            for event_id in DEAD_LETTERS {
                store
                    .put_dead_letter(DeadLetter {
                        event_id: event_id.to_owned(),
                        customer_id: format!("customer of {event_id}"),
                        action: Action::Create,
                        reason: "InvalidArgument: seeded".to_owned(),
                        attempts: 1,
                        create_time: now,
                        update_time: now,
                    })
                    .await
                    .expect("seeded dead letter");
            }
            let channel = Endpoint::from_shared(format!("http://{closed}"))
                .expect("endpoint")
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy();
            let stats = Arc::new(Stats::default());
            let deliverer = Deliverer::new(
                InterceptedService::new(channel, Authenticator::default()),
                RetryPolicy {
                    max_attempts: 1,
                    initial_backoff: Duration::from_millis(1),
                    max_backoff: Duration::from_millis(1),
                    call_timeout: Duration::from_secs(5),
                },
                Arc::new(RandomJitter),
                Arc::clone(&stats),
                4 * 1024 * 1024,
            );
            let handler = Handler {
                store: Arc::clone(&store),
                deliverer,
                stats: Arc::clone(&stats),
                clock: Arc::new(SystemClock),
                shutdown: CancellationToken::new(),
                redrive: true,
            };
            let leases = Arc::new(mip_integration::lease::Leases::new(
                "local".to_owned(),
                Arc::clone(&store),
                mip_integration::lease::DEFAULT_PARTITIONS,
                Duration::from_secs(10),
                Arc::new(SystemClock),
                Arc::clone(&stats),
                Default::default(),
            ));
            let api = IntegrationApi::new(handler, stats, leases, "auto".to_owned());
            let first = api
                .list_dead_letters(Request::new(pb::ListDeadLettersRequest {
                    page_size: 1,
                    page_token: String::new(),
                }))
                .await
                .expect("first page")
                .into_inner();
            (api, first.next_page_token)
        });
        assert!(!page_token.is_empty());
        Self {
            runtime,
            api,
            _dir: dir,
            page_token,
        }
    }
}

/// A `page_size`: the default, the limits, and any number.
fn page_size() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(0),
        Just(-1),
        Just(i32::MAX),
        Just(i32::MIN),
        1..2000,
        any::<i32>()
    ]
}

/// A page token, with the position it reads after when it is acceptable (`None` when it must
/// be refused). A dead-letter page token carries nothing but a position, so any well-formed
/// one is acceptable.
fn page_token(genuine: String) -> impl Strategy<Value = (String, Option<u64>)> {
    let mutated = genuine.clone();
    prop_oneof![
        Just((String::new(), Some(0))),
        Just((genuine.clone(), Some(1))),
        Just((format!(" {genuine}\t"), Some(1))),
        any::<u64>().prop_map(|after| (token::encode(PAGE_TOKEN_KIND, &[after]), Some(after))),
        (any::<Index>(), any::<char>()).prop_map(move |(at, c)| {
            let mut chars: Vec<char> = mutated.chars().collect();
            let at = at.index(chars.len());
            chars[at] = if chars[at] == c { '!' } else { c };
            (chars.into_iter().collect(), None)
        }),
        (any::<u8>(), prop::collection::vec(any::<u64>(), 0..=4))
            .prop_filter(
                "not a well-formed dead-letter page token",
                |(kind, values)| { *kind != PAGE_TOKEN_KIND || values.len() != 1 }
            )
            .prop_map(|(kind, values)| (token::encode(kind, &values), None)),
        text().prop_map(|s| {
            let after = s.is_empty().then_some(0);
            (s, after)
        }),
    ]
}

/// ListDeadLetters: a negative `page_size` and a malformed token are each named; otherwise the
/// page holds the dead letters after the token's position, at most `page_size` (0 meaning 100,
/// at most 1000).
#[test]
fn list_dead_letters_refuses_bad_page_sizes_and_tokens() {
    for fx in fixtures() {
        proptest!(mip_testkit::config(128), |(
            page_size in page_size(),
            (page_token, after) in page_token(fx.page_token.clone()),
        )| {
            let result = fx.runtime.block_on(fx.api.list_dead_letters(Request::new(
                pb::ListDeadLettersRequest { page_size, page_token },
            )));
            let mut bad = Vec::new();
            if page_size < 0 {
                bad.push("page_size");
            }
            if after.is_none() {
                bad.push("page_token");
            }
            let (Some(after), true) = (after, bad.is_empty()) else {
                prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&bad));
                return Ok(());
            };
            let page = result.expect("a valid listing succeeds").into_inner();
            let limit = if page_size == 0 { 100 } else { page_size.min(1000) as usize };
            let expected: Vec<&str> = DEAD_LETTERS
                .iter()
                .zip(1u64..)
                .filter(|(_, id)| *id > after)
                .map(|(event_id, _)| *event_id)
                .take(limit)
                .collect();
            let listed: Vec<&str> = page.dead_letters.iter().map(|d| d.event_id.as_str()).collect();
            prop_assert_eq!(listed, expected);
        });
    }
}

/// RetryDeadLetters: an empty event id is INVALID_ARGUMENT; otherwise each named dead letter
/// (all of them when none is named) is tried once more and, as Inventory is unreachable, stays
/// on the list; unknown ids are ignored.
#[test]
fn retry_dead_letters_refuses_empty_ids_and_ignores_unknown_ones() {
    for fx in fixtures() {
        let id = prop_oneof![
            2 => prop::sample::select(DEAD_LETTERS.to_vec()).prop_map(str::to_owned),
            1 => Just(String::new()),
            2 => text(),
        ];
        proptest!(mip_testkit::config(64), |(event_ids in prop::collection::vec(id, 0..6))| {
            let result = fx.runtime.block_on(fx.api.retry_dead_letters(Request::new(
                pb::RetryDeadLettersRequest { event_ids: event_ids.clone() },
            )));
            if event_ids.iter().any(String::is_empty) {
                prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&["event_ids"]));
                return Ok(());
            }
            let retried = result.expect("a valid re-drive succeeds").into_inner();
            let named = DEAD_LETTERS
                .iter()
                .filter(|id| event_ids.is_empty() || event_ids.iter().any(|e| e == *id))
                .count();
            prop_assert_eq!(retried.delivered, 0);
            prop_assert_eq!(retried.still_failing as usize, named);
            let status = fx
                .runtime
                .block_on(fx.api.get_status(Request::new(pb::GetStatusRequest {})))
                .expect("status")
                .into_inner();
            prop_assert_eq!(status.dead_letters_pending, DEAD_LETTERS.len() as i64);
        });
    }
}

/// Every request type of `integration.v1.IntegrationService`, by full name.
const REQUEST_TYPES: [&str; 3] = [
    "integration.v1.GetStatusRequest",
    "integration.v1.ListDeadLettersRequest",
    "integration.v1.RetryDeadLettersRequest",
];

/// Decodes `bytes` as request type `index` of [`REQUEST_TYPES`] and, if that works, calls its
/// handler. `None` when the bytes do not decode.
async fn decode_and_call(
    api: &IntegrationApi<dyn IntegrationStore>,
    index: usize,
    bytes: &[u8],
) -> Option<Result<(), Status>> {
    fn decoded<M: Message + Default>(bytes: &[u8]) -> Option<Request<M>> {
        M::decode(bytes).ok().map(Request::new)
    }
    Some(match index {
        0 => api.get_status(decoded(bytes)?).await.map(drop),
        1 => api.list_dead_letters(decoded(bytes)?).await.map(drop),
        2 => api.retry_dead_letters(decoded(bytes)?).await.map(drop),
        _ => unreachable!("{index} is not a request type"),
    })
}

/// Protobuf-shaped bytes: fields 1 to 3 with every wire type, so that many inputs decode and
/// reach the handler with odd values, and others fail on a wrong wire type, a bad length or
/// invalid UTF-8.
fn protobuf_bytes() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        text().prop_map(String::into_bytes),
        prop::sample::select(DEAD_LETTERS.to_vec()).prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    mip_testkit::protobuf_bytes(3, leaf)
}

/// The request types above are all of the service's: a method added to the contract must be
/// added here too, or this fails.
#[test]
fn request_types_cover_every_method() {
    let covered = REQUEST_TYPES.iter().map(|t| (*t).to_owned()).collect();
    assert_eq!(
        mip_testkit::request_types(mip_proto::INTEGRATION_DESCRIPTOR_SET),
        covered
    );
}

/// Arbitrary bytes decoded as every request type never panic; whatever decodes is handled with
/// a response or INVALID_ARGUMENT, never INTERNAL or UNKNOWN.
#[test]
fn arbitrary_bytes_as_any_request_are_handled_without_panicking() {
    for fx in fixtures() {
        proptest!(mip_testkit::config(128), |(
            bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), protobuf_bytes()],
        )| {
            for (index, name) in REQUEST_TYPES.iter().enumerate() {
                let Some(result) = fx.runtime.block_on(decode_and_call(&fx.api, index, &bytes)) else {
                    continue;
                };
                if let Err(status) = result {
                    prop_assert_eq!(status.code(), Code::InvalidArgument, "{}: {:?}", name, status);
                    let (reason, domain) = (
                        mip_runtime::status::reason(&status),
                        mip_runtime::status::domain(&status),
                    );
                    prop_assert_eq!(reason.as_deref(), Some("INVALID_FIELD"));
                    prop_assert_eq!(domain.as_deref(), Some("integration.mip.example.com"));
                }
            }
        });
    }
}
