//! The spec's `[[chaos]]` faults as the plan knows them: each checked against the
//! plan's nodes (a fault the network cannot ride out is a spec error, not a failed
//! test), and shown as a timeline by `plan`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::plan::{Step, StepKind};
use crate::spec::diagnostics::Reporter;
use crate::spec::{ChaosAction, ChaosEntry, LoadedSpec, RestartPolicy};

/// How long the model has to be READY again after a fault, unless the spec says.
const DEFAULT_READY_WITHIN: f64 = 10.0;

/// When a fault starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Seconds after the chats start.
    At(f64),
    /// Once the chats have produced this many tokens.
    AfterTokens(u32),
}

/// One checked fault.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosEvent {
    pub target: String,
    pub target_kind: StepKind,
    pub action: ChaosAction,
    pub trigger: Trigger,
    /// stop, slow, partition: seconds.
    pub duration: Option<f64>,
    /// slow: added latency per message, each way.
    pub delay_ms: Option<u64>,
    pub ready_within: f64,
}

impl ChaosEvent {
    /// The JUnit case name: `chaos_1_kill_compute-1-r1`.
    pub fn case_name(&self, index: usize) -> String {
        format!(
            "chaos_{}_{}_{}",
            index + 1,
            self.action.as_str(),
            self.target
        )
    }

    pub fn describe(&self) -> String {
        let when = match self.trigger {
            Trigger::At(s) => format!("at +{s}s"),
            Trigger::AfterTokens(n) => format!("after {n} tokens"),
        };
        let what = match (self.action, self.duration, self.delay_ms) {
            (ChaosAction::Slow, Some(d), Some(ms)) => {
                format!("slow {} by {ms} ms for {d}s", self.target)
            }
            (action, Some(d), _) => format!("{} {} for {d}s", action.as_str(), self.target),
            (action, None, _) => format!("{} {}", action.as_str(), self.target),
        };
        format!("{when}: {what}; READY again within {}s", self.ready_within)
    }
}

/// The faults of `loaded`'s spec, each checked against `steps`; problems go to `report`.
pub fn check(loaded: &LoadedSpec, steps: &[Step], report: &mut Reporter) -> Vec<ChaosEvent> {
    let mut events = Vec::new();
    for (i, entry) in loaded.spec.chaos.iter().enumerate() {
        let mut problem = |key: &str, message: String| {
            let span = loaded
                .spans
                .get(&format!("chaos[{i}].{key}"))
                .or_else(|| loaded.spans.get(&format!("chaos[{i}]")));
            report.at(span, format!("[[chaos]] #{}: {message}", i + 1));
        };
        match event(loaded, steps, entry) {
            Ok(event) => events.push(event),
            Err((key, message)) => problem(key, message),
        }
    }
    events
}

/// The event of one entry, or the key at fault and why.
fn event(
    loaded: &LoadedSpec,
    steps: &[Step],
    e: &ChaosEntry,
) -> Result<ChaosEvent, (&'static str, String)> {
    let Some(step) = steps.iter().find(|s| s.name == e.target) else {
        let names: Vec<&str> = steps
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Compute | StepKind::Daemon))
            .map(|s| s.name.as_str())
            .collect();
        return Err((
            "target",
            format!(
                "target = \"{}\" is no node of this plan; targets: {}",
                e.target,
                names.join(", ")
            ),
        ));
    };
    if !matches!(step.kind, StepKind::Compute | StepKind::Daemon) {
        return Err((
            "target",
            format!(
                "target = \"{}\" is a {:?} node: chaos targets compute nodes and the daemon (a failing registry, MPC party, vision shard or dashboard is not ridden out yet)",
                e.target, step.kind
            ),
        ));
    }
    let trigger = match (e.at, e.after_tokens) {
        (Some(at), None) => Trigger::At(at),
        (None, Some(n)) => Trigger::AfterTokens(n),
        _ => {
            return Err((
                "at",
                "give exactly one of at (seconds after the chats start) or after_tokens".into(),
            ));
        }
    };
    let action = e.action.as_str();
    match (e.action, e.duration) {
        (ChaosAction::Kill, Some(_)) => {
            return Err((
                "duration",
                "kill has no duration (the restart policy brings the node back); remove it".into(),
            ));
        }
        (ChaosAction::Kill, None) => {}
        (_, None) => {
            return Err(("action", format!("{action} needs duration (seconds)")));
        }
        (_, Some(d)) if d <= 0.0 => {
            return Err(("duration", format!("{action} needs a duration above 0")));
        }
        _ => {}
    }
    match (e.action, e.delay_ms) {
        (ChaosAction::Slow, None) => {
            return Err(("action", "slow needs delay_ms".into()));
        }
        (ChaosAction::Slow, Some(_)) | (_, None) => {}
        (_, Some(_)) => {
            return Err((
                "delay_ms",
                format!("delay_ms is for slow, not {action}; remove it"),
            ));
        }
    }
    if e.action == ChaosAction::Kill && loaded.spec.nodes.restart == RestartPolicy::Never {
        return Err((
            "action",
            "kill with nodes.restart = \"never\": the node would never come back; set nodes.restart = \"on-failure\"".into(),
        ));
    }
    let loses_node = matches!(e.action, ChaosAction::Kill | ChaosAction::Partition);
    if loses_node && step.kind == StepKind::Compute {
        let twins = steps
            .iter()
            .filter(|s| s.kind == StepKind::Compute && s.shard == step.shard)
            .count();
        if twins < 2 {
            return Err((
                "target",
                format!(
                    "{} is the only node of text shard {}: a chat cannot ride out its {action}; set nodes.replicas = 2",
                    e.target,
                    step.shard.unwrap_or(0)
                ),
            ));
        }
    }
    Ok(ChaosEvent {
        target: e.target.clone(),
        target_kind: step.kind,
        action: e.action,
        trigger,
        duration: e.duration,
        delay_ms: e.delay_ms,
        ready_within: e.ready_within.unwrap_or(DEFAULT_READY_WITHIN),
    })
}

/// `plan`'s chaos block: one line per fault, in the order `unfedctl test` runs them.
pub fn render(events: &[ChaosEvent], out: &mut String) {
    if events.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nchaos (run by `unfedctl test`, one fault at a time)");
    for (i, e) in events.iter().enumerate() {
        let _ = writeln!(out, "  {}. {}", i + 1, e.describe());
    }
}
