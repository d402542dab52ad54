//! The shared server's health service, through the standard grpc.health.v1 API.

use std::time::Duration;

use mip_runtime::CancellationToken;
use mip_runtime::server::{Health, ServerOptions, serve};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICE: &str = "test.v1.Thing";

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn open_health_watch_sees_not_serving_and_does_not_hold_up_shutdown() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new(&[SERVICE]).await;
        health.set_serving().await;
        let shutdown = CancellationToken::new();
        // A long grace period: if the watch held shutdown up, the server would take this long.
        let options = ServerOptions {
            shutdown_grace: Duration::from_secs(60),
            ..ServerOptions::default()
        };
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                serve(
                    listener,
                    mip_proto::CRM_DESCRIPTOR_SET,
                    Routes::default(),
                    health,
                    &options,
                    shutdown,
                )
                .await
            }
        });
        let mut client = HealthClient::new(channel(addr).await);
        let mut watch = client
            .watch(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);

        shutdown.cancel();
        let next = watch.message().await.unwrap().expect("a final status");
        assert_eq!(next.status(), ServingStatus::NotServing);
        assert!(
            watch.message().await.unwrap().is_none(),
            "the watch ends after NOT_SERVING"
        );
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops without waiting out the grace period")
            .unwrap()
            .unwrap();
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn watch_of_an_unknown_service_says_service_unknown() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new(&[SERVICE]).await;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                serve(
                    listener,
                    mip_proto::CRM_DESCRIPTOR_SET,
                    Routes::default(),
                    health,
                    &ServerOptions::default(),
                    shutdown,
                )
                .await
            }
        });
        let mut client = HealthClient::new(channel(addr).await);
        let status = client
            .check(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.status(),
            ServingStatus::NotServing,
            "not ready until marked serving"
        );
        let mut watch = client
            .watch(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::ServiceUnknown);
        drop(watch);
        shutdown.cancel();
        server.await.unwrap().unwrap();
    })
    .await
    .expect("test finished in time");
}
