//! The Anvil bootstrap: start on a free port, chosen block time, stop by PID.

use std::time::{Duration, Instant};

use alloy::providers::Provider;
use unfed_chain::anvil::{pid_alive, stop_pid};
use unfed_chain::{Anvil, AnvilOptions, Chain, dev_signer};

#[tokio::test]
async fn drop_stops_anvil_and_detached_anvil_stops_by_pid() {
    let a = Anvil::start(&AnvilOptions::default()).await.unwrap();
    let pid = a.pid();
    assert_eq!(a.chain_id(), 31337);
    assert!(pid_alive(pid));
    drop(a);
    assert!(!pid_alive(pid), "anvil {pid} survived its guard");

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("anvil.log");
    let a = Anvil::start(&AnvilOptions {
        chain_id: Some(4242),
        log_file: Some(log.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(a.chain_id(), 4242);
    let url = a.endpoint();
    let pid = a.detach();
    let c = Chain::connect(&url, dev_signer(0).unwrap()).unwrap();
    assert_eq!(c.chain_id().await.unwrap(), 4242);
    stop_pid(pid).unwrap();
    // Our own child becomes a zombie until reaped; pid_alive treats that as gone.
    assert!(!pid_alive(pid));
    assert!(c.chain_id().await.is_err());
    assert!(
        std::fs::metadata(&log).unwrap().len() > 0,
        "anvil wrote no log"
    );
    stop_pid(pid).unwrap(); // already gone: not an error
}

#[tokio::test]
async fn block_time_mines_blocks_on_its_own() {
    let a = Anvil::start(&AnvilOptions {
        block_time: Some(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = Chain::connect(&a.endpoint(), dev_signer(0).unwrap()).unwrap();
    let first = c.provider().get_block_number().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if c.provider().get_block_number().await.unwrap() > first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no block mined within 10 s at block time 1 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn taken_port_is_reported() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let err = Anvil::start(&AnvilOptions {
        port: Some(port),
        ..Default::default()
    })
    .await
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains(&port.to_string()), "{err}");
    // Anvil's own explanation is passed on.
    assert!(err.contains("Address already in use"), "{err}");
}

/// Installing from npm into an empty cache, from several threads at once: one installs,
/// the others wait on the lock and reuse it. Ignored by default (downloads the package, ~43 MB unpacked);
/// run with `cargo test -p unfed-chain --test anvil -- --ignored`.
#[test]
#[ignore = "downloads the anvil npm package"]
fn concurrent_fresh_install_installs_once() {
    let cache = tempfile::tempdir().unwrap();
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| unfed_chain::anvil::install_anvil(cache.path()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]), "{paths:?}");
    let out = std::process::Command::new(&paths[0])
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("anvil"));
    let leftovers: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
