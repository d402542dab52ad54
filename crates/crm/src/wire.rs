//! `WatchCustomers` on the network, with each event encoded once for every watcher.
//!
//! The generated server encodes every message of every stream itself: with a thousand
//! watchers, each event was converted to protobuf and encoded a thousand times, and that was
//! most of CRM's CPU under fan-out (see TECHNICAL_DESIGN.md, Performance). Here the first watch
//! stream to send an event encodes it and keeps the bytes on the event; every other stream
//! copies those bytes. The wire format is unchanged: the bytes are exactly the
//! `WatchCustomersResponse` the generated code would have sent.
//!
//! [`CrmRoutes`] serves the service: `WatchCustomers` here, every other method through the
//! generated server. The generated `watch_customers` stays for callers of the trait.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use mip_proto::crm::v1 as pb;
use mip_proto::crm::v1::crm_service_server::CrmServiceServer;
use mip_runtime::server::ServerOptions;
use prost::Message;
use tonic::codec::{
    Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings, EncodeBuf, Encoder,
};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::domain::CustomerEvent;
use crate::service::{CrmApi, Unbatch, WatchOutput};
use crate::store::CrmStore;

/// The method served here rather than by the generated server.
const WATCH_PATH: &str = "/crm.v1.CrmService/WatchCustomers";

/// An encoded `WatchCustomersResponse`.
#[derive(Debug, Clone)]
pub struct Encoded(Bytes);

impl WatchOutput for Encoded {
    fn event(log_id: u64, event: &CustomerEvent) -> Self {
        Encoded(event.rendered.get_or_init(|| {
            Bytes::from(pb::WatchCustomersResponse::event(log_id, event).encode_to_vec())
        }))
    }

    fn heartbeat(heartbeat: pb::Heartbeat) -> Self {
        Encoded(Bytes::from(
            pb::WatchCustomersResponse::heartbeat(heartbeat).encode_to_vec(),
        ))
    }
}

/// Sends [`Encoded`] messages as they are; reads requests with prost.
#[derive(Debug, Default, Clone, Copy)]
pub struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = Encoded;
    type Decode = pb::WatchCustomersRequest;
    type Encoder = WatchCodec;
    type Decoder = WatchCodec;

    fn encoder(&mut self) -> Self::Encoder {
        WatchCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        WatchCodec
    }
}

impl Encoder for WatchCodec {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }
}

impl Decoder for WatchCodec {
    type Item = pb::WatchCustomersRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        // The same status the generated server's prost decoder gives.
        Message::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// `WatchCustomers` as a server-streaming method of [`Encoded`] messages.
struct WatchMethod<S: ?Sized>(Arc<CrmApi<S>>);

impl<S: CrmStore + ?Sized> ServerStreamingService<pb::WatchCustomersRequest> for WatchMethod<S> {
    type Response = Encoded;
    type ResponseStream = Unbatch<Encoded>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<pb::WatchCustomersRequest>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move {
            api.open_watch::<Encoded>(request.into_inner())
                .await
                .map(Response::new)
        })
    }
}

/// The CRM service's routes: `WatchCustomers` with shared encodings, the rest generated.
pub struct CrmRoutes<S: ?Sized> {
    /// The service.
    api: Arc<CrmApi<S>>,
    /// The generated server, for every other method.
    generated: CrmServiceServer<CrmApi<S>>,
    /// Largest request accepted and response sent, as for every other method.
    max_message_bytes: usize,
}

impl<S: ?Sized> Clone for CrmRoutes<S> {
    fn clone(&self) -> Self {
        Self {
            api: Arc::clone(&self.api),
            generated: self.generated.clone(),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

impl<S: CrmStore + ?Sized> CrmRoutes<S> {
    /// Routes for `api`, with the server's shared message limits and compression.
    pub fn new(api: CrmApi<S>, server: &ServerOptions) -> Self {
        let api = Arc::new(api);
        Self {
            generated: mip_runtime::limited!(CrmServiceServer::from_arc(Arc::clone(&api)), server),
            api,
            max_message_bytes: server.max_message_bytes,
        }
    }
}

impl<S: ?Sized> NamedService for CrmRoutes<S> {
    const NAME: &'static str = crate::SERVICE_NAME;
}

impl<S, B> tower::Service<http::Request<B>> for CrmRoutes<S>
where
    S: CrmStore + ?Sized,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.generated.call(request);
        }
        let method = WatchMethod(Arc::clone(&self.api));
        let limit = Some(self.max_message_bytes);
        Box::pin(async move {
            // The compression and size settings `limited!` gives the generated server.
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(limit, limit);
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}
