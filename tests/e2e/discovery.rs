//! The standard gRPC health service and server reflection (v1 and v1alpha,
//! which grpcurl speaks).

use anyhow::{Context, Result};
use futures::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};
use workbroker_tests::*;

#[tokio::test]
async fn the_health_service_reports_serving() -> Result<()> {
    let broker = TestBroker::start().await?;
    let channel = tonic::transport::Channel::from_shared(broker.endpoint())?.connect().await?;
    let mut health = HealthClient::new(channel);
    for service in ["workbroker.v1.Broker", "workbroker.v1.Admin", ""] {
        let status = health.check(HealthCheckRequest { service: service.to_owned() }).await?.into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    broker.finish().await
}

#[tokio::test]
async fn reflection_lists_the_services_in_both_versions() -> Result<()> {
    let broker = TestBroker::start().await?;
    let channel = tonic::transport::Channel::from_shared(broker.endpoint())?.connect().await?;

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut responses = alpha.server_reflection_info(tokio_stream::iter(vec![request])).await?.into_inner();
    let response = responses.next().await.context("a reflection answer")??;
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        anyhow::bail!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for expected in ["workbroker.v1.Broker", "workbroker.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|name| name == expected), "{expected} missing from {names:?}");
    }

    let mut stable = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "workbroker.v1.Broker".to_owned(),
        )),
    };
    let mut responses = stable.server_reflection_info(tokio_stream::iter(vec![request])).await?.into_inner();
    let response = responses.next().await.context("a reflection answer")??;
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        anyhow::bail!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    broker.finish().await
}
