//! `--health-port`: plaintext grpc.health.v1 for kubelet probes. It says NOT_SERVING until
//! the node is admitted by its registry and SERVING after, and serves nothing else.

mod common;

use std::time::{Duration, Instant};

use common::net::{Net, Node, s};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A port free right now (the node binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn plaintext(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn status(addr: &str) -> Option<ServingStatus> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn wait_for(addr: &str, want: ServingStatus, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = status(addr).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health at {addr} is {got:?}, not {want:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `log` until it contains `needle`.
async fn wait_for_log(log: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "no \"{needle}\" in:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_server_flips_and_serves_only_health() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (health, _task) = unfed_node::health::serve(listener).await;
    let mut client = HealthClient::new(plaintext(&addr).await);
    let check = |c: &mut HealthClient<_>| {
        let mut c = c.clone();
        async move {
            c.check(HealthCheckRequest::default())
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    assert_eq!(check(&mut client).await, ServingStatus::NotServing as i32);
    health.set_serving(true).await;
    assert_eq!(check(&mut client).await, ServingStatus::Serving as i32);
    health.set_serving(false).await;
    assert_eq!(check(&mut client).await, ServingStatus::NotServing as i32);
    // Only the overall status is known: no role service is named.
    let named = client
        .check(HealthCheckRequest {
            service: "unfed.v1.Compute".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(named.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_node_is_not_serving_until_registered_and_serves_nothing_else() {
    let (dir, split) = Net::prepare_tiny(1);
    let registry_port = free_port();
    let health_port = free_port();
    let health = format!("127.0.0.1:{health_port}");
    let compute_log = dir.path().join("compute.log");
    let compute = Node::start(
        &[
            s("compute"),
            s("--shard-index"),
            s("0"),
            s("--port"),
            s("0"),
            s("--shards-dir"),
            split.display().to_string(),
            s("--registry"),
            format!("127.0.0.1:{registry_port}"),
            s("--heartbeat-secs"),
            s("1"),
            s("--health-port"),
            health_port.to_string(),
        ],
        compute_log.clone(),
    );
    // No registry yet: the node listens and retries, and the probe says not ready —
    // still after a registration attempt has failed.
    wait_for(&health, ServingStatus::NotServing, &compute_log).await;
    wait_for_log(&compute_log, "registry unreachable, retrying").await;
    assert_eq!(status(&health).await, Some(ServingStatus::NotServing));

    let _registry = Node::start(
        &[
            s("registry"),
            s("--port"),
            registry_port.to_string(),
            s("--heartbeat-secs"),
            s("1"),
            s("--shards-dir"),
            dir.path().join("splits").display().to_string(),
        ],
        dir.path().join("registry.log"),
    );
    wait_for(&health, ServingStatus::Serving, &compute_log).await;

    // The plaintext port answers no role RPC: the compute service is not routed there.
    let mut c = unfed_proto::compute_client::ComputeClient::new(plaintext(&health).await);
    let err = c
        .health(unfed_proto::HealthRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // And the node's own port still refuses plaintext (mTLS only).
    let own = tonic::transport::Endpoint::from_shared(format!("http://{}", compute.address))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = own {
        let refused = unfed_proto::compute_client::ComputeClient::new(ch)
            .health(unfed_proto::HealthRequest::default())
            .await;
        assert!(refused.is_err(), "the node's port answered plaintext");
    }
}
