//! Per-session state (KV cache, sampler) with an idle timeout and a memory cap.
//!
//! When the caches outgrow the cap, the least recently used sessions are evicted and
//! remembered, so their clients get a clear error instead of a wrong continuation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::model::KvCache;
use super::sampling::Sampler;

pub struct Session {
    pub cache: KvCache,
    pub sampler: Option<Sampler>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("session {id} was evicted (memory cap {cap_mb} MB); start a new session")]
    Evicted { id: String, cap_mb: usize },
    #[error("session {id} expired after {idle_secs} s without a request; start a new session")]
    Expired { id: String, idle_secs: u64 },
    #[error(
        "session {id} is unknown on this node (step {step} > 0 needs the cached prompt; did the node restart?); start a new session"
    )]
    Unknown { id: String, step: u32 },
    #[error(
        "session {id} is live on this node: a prompt step never replaces a live session; pick a new session id"
    )]
    InUse { id: String },
    #[error(
        "busy: the KV caches of {live} live session(s) hold {used_mb} of {cap_mb} MB and this prompt needs {need_mb} MB more; retry in {retry_secs} s or use another replica"
    )]
    Busy {
        live: usize,
        used_mb: usize,
        cap_mb: usize,
        need_mb: usize,
        retry_secs: u64,
    },
}

/// How long a refused client should wait: sessions end or go idle on this scale.
const BUSY_RETRY_SECS: u64 = 2;

struct Entry {
    session: Arc<Mutex<Session>>,
    last_used: Instant,
    bytes: usize,
    /// The owner's public key from the prompt step: only it may end the session.
    owner: Vec<u8>,
}

/// Why a session id disappeared, for the error its client gets next.
#[derive(Clone, Copy)]
enum Gone {
    Evicted,
    Expired,
}

struct Inner {
    live: HashMap<String, Entry>,
    gone: HashMap<String, Gone>,
    gone_order: VecDeque<String>,
}

pub struct SessionStore {
    inner: Mutex<Inner>,
    idle: Duration,
    cap_bytes: usize,
}

/// How many dropped session ids are remembered for error messages.
const GONE_MEMORY: usize = 4096;

impl SessionStore {
    pub fn new(idle: Duration, cap_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                live: HashMap::new(),
                gone: HashMap::new(),
                gone_order: VecDeque::new(),
            }),
            idle,
            cap_bytes,
        }
    }

    /// The session for a step: step 0 starts it (refused while one with that id is
    /// live, and refused as busy when its prompt's `need` bytes of cache do not fit
    /// beside the live sessions: admission waits rather than evicting them), later steps
    /// must find it. `owner` (step 0) is the key that may end it.
    pub fn open(
        &self,
        id: &str,
        step: u32,
        owner: &[u8],
        need: usize,
        create: impl FnOnce() -> Session,
    ) -> Result<Arc<Mutex<Session>>, SessionError> {
        let mut inner = self.inner.lock().expect("session map poisoned");
        let now = Instant::now();
        if step == 0 {
            if inner.live.contains_key(id) {
                return Err(SessionError::InUse { id: id.to_string() });
            }
            let used: usize = inner.live.values().map(|e| e.bytes).sum();
            if used + need > self.cap_bytes {
                return Err(SessionError::Busy {
                    live: inner.live.len(),
                    used_mb: used >> 20,
                    cap_mb: self.cap_bytes >> 20,
                    need_mb: need.div_ceil(1 << 20),
                    retry_secs: BUSY_RETRY_SECS,
                });
            }
            let session = Arc::new(Mutex::new(create()));
            inner.live.insert(
                id.to_string(),
                Entry {
                    session: session.clone(),
                    last_used: now,
                    bytes: 0,
                    owner: owner.to_vec(),
                },
            );
            return Ok(session);
        }
        if let Some(e) = inner.live.get_mut(id) {
            e.last_used = now;
            return Ok(e.session.clone());
        }
        Err(match inner.gone.get(id) {
            Some(Gone::Evicted) => SessionError::Evicted {
                id: id.to_string(),
                cap_mb: self.cap_bytes >> 20,
            },
            Some(Gone::Expired) => SessionError::Expired {
                id: id.to_string(),
                idle_secs: self.idle.as_secs(),
            },
            None => SessionError::Unknown {
                id: id.to_string(),
                step,
            },
        })
    }

    /// Records a session's cache size after a step and evicts the least recently used
    /// other sessions while the total exceeds the cap.
    pub fn account(&self, id: &str, bytes: usize) {
        let mut inner = self.inner.lock().expect("session map poisoned");
        if let Some(e) = inner.live.get_mut(id) {
            e.bytes = bytes;
            e.last_used = Instant::now();
        }
        loop {
            let total: usize = inner.live.values().map(|e| e.bytes).sum();
            if total <= self.cap_bytes {
                break;
            }
            let victim = inner
                .live
                .iter()
                .filter(|(k, _)| k.as_str() != id)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { break };
            tracing::warn!(session = %victim, cap_mb = self.cap_bytes >> 20, "evicting session: KV cache memory cap reached");
            Self::forget(&mut inner, &victim, Gone::Evicted);
        }
    }

    /// The owner key a live session was opened with (empty: none was given).
    pub fn owner(&self, id: &str) -> Option<Vec<u8>> {
        let inner = self.inner.lock().expect("session map poisoned");
        inner.live.get(id).map(|e| e.owner.clone())
    }

    pub fn end(&self, id: &str) -> bool {
        self.inner
            .lock()
            .expect("session map poisoned")
            .live
            .remove(id)
            .is_some()
    }

    /// How long a session may go without a request before it is dropped.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Drops sessions idle for longer than the timeout; returns how many.
    pub fn sweep_idle(&self) -> usize {
        let mut inner = self.inner.lock().expect("session map poisoned");
        let now = Instant::now();
        let stale: Vec<String> = inner
            .live
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_used) > self.idle)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &stale {
            Self::forget(&mut inner, id, Gone::Expired);
        }
        stale.len()
    }

    fn forget(inner: &mut Inner, id: &str, why: Gone) {
        inner.live.remove(id);
        inner.gone.insert(id.to_string(), why);
        inner.gone_order.push_back(id.to_string());
        while inner.gone_order.len() > GONE_MEMORY {
            if let Some(old) = inner.gone_order.pop_front() {
                inner.gone.remove(&old);
            }
        }
    }

    /// (live sessions, bytes of KV cache).
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("session map poisoned");
        (inner.live.len(), inner.live.values().map(|e| e.bytes).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::SamplingConfig;

    fn store(cap: usize, idle: Duration) -> SessionStore {
        SessionStore::new(idle, cap)
    }

    fn open(s: &SessionStore, id: &str, step: u32) -> Result<Arc<Mutex<Session>>, SessionError> {
        // A zero-layer cache is enough: the store accounts the bytes it is told.
        s.open(id, step, b"owner", 0, || Session {
            cache: KvCache::empty_for_tests(),
            sampler: Some(Sampler::new(SamplingConfig::default())),
        })
    }

    #[test]
    fn the_least_recently_used_session_is_evicted_and_told_so() {
        let s = store(3 << 20, Duration::from_secs(300));
        for id in ["a", "b", "c"] {
            open(&s, id, 0).unwrap();
            s.account(id, 1 << 20);
        }
        open(&s, "a", 1).unwrap(); // "b" is now the least recently used
        s.account("a", 1 << 20);
        open(&s, "d", 0).unwrap();
        s.account("d", 1 << 20);
        let err = open(&s, "b", 1).err().expect("b evicted");
        assert_eq!(
            err.to_string(),
            "session b was evicted (memory cap 3 MB); start a new session"
        );
        for live in ["a", "c", "d"] {
            open(&s, live, 2).unwrap();
        }
        assert_eq!(s.usage(), (3, 3 << 20));
    }

    #[test]
    fn a_prompt_that_does_not_fit_is_refused_as_busy_and_live_sessions_stay() {
        let s = store(3 << 20, Duration::from_secs(300));
        for id in ["a", "b"] {
            open(&s, id, 0).unwrap();
            s.account(id, 1 << 20);
        }
        let new = |need| {
            s.open("c", 0, b"owner", need, || Session {
                cache: KvCache::empty_for_tests(),
                sampler: None,
            })
        };
        let err = new(2 << 20).err().expect("no room for 2 MB");
        assert!(matches!(err, SessionError::Busy { live: 2, .. }), "{err}");
        assert!(err.to_string().contains("retry in 2 s"), "{err}");
        for live in ["a", "b"] {
            open(&s, live, 1).unwrap();
        }
        assert_eq!(s.usage(), (2, 2 << 20));
        new(1 << 20).expect("1 MB fits");
    }

    #[test]
    fn idle_and_unknown_sessions_get_their_own_errors() {
        let s = store(1 << 30, Duration::from_millis(0));
        open(&s, "x", 0).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(s.sweep_idle(), 1);
        assert!(matches!(
            open(&s, "x", 1),
            Err(SessionError::Expired { .. })
        ));
        let err = open(&s, "never", 3).err().unwrap();
        assert!(err.to_string().contains("unknown on this node"), "{err}");
    }

    #[test]
    fn a_prompt_step_never_replaces_a_live_session() {
        let s = store(1 << 30, Duration::from_secs(300));
        open(&s, "x", 0).unwrap();
        open(&s, "x", 1).unwrap();
        assert_eq!(
            open(&s, "x", 0).err(),
            Some(SessionError::InUse { id: "x".into() })
        );
        assert_eq!(s.owner("x").as_deref(), Some(&b"owner"[..]));
        // Ended, the id may start again.
        assert!(s.end("x"));
        open(&s, "x", 0).unwrap();
    }
}
