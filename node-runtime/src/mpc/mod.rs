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
//! - Linear layers run locally on shares with the public weights (in fixed point).
//! - Products of two secret values — attention scores Q·Kᵀ and probabilities × V — use
//!   Beaver matrix triples dealt by the client and compressed with PRG seeds
//!   ([`beaver`]); the openings go between A and B. Keys and values stay in shares on A
//!   and B across decode steps.
//! - Non-linear steps (RMSNorm, RoPE, softmax, SiLU·up) and the rescaling of every
//!   product are client-aided: A and B send their shares to the client, which already
//!   knows its prompt, reconstructs, computes in f64, and sends back fresh shares. This is
//!   exact (no polynomial approximations, no probabilistic local truncation) and cheaper:
//!   per layer and step it costs 6 client round trips carrying
//!   O(T·(hidden + qkv + intermediate) + heads·T·S) ring elements, against CrypTen-style
//!   2PC approximations that need ~10–20 A↔B rounds for each of softmax (exp by repeated
//!   squaring, reciprocal by Newton iterations), each RMSNorm (inverse square root by
//!   Newton) and SiLU (sigmoid via exp and reciprocal), each round carrying Beaver
//!   openings of the same tensors — about 60+ rounds per layer, with approximation error.
//! - What leaks: to A and B, the sequence length, the step count and timing (every
//!   message's shape); nothing else (every element they receive is uniformly masked — see
//!   the privacy tests). The client sees its own request's activations. The shard after
//!   the MPC layers reconstructs the layer-k activations of the request.
//!
//! - Where the output goes: with full output the client gets logit shares and samples;
//!   otherwise each party hands its share of the layer-k output to the compute node
//!   holding layer k ([`handoff`]), which checks both parties' signatures and
//!   reconstructs. The client reads the public parameters it needs from the pair
//!   ([`public`]).
//!
//! [`local::LocalPair`] runs both parties in-process (threads linked by channels); the
//! node role carries the same messages ([`port`]) between processes.

pub mod beaver;
pub mod client;
pub mod handoff;
pub mod local;
pub mod net;
pub mod party;
pub mod port;
pub mod public;
pub mod ring;
pub mod role;
pub mod weights;
