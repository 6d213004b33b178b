//! Issue 19: what leaves the processes of a private chat, byte for byte. Recording TCP
//! relays stand in front of party A, party B and the daemon (each advertises its relay,
//! so everything the client and the other nodes exchange with it passes through). The
//! testnet runs with TLS off (the loopback plaintext mode), so the relays record the
//! application bytes (HTTP/2 frames carrying protobuf) that TLS would encrypt. For
//! full_output_2pc, no window of 4 prompt or generated token ids, no embedding row of a
//! prompt token and no 12-byte run of the prompt text may appear; the same probe in
//! front of the compute node of a plaintext route finds the ids (the control).

mod common;
mod daemon_common;

use std::time::{Duration, Instant};

use common::net::{Net, party_args, s};
use common::relay::{Probe, Relay};
use unfed_node::client::GenerateOptions;
use unfed_node::client::private::{PublicParams, PublicSource};
use unfed_node::client::text::TextCodec;
use unfed_node::mpc::ring::FRAC_BITS;
use unfed_node::mpc::weights::ClientModel;

const PROMPT: &str = "Tell me where the shards of this model live, and who holds them.";

#[tokio::test(flavor = "multi_thread")]
async fn a_full_output_2pc_chat_puts_no_prompt_or_token_on_the_wire() {
    let (dir, split) = Net::prepare_tiny(1);
    let net = Net::registry_with(dir, false);
    let (reg, logs) = (net.registry.address.clone(), net.dir.path().to_path_buf());
    // In front of party A, party B and the daemon.
    let relays = [
        Relay::start().await,
        Relay::start().await,
        Relay::start().await,
    ];
    let args = daemon_common::daemon_args_at(
        &reg,
        &logs.join("chain.db"),
        "0",
        &["--advertise", &relays[2].address],
    );
    let daemon = net.start(&args, logs.join("daemon.log"));
    relays[2].forward_to(&daemon.address);
    let b = party_args(
        "B",
        &split,
        Some(&reg),
        None,
        &["--full-output", "--advertise", &relays[1].address],
    );
    let b = net.start(&b, logs.join("mpc-b.log"));
    relays[1].forward_to(&b.address);
    let a = party_args(
        "A",
        &split,
        Some(&reg),
        Some(&relays[1].address),
        &["--full-output", "--advertise", &relays[0].address],
    );
    let a = net.start(&a, logs.join("mpc-a.log"));
    relays[0].forward_to(&a.address);

    let mut client = net.client().await;
    // The public parameters come from the split: fetched from party A they would carry
    // the (public) embedding table, every row of which the probe would match.
    let params = PublicParams::new(PublicSource::Split(split.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let private = loop {
        if let Ok(Some(p)) = client.private_route("tiny", &params).await {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the registry never listed the pair\n{}",
            net.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll again until the deadline
    };
    assert!(private.0.full_output);
    let (manifest, files) = client.manifest("tiny").await.unwrap();
    let codec = TextCodec::from_manifest_files(&files, "tiny").unwrap();
    let ids = codec.encode_prompt(PROMPT, true).unwrap();
    let opts = GenerateOptions {
        max_tokens: 6,
        stop_on_eos: false,
        payer: Some(unfed_node::voucher::Payer::wallet(
            unfed_chain::dev_signer(9).unwrap(),
        )),
        ..Default::default()
    };
    let out = client
        .generate_via("tiny", Some(&private), &ids, None, &opts, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    // The parties' compute shares reach the daemon (through its relay) before we look.
    let channel = unfed_node::net::Net::plaintext()
        .connect(&daemon.address, Duration::from_secs(10), None)
        .await
        .unwrap();
    let mut d = unfed_proto::daemon_client::DaemonClient::new(channel);
    let steps = out.tokens.len() as u64;
    daemon_common::wait_status(&mut d, "both parties' shares", |st| {
        st.shares == 2 * steps && st.pending_shares == 0
    })
    .await;

    let layers = manifest.config.text.num_hidden_layers;
    let model = ClientModel::from_split(&split, layers, true).unwrap();
    let rows: Vec<Vec<f32>> = ids.iter().map(|id| model.embed(&[*id]).unwrap()).collect();
    let probe = |generated: &[u32]| {
        let all: Vec<u32> = ids.iter().chain(generated).copied().collect();
        Probe::new(&all, &rows, PROMPT, FRAC_BITS)
    };
    let private_probe = probe(&out.tokens);
    for (who, relay) in ["party A", "party B", "the daemon"].iter().zip(&relays) {
        let bytes = relay.bytes();
        println!("{who}: {} bytes relayed", bytes.len());
        assert!(
            bytes.len() > 1000,
            "{who}: only {} bytes relayed",
            bytes.len()
        );
        let found = private_probe.find(&bytes);
        assert!(found.is_empty(), "in front of {who}: {found:?}");
    }

    // Control: a plaintext route's compute node, behind a relay of its own.
    let relay = Relay::start().await;
    let mut args = net.compute_args("tiny", 0, "0");
    args.extend([s("--advertise"), relay.address.clone()]);
    let compute = net.start(&args, logs.join("compute.log"));
    relay.forward_to(&compute.address);
    net.wait_ready("tiny", 3).await;
    let plain = client.generate("tiny", &ids, &opts, |_| {}).await.unwrap();
    let found = probe(&plain.tokens).find(&relay.bytes());
    assert!(
        found.iter().any(|f| f.starts_with("ids")),
        "the probe saw no token ids on the plaintext route: {found:?}"
    );
}
