//! Both parties of a session in this process, on threads linked by channels: the
//! reference for tests and benchmarks of the protocol itself.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;

use super::client::{Client, ClientOutput, ClientSession};
use super::party::serve;
use super::port::{Port, Recording, linked};
use super::weights::PartyModel;

/// Optional hooks of a local pair, for tests.
#[derive(Default)]
pub struct Hooks {
    /// Everything party A receives.
    pub record_a: Option<Recording>,
    /// Everything party B receives.
    pub record_b: Option<Recording>,
    /// Party B stops (its thread ends, dropping its links) after this many steps.
    pub b_dies_after: Option<u32>,
    /// Party B stops answering (but keeps its links open) after this many steps.
    pub b_stalls_after: Option<u32>,
}

pub struct LocalPair {
    client: Port,
    parties: Vec<JoinHandle<Result<()>>>,
}

impl LocalPair {
    pub fn start(model: Arc<PartyModel>, session: &str, timeout: Duration, hooks: Hooks) -> Self {
        let (client, mut a, mut b) = linked(session, timeout);
        if let Some(r) = hooks.record_a {
            a.record_into(r);
        }
        if let Some(r) = hooks.record_b {
            b.record_into(r);
        }
        let ma = model.clone();
        let (dies, stalls) = (hooks.b_dies_after, hooks.b_stalls_after);
        let parties = vec![
            std::thread::spawn(move || serve(&ma, &mut a, true, None, &mut |_, _, _| Ok(()))),
            std::thread::spawn(move || {
                serve(
                    &model,
                    &mut b,
                    false,
                    dies.or(stalls),
                    &mut |_, _, _| Ok(()),
                )?;
                if stalls.is_some() {
                    // Silent but connected, past the others' timeouts.
                    std::thread::sleep(timeout * 2);
                }
                drop(b);
                Ok(())
            }),
        ];
        Self { client, parties }
    }

    /// One step of the client's rows through the pair.
    pub fn step(
        &mut self,
        client: &Client,
        sess: &mut ClientSession,
        input: &[f32],
    ) -> Result<ClientOutput> {
        let out = client.step(sess, &self.client, input);
        self.client.step += 1;
        out
    }

    /// Hangs up and returns the parties' errors, if any.
    pub fn finish(self) -> Result<()> {
        drop(self.client);
        for p in self.parties {
            p.join()
                .map_err(|_| anyhow::anyhow!("a party thread panicked"))??;
        }
        Ok(())
    }
}
