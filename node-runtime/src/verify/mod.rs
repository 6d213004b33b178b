//! Verified compute: hops attest what they computed, spot checks have a replica
//! re-execute a hop, and the registry adjudicates fraud reports.

pub mod adjudicate;
pub mod attest;
pub mod cheat;
pub mod reexec;
pub mod spot;
