//! The real `mip all` under malformed traffic, sent as raw HTTP/2 so that nothing on the client
//! side tidies it up. For every method of every service, read from the descriptor sets so that
//! a new method is covered without touching this file: random bytes as the message, frames cut
//! short, messages over `--max-message-bytes` (plain and gzip-compressed), bad compression
//! flags and encodings, a JSON content type, and huge or negative page sizes on every method
//! that takes one. Each call gets a clean gRPC status, exactly the one gRPC (as tonic
//! implements it) prescribes; afterwards the process still serves a normal create and its
//! health checks, and its log holds no panic.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::{Process, free_port};
use http::{HeaderMap, Request};
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest the whole test may take; generous, so a slow machine never fails it.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest one raw call may take; a server that neither answers nor resets a malformed call
/// within this is hanging.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `mip all` gets to report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `--max-message-bytes` of the server under test: small, so oversized messages are cheap.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Random payloads of each kind sent to every method.
const RANDOM_PAYLOADS: usize = 4;

/// A running `mip all` and where its services listen.
struct Platform {
    /// The process; killed on drop.
    process: Process,
    /// Its data directory and log; removed on drop.
    _dir: tempfile::TempDir,
    /// Port of each service, by fully-qualified service name.
    ports: HashMap<&'static str, u16>,
}

fn endpoint(port: u16) -> Endpoint {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
}

/// The health status of `service` on `port`, if it can be asked.
async fn health(port: u16, service: &str) -> Option<ServingStatus> {
    let channel = endpoint(port).connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(response.get_ref().status())
}

impl Platform {
    /// Starts `mip all` on free loopback ports and waits until every service serves. If the
    /// process exits first (most likely because another process took a port in the meantime),
    /// tries again on other ports.
    async fn start(extra_args: &[&str]) -> Self {
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let ports = HashMap::from([
                ("crm.v1.CrmService", free_port()),
                ("inventory.v1.InventoryService", free_port()),
                ("integration.v1.IntegrationService", free_port()),
            ]);
            let listen = |service: &str| format!("127.0.0.1:{}", ports[service]);
            let args: Vec<String> = [
                "all",
                "--crm-listen",
                &listen("crm.v1.CrmService"),
                "--inventory-listen",
                &listen("inventory.v1.InventoryService"),
                "--integration-listen",
                &listen("integration.v1.IntegrationService"),
                "--data-dir",
                &dir.path().join("data").display().to_string(),
                "--durability",
                "normal",
                "--max-message-bytes",
                &MAX_MESSAGE_BYTES.to_string(),
                // An open watch stream shows it is serving within a heartbeat.
                "--heartbeat-interval",
                "100ms",
            ]
            .iter()
            .chain(extra_args)
            .map(|arg| (*arg).to_owned())
            .collect();
            let mut process = Process::spawn("mip-all", &args, &BTreeMap::new(), dir.path());
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                let mut serving = true;
                for (service, port) in &ports {
                    serving &= health(*port, service).await == Some(ServingStatus::Serving);
                }
                if serving {
                    return Self {
                        process,
                        _dir: dir,
                        ports,
                    };
                }
                if let Some(status) = process.exited() {
                    eprintln!(
                        "mip all exited before serving ({status}); trying other ports:\n{}",
                        process.log_tail(5)
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "mip all did not report SERVING within {START_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("mip all could not be started");
    }

    /// Everything the process has logged so far.
    fn log(&self) -> String {
        self.process.log_tail(usize::MAX)
    }
}

/// One method of one service, as the descriptor sets describe it.
#[derive(Debug, Clone)]
struct Method {
    /// Fully-qualified service name, such as `crm.v1.CrmService`.
    service: String,
    /// The HTTP/2 path: `/crm.v1.CrmService/CreateCustomer`.
    path: String,
    /// The request message's descriptor.
    input: DescriptorProto,
    /// Whether the server answers with a stream (WatchCustomers).
    server_streaming: bool,
    /// Every message type of the method's descriptor set, by `.package.Name`, for nested
    /// fields.
    types: Arc<HashMap<String, DescriptorProto>>,
}

impl Method {
    /// The field number of the request's `page_size`, if it has one.
    fn page_size_field(&self) -> Option<u32> {
        self.input
            .field
            .iter()
            .find(|f| f.name() == "page_size")
            .map(|f| u32::try_from(f.number()).expect("field numbers are positive"))
    }
}

/// Every method of every service the platform serves.
fn methods() -> Vec<Method> {
    let mut methods = Vec::new();
    for set in [
        mip_proto::CRM_DESCRIPTOR_SET,
        mip_proto::INVENTORY_DESCRIPTOR_SET,
        mip_proto::INTEGRATION_DESCRIPTOR_SET,
    ] {
        let set = FileDescriptorSet::decode(set).expect("descriptor set decodes");
        let types: Arc<HashMap<String, DescriptorProto>> = Arc::new(
            set.file
                .iter()
                .flat_map(|file| {
                    file.message_type
                        .iter()
                        .map(move |m| (format!(".{}.{}", file.package(), m.name()), m.clone()))
                })
                .collect(),
        );
        for file in &set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    assert!(
                        !method.client_streaming(),
                        "{}: client streaming is not exercised here yet",
                        method.name()
                    );
                    methods.push(Method {
                        service: service_name.clone(),
                        path: format!("/{service_name}/{}", method.name()),
                        input: types[method.input_type()].clone(),
                        server_streaming: method.server_streaming(),
                        types: Arc::clone(&types),
                    });
                }
            }
        }
    }
    methods
}

/// What came back for one raw call.
#[derive(Debug)]
struct Reply {
    /// HTTP status of the response headers.
    http_status: u16,
    /// `content-type` of the response.
    content_type: Option<String>,
    /// `grpc-status`, from the headers (trailers-only response) or the trailers; `None` for a
    /// server stream that was still open, sending messages, when the client left.
    code: Option<Code>,
    /// `grpc-message`, percent-decoded.
    message: String,
    /// Whether any response message arrived.
    got_data: bool,
}

impl Reply {
    /// Whether the call ended with exactly `code` and a message starting with `message`.
    fn is(&self, code: Code, message: &str) -> bool {
        self.http_status == 200
            && self.content_type.as_deref() == Some("application/grpc")
            && self.code == Some(code)
            && self.message.starts_with(message)
    }
}

/// `grpc-message` is percent-encoded on the wire.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(headers: &HeaderMap) -> Option<(Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((Code::from_i32(code), message))
}

/// One HTTP/2 connection to a server, on which calls are sent exactly as given.
struct RawClient {
    /// Opens streams on the connection.
    sender: h2::client::SendRequest<Bytes>,
    /// For the request URI.
    port: u16,
}

impl RawClient {
    async fn connect(port: u16) -> Self {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (sender, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
        tokio::spawn(async move {
            // Ends when the test drops the client or the server closes the connection.
            let _ = connection.await;
        });
        Self { sender, port }
    }

    /// Sends a POST to `path` with `headers` and `body` (in as many DATA frames as given, the
    /// last one ending the stream), and reads the reply. A server stream that sends a message
    /// is left open no longer than it takes to see that message.
    async fn call(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[Bytes],
        server_streaming: bool,
    ) -> Reply {
        let call = async {
            let mut request = Request::post(format!("http://127.0.0.1:{}{path}", self.port));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request.body(()).expect("request");
            let mut sender = self.sender.clone().ready().await.expect("connection open");
            let (response, mut stream) = sender
                .send_request(request, body.is_empty())
                .expect("stream opened");
            for (n, chunk) in body.iter().enumerate() {
                // The server may answer and reset the stream before reading everything (an
                // oversized message is refused by its length prefix); that is not an error.
                if stream
                    .send_data(chunk.clone(), n + 1 == body.len())
                    .is_err()
                {
                    break;
                }
            }
            let response = response.await.expect("a response, not a reset stream");
            let http_status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some((code, message)) = status_of(response.headers()) {
                return Reply {
                    http_status,
                    content_type,
                    code: Some(code),
                    message,
                    got_data: false,
                };
            }
            let mut body = response.into_body();
            let mut got_data = false;
            while let Some(data) = body.data().await {
                let data = data.expect("response body");
                let _ = body.flow_control().release_capacity(data.len());
                got_data |= !data.is_empty();
                if got_data && server_streaming {
                    return Reply {
                        http_status,
                        content_type,
                        code: None,
                        message: String::new(),
                        got_data,
                    };
                }
            }
            let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
            let (code, message) = status_of(&trailers).expect("grpc-status in the trailers");
            Reply {
                http_status,
                content_type,
                code: Some(code),
                message,
                got_data,
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| panic!("{path}: no reply within {CALL_TIMEOUT:?}"))
    }

    /// A gRPC call with standard headers.
    async fn grpc(&mut self, method: &Method, body: &[Bytes]) -> Reply {
        self.call(
            &method.path,
            &[("content-type", "application/grpc"), ("te", "trailers")],
            body,
            method.server_streaming,
        )
        .await
    }
}

/// A gRPC length-prefixed message: compression flag, big-endian length, bytes.
fn frame(compressed: bool, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(u8::from(compressed));
    out.put_u32(u32::try_from(message.len()).expect("small message"));
    out.put_slice(message);
    out.freeze()
}

/// A small, seeded generator: the same bytes on every run, so a failure can be replayed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len as u64 + 1) as usize;
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Text of every sort a field might get: empty, ASCII, any Unicode (control characters
    /// included), something shaped like a UUID, or a long run.
    fn text(&mut self) -> String {
        match self.below(5) {
            0 => String::new(),
            1 => (0..self.below(40))
                .map(|_| char::from(b' ' + self.below(95) as u8))
                .collect(),
            2 => (0..self.below(40))
                .filter_map(|_| char::from_u32(self.below(0x11_0000) as u32))
                .collect(),
            3 => format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                self.next() as u32,
                self.next() as u16,
                self.next() as u16,
                self.next() as u16,
                self.next() & 0xffff_ffff_ffff
            ),
            _ => "x".repeat(self.below(10_000) as usize),
        }
    }

    /// A valid encoding of a random message of type `message`: each field present or not,
    /// with a random value of its type (repeated fields 0 to 3 times, nested messages to
    /// `depth` levels). Unlike random bytes, it always decodes, so it reaches the handler.
    fn message(
        &mut self,
        message: &DescriptorProto,
        types: &HashMap<String, DescriptorProto>,
        depth: u32,
    ) -> Vec<u8> {
        use prost::encoding::{self, WireType, encode_key, encode_varint};
        let mut out = Vec::new();
        for field in &message.field {
            let number = u32::try_from(field.number()).expect("positive field number");
            let count = match field.label() {
                Label::Repeated => self.below(4),
                _ => self.below(2),
            };
            for _ in 0..count {
                let value = self.next();
                match field.r#type() {
                    Type::String => encoding::string::encode(number, &self.text(), &mut out),
                    Type::Int32 | Type::Enum => {
                        let small = [0, 1, 2, 3, 4, 5, -1][self.below(7) as usize];
                        let value = if self.below(2) == 0 {
                            small
                        } else {
                            value as i32
                        };
                        encoding::int32::encode(number, &value, &mut out);
                    }
                    Type::Int64 => encoding::int64::encode(number, &(value as i64), &mut out),
                    Type::Uint32 => encoding::uint32::encode(number, &(value as u32), &mut out),
                    Type::Uint64 => encoding::uint64::encode(number, &value, &mut out),
                    Type::Bool => {
                        encoding::bool::encode(number, &value.is_multiple_of(2), &mut out)
                    }
                    Type::Message if depth > 0 => {
                        let nested = self.message(&types[field.type_name()], types, depth - 1);
                        encode_key(number, WireType::LengthDelimited, &mut out);
                        encode_varint(nested.len() as u64, &mut out);
                        out.extend_from_slice(&nested);
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// What tonic answers a message that is not valid protobuf of the request type.
const DECODE_FAILED: &str = "failed to decode Protobuf message";

/// Random bytes as the message: bytes that cannot be protobuf (they open with a field of wire
/// type 7, which does not exist) are INTERNAL, as gRPC prescribes for parse errors; bytes that
/// happen to decode reach the handler, which answers with a status of the contract, never
/// INTERNAL for anything but decoding. Random but well-formed messages (random values in the
/// request's own fields) always reach the handler, and are never INTERNAL. An open stream
/// means the request was valid.
async fn random_messages(client: &mut RawClient, method: &Method, rng: &mut SplitMix) {
    for _ in 0..RANDOM_PAYLOADS {
        let mut undecodable = vec![0x0f];
        undecodable.extend(rng.bytes(4096));
        let reply = client.grpc(method, &[frame(false, &undecodable)]).await;
        assert!(
            reply.is(Code::Internal, DECODE_FAILED),
            "{}: undecodable message: {reply:?}",
            method.path
        );

        let random = rng.bytes(256);
        let reply = client.grpc(method, &[frame(false, &random)]).await;
        let clean = match reply.code {
            Some(Code::Internal) => reply.message.starts_with(DECODE_FAILED),
            Some(code) => HANDLER_CODES.contains(&code),
            None => method.server_streaming && reply.got_data,
        };
        assert!(
            clean && reply.http_status == 200,
            "{}: random message {random:?}: {reply:?}",
            method.path
        );

        let message = rng.message(&method.input, &method.types, 2);
        let reply = client.grpc(method, &[frame(false, &message)]).await;
        let handled = match reply.code {
            Some(code) => HANDLER_CODES.contains(&code),
            None => method.server_streaming && reply.got_data,
        };
        assert!(
            handled && reply.http_status == 200,
            "{}: random well-formed message {message:?}: {reply:?}",
            method.path
        );
    }
}

/// The codes handlers answer well-formed requests with, whatever their values.
const HANDLER_CODES: [Code; 6] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::OutOfRange,
];

/// Frames cut short and missing messages: the stream ends inside a frame's length prefix or
/// its body (INTERNAL, "Unexpected EOF"), or before any frame (INTERNAL, "Missing request
/// message").
async fn truncated_frames(client: &mut RawClient, method: &Method) {
    let mut declares_more = BytesMut::new();
    declares_more.put_u8(0);
    declares_more.put_u32(100);
    declares_more.put_slice(&[0x0a, 0x05, b'h', b'e', b'l', b'l', b'o']);
    for (what, body) in [
        (
            "length prefix longer than the body",
            vec![declares_more.freeze()],
        ),
        ("half a length prefix", vec![Bytes::from_static(&[0, 0, 0])]),
        (
            "a whole message, then half a prefix",
            vec![frame(false, &[]), Bytes::from_static(&[0, 0])],
        ),
    ] {
        let reply = client.grpc(method, &body).await;
        assert!(
            reply.is(Code::Internal, "Unexpected EOF decoding stream."),
            "{}: {what}: {reply:?}",
            method.path
        );
    }
    let reply = client.grpc(method, &[]).await;
    assert!(
        reply.is(Code::Internal, "Missing request message."),
        "{}: no message at all: {reply:?}",
        method.path
    );
}

/// Messages over `--max-message-bytes` are refused by their length prefix, before the body is
/// read or buffered, with RESOURCE_EXHAUSTED as gRPC prescribes (tonic itself says
/// OUT_OF_RANGE; the admission gate maps it, keeping tonic's message). A gzip-compressed
/// message that inflates past the limit is RESOURCE_EXHAUSTED too. A message of exactly the
/// limit is read (and here fails to decode).
async fn oversized_messages(client: &mut RawClient, method: &Method) {
    let too_large = format!(
        "Error, decoded message length too large: found {} bytes, the limit is: {MAX_MESSAGE_BYTES} bytes",
        MAX_MESSAGE_BYTES + 1
    );
    let reply = client
        .grpc(method, &[frame(false, &vec![0x0f; MAX_MESSAGE_BYTES + 1])])
        .await;
    assert!(
        reply.is(Code::ResourceExhausted, &too_large),
        "{}: oversized message: {reply:?}",
        method.path
    );

    // A prefix claiming 4 GiB, with nothing behind it: refused at once, nothing allocated.
    let mut huge = BytesMut::new();
    huge.put_u8(0);
    huge.put_u32(u32::MAX);
    let reply = client.grpc(method, &[huge.freeze()]).await;
    let claimed = format!(
        "Error, decoded message length too large: found {} bytes",
        u32::MAX
    );
    assert!(
        reply.is(Code::ResourceExhausted, &claimed),
        "{}: 4 GiB length prefix: {reply:?}",
        method.path
    );

    let reply = client
        .grpc(method, &[frame(false, &vec![0x0f; MAX_MESSAGE_BYTES])])
        .await;
    assert!(
        reply.is(Code::Internal, DECODE_FAILED),
        "{}: message of exactly the limit: {reply:?}",
        method.path
    );

    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gzip.write_all(&vec![0u8; 16 * MAX_MESSAGE_BYTES]).unwrap();
    let bomb = gzip.finish().unwrap();
    let reply = client
        .call(
            &method.path,
            &[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-encoding", "gzip"),
            ],
            &[frame(true, &bomb)],
            method.server_streaming,
        )
        .await;
    let exceeded = format!(
        "Error decompressing: size limit, of {MAX_MESSAGE_BYTES} bytes, exceeded while decompressing message"
    );
    assert!(
        reply.is(Code::ResourceExhausted, &exceeded),
        "{}: gzip bomb of {} bytes: {reply:?}",
        method.path,
        bomb.len()
    );
}

/// Compression the server cannot honour: the compressed flag with no `grpc-encoding` is
/// INTERNAL (as the gRPC compression spec requires); an encoding it does not support is
/// UNIMPLEMENTED.
async fn bad_compression(client: &mut RawClient, method: &Method) {
    let reply = client.grpc(method, &[frame(true, &[0x1f, 0x8b])]).await;
    assert!(
        reply.is(
            Code::Internal,
            "protocol error: received message with compressed-flag but no grpc-encoding was specified"
        ),
        "{}: compressed flag without an encoding: {reply:?}",
        method.path
    );

    let reply = client
        .call(
            &method.path,
            &[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-encoding", "snappy"),
            ],
            &[frame(true, b"whatever")],
            method.server_streaming,
        )
        .await;
    assert!(
        reply.is(
            Code::Unimplemented,
            "Content is compressed with `snappy` which isn't supported"
        ),
        "{}: unsupported encoding: {reply:?}",
        method.path
    );
}

/// A JSON request. tonic does not check `content-type` (no HTTP 415): it reads the body as gRPC
/// frames, so the first byte of the JSON, `{`, is taken for a compression flag and refused as
/// INTERNAL, in a normal gRPC response.
async fn wrong_content_type(client: &mut RawClient, method: &Method) {
    let json = Bytes::from_static(br#"{"page_size": 1, "name": "Ada"}"#);
    let reply = client
        .call(
            &method.path,
            &[("content-type", "application/json")],
            &[json],
            method.server_streaming,
        )
        .await;
    assert!(
        reply.is(
            Code::Internal,
            "protocol error: received message with invalid compression flag: 123 (valid flags are 0 and 1), while sending request"
        ),
        "{}: JSON: {reply:?}",
        method.path
    );
}

/// `page_size` at the extremes, on every method that has one: any positive size is served (the
/// server lowers it to its maximum), a negative one is INVALID_ARGUMENT.
async fn extreme_page_sizes(client: &mut RawClient, method: &Method, field: u32) {
    for (page_size, expected) in [
        (i32::MAX, Code::Ok),
        (1_000_001, Code::Ok),
        (-1, Code::InvalidArgument),
        (i32::MIN, Code::InvalidArgument),
    ] {
        let mut message = Vec::new();
        prost::encoding::int32::encode(field, &page_size, &mut message);
        let reply = client.grpc(method, &[frame(false, &message)]).await;
        assert!(
            reply.http_status == 200 && reply.code == Some(expected),
            "{}: page_size {page_size}: {reply:?}",
            method.path
        );
    }
}

/// The bytes [`extreme_page_sizes`] builds from the descriptors are what the generated types
/// encode, so the generic encoding is the real request.
#[test]
fn page_size_requests_match_the_generated_types() {
    use mip_proto::crm::v1::{ListCustomerEventsRequest, ListCustomersRequest};
    use mip_proto::integration::v1::ListDeadLettersRequest;
    use mip_proto::inventory::v1::ListPackageRequestsRequest;

    let generated: HashMap<&str, Vec<u8>> = HashMap::from([
        (
            "/crm.v1.CrmService/ListCustomers",
            ListCustomersRequest {
                page_size: i32::MIN,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/crm.v1.CrmService/ListCustomerEvents",
            ListCustomerEventsRequest {
                page_size: i32::MIN,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/inventory.v1.InventoryService/ListPackageRequests",
            ListPackageRequestsRequest {
                page_size: i32::MIN,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/integration.v1.IntegrationService/ListDeadLetters",
            ListDeadLettersRequest {
                page_size: i32::MIN,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ]);
    let mut paged = 0;
    for method in methods() {
        let Some(field) = method.page_size_field() else {
            continue;
        };
        paged += 1;
        let mut message = Vec::new();
        prost::encoding::int32::encode(field, &i32::MIN, &mut message);
        if let Some(expected) = generated.get(method.path.as_str()) {
            assert_eq!(&message, expected, "{}", method.path);
        }
    }
    assert!(
        paged >= generated.len(),
        "every list method has a page_size"
    );
}

/// Calls the platform normally afterwards: a CreateCustomer and every health check succeed.
async fn still_serving(platform: &Platform) {
    let crm_port = platform.ports["crm.v1.CrmService"];
    let channel: Channel = endpoint(crm_port).connect().await.expect("connect to CRM");
    let customer = CrmServiceClient::new(channel)
        .create_customer(mip_proto::crm::v1::CreateCustomerRequest {
            name: "After The Storm".into(),
            email: "after.the.storm@example.com".into(),
            request_id: String::new(),
        })
        .await
        .expect("a normal CreateCustomer succeeds")
        .into_inner();
    assert!(!customer.id.is_empty());
    for (service, port) in &platform.ports {
        for name in [*service, ""] {
            assert_eq!(
                health(*port, name).await,
                Some(ServingStatus::Serving),
                "health of {name:?} on {service}'s port"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_traffic_gets_clean_statuses_and_the_server_keeps_serving() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut platform = Platform::start(&[]).await;
        let methods = methods();
        assert!(
            methods.len() >= 14,
            "every method of the three services: {methods:?}"
        );
        let mut clients = HashMap::new();
        for (service, port) in &platform.ports {
            clients.insert(service.to_string(), RawClient::connect(*port).await);
        }
        let mut rng = SplitMix(0x6d69_7020_6d61_6c66);
        let mut paged = 0;
        for method in &methods {
            let client = clients.get_mut(&method.service).expect("a served service");
            random_messages(client, method, &mut rng).await;
            truncated_frames(client, method).await;
            oversized_messages(client, method).await;
            bad_compression(client, method).await;
            wrong_content_type(client, method).await;
            if let Some(field) = method.page_size_field() {
                extreme_page_sizes(client, method, field).await;
                paged += 1;
            }
        }
        assert_eq!(paged, 4, "the List methods of the three services");

        // Unknown methods and services are UNIMPLEMENTED, on every server.
        for (service, client) in &mut clients {
            for path in [
                format!("/{service}/NoSuchMethod"),
                "/no.such.v1.Service/Call".to_owned(),
            ] {
                let method = Method {
                    service: service.clone(),
                    path,
                    input: DescriptorProto::default(),
                    server_streaming: false,
                    types: Arc::default(),
                };
                let reply = client.grpc(&method, &[frame(false, &[])]).await;
                assert!(
                    reply.http_status == 200 && reply.code == Some(Code::Unimplemented),
                    "{}: {reply:?}",
                    method.path
                );
            }
        }

        still_serving(&platform).await;
        assert!(
            platform.process.exited().is_none(),
            "mip all exited under malformed traffic"
        );
        let log = platform.log();
        assert!(!log.contains("panicked"), "the log shows a panic:\n{log}");
    })
    .await
    .expect("test did not finish in time");
}

/// Calls whose request body never ends hold their slot of `--max-concurrent-requests` only
/// until `--request-timeout`: past the limit other calls are refused at once with
/// RESOURCE_EXHAUSTED, health still answers, and once the stalled calls are cut off the server
/// takes calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_calls_are_cut_off_and_the_in_flight_limit_sheds_load_meanwhile() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let platform =
            Platform::start(&["--max-concurrent-requests", "2", "--request-timeout", "2s"]).await;
        let port = platform.ports["crm.v1.CrmService"];
        let mut client = RawClient::connect(port).await;
        let path = format!("http://127.0.0.1:{port}/crm.v1.CrmService/CreateCustomer");
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let request = Request::post(&path)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
            let mut sender = client
                .sender
                .clone()
                .ready()
                .await
                .expect("connection open");
            let (response, mut body) = sender.send_request(request, false).expect("stream");
            // Half a length prefix, and the stream stays open.
            body.send_data(Bytes::from_static(&[0, 0]), false)
                .expect("data sent");
            stalled.push((response, body));
        }
        let started = Instant::now();
        // Polling a response also drives the request out; neither call can be answered yet.
        for (response, _) in &mut stalled {
            let early = tokio::time::timeout(Duration::from_millis(200), response).await;
            assert!(
                early.is_err(),
                "a call without its message was answered: {early:?}"
            );
        }

        // Both slots are taken (the server admits a call when its headers arrive).
        let deadline = Instant::now() + CALL_TIMEOUT;
        let refused = loop {
            let reply = client
                .call(
                    "/crm.v1.CrmService/ListCustomers",
                    &[("content-type", "application/grpc"), ("te", "trailers")],
                    &[frame(false, &[])],
                    false,
                )
                .await;
            if reply.code == Some(Code::ResourceExhausted) || Instant::now() > deadline {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            refused.code == Some(Code::ResourceExhausted)
                && refused.message.contains("--max-concurrent-requests"),
            "{refused:?}"
        );
        assert_eq!(
            health(port, "crm.v1.CrmService").await,
            Some(ServingStatus::Serving),
            "health is never refused"
        );

        // The stalled calls are cut off after --request-timeout, with a status.
        for (response, _body) in stalled {
            let response = tokio::time::timeout(CALL_TIMEOUT, response)
                .await
                .expect("the stalled call was cut off")
                .expect("a response, not a reset stream");
            let (code, message) = status_of(response.headers()).expect("a trailers-only status");
            assert_eq!(code, Code::Cancelled, "{message}");
            assert!(message.contains("Timeout expired"), "{message}");
        }
        assert!(started.elapsed() >= Duration::from_millis(1500));

        // Their slots are free again.
        let reply = client
            .call(
                "/crm.v1.CrmService/ListCustomers",
                &[("content-type", "application/grpc"), ("te", "trailers")],
                &[frame(false, &[])],
                false,
            )
            .await;
        assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    })
    .await
    .expect("test did not finish in time");
}

/// Opens a `WatchCustomers` stream on `sender` and waits for its response headers.
async fn open_watch(
    sender: h2::client::SendRequest<Bytes>,
    port: u16,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let request = Request::post(format!(
        "http://127.0.0.1:{port}/crm.v1.CrmService/WatchCustomers"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request");
    let mut sender = sender.ready().await?;
    let (response, mut body) = sender.send_request(request, false)?;
    body.send_data(frame(false, &[]), true)?;
    response.await
}

/// `--max-streams-per-connection` is the HTTP/2 limit the server announces: with two watch
/// streams open on a connection, a third call on it waits, and goes through once one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_no_more_streams_than_the_limit() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let platform = Platform::start(&["--max-streams-per-connection", "2"]).await;
        let port = platform.ports["crm.v1.CrmService"];
        let client = RawClient::connect(port).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            let response =
                tokio::time::timeout(CALL_TIMEOUT, open_watch(client.sender.clone(), port))
                    .await
                    .expect("a watch stream opens")
                    .expect("response headers");
            assert_eq!(status_of(response.headers()), None, "the stream is open");
            open.push(response);
        }

        let third = tokio::spawn(open_watch(client.sender.clone(), port));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !third.is_finished(),
            "a third stream opened past the limit of 2"
        );
        drop(open.pop());
        let response = tokio::time::timeout(CALL_TIMEOUT, third)
            .await
            .expect("the third stream opens once one closes")
            .expect("task")
            .expect("response headers");
        assert_eq!(status_of(response.headers()), None);
    })
    .await
    .expect("test did not finish in time");
}
