//! What the client does when a hop fails: find which node failed (a health probe of
//! the route, else the node the error names), ban it for this client with exponential
//! backoff, and say, when a shard has no replica left, what was tried.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use unfed_proto::Hop;

/// How long a route hop has to answer a health probe after a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// First ban of a node; each further failure doubles it, up to `MAX_BAN`.
const FIRST_BAN: Duration = Duration::from_secs(5);
const MAX_BAN: Duration = Duration::from_secs(300);

/// A step that failed at a hop, with the gRPC code the entry hop returned (its
/// message names the node when a node further down failed).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HopFailed {
    pub code: tonic::Code,
    pub message: String,
}

impl HopFailed {
    /// A failure another replica may not have (`replayable_code`).
    pub fn replayable(&self) -> bool {
        replayable_code(self.code)
    }

    /// The node at fault: the one a hop refused ("rejected the hop from ID"), else the
    /// first route hop the message names ("node ID (shard N)").
    pub fn named<'a>(&self, route: &'a [Hop]) -> Option<&'a Hop> {
        let refused = route.iter().find(|h| {
            self.message
                .contains(&format!("rejected the hop from {}", h.node_id))
        });
        refused.or_else(|| self.first_named(route))
    }

    fn first_named<'a>(&self, route: &'a [Hop]) -> Option<&'a Hop> {
        route
            .iter()
            .filter_map(|h| {
                self.message
                    .find(&format!("node {} (shard", h.node_id))
                    .map(|at| (at, h))
            })
            .min_by_key(|(at, _)| *at)
            .map(|(_, h)| h)
    }
}

/// Whether a hop that failed with `code` may work elsewhere: the node is gone, hung,
/// restarted (the session is unknown there) or refused the hop. Bad input fails
/// everywhere alike.
pub fn replayable_code(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable
            | DeadlineExceeded
            | Cancelled
            | Unknown
            | Internal
            | Aborted
            | FailedPrecondition
            | PermissionDenied
            | NotFound
    )
}

struct Ban {
    until: Instant,
    length: Duration,
    reason: String,
    /// The node as it was routed to, for naming it when its shard runs out.
    hop: Hop,
}

/// Nodes this client stopped routing to, each until its ban ends; a node that fails
/// again after its ban is banned twice as long.
#[derive(Default)]
pub struct Bans {
    nodes: HashMap<String, Ban>,
}

impl Bans {
    pub fn ban(&mut self, hop: &Hop, reason: &str) {
        let now = Instant::now();
        let length = match self.nodes.get(&hop.node_id) {
            Some(b) => (b.length * 2).min(MAX_BAN),
            None => FIRST_BAN,
        };
        tracing::warn!(
            node = hop.node_id,
            shard = hop.shard_index,
            ban_secs = length.as_secs(),
            "banned: {reason}"
        );
        self.nodes.insert(
            hop.node_id.clone(),
            Ban {
                until: now + length,
                length,
                reason: reason.to_string(),
                hop: hop.clone(),
            },
        );
    }

    pub fn is_banned(&self, node_id: &str) -> bool {
        self.nodes
            .get(node_id)
            .is_some_and(|b| b.until > Instant::now())
    }

    /// `node_id` answered again: route to it (a later failure bans it longer).
    pub fn lift(&mut self, node_id: &str) {
        if let Some(b) = self.nodes.get_mut(node_id) {
            b.until = Instant::now();
        }
    }

    /// "text shard N has no live replica: tried ...", naming the nodes of `shard` that
    /// are banned and why; `None` when none is.
    pub fn exhausted(&self, model: &str, shard: u32) -> Option<String> {
        let now = Instant::now();
        let mut tried: Vec<String> = self
            .nodes
            .values()
            .filter(|b| b.until > now && b.hop.shard_index == shard)
            .map(|b| format!("{} at {} ({})", b.hop.node_id, b.hop.address, b.reason))
            .collect();
        if tried.is_empty() {
            return None;
        }
        tried.sort();
        Some(format!(
            "text shard {shard} of `{model}` has no live replica: tried {}; start another replica of shard {shard}, or retry once one is back",
            tried.join("; ")
        ))
    }
}

/// The hops of `route` that do not answer a health call within `PROBE_TIMEOUT`, with
/// why (probed together, so a failover costs one timeout at most).
pub async fn unresponsive(net: &crate::net::Net, route: &[Hop]) -> Vec<(Hop, String)> {
    let probes = route.iter().map(|hop| async move {
        crate::compute::probe_health(net, hop, PROBE_TIMEOUT)
            .await
            .err()
            .map(|e| (hop.clone(), format!("{e:#}")))
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(id: &str, shard: u32) -> Hop {
        Hop {
            node_id: id.into(),
            shard_index: shard,
            ..Default::default()
        }
    }

    #[test]
    fn the_error_names_the_first_route_node_it_mentions() {
        let route = [hop("c0", 0), hop("c1", 1), hop("c1x", 1)];
        let f = HopFailed {
            code: tonic::Code::Unavailable,
            message: "generation failed at step 3: node c1x (shard 1) at 1.2.3.4 is unreachable"
                .into(),
        };
        assert_eq!(f.named(&route).map(|h| h.node_id.as_str()), Some("c1x"));
        let bad = HopFailed {
            code: tonic::Code::InvalidArgument,
            message: "hidden state shape".into(),
        };
        assert!(bad.named(&route).is_none());
        assert!(!bad.replayable(), "bad input fails on every replica");
        assert!(f.replayable());
    }

    #[test]
    fn bans_double_on_each_failure_and_name_what_was_tried() {
        let mut bans = Bans::default();
        let n = hop("n", 1);
        assert!(!bans.is_banned("n"));
        assert!(bans.exhausted("m", 1).is_none());
        bans.ban(&n, "unreachable");
        assert!(bans.is_banned("n"));
        assert_eq!(bans.nodes["n"].length, FIRST_BAN);
        let msg = bans.exhausted("m", 1).unwrap();
        assert!(
            msg.contains("shard 1 of `m`") && msg.contains("n at  (unreachable)"),
            "{msg}"
        );
        assert!(bans.exhausted("m", 0).is_none(), "another shard");
        bans.ban(&n, "hung");
        assert_eq!(bans.nodes["n"].length, FIRST_BAN * 2);
        for _ in 0..20 {
            bans.ban(&n, "hung");
        }
        assert_eq!(bans.nodes["n"].length, MAX_BAN);
    }
}
