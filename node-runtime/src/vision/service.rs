//! The vision role's gRPC service (`unfed.v1.Vision`): one vision shard of a split
//! vision-language model, and the client call that walks the vision shards in order.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use unfed_model::{Manifest, ShardEntry};
use unfed_proto::vision_client::VisionClient;
use unfed_proto::vision_server::{Vision, VisionServer};
use unfed_proto::{
    DType, EncodeRequest, EncodeResponse, PixelTiles, VisionHidden, encode_request, encode_response,
};

use super::tower::{PatchStates, PixelBatch, VisionInput, VisionModel, VisionOutput, VisionSpec};
use crate::compute::{self, ComputeConfig};
use crate::engine::WeightFiles;
use crate::wire;

/// A loaded vision shard and its manifest entry.
pub struct LoadedVisionShard {
    pub manifest: Manifest,
    pub entry: ShardEntry,
    pub model: VisionModel,
}

/// Loads vision shard `index` of the split model in `dir` (only that shard's file).
pub fn load_vision_shard(dir: &Path, index: usize) -> Result<LoadedVisionShard> {
    let manifest = Manifest::load(dir).with_context(|| {
        format!(
            "reading the split in {}; is --shards-dir the output of `unfedctl split`?",
            dir.display()
        )
    })?;
    let Some(vcfg) = manifest.config.vision.clone() else {
        bail!(
            "{} holds `{}`, a text-only model ({}); --model-type smolvlm_vision needs a vision-language model such as SmolVLM",
            dir.display(),
            manifest.model_id,
            manifest.config.model_type
        );
    };
    let total = manifest.vision_shards().count();
    let Some(entry) = manifest.vision_shards().find(|s| s.index == index).cloned() else {
        bail!(
            "--shard-index {index} is out of range: {} has {total} vision shard(s) (split with --vision-shards N for more)",
            dir.display()
        );
    };
    let spec = VisionSpec {
        layer_start: entry.layer_start,
        layer_end: entry.layer_end,
        has_embedding: entry.has_embedding,
        has_head: entry.has_head,
    };
    let files = WeightFiles::open(&[dir.join(&entry.file)])?;
    let model = VisionModel::load(&vcfg, manifest.config.text.hidden_size, spec, &files)
        .with_context(|| format!("loading vision shard {index} from {}", dir.display()))?;
    Ok(LoadedVisionShard {
        manifest,
        entry,
        model,
    })
}

/// A vision shard serving `Encode`.
#[derive(Clone)]
pub struct VisionNode {
    model_id: String,
    model: Arc<VisionModel>,
}

impl VisionNode {
    pub fn new(model_id: String, model: VisionModel) -> Self {
        Self {
            model_id,
            model: Arc::new(model),
        }
    }
}

/// Serves `node` on `listener` until `shutdown` completes.
pub async fn serve(
    net: crate::net::Net,
    listener: TcpListener,
    node: VisionNode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let router = net.server().add_service(
        VisionServer::new(node)
            .max_decoding_message_size(crate::net::limits::VISION)
            .max_encoding_message_size(crate::net::limits::VISION),
    );
    net.serve(router, listener, shutdown)
        .await
        .context("vision server failed")
}

/// How long one vision shard may take for one image.
const ENCODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[tonic::async_trait]
impl Vision for VisionNode {
    async fn encode(
        &self,
        req: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        let req = req.into_inner();
        if req.model_id != self.model_id {
            return Err(Status::not_found(format!(
                "this vision node serves `{}`, not `{}`",
                self.model_id, req.model_id
            )));
        }
        let input = match req.input {
            Some(encode_request::Input::Pixels(p)) => {
                VisionInput::Pixels(pixels_from_wire(&p, self.model.config().num_channels)?)
            }
            Some(encode_request::Input::Hidden(h)) => VisionInput::Hidden(hidden_from_wire(&h)?),
            None => {
                return Err(Status::invalid_argument(
                    "EncodeRequest has no input: send pixels or hidden states",
                ));
            }
        };
        let model = self.model.clone();
        let (output, ms) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            model
                .forward(input)
                .map(|o| (o, start.elapsed().as_secs_f64() * 1e3))
        })
        .await
        .map_err(|e| Status::internal(format!("vision task failed: {e}")))?
        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let output = match output {
            VisionOutput::Features { rows, data } => {
                let width = data.len() / rows.max(1);
                encode_response::Output::Features(wire::encode(
                    &data,
                    &[rows, width],
                    DType::DtypeF32,
                ))
            }
            VisionOutput::Hidden(states) => {
                encode_response::Output::Hidden(hidden_to_wire(&states))
            }
        };
        Ok(Response::new(EncodeResponse {
            output: Some(output),
            compute_ms: ms,
        }))
    }
}

fn pixels_to_wire(b: &PixelBatch) -> PixelTiles {
    PixelTiles {
        pixels: Some(wire::encode(
            &b.pixels,
            &[b.tiles, b.channels, b.height, b.width],
            DType::DtypeF32,
        )),
        pixel_mask: b.pixel_mask.clone(),
    }
}

fn pixels_from_wire(p: &PixelTiles, channels: usize) -> Result<PixelBatch, Status> {
    let t = p
        .pixels
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("PixelTiles has no pixels tensor"))?;
    let (pixels, shape) =
        wire::decode(t).map_err(|e| Status::invalid_argument(format!("pixels: {e}")))?;
    let [tiles, c, height, width] = shape[..] else {
        return Err(Status::invalid_argument(format!(
            "pixels have shape {shape:?}; expected [tiles, {channels}, height, width]"
        )));
    };
    let batch = PixelBatch {
        tiles,
        channels: c,
        height,
        width,
        pixels,
        pixel_mask: p.pixel_mask.clone(),
    };
    batch
        .validate()
        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
    Ok(batch)
}

fn hidden_to_wire(s: &PatchStates) -> VisionHidden {
    let seq = s.grid_h * s.grid_w;
    let hidden = s.data.len() / (s.tiles * seq).max(1);
    VisionHidden {
        states: Some(wire::encode(
            &s.data,
            &[s.tiles, seq, hidden],
            DType::DtypeF32,
        )),
        grid_h: s.grid_h as u32,
        grid_w: s.grid_w as u32,
        patch_mask: s.patch_mask.iter().map(|&m| m as u8).collect(),
    }
}

fn hidden_from_wire(h: &VisionHidden) -> Result<PatchStates, Status> {
    let t = h
        .states
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("VisionHidden has no states tensor"))?;
    let (data, shape) = wire::decode(t)
        .map_err(|e| Status::invalid_argument(format!("vision hidden states: {e}")))?;
    let (grid_h, grid_w) = (h.grid_h as usize, h.grid_w as usize);
    let [tiles, seq, _] = shape[..] else {
        return Err(Status::invalid_argument(format!(
            "vision hidden states have shape {shape:?}; expected [tiles, patches, hidden]"
        )));
    };
    if seq != grid_h * grid_w || h.patch_mask.len() != tiles * seq {
        return Err(Status::invalid_argument(format!(
            "vision hidden states: {seq} patches per tile and {} mask bytes do not match a {grid_h}x{grid_w} grid over {tiles} tiles",
            h.patch_mask.len()
        )));
    }
    Ok(PatchStates {
        tiles,
        grid_h,
        grid_w,
        patch_mask: h.patch_mask.iter().map(|&m| m != 0).collect(),
        data,
    })
}

/// A vision hop that failed an encode: which node, and the gRPC code and message.
#[derive(Debug, thiserror::Error)]
#[error("vision shard {} at {}: {message}", hop.shard_index, hop.address)]
pub struct EncodeFailed {
    pub hop: unfed_proto::Hop,
    pub code: tonic::Code,
    pub message: String,
}

/// Runs preprocessed tiles through the vision shards `hops` (shard 0 first, each pinned
/// to its registered certificate) and returns the image features `[rows, text_hidden]`
/// as (values, rows).
pub async fn encode_image(
    net: &crate::net::Net,
    hops: &[unfed_proto::Hop],
    model_id: &str,
    batch: &PixelBatch,
) -> Result<(Vec<f32>, usize)> {
    if hops.is_empty() {
        bail!(
            "model `{model_id}` has no vision shard serving; start one with `unfed-node compute --model-type smolvlm_vision`"
        );
    }
    let mut input = encode_request::Input::Pixels(pixels_to_wire(batch));
    for (i, hop) in hops.iter().enumerate() {
        let address = &hop.address;
        let pin = crate::net::Pin::parse(&hop.tls_pin)?;
        let failed = |code, message: String| EncodeFailed {
            hop: hop.clone(),
            code,
            message,
        };
        let ch = net
            .connect(address, ENCODE_TIMEOUT, pin)
            .await
            .map_err(|e| failed(tonic::Code::Unavailable, format!("cannot reach it: {e:#}")))?;
        let mut client = VisionClient::new(ch)
            .max_decoding_message_size(crate::net::limits::VISION)
            .max_encoding_message_size(crate::net::limits::VISION);
        let resp = client
            .encode(EncodeRequest {
                model_id: model_id.to_string(),
                input: Some(input),
            })
            .await
            .map_err(|s| failed(s.code(), s.message().to_string()))?
            .into_inner();
        match resp.output {
            Some(encode_response::Output::Features(t)) if i + 1 == hops.len() => {
                let (data, shape) = wire::decode(&t)?;
                return Ok((data, shape.first().copied().unwrap_or(0)));
            }
            Some(encode_response::Output::Hidden(h)) if i + 1 < hops.len() => {
                input = encode_request::Input::Hidden(h)
            }
            _ => bail!(
                "vision shard {i} at {address} returned an unexpected output (are the shards in index order?)"
            ),
        }
    }
    unreachable!("the loop returns on the last shard")
}

/// Serves vision shard `shard` on `listener` until `shutdown`, registered with the
/// registry (role `vision`, stack VISION) while up, unregistered on the way out.
pub async fn run(
    cfg: ComputeConfig,
    shard: LoadedVisionShard,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let node = VisionNode::new(shard.manifest.model_id.clone(), shard.model);
    let cfg = Arc::new(cfg);
    let server = tokio::spawn(serve(cfg.net.clone(), listener, node, shutdown));
    let mut member = None;
    if let Some(registry) = cfg.registry.clone() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        member = Some(tokio::spawn(compute::membership(
            cfg.clone(),
            shard.manifest,
            shard.entry,
            registry,
            tx,
        )));
        if let Ok(Err(e)) = rx.await {
            server.abort();
            return Err(e);
        }
    }
    if cfg.registry.is_none() {
        cfg.health.set_serving(true).await;
    }
    tracing::info!(node = %cfg.node_id, shard = cfg.shard_index, address = %cfg.advertise, "vision node serving");
    let result = server.await.context("vision server task failed")?;
    if let Some(m) = member {
        m.abort();
    }
    compute::unregister(&cfg).await;
    result
}

/// The live vision shards of `model`, in shard order, from the registry.
pub async fn vision_addresses(
    net: &crate::net::Net,
    registry: &str,
    model: &str,
) -> Result<Vec<unfed_proto::Hop>> {
    vision_route(net, registry, model, &|_| false).await
}

/// One listed replica per vision shard, in shard order, skipping the nodes `banned`
/// names (those that failed this client).
pub async fn vision_route(
    net: &crate::net::Net,
    registry: &str,
    model: &str,
    banned: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Vec<unfed_proto::Hop>> {
    let mut client = crate::membership::registry_client(net, registry)?;
    let nodes = client
        .discover(unfed_proto::DiscoverRequest {
            model: model.to_string(),
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "Discover at the registry {registry} failed: {}",
                s.message()
            )
        })?
        .into_inner()
        .nodes;
    let mut shards: Vec<_> = nodes
        .iter()
        .filter(|n| n.model == model && n.stack == unfed_proto::Stack::Vision as i32)
        .map(|n| {
            (
                n.shard_index,
                n.shards_total,
                unfed_proto::Hop {
                    node_id: n.node_id.clone(),
                    address: n.address.clone(),
                    shard_index: n.shard_index,
                    tls_pin: n.tls_pin.clone(),
                },
            )
        })
        .collect();
    shards.sort_by_key(|s| s.0);
    let listed: std::collections::BTreeSet<u32> = shards.iter().map(|s| s.0).collect();
    shards.retain(|s| !banned(&s.2.node_id));
    shards.dedup_by_key(|s| s.0);
    if let Some(gone) = listed.iter().find(|i| !shards.iter().any(|s| s.0 == **i)) {
        bail!(
            "vision shard {gone} of `{model}` has no live replica: every listed one failed for this client; start another replica of it, or retry once one is back"
        );
    }
    let total = shards.first().map_or(0, |s| s.1 as usize);
    if shards.is_empty() || shards.len() != total {
        bail!(
            "`{model}` has {} of {total} vision shard(s) served; images need every vision shard \
             (`unfed-node compute --model-type smolvlm_vision --shard-index N`)",
            shards.len()
        );
    }
    Ok(shards.into_iter().map(|s| s.2).collect())
}
