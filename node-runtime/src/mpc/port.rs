//! Messages between the client and the two parties, and one endpoint's view of them.
//!
//! Every message names its session, step, kind and shape; a receiver states what it
//! expects and refuses anything else, so a message for another session, step or tensor
//! can never be mixed into a computation. A peer that is gone or silent fails the receive
//! within the port's timeout instead of hanging.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};

/// Who is at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    Client,
    A,
    B,
}

/// Why a receive failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{peer:?} is gone (waiting for {kind}, session {session}, step {step})")]
    Gone {
        peer: Peer,
        kind: String,
        session: String,
        step: u32,
    },
    #[error(
        "{peer:?} sent nothing for {waited:?} (waiting for {kind}, session {session}, step {step}); the peer is stuck or down"
    )]
    Timeout {
        peer: Peer,
        kind: String,
        session: String,
        step: u32,
        waited: Duration,
    },
    #[error(
        "{me:?} refused a message from {peer:?}: expected {expected:?}, got {got:?} with {len} elements"
    )]
    Refused {
        me: Peer,
        peer: Peer,
        expected: Box<Header>,
        got: Box<Header>,
        len: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub session: String,
    pub step: u32,
    pub kind: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub from: Peer,
    pub header: Header,
    pub data: Vec<u64>,
}

/// Everything an endpoint received, for privacy tests.
pub type Recording = Arc<Mutex<Vec<Msg>>>;

/// One endpoint: a sender to and a receiver from each peer it talks to.
pub struct Port {
    pub me: Peer,
    pub session: String,
    pub step: u32,
    to: HashMap<Peer, Sender<Msg>>,
    from: HashMap<Peer, Receiver<Msg>>,
    timeout: Duration,
    record: Option<Recording>,
}

impl Port {
    pub fn send(&self, to: Peer, kind: &str, shape: &[usize], data: Vec<u64>) -> Result<()> {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len(), "{kind}");
        let msg = Msg {
            from: self.me,
            header: Header {
                session: self.session.clone(),
                step: self.step,
                kind: kind.to_string(),
                shape: shape.to_vec(),
            },
            data,
        };
        let Some(tx) = self.to.get(&to) else {
            bail!("{:?} has no link to {to:?}", self.me);
        };
        tx.send(msg)
            .map_err(|_| anyhow::anyhow!("{to:?} is gone (sending {kind})"))
    }

    /// The next message from `from`, which must be `kind` with `shape` for this session
    /// and step.
    pub fn recv(&self, from: Peer, kind: &str, shape: &[usize]) -> Result<Vec<u64>> {
        Ok(self.recv_within(from, kind, shape, self.timeout)?)
    }

    /// `recv` with its own deadline (a party waits for a session's next step longer than
    /// for the next message within a step).
    pub fn recv_within(
        &self,
        from: Peer,
        kind: &str,
        shape: &[usize],
        timeout: Duration,
    ) -> Result<Vec<u64>, PortError> {
        let gone = || PortError::Gone {
            peer: from,
            kind: kind.to_string(),
            session: self.session.clone(),
            step: self.step,
        };
        let rx = self.from.get(&from).ok_or_else(gone)?;
        let msg = match rx.recv_timeout(timeout) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                return Err(PortError::Timeout {
                    peer: from,
                    kind: kind.to_string(),
                    session: self.session.clone(),
                    step: self.step,
                    waited: timeout,
                });
            }
            Err(RecvTimeoutError::Disconnected) => return Err(gone()),
        };
        if let Some(r) = &self.record {
            r.lock().expect("recording poisoned").push(msg.clone());
        }
        let expected = Header {
            session: self.session.clone(),
            step: self.step,
            kind: kind.to_string(),
            shape: shape.to_vec(),
        };
        if msg.header != expected || msg.data.len() != shape.iter().product::<usize>() {
            return Err(PortError::Refused {
                me: self.me,
                peer: from,
                expected: Box::new(expected),
                got: Box::new(msg.header),
                len: msg.data.len(),
            });
        }
        Ok(msg.data)
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Keeps a copy of every message this endpoint receives.
    pub fn record_into(&mut self, r: Recording) {
        self.record = Some(r);
    }
}

impl Port {
    /// An endpoint over links made elsewhere (gRPC streams bridged to channels).
    pub fn new(
        me: Peer,
        session: &str,
        timeout: Duration,
        links: Vec<(Peer, Sender<Msg>, Receiver<Msg>)>,
    ) -> Self {
        let mut port = Port {
            me,
            session: session.to_string(),
            step: 0,
            to: HashMap::new(),
            from: HashMap::new(),
            timeout,
            record: None,
        };
        for (peer, tx, rx) in links {
            port.to.insert(peer, tx);
            port.from.insert(peer, rx);
        }
        port
    }
}

/// The three endpoints of one session, linked in-process (client↔A, client↔B, A↔B).
pub fn linked(session: &str, timeout: Duration) -> (Port, Port, Port) {
    let mut ports: HashMap<Peer, Port> = [Peer::Client, Peer::A, Peer::B]
        .into_iter()
        .map(|me| (me, Port::new(me, session, timeout, Vec::new())))
        .collect();
    for (x, y) in [
        (Peer::Client, Peer::A),
        (Peer::Client, Peer::B),
        (Peer::A, Peer::B),
    ] {
        for (src, dst) in [(x, y), (y, x)] {
            let (tx, rx) = channel();
            ports.get_mut(&src).unwrap().to.insert(dst, tx);
            ports.get_mut(&dst).unwrap().from.insert(src, rx);
        }
    }
    (
        ports.remove(&Peer::Client).unwrap(),
        ports.remove(&Peer::A).unwrap(),
        ports.remove(&Peer::B).unwrap(),
    )
}
