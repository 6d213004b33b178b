//! How a session's steps reach a hop: one persistent bidirectional stream per session
//! and hop (Compute.Steps) instead of one unary Forward call per token. Once the stream
//! is open a step is one message each way; a unary call also opens and closes an
//! HTTP/2 stream with headers and trailers and passes through more task hand-offs.
//! Over TLS on loopback that is ~150 µs per round trip against ~230 µs.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::{ForwardRequest, ForwardResponse, Hop};

/// The way one session's steps go to its next hop.
pub enum StepLink {
    /// A unary Forward per step: how a step that arrived unary is passed on.
    Unary,
    /// The session's stream, opened at its first step and reopened after a failure or
    /// when the next hop changes.
    Stream(Option<Box<OpenStream>>),
}

pub struct OpenStream {
    /// The hop it goes to (address and certificate pin).
    to: (String, String),
    requests: mpsc::UnboundedSender<ForwardRequest>,
    answers: Streaming<ForwardResponse>,
}

impl StepLink {
    pub fn stream() -> Self {
        Self::Stream(None)
    }

    /// Runs `req` at `hop` and returns its answer. On a stream it waits at most
    /// `timeout` (a stream outlives its channel's timeout, which bounds a unary call).
    /// `client` makes a client for the hop when a call or a new stream needs one. On
    /// any failure the stream is dropped: a late answer can never be taken for the next
    /// step's, and the next step opens a new stream.
    pub async fn step(
        &mut self,
        hop: &Hop,
        client: impl FnOnce() -> Result<ComputeClient<Channel>, Status>,
        req: ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardResponse, Status> {
        let slot = match self {
            Self::Unary => return Ok(client()?.forward(req).await?.into_inner()),
            Self::Stream(slot) => slot,
        };
        let to = (hop.address.clone(), hop.tls_pin.clone());
        let open = slot.take().filter(|o| o.to == to);
        let exchange = async move {
            let mut open = match open {
                Some(o) => {
                    o.requests.send(req).map_err(|_| closed())?;
                    o
                }
                None => {
                    let (requests, queue) = mpsc::unbounded_channel();
                    // Queued before the call: the first step travels with the stream's
                    // headers instead of a round trip after them.
                    requests.send(req).map_err(|_| closed())?;
                    let answers = client()?
                        .steps(UnboundedReceiverStream::new(queue))
                        .await?
                        .into_inner();
                    Box::new(OpenStream {
                        to,
                        requests,
                        answers,
                    })
                }
            };
            let answer = open.answers.message().await?.ok_or_else(closed)?;
            Ok::<_, Status>((answer, open))
        };
        let (answer, open) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no answer within {} s", timeout.as_secs_f64()))
            })??;
        *slot = Some(open);
        Ok(answer)
    }
}

fn closed() -> Status {
    Status::unavailable("the hop closed the session's step stream")
}
