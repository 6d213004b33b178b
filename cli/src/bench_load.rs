//! `unfedctl bench --concurrency N`: many sessions at once against one network. For 1,
//! 2, 4, … N sessions started together: aggregate and per-session decode speed and the
//! gaps between tokens, each level as a ratio to one session measured in the same run.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use unfed_node::client::{Client, GenerateOptions};

/// What one session saw: when it started and when each token arrived.
struct Trace {
    tokens: Vec<u32>,
    arrivals: Vec<Instant>,
}

impl Trace {
    fn decoded(&self) -> usize {
        self.arrivals.len().saturating_sub(1)
    }

    fn decode_rate(&self) -> f64 {
        match (self.arrivals.first(), self.arrivals.last()) {
            (Some(a), Some(b)) if b > a => self.decoded() as f64 / (*b - *a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// One concurrency level's figures (medians over the runs).
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub sessions: usize,
    /// Tokens decoded by all sessions per second, from the first session's first token
    /// to the last session's last.
    pub aggregate_decode_tokens_per_s: f64,
    /// The median session's own decode speed.
    pub per_session_decode_tokens_per_s: f64,
    pub inter_token_p50_ms: f64,
    pub inter_token_p99_ms: f64,
    /// Aggregate decode over one session's, in the same run.
    pub aggregate_over_one_session: f64,
    /// Session 0 (the same prompt at every level) got the tokens it gets alone.
    pub tokens_match_one_session: bool,
    /// Per shard (route order): sessions' steps per batch the node ran at this level,
    /// from its Health counters (how much of the weight traffic the sessions shared).
    pub steps_per_batch: Vec<f64>,
}

/// 1, 2, 4, … up to `max`, and `max` itself.
pub fn levels(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|n| *n < max)
        .collect();
    v.push(max);
    v
}

pub struct Load<'a> {
    pub net: &'a unfed_node::net::Net,
    pub registry: &'a str,
    pub model: &'a str,
    pub opts: GenerateOptions,
    pub vocab: u32,
    pub prompt_tokens: usize,
    pub runs: usize,
    /// The compute nodes whose batching is reported: one route, a node per shard (with
    /// replicas, sessions may also use others).
    pub hops: Vec<unfed_proto::Hop>,
}

/// (forwards, batches) of each hop, from its Health answer.
async fn batch_counters(
    net: &unfed_node::net::Net,
    hops: &[unfed_proto::Hop],
) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(hops.len());
    for hop in hops {
        let h = unfed_node::compute::health(net, hop, unfed_node::net::REQUEST_TIMEOUT)
            .await
            .with_context(|| {
                format!("health of node {} (shard {})", hop.node_id, hop.shard_index)
            })?;
        out.push((h.forwards, h.batches));
    }
    Ok(out)
}

impl Load<'_> {
    /// Session `i`'s prompt: the same length for all, different ids.
    fn prompt(&self, i: usize) -> Vec<u32> {
        (0..self.prompt_tokens as u32)
            .map(|j| (j * 7919 + 13 + i as u32 * 104_729) % self.vocab.max(2))
            .collect()
    }

    pub async fn sweep(&self, max: usize) -> Result<Vec<Level>> {
        if max == 0 {
            bail!("--concurrency must be at least 1");
        }
        // Warm-up: connections, caches of the nodes, page cache.
        self.run(1).await?;
        let mut out: Vec<Level> = Vec::new();
        let mut alone: Option<(f64, Vec<u32>)> = None;
        for n in levels(max) {
            let mut aggregate = Vec::new();
            let mut per_session = Vec::new();
            let mut gaps = Vec::new();
            let mut first_tokens = None;
            let before = batch_counters(self.net, &self.hops).await?;
            for _ in 0..self.runs.max(1) {
                let traces = self.run(n).await?;
                aggregate.push(aggregate_rate(&traces));
                per_session.push(median(traces.iter().map(Trace::decode_rate).collect()));
                gaps.extend(traces.iter().flat_map(|t| {
                    t.arrivals
                        .windows(2)
                        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
                }));
                first_tokens.get_or_insert_with(|| traces[0].tokens.clone());
            }
            let after = batch_counters(self.net, &self.hops).await?;
            let steps_per_batch = before
                .iter()
                .zip(&after)
                .map(|((f0, b0), (f1, b1))| (f1 - f0) as f64 / (b1 - b0).max(1) as f64)
                .collect();
            let aggregate = median(aggregate);
            let first_tokens = first_tokens.unwrap_or_default();
            let (one, one_tokens) = alone.get_or_insert_with(|| (aggregate, first_tokens.clone()));
            gaps.sort_by(f64::total_cmp);
            out.push(Level {
                sessions: n,
                aggregate_decode_tokens_per_s: aggregate,
                per_session_decode_tokens_per_s: median(per_session),
                inter_token_p50_ms: percentile(&gaps, 0.50),
                inter_token_p99_ms: percentile(&gaps, 0.99),
                aggregate_over_one_session: if *one > 0.0 { aggregate / *one } else { 0.0 },
                tokens_match_one_session: first_tokens == *one_tokens,
                steps_per_batch,
            });
        }
        Ok(out)
    }

    /// `n` sessions started together, each on its own connection.
    async fn run(&self, n: usize) -> Result<Vec<Trace>> {
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (net, registry, model) = (
                self.net.clone(),
                self.registry.to_string(),
                self.model.to_string(),
            );
            let (prompt, opts) = (self.prompt(i), self.opts.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = Client::connect(&net, &registry).await?;
                let mut arrivals = Vec::new();
                let out = client
                    .generate(&model, &prompt, &opts, |_| arrivals.push(Instant::now()))
                    .await?;
                anyhow::Ok(Trace {
                    tokens: out.tokens,
                    arrivals,
                })
            }));
        }
        let mut traces = Vec::with_capacity(n);
        for (i, t) in tasks.into_iter().enumerate() {
            traces.push(
                t.await?
                    .with_context(|| format!("session {i} of {n} concurrent sessions"))?,
            );
        }
        Ok(traces)
    }
}

fn aggregate_rate(traces: &[Trace]) -> f64 {
    let first = traces.iter().filter_map(|t| t.arrivals.first()).min();
    let last = traces.iter().filter_map(|t| t.arrivals.last()).max();
    let decoded: usize = traces.iter().map(Trace::decoded).sum();
    match (first, last) {
        (Some(a), Some(b)) if b > a => decoded as f64 / (*b - *a).as_secs_f64(),
        _ => 0.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Prints the levels as a table.
pub fn print(model: &str, levels: &[Level]) {
    println!("model {model}: sessions started together, median of runs");
    println!(
        "{:>8} {:>16} {:>18} {:>12} {:>12} {:>10} {:>8}  steps/batch by shard",
        "sessions",
        "aggregate tok/s",
        "per-session tok/s",
        "ITL p50 ms",
        "ITL p99 ms",
        "× one",
        "tokens"
    );
    for l in levels {
        println!(
            "{:>8} {:>16.1} {:>18.1} {:>12.2} {:>12.2} {:>10.2} {:>8}  {}",
            l.sessions,
            l.aggregate_decode_tokens_per_s,
            l.per_session_decode_tokens_per_s,
            l.inter_token_p50_ms,
            l.inter_token_p99_ms,
            l.aggregate_over_one_session,
            if l.tokens_match_one_session {
                "same"
            } else {
                "DIFFER"
            },
            l.steps_per_batch
                .iter()
                .map(|b| format!("{b:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
}

/// An SVG line chart of aggregate and per-session decode tok/s against sessions.
pub fn plot(model: &str, levels: &[Level]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 70.0, 50.0, 40.0, 20.0);
    let top_value = levels
        .iter()
        .map(|l| l.aggregate_decode_tokens_per_s)
        .fold(1.0, f64::max)
        * 1.1;
    let x = |i: usize| {
        let span = (levels.len().max(2) - 1) as f64;
        left + (w - left - right) * i as f64 / span
    };
    let y = |v: f64| h - bottom - (h - bottom - top) * v / top_value;
    let line = |get: &dyn Fn(&Level) -> f64, colour: &str| {
        let points: Vec<String> = levels
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{:.1},{:.1}", x(i), y(get(l))))
            .collect();
        let dots: String = levels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!(
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    x(i),
                    y(get(l))
                )
            })
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>{dots}"#,
            points.join(" ")
        )
    };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    svg += &format!(
        r#"<text x="{left}" y="20">decode tok/s against concurrent sessions — {}</text>"#,
        xml_escape(model)
    );
    svg += &format!(
        r#"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{0}" stroke="black"/>"#,
        h - bottom,
        w - right
    );
    for (i, l) in levels.iter().enumerate() {
        svg += &format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(i),
            h - bottom + 18.0,
            l.sessions
        );
    }
    for k in 0..=4 {
        let v = top_value * k as f64 / 4.0;
        svg += &format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"#,
            left - 6.0,
            y(v) + 4.0
        );
    }
    svg += &format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sessions</text>"#,
        (left + w - right) / 2.0,
        h - 12.0
    );
    svg += &line(&|l| l.aggregate_decode_tokens_per_s, "#1f77b4");
    svg += &line(&|l| l.per_session_decode_tokens_per_s, "#ff7f0e");
    svg += &format!(
        r##"<text x="{0}" y="{1}" fill="#1f77b4">aggregate</text><text x="{0}" y="{2}" fill="#ff7f0e">per session</text>"##,
        w - right - 90.0,
        top + 10.0,
        top + 26.0
    );
    svg + "</svg>\n"
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_double_up_to_the_maximum() {
        assert_eq!(levels(1), vec![1]);
        assert_eq!(levels(8), vec![1, 2, 4, 8]);
        assert_eq!(levels(6), vec![1, 2, 4, 6]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn the_plot_has_a_point_per_level_and_escapes_the_model_name() {
        let level = |n: usize, agg: f64| Level {
            sessions: n,
            aggregate_decode_tokens_per_s: agg,
            per_session_decode_tokens_per_s: agg / n as f64,
            inter_token_p50_ms: 1.0,
            inter_token_p99_ms: 2.0,
            aggregate_over_one_session: agg / 100.0,
            tokens_match_one_session: true,
            steps_per_batch: vec![1.0],
        };
        let svg = plot("a<b", &[level(1, 100.0), level(2, 180.0), level(4, 300.0)]);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
