//! Where the engine's steps run: on a thread of a rayon pool, never beside one.
//!
//! Each small parallel op of a step (rope and softmax over a few heads, a matmul split
//! across cores) called from a thread outside the pool is handed to a pool thread and
//! waited for: two wake-ups, each tens of microseconds on a VM, dozens of times a step.
//! Called from a thread of the pool, the op starts on that thread and the other threads
//! only take the halves they steal. On the built-in model this halves a decode step.

use std::thread::JoinHandle;

/// Spawns the thread `name` as thread 0 of a pool of its own (as many threads as the
/// process's engine thread count) and runs `f` on it. For a thread that runs steps for
/// its whole life, such as a shard's batch worker: rayon never releases the pool of a
/// thread that joined it, so it must not be a short-lived one.
pub fn spawn_engine_thread<F>(name: &str, f: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .thread_name(move |i| format!("{name}-{i}"))
                .use_current_thread()
                .build();
            if let Err(e) = &pool {
                // Still correct, only slower: every parallel op goes through the global pool.
                tracing::warn!("the engine thread runs outside a thread pool: {e}");
            }
            f()
        })
}

/// Runs `f` on a thread of the global pool (here when this already is one), for work
/// started from an ordinary thread, such as a whole local generation.
pub fn on_pool<F, T>(f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_thread_is_thread_0_of_a_pool_as_large_as_the_global_one() {
        let global = rayon::current_num_threads();
        let h = spawn_engine_thread("pool-test", move || {
            assert_eq!(rayon::current_thread_index(), Some(0));
            assert_eq!(rayon::current_num_threads(), global);
        })
        .unwrap();
        h.join().unwrap();
    }

    #[test]
    fn work_from_an_ordinary_thread_runs_on_the_pool() {
        assert_eq!(rayon::current_thread_index(), None);
        assert!(on_pool(rayon::current_thread_index).is_some());
    }
}
