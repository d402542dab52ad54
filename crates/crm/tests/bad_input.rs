//! CRM under bad input, called through the service trait with no network in between: every
//! field of every request takes arbitrary values (any Unicode, huge lengths, any `page_size`,
//! any token), and arbitrary bytes are decoded as every request type and handed to the handler.
//! Nothing panics; each call is accepted or refused exactly as the contract in
//! `proto/crm/v1/crm.proto` says, with the bad fields named.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mip_crm::domain::Email;
use mip_crm::error::RESUME_TOKEN_UNKNOWN_LOG;
use mip_crm::{CrmApi, CrmOptions, SqliteStore};
use mip_proto::crm::v1 as pb;
use mip_proto::crm::v1::crm_service_server::CrmService;
use mip_runtime::CancellationToken;
use mip_runtime::clock::SystemClock;
use mip_runtime::sqlite::Durability;
use mip_runtime::status::reason;
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

/// Kind of CRM resume tokens, as the service encodes them (`[log_id, position]`).
const RESUME_TOKEN_KIND: u8 = 1;

/// Kind of `ListCustomers` page tokens (`[log_id, snapshot, after]`).
const PAGE_TOKEN_KIND: u8 = 2;

/// Request ids that many generated creates share, so that repeats with the same and with other
/// parameters happen.
const REUSED_REQUEST_IDS: [&str; 3] = [
    "0190f2b4-0000-7000-8000-000000000001",
    "0190F2B4-0000-7000-8000-000000000002",
    " 0190f2b4000070008000000000000003 ",
];

/// Customers created before the properties run, so that listings have pages and tokens.
const SEEDED: usize = 3;

/// What each `request_id` created: its parameters (trimmed name, email key) and the customer's
/// id.
type Replays = HashMap<Uuid, ((String, String), String)>;

/// A CRM service over a fresh store, and what the properties need to know about its data.
struct Fixture {
    /// Runs the async handlers; the properties themselves are synchronous.
    runtime: Runtime,
    /// The service under test.
    api: CrmApi<SqliteStore>,
    /// The store's directory; removed on drop.
    _dir: tempfile::TempDir,
    /// Ids of the seeded customers.
    customers: Vec<Uuid>,
    /// A genuine `ListCustomers` page token.
    page_token: String,
    /// The change log's id, as resume tokens carry it.
    log_id: u64,
    /// The newest event's position.
    head: u64,
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
        let api = CrmApi::new(
            Arc::new(store),
            CrmOptions::default(),
            Arc::new(SystemClock),
            CancellationToken::new(),
        );
        let (customers, page_token, resume_token) = runtime.block_on(async {
            let mut customers = Vec::new();
            for n in 0..SEEDED {
                let customer = api
                    .create_customer(Request::new(pb::CreateCustomerRequest {
                        name: format!("Seeded {n}"),
                        email: format!("seeded.{n}@example.com"),
                        request_id: String::new(),
                    }))
                    .await
                    .expect("seeded customer")
                    .into_inner();
                customers.push(customer.id.parse().expect("a UUID"));
            }
            let page = api
                .list_customers(Request::new(pb::ListCustomersRequest {
                    page_size: 1,
                    page_token: String::new(),
                }))
                .await
                .expect("first page")
                .into_inner();
            assert!(
                !page.next_page_token.is_empty(),
                "a first page of one has a next page"
            );
            (customers, page.next_page_token, page.resume_token)
        });
        let [log_id, head] =
            token::decode::<2>(RESUME_TOKEN_KIND, &resume_token).expect("a resume token");
        assert_eq!(head, SEEDED as u64);
        Self {
            runtime,
            api,
            _dir: dir,
            customers,
            page_token,
            log_id,
            head,
        }
    }
}

/// A UUID spelled every way a client might: hyphenated, upper case, simple, braced, URN, with
/// white space around.
fn uuid_text() -> impl Strategy<Value = String> {
    (any::<u128>(), 0..6u8).prop_map(|(n, form)| {
        let id = Uuid::from_u128(n);
        match form {
            0 => id.hyphenated().to_string(),
            1 => id.hyphenated().to_string().to_uppercase(),
            2 => id.simple().to_string(),
            3 => id.braced().to_string(),
            4 => id.urn().to_string(),
            _ => format!("  {id}\t"),
        }
    })
}

/// An id field: empty, a UUID in any spelling, near misses, or anything at all.
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        uuid_text(),
        "[0-9a-fA-F-]{30,40}",
        text()
    ]
}

/// Whether a required id field holds a UUID (white space around is allowed).
fn id_ok(raw: &str) -> bool {
    !raw.is_empty() && Uuid::try_parse(raw.trim()).is_ok()
}

/// A name: plausible ones, ones around the 200-character limit, blank ones, and anything.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z][A-Za-z .'-]{0,60}",
        3 => " {0,3}[a-z]{1,10} {0,3}",
        1 => (195..=205usize).prop_map(|n| "é".repeat(n)),
        1 => Just("   ".to_owned()),
        2 => text(),
    ]
}

/// The documented rule for names: 1 to 200 characters once trimmed, and no control characters.
fn name_ok(raw: &str) -> bool {
    let name = raw.trim();
    !name.is_empty() && name.chars().count() <= 200 && !name.chars().any(char::is_control)
}

/// An email, with whether it must be accepted (`Some(true)`), must be refused
/// (`Some(false)`), or is arbitrary text that the email parser decides (`None`).
fn email() -> impl Strategy<Value = (String, Option<bool>)> {
    prop_oneof![
        6 => (
            "[a-z0-9]{1,20}(\\.[a-z0-9]{1,10})?@[a-z0-9]{1,20}\\.[a-z]{2,6}",
            any::<bool>(),
            " {0,2}"
        )
            .prop_map(|(email, upper, pad)| {
                let email = if upper { email.to_uppercase() } else { email };
                (format!("{pad}{email}{pad}"), Some(true))
            }),
        1 => "[a-z0-9.]{0,40}".prop_map(|s| (s, Some(false))),
        1 => "[a-z]{1,5} [a-z]{1,5}@example\\.com".prop_map(|s| (s, Some(false))),
        1 => "[a-z]{1,10}@[a-z]{1,10}".prop_map(|s| (s, Some(false))),
        1 => "[a-z]{1,10}@\\[10\\.0\\.0\\.1\\]".prop_map(|s| (s, Some(false))),
        1 => "[a-z]{64}@[a-z]{63}\\.[a-z]{63}\\.[a-z]{63}\\.[a-z]{2,63}".prop_map(|s| (s, Some(false))),
        1 => text().prop_map(|s| (s, None)),
    ]
}

/// Whether an email is accepted: by construction where known, else by the parser, which must
/// then still only accept what the contract describes (`local@domain`, at most 254 bytes, no
/// white space, a dot in the domain).
fn email_ok(raw: &str, known: Option<bool>) -> bool {
    let parsed = Email::parse(raw).is_ok();
    if let Some(known) = known {
        assert_eq!(parsed, known, "email {raw:?}");
    }
    if parsed {
        let email = raw.trim();
        assert!(email.len() <= 254, "{raw:?} is too long to be accepted");
        assert!(!email.chars().any(char::is_whitespace), "{raw:?}");
        let (_, domain) = email.rsplit_once('@').expect("an accepted email has an @");
        assert!(domain.contains('.'), "{raw:?}");
    }
    parsed
}

/// A `start_position`: the three defined values, or any number.
fn start_position() -> impl Strategy<Value = i32> {
    prop_oneof![0..=2, any::<i32>()]
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

/// Replaces the character at `at` with `with` (a different one).
fn mutate(token: &str, at: Index, with: char) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let at = at.index(chars.len());
    chars[at] = if chars[at] == with { '!' } else { with };
    chars.into_iter().collect()
}

/// What a resume token is, as the contract sorts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenClass {
    /// No token: `start_position` decides.
    Empty,
    /// A position in this log.
    Valid,
    /// Not a resume token of any log: INVALID_ARGUMENT.
    Invalid,
    /// A resume token of another change log: FAILED_PRECONDITION.
    UnknownLog,
    /// A position past the newest event: OUT_OF_RANGE.
    Ahead,
}

/// Resume tokens of every class, built from the fixture's log.
fn resume_token(log_id: u64, head: u64) -> impl Strategy<Value = (String, TokenClass)> {
    let encode = move |values: &[u64]| token::encode(RESUME_TOKEN_KIND, values);
    prop_oneof![
        Just((String::new(), TokenClass::Empty)),
        (0..=head).prop_map(move |p| (encode(&[log_id, p]), TokenClass::Valid)),
        (0..=head).prop_map(move |p| (format!(" {}\n", encode(&[log_id, p])), TokenClass::Valid)),
        (head + 1..=u64::MAX).prop_map(move |p| (encode(&[log_id, p]), TokenClass::Ahead)),
        (1..=u64::MAX, any::<u64>())
            .prop_map(move |(x, p)| (encode(&[log_id ^ x, p]), TokenClass::UnknownLog)),
        (0..=head, any::<Index>(), any::<char>()).prop_map(move |(p, at, c)| {
            (mutate(&encode(&[log_id, p]), at, c), TokenClass::Invalid)
        }),
        (any::<u8>(), prop::collection::vec(any::<u64>(), 0..=4))
            .prop_filter("not a well-formed resume token", |(kind, values)| {
                *kind != RESUME_TOKEN_KIND || values.len() != 2
            })
            .prop_map(|(kind, values)| (token::encode(kind, &values), TokenClass::Invalid)),
        text().prop_map(|s| {
            let class = if s.is_empty() {
                TokenClass::Empty
            } else {
                TokenClass::Invalid
            };
            (s, class)
        }),
    ]
}

/// What a `ListCustomers` page token is, as the contract sorts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageToken {
    /// No token: the first page.
    Empty,
    /// Well-formed for this log (issued by the server, or made by a client that knows the
    /// format: tokens are checksummed, not signed): customers created after `after`, up to
    /// `snapshot`.
    Issued {
        /// Log position of the listing's snapshot.
        snapshot: u64,
        /// Creation position of the last customer already listed.
        after: u64,
    },
    /// Well-formed, but its snapshot is past the head: OUT_OF_RANGE.
    Ahead,
    /// Not a page token of this log: INVALID_ARGUMENT.
    Invalid,
}

/// Page tokens: the genuine one (possibly with white space around), made-up ones of this log,
/// and every way of getting one wrong.
fn page_token(
    genuine: String,
    log_id: u64,
    head: u64,
) -> impl Strategy<Value = (String, PageToken)> {
    let issued = PageToken::Issued {
        snapshot: head,
        after: 1,
    };
    let spaced = format!("\t{genuine} ");
    let mutated = genuine.clone();
    let encode = move |values: &[u64]| token::encode(PAGE_TOKEN_KIND, values);
    prop_oneof![
        Just((String::new(), PageToken::Empty)),
        Just((genuine, issued)),
        Just((spaced, issued)),
        (
            0..=head,
            prop_oneof![0..=head + 1, Just(u64::MAX), any::<u64>()]
        )
            .prop_map(move |(snapshot, after)| {
                (
                    encode(&[log_id, snapshot, after]),
                    PageToken::Issued { snapshot, after },
                )
            }),
        (head + 1..=u64::MAX, any::<u64>()).prop_map(move |(snapshot, after)| (
            encode(&[log_id, snapshot, after]),
            PageToken::Ahead
        )),
        (any::<Index>(), any::<char>())
            .prop_map(move |(at, c)| (mutate(&mutated, at, c), PageToken::Invalid)),
        (1..=u64::MAX, any::<u64>(), any::<u64>())
            .prop_map(move |(x, s, a)| { (encode(&[log_id ^ x, s, a]), PageToken::Invalid) }),
        (any::<u8>(), prop::collection::vec(any::<u64>(), 0..=4))
            .prop_filter("not a well-formed page token", |(kind, values)| {
                *kind != PAGE_TOKEN_KIND || values.len() != 3
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

/// CreateCustomer: each bad field is named; a valid request creates the customer (trimmed),
/// unless its email is taken or its `request_id` was used for something else; a repeated
/// request returns the first customer.
#[test]
fn create_customer_accepts_exactly_valid_requests() {
    let fx = Fixture::new();
    // Email keys in use, and what each request_id created: the store's state, as a client
    // sees it.
    let emails: RefCell<HashSet<String>> = RefCell::new(
        (0..SEEDED)
            .map(|n| format!("seeded.{n}@example.com"))
            .collect(),
    );
    let replays: RefCell<Replays> = RefCell::default();
    proptest!(mip_testkit::config(CASES), |(
        name in name(),
        (email, known) in email(),
        request_id in prop_oneof![
            2 => Just(String::new()),
            2 => prop::sample::select(REUSED_REQUEST_IDS.to_vec()).prop_map(str::to_owned),
            3 => id_text(),
        ],
    )| {
        let mut bad = Vec::new();
        if !name_ok(&name) {
            bad.push("name");
        }
        if !email_ok(&email, known) {
            bad.push("email");
        }
        if !request_id.is_empty() && !id_ok(&request_id) {
            bad.push("request_id");
        }
        let request = pb::CreateCustomerRequest {
            name: name.clone(),
            email: email.clone(),
            request_id: request_id.clone(),
        };
        let create = || fx.runtime.block_on(fx.api.create_customer(Request::new(request.clone())));
        let result = create();
        if !bad.is_empty() {
            prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&bad));
            return Ok(());
        }
        let key = email.trim().to_lowercase();
        let fingerprint = (name.trim().to_owned(), key.clone());
        let request_id = Uuid::try_parse(request_id.trim()).ok();
        let replayed = request_id.and_then(|id| replays.borrow().get(&id).cloned());
        match replayed {
            Some((first, customer_id)) if first == fingerprint => {
                let customer = result.expect("a repeated request succeeds").into_inner();
                prop_assert_eq!(customer.id, customer_id);
            }
            Some(_) => prop_assert_eq!(Outcome::of(&result), Outcome::Refused(Code::AlreadyExists)),
            None if emails.borrow().contains(&key) => {
                prop_assert_eq!(Outcome::of(&result), Outcome::Refused(Code::AlreadyExists));
            }
            None => {
                let customer = result.expect("a valid request succeeds").into_inner();
                prop_assert_eq!(&customer.name, name.trim());
                prop_assert_eq!(&customer.email, email.trim());
                // Sent again: the same customer with a request_id, ALREADY_EXISTS without.
                let again = create();
                match request_id {
                    Some(id) => {
                        let again = again.expect("a repeated request succeeds").into_inner();
                        prop_assert_eq!(&again.id, &customer.id);
                        replays.borrow_mut().insert(id, (fingerprint, customer.id));
                    }
                    None => prop_assert_eq!(Outcome::of(&again), Outcome::Refused(Code::AlreadyExists)),
                }
                emails.borrow_mut().insert(key);
            }
        }
    });
}

/// GetCustomer and DeleteCustomer: a missing or malformed id is INVALID_ARGUMENT; a well-formed
/// unknown one NOT_FOUND; a known one is found.
#[test]
fn get_and_delete_refuse_bad_ids_and_find_only_known_ones() {
    let fx = Fixture::new();
    let known = fx.customers[0];
    proptest!(mip_testkit::config(CASES), |(
        id in prop_oneof![id_text(), Just(known.to_string()), Just(known.simple().to_string())],
        delete_id in id_text(),
    )| {
        let got = fx.runtime.block_on(fx.api.get_customer(Request::new(pb::GetCustomerRequest {
            id: id.clone(),
        })));
        let expected = match Uuid::try_parse(id.trim()) {
            _ if !id_ok(&id) => Outcome::invalid(&["id"]),
            Ok(parsed) if parsed == known => Outcome::Ok,
            _ => Outcome::Refused(Code::NotFound),
        };
        prop_assert_eq!(Outcome::of(&got), expected);

        let deleted = fx.runtime.block_on(fx.api.delete_customer(Request::new(
            pb::DeleteCustomerRequest { id: delete_id.clone() },
        )));
        let expected = if id_ok(&delete_id) {
            Outcome::Refused(Code::NotFound)
        } else {
            Outcome::invalid(&["id"])
        };
        prop_assert_eq!(Outcome::of(&deleted), expected);
    });
}

/// UpdateCustomer: the customer is required; its id must be a UUID; every masked field must be
/// valid and updatable (an empty mask means name and email); then an unknown id is NOT_FOUND.
#[test]
fn update_customer_names_every_bad_field_and_mask_path() {
    let fx = Fixture::new();
    let path = prop_oneof![
        Just("name".to_owned()),
        Just("email".to_owned()),
        Just("customer.name".to_owned()),
        Just("NAME".to_owned()),
        Just(String::new()),
        text(),
    ];
    proptest!(mip_testkit::config(CASES), |(
        customer in prop::option::weighted(0.9, (id_text(), name(), email())),
        mask in prop::option::of(prop::collection::vec(path, 0..4)),
    )| {
        let request = pb::UpdateCustomerRequest {
            customer: customer.clone().map(|(id, name, (email, _))| pb::Customer {
                id,
                name,
                email,
                ..pb::Customer::default()
            }),
            update_mask: mask.clone().map(|paths| prost_types::FieldMask { paths }),
        };
        let result = fx.runtime.block_on(fx.api.update_customer(Request::new(request)));
        let expected = match customer {
            None => Outcome::invalid(&["customer"]),
            Some((id, name, (email, known))) => {
                let mut bad = Vec::new();
                if !id_ok(&id) {
                    bad.push("customer.id");
                }
                let paths = mask
                    .filter(|paths| !paths.is_empty())
                    .unwrap_or_else(|| vec!["name".into(), "email".into()]);
                for path in &paths {
                    match path.as_str() {
                        "name" if !name_ok(&name) => bad.push("customer.name"),
                        "email" if !email_ok(&email, known) => bad.push("customer.email"),
                        "name" | "email" => {}
                        _ => bad.push("update_mask"),
                    }
                }
                if bad.is_empty() {
                    Outcome::Refused(Code::NotFound)
                } else {
                    Outcome::invalid(&bad)
                }
            }
        };
        prop_assert_eq!(Outcome::of(&result), expected);
    });
}

/// ListCustomers: a negative page size and a token that is not a page token of this log are
/// INVALID_ARGUMENT; a well-formed token past the head is OUT_OF_RANGE (checked as soon as it
/// is read); otherwise the page holds the customers created after the token's position up to
/// its snapshot, at most `page_size` (0 meaning 100, at most 1000).
#[test]
fn list_customers_refuses_bad_page_sizes_and_tokens() {
    let fx = Fixture::new();
    proptest!(mip_testkit::config(CASES), |(
        page_size in page_size(),
        (page_token, class) in page_token(fx.page_token.clone(), fx.log_id, fx.head),
    )| {
        let result = fx.runtime.block_on(fx.api.list_customers(Request::new(
            pb::ListCustomersRequest { page_size, page_token },
        )));
        if class == PageToken::Ahead {
            prop_assert_eq!(Outcome::of(&result), Outcome::Refused(Code::OutOfRange));
            return Ok(());
        }
        let mut bad = Vec::new();
        if page_size < 0 {
            bad.push("page_size");
        }
        if class == PageToken::Invalid {
            bad.push("page_token");
        }
        if !bad.is_empty() {
            prop_assert_eq!(Outcome::of(&result), Outcome::invalid(&bad));
            return Ok(());
        }
        let page = result.expect("a valid listing succeeds").into_inner();
        let (snapshot, after) = match class {
            PageToken::Issued { snapshot, after } => (snapshot, after),
            _ => (fx.head, 0),
        };
        // The seeded customers were created at log positions 1, 2, 3.
        let selected = (1..=SEEDED as u64).filter(|c| *c > after && *c <= snapshot).count();
        let limit = if page_size == 0 { 100 } else { page_size.min(1000) as usize };
        prop_assert_eq!(page.customers.len(), selected.min(limit));
    });
}

/// BatchCreateCustomers: one result per request, in order; each invalid request names exactly
/// its bad fields, each valid one is created with its name and email or refused as a
/// duplicate, and none spoils another.
#[test]
fn batch_creates_judge_each_request_on_its_own() {
    let fx = Fixture::new();
    let item = (name(), email(), prop_oneof![Just(String::new()), id_text()]);
    proptest!(mip_testkit::config(CASES), |(items in prop::collection::vec(item, 1..16))| {
        let requests: Vec<pb::CreateCustomerRequest> = items
            .iter()
            .map(|(name, (email, _), request_id)| pb::CreateCustomerRequest {
                name: name.clone(),
                email: email.clone(),
                request_id: request_id.clone(),
            })
            .collect();
        let response = fx
            .runtime
            .block_on(fx.api.batch_create_customers(Request::new(
                pb::BatchCreateCustomersRequest { requests: requests.clone() },
            )))
            .expect("a batch of 1 to 15 requests is accepted")
            .into_inner();
        prop_assert_eq!(response.results.len(), requests.len());
        for ((name, (email, known), request_id), result) in items.iter().zip(response.results) {
            let mut bad = Vec::new();
            if !name_ok(name) {
                bad.push("name");
            }
            if !email_ok(email, *known) {
                bad.push("email");
            }
            if !request_id.is_empty() && !id_ok(request_id) {
                bad.push("request_id");
            }
            match result.result.expect("every result is set") {
                pb::create_customer_result::Result::Error(error) if !bad.is_empty() => {
                    prop_assert_eq!(error.code, Code::InvalidArgument as i32);
                    let fields: Vec<&str> =
                        error.field_violations.iter().map(|v| v.field.as_str()).collect();
                    prop_assert_eq!(fields, bad);
                }
                pb::create_customer_result::Result::Customer(created) => {
                    prop_assert!(bad.is_empty(), "{:?} was accepted", (name, email));
                    prop_assert_eq!(created.email.to_lowercase(), email.trim().to_lowercase());
                }
                // The email is taken (by an earlier case, the seed, or this batch), or a request
                // id was seen before with other parameters.
                pb::create_customer_result::Result::Error(error) => {
                    prop_assert_eq!(error.code, Code::AlreadyExists as i32, "{:?}", error);
                }
            }
        }
    });
}

/// ListCustomerEvents and WatchCustomers share one reading of where to start: a token of this
/// log is used, a malformed one or an unknown `start_position` is INVALID_ARGUMENT, another
/// log's token FAILED_PRECONDITION (RESUME_TOKEN_UNKNOWN_LOG), and a position past the head
/// OUT_OF_RANGE. ListCustomerEvents checks `page_size` first.
#[test]
fn feed_requests_accept_exactly_positions_of_this_log() {
    let fx = Fixture::new();
    proptest!(mip_testkit::config(CASES), |(
        (resume_token, class) in resume_token(fx.log_id, fx.head),
        start_position in start_position(),
        page_size in page_size(),
    )| {
        let start = match class {
            TokenClass::Empty if (0..=2).contains(&start_position) => Outcome::Ok,
            TokenClass::Empty => Outcome::invalid(&["start_position"]),
            TokenClass::Valid => Outcome::Ok,
            TokenClass::Invalid => Outcome::invalid(&["resume_token"]),
            TokenClass::UnknownLog => Outcome::Refused(Code::FailedPrecondition),
            TokenClass::Ahead => Outcome::Refused(Code::OutOfRange),
        };

        let watched = fx.runtime.block_on(fx.api.watch_customers(Request::new(
            pb::WatchCustomersRequest {
                resume_token: resume_token.clone(),
                start_position,
                partition_filter: None,
            },
        )));
        prop_assert_eq!(Outcome::of(&watched), start.clone());
        if let Err(status) = &watched && class == TokenClass::UnknownLog {
            let why = reason(status);
            prop_assert_eq!(why.as_deref(), Some(RESUME_TOKEN_UNKNOWN_LOG));
        }
        // Dropping the stream ends the watcher.
        drop(watched);

        let listed = fx.runtime.block_on(fx.api.list_customer_events(Request::new(
            pb::ListCustomerEventsRequest {
                resume_token,
                start_position,
                page_size,
                partition_filter: None,
            },
        )));
        let expected = if page_size < 0 { Outcome::invalid(&["page_size"]) } else { start };
        prop_assert_eq!(Outcome::of(&listed), expected);
        if let Ok(response) = listed {
            let limit = if page_size == 0 { 100 } else { page_size.min(1000) as usize };
            prop_assert!(response.get_ref().events.len() <= limit);
        }
    });
}

/// Every request type of `crm.v1.CrmService`, by full name.
const REQUEST_TYPES: [&str; 8] = [
    "crm.v1.CreateCustomerRequest",
    "crm.v1.GetCustomerRequest",
    "crm.v1.UpdateCustomerRequest",
    "crm.v1.DeleteCustomerRequest",
    "crm.v1.ListCustomersRequest",
    "crm.v1.WatchCustomersRequest",
    "crm.v1.ListCustomerEventsRequest",
    "crm.v1.BatchCreateCustomersRequest",
];

/// Decodes `bytes` as request type `index` of [`REQUEST_TYPES`] and, if that works, calls its
/// handler. `None` when the bytes do not decode.
async fn decode_and_call(
    api: &CrmApi<SqliteStore>,
    index: usize,
    bytes: &[u8],
) -> Option<Result<(), Status>> {
    fn decoded<M: Message + Default>(bytes: &[u8]) -> Option<Request<M>> {
        M::decode(bytes).ok().map(Request::new)
    }
    Some(match index {
        0 => api.create_customer(decoded(bytes)?).await.map(drop),
        1 => api.get_customer(decoded(bytes)?).await.map(drop),
        2 => api.update_customer(decoded(bytes)?).await.map(drop),
        3 => api.delete_customer(decoded(bytes)?).await.map(drop),
        4 => api.list_customers(decoded(bytes)?).await.map(drop),
        5 => api.watch_customers(decoded(bytes)?).await.map(drop),
        6 => api.list_customer_events(decoded(bytes)?).await.map(drop),
        7 => {
            let request: Request<pb::BatchCreateCustomersRequest> = decoded(bytes)?;
            let items = request.get_ref().requests.len();
            let response = match api.batch_create_customers(request).await {
                Ok(response) => response,
                Err(status) => return Some(Err(status)),
            };
            let results = response.into_inner().results;
            // One result per request, each a customer or an error from the contract.
            assert_eq!(results.len(), items);
            for result in results {
                match result.result.expect("every result is set") {
                    pb::create_customer_result::Result::Customer(_) => {}
                    pb::create_customer_result::Result::Error(error) => assert!(
                        [Code::InvalidArgument, Code::AlreadyExists, Code::NotFound]
                            .contains(&Code::from(error.code)),
                        "{error:?}"
                    ),
                }
            }
            Ok(())
        }
        _ => unreachable!("{index} is not a request type"),
    })
}

/// Protobuf-shaped bytes: fields 1 to 6 (the request fields and a few unknown ones) with every
/// wire type, so that many inputs decode and reach the handler with odd values, and others
/// fail on a wrong wire type, a bad length or invalid UTF-8.
fn protobuf_bytes() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        text().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    mip_testkit::protobuf_bytes(6, leaf)
}

/// The request types above are all of the service's: a method added to the contract must be
/// added here too, or this fails.
#[test]
fn request_types_cover_every_method() {
    let covered = REQUEST_TYPES.iter().map(|t| (*t).to_owned()).collect();
    assert_eq!(
        mip_testkit::request_types(mip_proto::CRM_DESCRIPTOR_SET),
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
                            | Code::OutOfRange
                    ),
                    "{}: {:?}",
                    name,
                    status
                );
            }
        }
    });
}
