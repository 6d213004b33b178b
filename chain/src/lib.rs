//! The economic layer: contracts, Anvil, wallets, staking and signed admission.
