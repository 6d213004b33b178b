//! The economic layer of UNFED on an EVM chain: the compiled contracts and their
//! bindings, a local Anvil, wallets and keys, staking and settlements, and the
//! stake-gated signed admission the registry applies to nodes.

pub mod admission;
pub mod amount;
pub mod anvil;
pub mod contracts;
pub mod escrow;
pub mod keys;
pub mod personal;
pub mod presigned;
pub mod voucher;

pub use admission::{
    AdmissionVerifier, RegistrationPayload, RejectReason, Rejection, sign_registration,
};
pub use alloy::primitives::{Address, Bytes, U256};
pub use alloy::signers::local::PrivateKeySigner;
pub use amount::{format_amount, parse_amount};
pub use anvil::{Anvil, AnvilOptions};
pub use escrow::{
    Chain, ChainError, Deployment, EscrowParams, Roles, SlashDestination, StakeInfo,
    WithdrawalRequest,
};
pub use keys::{
    STAKE_KEY_ENV, STAKE_KEY_FILE_ENV, dev_signer, load_stake_key_from_env, read_key_file,
    write_key_file,
};
pub use personal::{personal_sign, recover_personal_signer};
pub use voucher::{Delegation, SignedVoucher, SpendingVoucher};
