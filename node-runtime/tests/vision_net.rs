//! Vision shards over real gRPC: two in-process vision shards give the whole model's
//! image features (and so transformers' tokens), and an `unfed-node compute
//! --model-type smolvlm_vision` process registers, completing the model's READY, and
//! image + text generation through the testnet is token-identical to transformers.

mod common;
mod vision_common;

use std::time::{Duration, Instant};

use common::net::{Net, s, start_pair};
use tokio::net::TcpListener;
use unfed_model::split::{SplitOptions, split};
use unfed_node::client::GenerateOptions;
use unfed_node::client::image::{ImageLimits, image_prompt};
use unfed_node::client::private::{PublicParams, PublicSource};
use unfed_node::engine::SamplingConfig;
use unfed_node::engine::generate::load_checkpoint;
use unfed_node::vision::image_prompt_rows;
use unfed_node::vision::service::{
    VisionNode, encode_image, load_vision_shard, serve, vision_addresses,
};
use unfed_node::wire;
use unfed_proto::{DType, ModelState};
use vision_common::{label, model, model_dir, preprocess, reference};

const MODEL: &str = "smolvlm-tiny";

fn split_vl(root: &std::path::Path, text: usize, vision: usize) -> std::path::PathBuf {
    let out = root.join(MODEL);
    let opts = SplitOptions {
        text_shards: text,
        vision_shards: Some(vision),
        model_id: Some(MODEL.to_string()),
        ..Default::default()
    };
    split(&model_dir(), &out, &opts).unwrap();
    out
}

/// Both text shards and the vision shard of the model, as `unfed-node compute` processes.
fn serve_vl(net: &mut Net) {
    net.compute(MODEL, 0);
    net.compute(MODEL, 1);
    serve_vision(net, 0);
}

/// A vision node serving vision shard 0; returns its index in `net.computes`.
fn serve_vision(net: &mut Net, replica: usize) -> usize {
    let mut args = net.compute_args(MODEL, 0, "0");
    args.extend([s("--model-type"), s("smolvlm_vision")]);
    let log = net.dir.path().join(format!("vision-0-r{replica}.log"));
    net.computes.push(common::net::Node::start(&args, log));
    net.computes.len() - 1
}

/// `image_prompt` of the reference prompt and `image`.
async fn vision_prompt(
    client: &mut unfed_node::client::Client,
    registry: &str,
    image: &std::path::Path,
) -> anyhow::Result<unfed_node::client::image::ImagePrompt> {
    let prompt = &reference().prompt;
    image_prompt(
        client,
        registry,
        MODEL,
        prompt,
        image,
        false,
        ImageLimits::default(),
    )
    .await
}

/// Issue 20: the vision node encoding a chat's image is dead: the client bans it and
/// encodes through the other replica, with the same features and tokens. With none
/// left, the error names the vision shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vision_node_fails_over_to_its_replica() {
    let dir = Net::prepare();
    split_vl(&dir.path().join("splits"), 2, 1);
    let mut net = Net::registry(dir);
    serve_vl(&mut net);
    let twin = serve_vision(&mut net, 1);
    net.wait_ready(MODEL, 4).await;
    let mut client = net.client().await;
    let case = reference()
        .cases
        .iter()
        .find(|c| c.do_image_splitting)
        .unwrap();
    let image = vision_common::fixtures().join("vision").join(&case.image);
    let registry = net.registry.address.clone();
    let undisturbed = vision_prompt(&mut client, &registry, &image).await.unwrap();
    // Whichever replica the client would pick first is dead.
    let tls = common::net::transport();
    let first = vision_addresses(&tls, &net.registry.address, MODEL)
        .await
        .unwrap()[0]
        .address
        .clone();
    let dead = net
        .computes
        .iter()
        .position(|n| n.address == first)
        .unwrap();
    net.computes[dead].kill();
    let p = vision_prompt(&mut client, &registry, &image)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    assert_eq!(p.prompt_ids, undisturbed.prompt_ids);
    assert_eq!(p.features, undisturbed.features);
    let opts = GenerateOptions {
        max_tokens: case.generated_ids.len(),
        ..Default::default()
    };
    let out = client
        .generate_with_image(MODEL, &p.prompt_ids, Some(&p.features), &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(out.tokens, case.generated_ids, "{}", label(case));

    let other = if dead == twin { 2 } else { twin };
    net.computes[other].kill();
    let err = format!(
        "{:#}",
        vision_prompt(&mut client, &registry, &image)
            .await
            .err()
            .unwrap()
    );
    assert!(
        err.contains("vision shard 0 of `smolvlm-tiny` has no live replica"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vision_shards_over_grpc_give_the_reference_features_and_tokens() {
    let tls = common::net::transport();
    let dir = tempfile::tempdir().unwrap();
    let split_dir = split_vl(dir.path(), 1, 2);
    let mut addresses = Vec::new();
    let mut stops = Vec::new();
    for i in 0..2 {
        let shard = load_vision_shard(&split_dir, i).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addresses.push(unfed_proto::Hop {
            address: listener.local_addr().unwrap().to_string(),
            ..Default::default()
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        let node = VisionNode::new(shard.manifest.model_id.clone(), shard.model);
        tokio::spawn(serve(
            common::net::identity("vision"),
            listener,
            node,
            async move {
                let _ = rx.await;
            },
        ));
    }
    for case in reference().cases.iter().filter(|c| c.do_image_splitting) {
        let batch = preprocess(case).batch;
        let (features, rows) = encode_image(&tls, &addresses, MODEL, &batch).await.unwrap();
        assert_eq!(rows, case.features_shape[0]);
        assert_eq!(
            features,
            model().image_features(batch).unwrap(),
            "{}",
            case.image
        );
        let got = model()
            .generate(
                &case.input_ids,
                Some(&features),
                case.generated_ids.len(),
                SamplingConfig::default(),
                true,
            )
            .unwrap();
        assert_eq!(got, case.generated_ids, "{}", case.image);
    }
    let batch = preprocess(&reference().cases[0]).batch;
    let err = encode_image(&tls, &addresses, "other-model", &batch)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("serves `{MODEL}`, not `other-model`")),
        "{err:#}"
    );
    let reversed: Vec<_> = addresses.iter().rev().cloned().collect();
    let err = encode_image(&tls, &reversed, MODEL, &batch)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("vision shard 0"), "{err:#}");
    let err = encode_image(&tls, &[], MODEL, &batch).await.unwrap_err();
    assert!(format!("{err:#}").contains("smolvlm_vision"), "{err:#}");
}

#[test]
fn a_vision_shard_index_out_of_range_or_a_text_only_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let split_dir = split_vl(dir.path(), 1, 1);
    let err = load_vision_shard(&split_dir, 1).err().unwrap();
    assert!(
        format!("{err:#}").contains("--shard-index 1 is out of range"),
        "{err:#}"
    );
    let text_only = dir.path().join("qwen");
    let opts = SplitOptions {
        text_shards: 1,
        ..Default::default()
    };
    split(
        &vision_common::fixtures().join("models/qwen2-f32"),
        &text_only,
        &opts,
    )
    .unwrap();
    let err = load_vision_shard(&text_only, 0).err().unwrap();
    assert!(format!("{err:#}").contains("text-only model"), "{err:#}");
}

async fn model_status(net: &Net) -> unfed_proto::ModelStatus {
    let mut client = net.client().await;
    let models = client.list_models().await.unwrap();
    models
        .into_iter()
        .find(|m| m.model == MODEL)
        .expect("the registry lists the model")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_node_process_completes_the_model_and_serves_features() {
    let tls = common::net::transport();
    let dir = Net::prepare();
    split_vl(&dir.path().join("splits"), 2, 1);
    let mut net = Net::registry(dir);
    net.compute(MODEL, 0);
    net.compute(MODEL, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = model_status(&net).await;
        if m.text_shards_covered == 2 {
            assert_eq!(m.state, ModelState::Incomplete as i32);
            assert_eq!(m.reason, "incomplete_vision_coverage", "{m:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "text shards never covered: {m:?}\n{}",
            net.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await; // poll again until the deadline
    }
    let mut args = net.compute_args(MODEL, 0, "0");
    args.extend([s("--model-type"), s("smolvlm_vision")]);
    let log = net.dir.path().join("vision-0.log");
    net.computes.push(common::net::Node::start(&args, log));
    net.wait_ready(MODEL, 3).await;

    let vision = vision_addresses(&tls, &net.registry.address, MODEL)
        .await
        .unwrap();
    assert_eq!(vision.len(), 1);
    let case = &reference().cases[0];
    let batch = preprocess(case).batch;
    let (features, _) = encode_image(&tls, &vision, MODEL, &batch).await.unwrap();
    assert_eq!(features, model().image_features(batch).unwrap());

    // SIGTERM: the vision node unregisters and the model is incomplete again.
    let status = net.computes.last_mut().unwrap().terminate();
    assert!(
        status.success(),
        "vision node exit: {status:?}\n{}",
        net.logs()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = model_status(&net).await;
        if m.reason == "incomplete_vision_coverage" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the model stayed {m:?} after the vision node left"
        );
        tokio::time::sleep(Duration::from_millis(25)).await; // poll again until the deadline
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_and_text_greedy_generation_through_the_testnet_matches_transformers() {
    let tls = common::net::transport();
    let dir = Net::prepare();
    split_vl(&dir.path().join("splits"), 2, 1);
    let text_only = SplitOptions {
        text_shards: 1,
        model_id: Some("qwen".into()),
        ..Default::default()
    };
    split(
        &vision_common::fixtures().join("models/qwen2-f32"),
        &dir.path().join("splits/qwen"),
        &text_only,
    )
    .unwrap();
    let mut net = Net::registry(dir);
    serve_vl(&mut net);
    net.wait_ready(MODEL, 3).await;
    let vision = vision_addresses(&tls, &net.registry.address, MODEL)
        .await
        .unwrap();
    let mut client = net.client().await;
    for case in &reference().cases {
        let batch = preprocess(case).batch;
        let (features, rows) = encode_image(&tls, &vision, MODEL, &batch).await.unwrap();
        let features = wire::encode(&features, &[rows, features.len() / rows], DType::DtypeF32);
        let opts = GenerateOptions {
            max_tokens: case.generated_ids.len(),
            ..Default::default()
        };
        let out = client
            .generate_with_image(MODEL, &case.input_ids, Some(&features), &opts, |_| {})
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}\n{}", label(case), net.logs()));
        assert_eq!(out.tokens, case.generated_ids, "{}", label(case));
    }
    // The client-side pipeline `chat --image` runs: the served preprocessor config
    // (splitting on), the chat template, the expansion, the vision shards.
    for case in reference().cases.iter().filter(|c| c.do_image_splitting) {
        let image = vision_common::fixtures().join("vision").join(&case.image);
        let p = image_prompt(
            &mut client,
            &net.registry.address,
            MODEL,
            &reference().prompt,
            &image,
            false,
            ImageLimits::default(),
        )
        .await
        .unwrap();
        assert_eq!(p.prompt_ids, case.input_ids, "{}", label(case));
        let opts = GenerateOptions {
            max_tokens: case.generated_ids.len(),
            ..Default::default()
        };
        let out = client
            .generate_with_image(MODEL, &p.prompt_ids, Some(&p.features), &opts, |_| {})
            .await
            .unwrap();
        assert_eq!(
            out.tokens,
            case.generated_ids,
            "{} via image_prompt",
            label(case)
        );
    }
    let image = vision_common::fixtures().join("vision/square.png");
    let err = image_prompt(
        &mut client,
        &net.registry.address,
        "qwen",
        "hi",
        &image,
        false,
        ImageLimits::default(),
    )
    .await
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("`qwen` is a text-only model (qwen2) and cannot take --image"),
        "{err:#}"
    );
    let truncated = vision_common::fixtures().join("vision/truncated.png");
    let err = image_prompt(
        &mut client,
        &net.registry.address,
        MODEL,
        "hi",
        &truncated,
        false,
        ImageLimits::default(),
    )
    .await
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("check that the file is complete"),
        "{err:#}"
    );

    // Features for five tiles with a one-tile prompt: the first shard names the mismatch.
    let five = &reference().cases[0];
    let one = reference()
        .cases
        .iter()
        .find(|c| !c.do_image_splitting)
        .unwrap();
    let (features, rows) = encode_image(&tls, &vision, MODEL, &preprocess(five).batch)
        .await
        .unwrap();
    let features = wire::encode(&features, &[rows, features.len() / rows], DType::DtypeF32);
    let err = client
        .generate_with_image(
            MODEL,
            &one.input_ids,
            Some(&features),
            &GenerateOptions::default(),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("4 image placeholder tokens"),
        "{err:#}"
    );

    // The dashboard: an uploaded image gives the same tokens as `chat --image`.
    // (Demo mode: no chain, so nothing to sign in to.)
    let args = common::web::args(&net.registry.address, &net.dir.path().join("web.db"), &[]);
    let web = common::web::Web::start(
        args,
        &[("UNFED_DEMO_AUTH", "1")],
        &net.dir.path().join("web.log"),
    );
    let (_, models) = web.get("/api/models", None).await;
    let kinds: Vec<(&str, bool)> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["model"].as_str().unwrap(), m["vision"].as_bool().unwrap()))
        .collect();
    assert!(
        kinds.contains(&(MODEL, true)) && kinds.contains(&("qwen", false)),
        "{kinds:?}"
    );
    let case = reference()
        .cases
        .iter()
        .find(|c| c.do_image_splitting)
        .unwrap();
    let png = std::fs::read(vision_common::fixtures().join("vision").join(&case.image)).unwrap();
    let image = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png)
    );
    let chat = serde_json::json!({
        "model": MODEL,
        "prompt": reference().prompt,
        "image": image,
        "max_tokens": case.generated_ids.len(),
    });
    let (st, v) = web.post("/api/chat", chat, None).await;
    assert_eq!(st, 200, "{v}");
    let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
    assert_eq!(ids, case.generated_ids, "{} via the dashboard", label(case));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_prompts_through_an_mpc_pair_give_the_transformers_tokens() {
    let tls = common::net::transport();
    let dir = Net::prepare();
    let split = split_vl(&dir.path().join("splits"), 2, 1);
    let mut net = Net::registry(dir);
    serve_vl(&mut net);
    let logs = net.dir.path().to_path_buf();
    let _pair = start_pair(&split, Some(&net.registry.address), &[], &logs);
    net.wait_ready(MODEL, 5).await;
    let vision = vision_addresses(&tls, &net.registry.address, MODEL)
        .await
        .unwrap();
    let mut client = net.client().await;
    let route = client
        .private_route(
            MODEL,
            &PublicParams::new(PublicSource::Split(split.clone())),
        )
        .await
        .unwrap()
        .expect("the pair is listed");
    // The client merges the image features into its own embedded prompt; the pair runs
    // shard 0 on shares and hands over to shard 1.
    for case in &reference().cases {
        let batch = preprocess(case).batch;
        let (features, rows) = encode_image(&tls, &vision, MODEL, &batch).await.unwrap();
        let features = wire::encode(&features, &[rows, features.len() / rows], DType::DtypeF32);
        let opts = GenerateOptions {
            max_tokens: case.generated_ids.len(),
            ..Default::default()
        };
        let out = client
            .generate_via(
                MODEL,
                Some(&route),
                &case.input_ids,
                Some(&features),
                &opts,
                |_| {},
            )
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}\n{}", label(case), net.logs()));
        assert_eq!(out.tokens, case.generated_ids, "{}", label(case));
        assert_eq!(out.route.len(), 3, "{:?}", out.route);
    }
    assert_eq!(net.compute_forwards(0).await, 0);
}

#[test]
fn image_features_for_a_text_only_model_are_refused() {
    let (cfg, model) =
        load_checkpoint(&vision_common::fixtures().join("models/qwen2-f32")).unwrap();
    let features = wire::encode(&[0.0; 64], &[1, 64], DType::DtypeF32);
    let err = image_prompt_rows(&model, &cfg, &[1, 2, 3], &features).unwrap_err();
    assert!(
        format!("{err:#}").contains("text-only model and takes no image"),
        "{err:#}"
    );
}
