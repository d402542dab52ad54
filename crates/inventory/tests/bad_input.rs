//! Inventory under bad input, called through the service trait with no network in between:
//! every field of every request takes arbitrary values (any Unicode, huge lengths, any
//! `page_size`, status or token), and arbitrary bytes are decoded as every request type and
//! handed to the handler. Nothing panics; each call is accepted or refused exactly as the
//! contract in `proto/inventory/v1/inventory.proto` says, with the bad fields named.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use mip_inventory::{InventoryApi, SqliteStore};
use mip_proto::inventory::v1 as pb;
use mip_proto::inventory::v1::inventory_service_server::InventoryService;
use mip_runtime::clock::SystemClock;
use mip_runtime::sqlite::Durability;
use mip_runtime::token;
use mip_testkit::{Outcome, text};
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;
use tokio::runtime::Runtime;
use tonic::{Code, Request, Status};
use uuid::Uuid;

/// Cases per property: enough to meet every class of input many times, few enough for CI.
const CASES: u32 = 128;

/// Kind of `ListPackageRequests` page tokens (`[filter_fingerprint, after]`).
const PAGE_TOKEN_KIND: u8 = 3;

/// Request ids that many generated creates share, so that repeats with the same and with other
/// parameters happen.
const REUSED_REQUEST_IDS: [&str; 3] = [
    "0190f2b4-0000-7000-8000-000000000001",
    "0190F2B4-0000-7000-8000-000000000002",
    " 0190f2b4000070008000000000000003 ",
];

/// What each `request_id` created: its parameters (customer, package type) and the package
/// request's id.
type Replays = HashMap<Uuid, ((Uuid, String), String)>;

/// An Inventory service over a fresh store holding three package requests: two for one
/// customer, one for another.
struct Fixture {
    /// Runs the async handlers; the properties themselves are synchronous.
    runtime: Runtime,
    /// The service under test.
    api: InventoryApi<SqliteStore>,
    /// The store's directory; removed on drop.
    _dir: tempfile::TempDir,
    /// The customer with two package requests.
    first: Uuid,
    /// The customer with one.
    second: Uuid,
    /// Ids of the three package requests, oldest first.
    packages: Vec<Uuid>,
    /// A genuine page token of the unfiltered listing.
    all_token: String,
    /// A genuine page token of the listing filtered on `first`.
    first_token: String,
}

impl Fixture {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = runtime
            .block_on(SqliteStore::open(dir.path(), Durability::Normal))
            .expect("store opens");
        let api = InventoryApi::new(Arc::new(store), Arc::new(SystemClock));
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let (packages, all_token, first_token) = runtime.block_on(async {
            let mut packages = Vec::new();
            for customer in [first, first, second] {
                let created = api
                    .create_package_request(Request::new(pb::CreatePackageRequestRequest {
                        customer_id: customer.to_string(),
                        package_type: "welcome_package".into(),
                        request_id: String::new(),
                    }))
                    .await
                    .expect("seeded package request")
                    .into_inner();
                packages.push(created.id.parse().expect("a UUID"));
            }
            let first_page = |customer_id: String| {
                api.list_package_requests(Request::new(pb::ListPackageRequestsRequest {
                    customer_id,
                    page_size: 1,
                    page_token: String::new(),
                }))
            };
            let all = first_page(String::new()).await.expect("first page");
            let of_first = first_page(first.to_string()).await.expect("first page");
            (
                packages,
                all.into_inner().next_page_token,
                of_first.into_inner().next_page_token,
            )
        });
        assert!(!all_token.is_empty() && !first_token.is_empty());
        Self {
            runtime,
            api,
            _dir: dir,
            first,
            second,
            packages,
            all_token,
            first_token,
        }
    }
}

/// `id` spelled every way a client might: hyphenated, upper case, simple, braced, URN, with
/// white space around.
fn spelled(id: Uuid) -> impl Strategy<Value = String> {
    (0..6u8).prop_map(move |form| match form {
        0 => id.hyphenated().to_string(),
        1 => id.hyphenated().to_string().to_uppercase(),
        2 => id.simple().to_string(),
        3 => id.braced().to_string(),
        4 => id.urn().to_string(),
        _ => format!("  {id}\t"),
    })
}

/// An id field: empty, a random UUID in any spelling, near misses, or anything at all.
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        2 => any::<u128>().prop_flat_map(|n| spelled(Uuid::from_u128(n))),
        1 => "[0-9a-fA-F-]{30,40}",
        1 => text(),
    ]
}

/// The UUID in an id field, if it holds one (white space around is allowed).
fn parse_id(raw: &str) -> Option<Uuid> {
    if raw.is_empty() {
        return None;
    }
    Uuid::try_parse(raw.trim()).ok()
}

/// A package type: valid ones, ones around the 64-character limit, near misses, anything.
fn package_type() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_]{1,64}",
        1 => "[a-z0-9_]{60,70}",
        1 => "[A-Za-z0-9_ .-]{1,20}",
        1 => Just("café".to_owned()),
        1 => Just(" welcome_package".to_owned()),
        2 => text(),
    ]
}

/// The documented rule: 1 to 64 characters of lower-case letters, digits and `_`, as given.
fn package_type_ok(raw: &str) -> bool {
    !raw.is_empty()
        && raw.chars().count() <= 64
        && raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
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

/// Replaces the character at `at` with `with` (or with `!` if they are the same).
fn mutate(token: &str, at: Index, with: char) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let at = at.index(chars.len());
    chars[at] = if chars[at] == with { '!' } else { with };
    chars.into_iter().collect()
}

/// CreatePackageRequest: each bad field is named; a valid request creates a PENDING package
/// request as given; repeating it with its `request_id` returns the first, and reusing the
/// `request_id` for other parameters is ALREADY_EXISTS.
#[test]
fn create_package_request_accepts_exactly_valid_requests() {
    let fx = Fixture::new();
    let replays: RefCell<Replays> = RefCell::default();
    let known = fx.first;
    proptest!(mip_testkit::config(CASES), |(
        customer_id in prop_oneof![id_text(), spelled(known)],
        package_type in package_type(),
        request_id in prop_oneof![
            2 => Just(String::new()),
            2 => prop::sample::select(REUSED_REQUEST_IDS.to_vec()).prop_map(str::to_owned),
            3 => id_text(),
        ],
    )| {
        let customer = parse_id(&customer_id);
        let request_uuid = parse_id(&request_id);
        let mut bad = Vec::new();
        if customer.is_none() {
            bad.push("customer_id");
        }
        if !package_type_ok(&package_type) {
            bad.push("package_type");
        }
        if !request_id.is_empty() && request_uuid.is_none() {
            bad.push("request_id");
        }
        let request = pb::CreatePackageRequestRequest {
            customer_id: customer_id.clone(),
            package_type: package_type.clone(),
            request_id: request_id.clone(),
        };
        let create = || {
            fx.runtime
                .block_on(fx.api.create_package_request(Request::new(request.clone())))
        };
        let result = create();
        let (Some(customer), true) = (customer, bad.is_empty()) else {
            prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&bad));
            return Ok(());
        };
        let fingerprint = (customer, package_type.clone());
        let replayed = request_uuid.and_then(|id| replays.borrow().get(&id).cloned());
        match replayed {
            Some((first, id)) if first == fingerprint => {
                let again = result.expect("a repeated request succeeds").into_inner();
                prop_assert_eq!(again.id, id);
            }
            Some(_) => prop_assert_eq!(Outcome::of(&result), Outcome::Refused(Code::AlreadyExists)),
            None => {
                let created = result.expect("a valid request succeeds").into_inner();
                prop_assert_eq!(&created.customer_id, &customer.to_string());
                prop_assert_eq!(&created.package_type, &package_type);
                prop_assert_eq!(created.status(), pb::PackageStatus::Pending);
                let again = create().expect("a repeated request succeeds").into_inner();
                match request_uuid {
                    Some(id) => {
                        prop_assert_eq!(&again.id, &created.id);
                        prop_assert_eq!(&created.request_id, &id.to_string());
                        replays.borrow_mut().insert(id, (fingerprint, created.id));
                    }
                    None => prop_assert_ne!(&again.id, &created.id),
                }
            }
        }
    });
}

/// BatchCreatePackageRequests: one result per request, in order; each invalid request names
/// exactly its bad fields, each valid one is created for its customer, and none spoils another.
#[test]
fn batch_creates_judge_each_request_on_its_own() {
    let fx = Fixture::new();
    let item = (
        id_text(),
        package_type(),
        prop_oneof![Just(String::new()), id_text()],
    );
    proptest!(mip_testkit::config(CASES), |(items in prop::collection::vec(item, 1..16))| {
        let requests: Vec<pb::CreatePackageRequestRequest> = items
            .iter()
            .map(|(customer_id, package_type, request_id)| pb::CreatePackageRequestRequest {
                customer_id: customer_id.clone(),
                package_type: package_type.clone(),
                request_id: request_id.clone(),
            })
            .collect();
        let response = fx
            .runtime
            .block_on(fx.api.batch_create_package_requests(Request::new(
                pb::BatchCreatePackageRequestsRequest { requests: requests.clone() },
            )))
            .expect("a batch of 1 to 15 requests is accepted")
            .into_inner();
        prop_assert_eq!(response.results.len(), requests.len());
        for (request, result) in requests.iter().zip(response.results) {
            let mut bad = Vec::new();
            if parse_id(&request.customer_id).is_none() {
                bad.push("customer_id");
            }
            if !package_type_ok(&request.package_type) {
                bad.push("package_type");
            }
            if !request.request_id.is_empty() && parse_id(&request.request_id).is_none() {
                bad.push("request_id");
            }
            match result.result.expect("every result is set") {
                pb::create_package_request_result::Result::Error(error) if !bad.is_empty() => {
                    prop_assert_eq!(error.code, Code::InvalidArgument as i32);
                    let fields: Vec<&str> =
                        error.field_violations.iter().map(|v| v.field.as_str()).collect();
                    prop_assert_eq!(fields, bad);
                }
                pb::create_package_request_result::Result::PackageRequest(created) => {
                    prop_assert!(bad.is_empty(), "{:?} was accepted", request);
                    let customer = parse_id(&request.customer_id).expect("valid");
                    prop_assert_eq!(created.customer_id, customer.to_string());
                    prop_assert_eq!(&created.package_type, &request.package_type);
                }
                // A random request id seen before with other parameters.
                pb::create_package_request_result::Result::Error(error) => {
                    prop_assert_eq!(error.code, Code::AlreadyExists as i32, "{:?}", error);
                }
            }
        }
    });
}

/// GetPackageRequest: a missing or malformed id is INVALID_ARGUMENT, an unknown one
/// NOT_FOUND, a known one (in any spelling) is found.
#[test]
fn get_package_request_refuses_bad_ids_and_finds_only_known_ones() {
    let fx = Fixture::new();
    let known = fx.packages[0];
    proptest!(mip_testkit::config(CASES), |(id in prop_oneof![id_text(), spelled(known)])| {
        let result = fx.runtime.block_on(fx.api.get_package_request(Request::new(
            pb::GetPackageRequestRequest { id: id.clone() },
        )));
        let expected = match parse_id(&id) {
            None => Outcome::invalid(&["id"]),
            Some(parsed) if parsed == known => Outcome::Ok,
            Some(_) => Outcome::Refused(Code::NotFound),
        };
        prop_assert_eq!(Outcome::of(&result), expected);
    });
}

/// UpdatePackageRequestStatus: a bad id and a status outside the four defined ones are both
/// named; an unknown id is NOT_FOUND; a known package request moves only along the life
/// cycle (PENDING to SHIPPED to DELIVERED, PENDING to CANCELLED), setting the current status
/// again is a no-op, and any other move is FAILED_PRECONDITION.
#[test]
fn status_updates_follow_the_life_cycle_and_name_bad_fields() {
    use pb::PackageStatus::{Cancelled, Delivered, Pending, Shipped};
    let fx = Fixture::new();
    let states: RefCell<Vec<pb::PackageStatus>> = RefCell::new(vec![Pending; fx.packages.len()]);
    let packages = fx.packages.clone();
    let id = prop_oneof![
        id_text().prop_map(|id| (id, None)),
        (0..packages.len())
            .prop_flat_map(move |n| spelled(packages[n]).prop_map(move |id| (id, Some(n)))),
    ];
    proptest!(mip_testkit::config(CASES), |(
        (id, known) in id,
        status in prop_oneof![3 => 0..=5, 1 => any::<i32>()],
    )| {
        let result = fx.runtime.block_on(fx.api.update_package_request_status(Request::new(
            pb::UpdatePackageRequestStatusRequest { id: id.clone(), status },
        )));
        let to = pb::PackageStatus::try_from(status).ok().filter(|s| *s != pb::PackageStatus::Unspecified);
        let mut bad = Vec::new();
        if parse_id(&id).is_none() {
            bad.push("id");
        }
        if to.is_none() {
            bad.push("status");
        }
        let (Some(to), true) = (to, bad.is_empty()) else {
            prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&bad));
            return Ok(());
        };
        let Some(n) = known else {
            prop_assert_eq!(Outcome::of(&result), Outcome::Refused(Code::NotFound));
            return Ok(());
        };
        let from = states.borrow()[n];
        let allowed = from == to
            || matches!((from, to), (Pending, Shipped) | (Shipped, Delivered) | (Pending, Cancelled));
        if allowed {
            let updated = result.expect("an allowed move succeeds").into_inner();
            prop_assert_eq!(updated.status(), to);
            states.borrow_mut()[n] = to;
        } else {
            prop_assert_eq!(Outcome::of(&result), Outcome::Refused(Code::FailedPrecondition));
        }
    });
}

/// Page tokens of every kind: none, well-formed ones, and every way of getting one wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageToken {
    /// No token.
    Empty,
    /// Well-formed (issued by the server, or made by a client that knows the format: tokens
    /// are checksummed, not signed): bound to `filter`, reading after position `after`.
    Issued {
        /// The `customer_id` filter the token is bound to.
        filter: Option<Uuid>,
        /// Position of the last package request already listed.
        after: u64,
    },
    /// Not a page token of this method at all.
    Invalid,
}

fn page_token(fx: &Fixture) -> impl Strategy<Value = (String, PageToken)> {
    let (first, second) = (fx.first, fx.second);
    let all = PageToken::Issued {
        filter: None,
        after: 1,
    };
    let of_first = PageToken::Issued {
        filter: Some(first),
        after: 1,
    };
    let spaced = format!(" {}\n", fx.first_token);
    let mutated = fx.all_token.clone();
    let filter = prop_oneof![
        Just(None),
        Just(Some(first)),
        Just(Some(second)),
        any::<u128>().prop_map(|n| Some(Uuid::from_u128(n))),
    ];
    let after = prop_oneof![0..=4u64, Just(u64::MAX), any::<u64>()];
    prop_oneof![
        Just((String::new(), PageToken::Empty)),
        Just((fx.all_token.clone(), all)),
        Just((fx.first_token.clone(), of_first)),
        Just((spaced, of_first)),
        (filter, after).prop_map(|(filter, after)| {
            let fingerprint =
                token::fingerprint(&[&filter.map(|f| f.to_string()).unwrap_or_default()]);
            (
                token::encode(PAGE_TOKEN_KIND, &[fingerprint, after]),
                PageToken::Issued { filter, after },
            )
        }),
        (any::<Index>(), any::<char>())
            .prop_map(move |(at, c)| (mutate(&mutated, at, c), PageToken::Invalid)),
        (any::<u8>(), prop::collection::vec(any::<u64>(), 0..=4))
            .prop_filter("not a well-formed package page token", |(kind, values)| {
                *kind != PAGE_TOKEN_KIND || values.len() != 2
            })
            .prop_map(|(kind, values)| (token::encode(kind, &values), PageToken::Invalid)),
        text().prop_map(|s| {
            let class = if s.is_empty() {
                PageToken::Empty
            } else {
                PageToken::Invalid
            };
            (s, class)
        }),
    ]
}

/// ListPackageRequests: a malformed `customer_id`, a negative `page_size` and a token that is
/// not a page token are each named; a well-formed token must come with the filter it was
/// issued for (unless the filter itself is malformed, which is reported instead); otherwise the
/// page holds what the filter selects after the token's position, at most `page_size` (0
/// meaning 100, at most 1000).
#[test]
fn list_package_requests_binds_tokens_to_their_filter() {
    let fx = Fixture::new();
    let (first, second) = (fx.first, fx.second);
    // The seeded package requests, at positions 1, 2, 3 (the first three writes).
    let seeded = [(1u64, first), (2, first), (3, second)];
    proptest!(mip_testkit::config(CASES), |(
        customer_id in prop_oneof![
            Just(String::new()),
            spelled(first),
            spelled(second),
            id_text(),
        ],
        page_size in page_size(),
        (page_token, class) in page_token(&fx),
    )| {
        let result = fx.runtime.block_on(fx.api.list_package_requests(Request::new(
            pb::ListPackageRequestsRequest {
                customer_id: customer_id.clone(),
                page_size,
                page_token,
            },
        )));
        let filter_ok = customer_id.is_empty() || parse_id(&customer_id).is_some();
        let filter = parse_id(&customer_id);
        let (token_ok, after) = match class {
            PageToken::Empty => (true, 0),
            PageToken::Invalid => (false, 0),
            PageToken::Issued { filter: bound, after } => (!filter_ok || bound == filter, after),
        };
        let mut bad = Vec::new();
        if !filter_ok {
            bad.push("customer_id");
        }
        if page_size < 0 {
            bad.push("page_size");
        }
        if !token_ok {
            bad.push("page_token");
        }
        if !bad.is_empty() {
            prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&bad));
            return Ok(());
        }
        let page = result.expect("a valid listing succeeds").into_inner();
        let expected: Vec<String> = seeded
            .iter()
            .filter(|(seq, customer)| *seq > after && filter.is_none_or(|f| f == *customer))
            .map(|(seq, _)| fx.packages[*seq as usize - 1].to_string())
            .take(if page_size == 0 { 100 } else { page_size.min(1000) as usize })
            .collect();
        let listed: Vec<String> = page.package_requests.into_iter().map(|p| p.id).collect();
        prop_assert_eq!(listed, expected);
    });
}

/// Every request type of `inventory.v1.InventoryService`, by full name.
const REQUEST_TYPES: [&str; 5] = [
    "inventory.v1.CreatePackageRequestRequest",
    "inventory.v1.BatchCreatePackageRequestsRequest",
    "inventory.v1.GetPackageRequestRequest",
    "inventory.v1.ListPackageRequestsRequest",
    "inventory.v1.UpdatePackageRequestStatusRequest",
];

/// Decodes `bytes` as request type `index` of [`REQUEST_TYPES`] and, if that works, calls its
/// handler. `None` when the bytes do not decode.
async fn decode_and_call(
    api: &InventoryApi<SqliteStore>,
    index: usize,
    bytes: &[u8],
) -> Option<Result<(), Status>> {
    fn decoded<M: Message + Default>(bytes: &[u8]) -> Option<Request<M>> {
        M::decode(bytes).ok().map(Request::new)
    }
    Some(match index {
        0 => api.create_package_request(decoded(bytes)?).await.map(drop),
        1 => {
            let request: Request<pb::BatchCreatePackageRequestsRequest> = decoded(bytes)?;
            let items = request.get_ref().requests.len();
            let response = match api.batch_create_package_requests(request).await {
                Ok(response) => response,
                Err(status) => return Some(Err(status)),
            };
            let results = response.into_inner().results;
            // One result per request, each a package request or an error from the contract.
            assert_eq!(results.len(), items);
            for result in results {
                match result.result.expect("every result is set") {
                    pb::create_package_request_result::Result::PackageRequest(_) => {}
                    pb::create_package_request_result::Result::Error(error) => assert!(
                        [Code::InvalidArgument, Code::AlreadyExists]
                            .contains(&Code::from(error.code)),
                        "{error:?}"
                    ),
                }
            }
            Ok(())
        }
        2 => api.get_package_request(decoded(bytes)?).await.map(drop),
        3 => api.list_package_requests(decoded(bytes)?).await.map(drop),
        4 => api
            .update_package_request_status(decoded(bytes)?)
            .await
            .map(drop),
        _ => unreachable!("{index} is not a request type"),
    })
}

/// Protobuf-shaped bytes: fields 1 to 4 (the request fields and an unknown one) with every
/// wire type, so that many inputs decode and reach the handler with odd values, and others
/// fail on a wrong wire type, a bad length or invalid UTF-8.
fn protobuf_bytes() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        text().prop_map(String::into_bytes),
        "[a-z0-9_]{1,64}".prop_map(String::into_bytes),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    mip_testkit::protobuf_bytes(4, leaf)
}

/// The request types above are all of the service's: a method added to the contract must be
/// added here too, or this fails.
#[test]
fn request_types_cover_every_method() {
    let covered = REQUEST_TYPES.iter().map(|t| (*t).to_owned()).collect();
    assert_eq!(
        mip_testkit::request_types(mip_proto::INVENTORY_DESCRIPTOR_SET),
        covered
    );
}

/// Arbitrary bytes decoded as every request type never panic; whatever decodes is handled with
/// a response or a status from the contract, never INTERNAL or UNKNOWN.
#[test]
fn arbitrary_bytes_as_any_request_are_handled_without_panicking() {
    let fx = Fixture::new();
    proptest!(ProptestConfig { cases: 256, ..mip_testkit::config(CASES) }, |(
        bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), protobuf_bytes()],
    )| {
        for (index, name) in REQUEST_TYPES.iter().enumerate() {
            let Some(result) = fx.runtime.block_on(decode_and_call(&fx.api, index, &bytes)) else {
                continue;
            };
            if let Err(status) = result {
                prop_assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument
                            | Code::NotFound
                            | Code::AlreadyExists
                            | Code::FailedPrecondition
                    ),
                    "{}: {:?}",
                    name,
                    status
                );
            }
        }
    });
}
