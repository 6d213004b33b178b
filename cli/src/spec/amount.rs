//! Token amounts as written in a spec ("200", "0.5"), held exactly in wei (18 decimals).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const DECIMALS: u32 = 18;
const WEI_PER_TOKEN: u128 = 10u128.pow(DECIMALS);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct TokenAmount(u128);

impl TokenAmount {
    pub const fn from_wei(wei: u128) -> Self {
        Self(wei)
    }
    pub const fn whole(tokens: u64) -> Self {
        Self(tokens as u128 * WEI_PER_TOKEN)
    }
    pub const fn wei(self) -> u128 {
        self.0
    }
}

impl FromStr for TokenAmount {
    type Err = String;

    /// Decimal only, no sign, no exponent, at most 18 fractional digits: exact by construction.
    fn from_str(s: &str) -> Result<Self, String> {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) {
            return Err(format!(
                "'{s}' is not a decimal token amount (write e.g. \"200\" or \"0.5\")"
            ));
        }
        if frac.len() > DECIMALS as usize {
            return Err(format!("'{s}' has more than {DECIMALS} decimal places"));
        }
        let too_big = || format!("'{s}' is too large");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_big())?
        };
        let frac_wei: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse::<u128>().map_err(|_| too_big())? * 10u128.pow(DECIMALS - frac.len() as u32)
        };
        whole
            .checked_mul(WEI_PER_TOKEN)
            .and_then(|w| w.checked_add(frac_wei))
            .map(Self)
            .ok_or_else(too_big)
    }
}

impl fmt::Display for TokenAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / WEI_PER_TOKEN, self.0 % WEI_PER_TOKEN);
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let frac = format!("{frac:018}");
        write!(f, "{whole}.{}", frac.trim_end_matches('0'))
    }
}

impl Serialize for TokenAmount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TokenAmount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Self::whole(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TokenAmount;

    #[test]
    fn parses_exactly() {
        let a: TokenAmount = "0.5".parse().unwrap();
        assert_eq!(a.wei(), 500_000_000_000_000_000);
        assert_eq!(
            "200".parse::<TokenAmount>().unwrap(),
            TokenAmount::whole(200)
        );
        assert_eq!(
            "0.0001".parse::<TokenAmount>().unwrap().wei(),
            100_000_000_000_000
        );
        assert_eq!(
            "0.000000000000000001".parse::<TokenAmount>().unwrap().wei(),
            1
        );
        assert_eq!(
            TokenAmount::from_wei(1_500_000_000_000_000_000).to_string(),
            "1.5"
        );
    }

    #[test]
    fn rejects_non_decimals() {
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "abc",
            "1.2.3",
            "0.0000000000000000001",
        ] {
            assert!(bad.parse::<TokenAmount>().is_err(), "{bad}");
        }
    }
}
