//! The MPC pair: shard 0's layers (or the whole model, for full-output 2PC) computed by
//! two non-colluding parties, A and B, on additive secret shares, so that neither sees the
//! prompt, a token or an activation.
//!
//! Threat model: A and B honest-but-curious and not colluding; the client honest for its
//! own request.
//!
//! Design:
//! - Values are fixed point in Z_2^64 with [`ring::FRAC_BITS`] = 20 fractional bits; masks
//!   come from ChaCha20 seeded by the OS (never floating-point noise).
//! - The linear layers — the public weights, nearly all of the compute and memory — run
//!   on shares at the parties, each locally (no A↔B interaction).
//! - Everything else is client-aided: RMSNorm, RoPE, attention (Q·Kᵀ, softmax, ·V over
//!   the keys and values the client keeps), SiLU·up, and the rescaling of every product.
//!   A and B send their shares of a layer's output to the client, which already knows
//!   its prompt, reconstructs, computes in f64, and shares the next input afresh. Exact
//!   (no polynomial approximations, no probabilistic local truncation), and cheap: 4
//!   round trips per layer and step, against CrypTen-style 2PC approximations that need
//!   ~10–20 A↔B rounds for each softmax, RMSNorm and SiLU (~60+ per layer, with error).
//!   Attention at the client costs it what dealing Beaver triples for the same products
//!   cost it (the dealer computes A·B), and saves the A↔B openings of the cached keys
//!   and values, which grew with the context at every step.
//! - A's shares are expanded from one seed per step ([`mask`]): the client sends A 32
//!   bytes a step and B x − r for each tensor x; A needs nothing else within a step, so
//!   only B's answers are on the critical path.
//! - What leaks: to A and B, the sequence length, the step count and timing (every
//!   message's shape); nothing else (A receives a random seed, B uniformly masked
//!   elements — see the privacy tests). The client sees its own request's activations.
//!   The shard after the MPC layers reconstructs the layer-k activations of the request.
//!
//! - Where the output goes: with full output the client gets logit shares and samples;
//!   otherwise each party hands its share of the layer-k output to the compute node
//!   holding layer k ([`handoff`]), which checks both parties' signatures and
//!   reconstructs. The client reads the public parameters it needs from the pair
//!   ([`public`]).
//!
//! [`local::LocalPair`] runs both parties in-process (threads linked by channels); the
//! node role carries the same messages ([`port`]) between processes.

pub mod client;
pub mod handoff;
pub mod local;
pub mod mask;
pub mod net;
pub mod party;
pub mod port;
pub mod public;
pub mod ring;
pub mod role;
pub mod weights;
