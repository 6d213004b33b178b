//! Continuous batching of sessions' steps on one shard: a worker runs whatever steps
//! are waiting as one `forward_batch`, so concurrent sessions share each pass over the
//! weights instead of queueing for it (a decode step reads every weight for one row).
//!
//! The worker waits for more steps (at most `wait`) only while it has fewer than the
//! sessions that stepped recently: a lone session never waits, and steps that arrive
//! while a batch runs form the next batch.
//!
//! Sessions through a route of several shards tend to split into groups that alternate
//! between the shards (one group here while another is at the next hop), and then
//! every shard reads its weights once per group. The first shard of the route therefore
//! also waits, up to most of a round, while an active session's step is due within it
//! (its last arrival plus its own interval between steps): the groups merge into one
//! batch that then moves along the route together. Later shards never wait long, so
//! two shards never wait for each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::model::{ShardInput, ShardModel, ShardOutput};
use super::sessions::Session;

/// A step's input, owned until the worker runs it.
pub enum StepRows {
    Tokens(Vec<u32>),
    /// Hidden rows, their count, and the absolute layer they enter at when not the
    /// shard's first (an MPC pair's output).
    Hidden(Vec<f32>, usize, Option<usize>),
    /// First shard: prompt rows already embedded (image features merged in).
    Embedded(Vec<f32>, usize),
}

impl StepRows {
    /// The engine's view of the rows (hidden rows move out: the step runs once).
    fn take(&mut self) -> ShardInput<'_> {
        match self {
            StepRows::Tokens(ids) => ShardInput::Tokens(ids),
            StepRows::Hidden(d, seq, None) => ShardInput::Hidden {
                data: std::mem::take(d),
                seq: *seq,
            },
            StepRows::Hidden(d, seq, Some(layer)) => ShardInput::HiddenAt {
                data: std::mem::take(d),
                seq: *seq,
                layer: *layer,
            },
            StepRows::Embedded(d, seq) => ShardInput::Embedded {
                data: std::mem::take(d),
                seq: *seq,
            },
        }
    }
}

/// Why a step produced no output.
#[derive(Debug)]
pub enum StepError {
    /// The step does not start where the session's cache ends (replayed or reordered).
    Misplaced(String),
    /// The engine refused the input, or the worker is gone.
    Failed(anyhow::Error),
}

/// What to do with a step's output, under the session's lock (sample, seal, reply).
pub type Finish = Box<dyn FnOnce(&mut Session, Result<ShardOutput, StepError>) + Send>;

/// One session's step.
pub struct Job {
    pub session_id: String,
    pub session: Arc<Mutex<Session>>,
    /// The position the client says the step starts at; a mismatch with the cache fails
    /// the step (a replayed or reordered request) without running it.
    pub position: usize,
    pub rows: StepRows,
    pub finish: Finish,
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Longest wait for more sessions' steps before running a batch.
    pub wait: Duration,
    /// Most steps in one batch.
    pub max_steps: usize,
    /// First shard of a route: also wait for the steps of active sessions that are due
    /// (see the module's comment).
    pub align: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            wait: Duration::from_micros(1000),
            max_steps: 16,
            align: false,
        }
    }
}

/// Sessions that stepped within this window, and still exist, count as active: the
/// batch waits for them.
const ACTIVE_WINDOW: Duration = Duration::from_millis(500);

/// A step and when it was submitted.
struct Arrival {
    at: Instant,
    job: Job,
}

#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Arrival>,
    stats: Arc<Stats>,
}

/// What the worker has run, for the node's health report.
#[derive(Default)]
struct Stats {
    batches: AtomicU64,
    largest: AtomicUsize,
}

impl Batcher {
    /// Starts the worker thread; it ends when every `Batcher` clone is dropped.
    pub fn start<M>(model: Arc<M>, cfg: BatchConfig) -> Self
    where
        M: AsRef<ShardModel> + Send + Sync + 'static,
    {
        let (tx, rx) = channel();
        let stats = Arc::new(Stats::default());
        let worker = Worker::new(cfg, stats.clone());
        super::pool::spawn_engine_thread("shard-batcher", move || {
            worker.run(rx, (*model).as_ref())
        })
        .expect("spawn the batch worker");
        Self { tx, stats }
    }

    /// Batches run so far, and the most steps one of them held.
    pub fn stats(&self) -> (u64, usize) {
        (
            self.stats.batches.load(Ordering::Relaxed),
            self.stats.largest.load(Ordering::Relaxed),
        )
    }

    pub fn submit(&self, job: Job) {
        let at = Instant::now();
        if let Err(e) = self.tx.send(Arrival { at, job }) {
            let job = e.0.job;
            let mut s = job.session.lock().expect("session poisoned");
            let gone = StepError::Failed(anyhow::anyhow!("the shard worker stopped"));
            (job.finish)(&mut s, Err(gone));
        }
    }
}

/// What the worker knows of a session that stepped recently.
struct Seen {
    /// When its last step arrived, and the time between its last two steps.
    last: Instant,
    interval: Option<Duration>,
    session: std::sync::Weak<Mutex<Session>>,
}

impl Seen {
    fn live(&self) -> bool {
        self.session.strong_count() > 0
    }

    /// When its next step should arrive if it keeps its pace, and when, a whole interval
    /// later still, it counts as paused.
    fn due(&self) -> Option<(Instant, Instant)> {
        self.interval.map(|i| (self.last + i, self.last + 2 * i))
    }
}

struct Worker {
    cfg: BatchConfig,
    stats: Arc<Stats>,
    /// Sessions by id; ended sessions (dropped by the store) no longer count, so
    /// back-to-back sessions never wait for the one before.
    seen: HashMap<String, Seen>,
    /// Steps held back from the last batch (a second step of a session already in it).
    held: Vec<Arrival>,
}

impl Worker {
    fn new(cfg: BatchConfig, stats: Arc<Stats>) -> Self {
        Self {
            cfg,
            stats,
            seen: HashMap::new(),
            held: Vec::new(),
        }
    }

    fn run(mut self, rx: Receiver<Arrival>, model: &ShardModel) {
        loop {
            let mut jobs = std::mem::take(&mut self.held);
            if jobs.is_empty() {
                match rx.recv() {
                    Ok(a) => jobs.push(a),
                    Err(_) => return,
                }
            }
            self.collect(&rx, &mut jobs);
            let now = Instant::now();
            self.seen
                .retain(|_, s| now.duration_since(s.last) < ACTIVE_WINDOW && s.live());
            for a in &jobs {
                let session = Arc::downgrade(&a.job.session);
                let interval = self
                    .seen
                    .get(&a.job.session_id)
                    .and_then(|s| a.at.checked_duration_since(s.last));
                let seen = Seen {
                    last: a.at,
                    interval,
                    session,
                };
                self.seen.insert(a.job.session_id.clone(), seen);
            }
            let (batch, held) = one_step_per_session(jobs);
            self.held = held;
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.largest.fetch_max(batch.len(), Ordering::Relaxed);
            run_batch(model, batch);
        }
    }

    /// Adds waiting steps; waits for more while fewer than the active sessions are in.
    fn collect(&self, rx: &Receiver<Arrival>, jobs: &mut Vec<Arrival>) {
        let expected = self
            .seen
            .values()
            .filter(|s| s.live())
            .count()
            .min(self.cfg.max_steps);
        let first = jobs.iter().map(|a| a.at).min().unwrap_or_else(Instant::now);
        while jobs.len() < self.cfg.max_steps {
            match rx.try_recv() {
                Ok(a) => {
                    jobs.push(a);
                    continue;
                }
                Err(_) if jobs.len() >= expected => return,
                Err(_) => {}
            }
            let in_batch: Vec<&str> = jobs.iter().map(|a| a.job.session_id.as_str()).collect();
            let left = self
                .deadline(first, &in_batch)
                .saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match rx.recv_timeout(left) {
                Ok(a) => jobs.push(a),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Until when to wait for more steps, given the sessions already in the batch (the
    /// first of whose steps arrived at `first`).
    fn deadline(&self, first: Instant, in_batch: &[&str]) -> Instant {
        let short = first + self.cfg.wait;
        let live = || self.seen.iter().filter(|(_, s)| s.live());
        if !self.cfg.align || live().count() > self.cfg.max_steps {
            // More sessions than a batch holds stay in groups whatever the wait.
            return short;
        }
        // Most of a round of the sessions in the batch (their median interval): a session
        // due later than that steps more slowly than they do, and is not waited for.
        let mut round: Vec<Duration> = in_batch
            .iter()
            .filter_map(|id| self.seen.get(*id)?.interval)
            .collect();
        round.sort();
        let Some(reach) = round.get(round.len() / 2).map(|r| *r * 3 / 4) else {
            return short;
        };
        // Waiting up to that reach, not to each session's own due time: arrivals of a
        // round spread over milliseconds, and a step that misses its batch runs alone.
        let now = Instant::now();
        let coming = live()
            .filter(|(id, _)| !in_batch.contains(&id.as_str()))
            .filter_map(|(_, s)| s.due())
            .any(|(due, paused)| due <= first + reach && now < paused);
        if coming {
            short.max(first + reach)
        } else {
            short
        }
    }
}

/// A batch holds each session once; later steps of the same session wait their turn.
fn one_step_per_session(jobs: Vec<Arrival>) -> (Vec<Job>, Vec<Arrival>) {
    let mut batch: Vec<Job> = Vec::with_capacity(jobs.len());
    let mut held = Vec::new();
    for a in jobs {
        if batch
            .iter()
            .any(|b| Arc::ptr_eq(&b.session, &a.job.session))
        {
            held.push(a);
        } else {
            batch.push(a.job);
        }
    }
    (batch, held)
}

fn run_batch(model: &ShardModel, mut batch: Vec<Job>) {
    let sessions: Vec<_> = batch.iter().map(|j| j.session.clone()).collect();
    let mut guards: Vec<_> = sessions
        .iter()
        .map(|s| s.lock().expect("session poisoned"))
        .collect();
    // Steps that do not start where their cache ends fail alone, unrun.
    let fits: Vec<bool> = guards
        .iter()
        .zip(&batch)
        .map(|(g, j)| g.cache.len() == j.position)
        .collect();
    let items = guards
        .iter_mut()
        .zip(batch.iter_mut())
        .zip(&fits)
        .filter(|(_, fit)| **fit)
        .map(|((g, j), _)| (&mut g.cache, j.rows.take()))
        .collect();
    let mut outs = model.forward_batch(items).into_iter();
    for ((mut guard, job), fit) in guards.into_iter().zip(batch).zip(fits) {
        let out = if fit {
            outs.next()
                .expect("one output per run step")
                .map_err(StepError::Failed)
        } else {
            Err(StepError::Misplaced(format!(
                "session {}: step starts at position {} but {} positions are cached",
                job.session_id,
                job.position,
                guard.cache.len()
            )))
        };
        (job.finish)(&mut guard, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn session() -> Arc<Mutex<Session>> {
        Arc::new(Mutex::new(Session {
            cache: Default::default(),
            sampler: None,
        }))
    }

    /// A worker that has seen each session step last at `first - ago`, `interval` after
    /// the step before (ms).
    fn worker(
        align: bool,
        first: Instant,
        sessions: &[(&str, &Arc<Mutex<Session>>, u64, u64)],
    ) -> Worker {
        let cfg = BatchConfig {
            wait: MS,
            max_steps: 4,
            align,
        };
        let mut w = Worker::new(cfg, Arc::default());
        for (id, s, ago, interval) in sessions {
            let seen = Seen {
                last: first - *ago as u32 * MS,
                interval: Some(*interval as u32 * MS),
                session: Arc::downgrade(s),
            };
            w.seen.insert(id.to_string(), seen);
        }
        w
    }

    #[test]
    fn the_first_shard_waits_for_a_group_due_within_the_round() {
        let (a, b) = (session(), session());
        let first = Instant::now();
        // A is here; B, on the same 20 ms pace, is due 10 ms from now.
        let w = worker(true, first, &[("a", &a, 20, 20), ("b", &b, 10, 20)]);
        assert_eq!(w.deadline(first, &["a"]), first + 15 * MS);
        // B is 5 ms past due: a round's arrivals spread, so it is still waited for.
        let w = worker(true, first, &[("a", &a, 20, 20), ("b", &b, 25, 20)]);
        assert_eq!(w.deadline(first, &["a"]), first + 15 * MS);
        // A later shard only waits the short wait: two shards never wait for each other.
        let w = worker(false, first, &[("a", &a, 20, 20), ("b", &b, 10, 20)]);
        assert_eq!(w.deadline(first, &["a"]), first + MS);
    }

    #[test]
    fn the_first_shard_does_not_wait_for_slow_paused_ended_or_surplus_sessions() {
        let first = Instant::now();
        let (a, b) = (session(), session());
        let short = first + MS;
        // B steps every 60 ms and is due in 59: slower than A's round, not waited for.
        let w = worker(true, first, &[("a", &a, 20, 20), ("b", &b, 1, 60)]);
        assert_eq!(w.deadline(first, &["a"]), short);
        // B was due 20 ms ago: paused, not waited for.
        let w = worker(true, first, &[("a", &a, 20, 20), ("b", &b, 40, 20)]);
        assert_eq!(w.deadline(first, &["a"]), short);
        // B ended (its session dropped).
        let ended = session();
        let w = worker(true, first, &[("a", &a, 20, 20), ("b", &ended, 10, 20)]);
        drop(ended);
        assert_eq!(w.deadline(first, &["a"]), short);
        // More live sessions than a batch holds: they stay in groups anyway.
        let more: Vec<_> = (0..5).map(|_| session()).collect();
        let ids = ["a", "b", "c", "d", "e"];
        let seen: Vec<_> = ids
            .iter()
            .zip(&more)
            .map(|(id, s)| (*id, s, 10, 20))
            .collect();
        let w = worker(true, first, &seen);
        assert_eq!(w.deadline(first, &["a"]), short);
        // A lone session in the batch with no pace yet: nothing to go by.
        let w = worker(true, first, &[("b", &b, 10, 20)]);
        assert_eq!(w.deadline(first, &["a"]), short);
    }
}
