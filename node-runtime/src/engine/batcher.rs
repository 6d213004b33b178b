//! Continuous batching of sessions' steps on one shard: a worker runs whatever steps
//! are waiting as one `forward_batch`, so concurrent sessions share each pass over the
//! weights instead of queueing for it (a decode step reads every weight for one row).
//!
//! The worker waits for more steps (at most `wait`) only while it has fewer than the
//! sessions that stepped recently: a lone session never waits, and steps that arrive
//! while a batch runs form the next batch.

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
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            wait: Duration::from_micros(500),
            max_steps: 16,
        }
    }
}

/// Sessions that stepped within this window, and still exist, count as active: the
/// batch waits for them.
const ACTIVE_WINDOW: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Job>,
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
        std::thread::Builder::new()
            .name("shard-batcher".into())
            .spawn(move || worker.run(rx, (*model).as_ref()))
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
        if let Err(e) = self.tx.send(job) {
            let job = e.0;
            let mut s = job.session.lock().expect("session poisoned");
            let gone = StepError::Failed(anyhow::anyhow!("the shard worker stopped"));
            (job.finish)(&mut s, Err(gone));
        }
    }
}

struct Worker {
    cfg: BatchConfig,
    stats: Arc<Stats>,
    /// When each session last stepped; ended sessions (dropped by the store) no
    /// longer count, so back-to-back sessions never wait for the one before.
    seen: HashMap<String, (Instant, std::sync::Weak<Mutex<Session>>)>,
    /// Steps held back from the last batch (a second step of a session already in it).
    held: Vec<Job>,
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

    fn run(mut self, rx: Receiver<Job>, model: &ShardModel) {
        loop {
            let mut jobs = std::mem::take(&mut self.held);
            if jobs.is_empty() {
                match rx.recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => return,
                }
            }
            self.collect(&rx, &mut jobs);
            let now = Instant::now();
            self.seen.retain(|_, (t, session)| {
                now.duration_since(*t) < ACTIVE_WINDOW && session.strong_count() > 0
            });
            for job in &jobs {
                let session = Arc::downgrade(&job.session);
                self.seen.insert(job.session_id.clone(), (now, session));
            }
            let (batch, held) = one_step_per_session(jobs);
            self.held = held;
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.largest.fetch_max(batch.len(), Ordering::Relaxed);
            run_batch(model, batch);
        }
    }

    /// Adds waiting steps; waits for more while fewer than the active sessions are in.
    fn collect(&self, rx: &Receiver<Job>, jobs: &mut Vec<Job>) {
        let live = self.seen.values().filter(|(_, s)| s.strong_count() > 0);
        let expected = live.count().min(self.cfg.max_steps);
        let deadline = Instant::now() + self.cfg.wait;
        while jobs.len() < self.cfg.max_steps {
            match rx.try_recv() {
                Ok(job) => {
                    jobs.push(job);
                    continue;
                }
                Err(_) if jobs.len() >= expected => return,
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// A batch holds each session once; later steps of the same session wait their turn.
fn one_step_per_session(jobs: Vec<Job>) -> (Vec<Job>, Vec<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(jobs.len());
    let mut held = Vec::new();
    for job in jobs {
        if batch.iter().any(|b| Arc::ptr_eq(&b.session, &job.session)) {
            held.push(job);
        } else {
            batch.push(job);
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
