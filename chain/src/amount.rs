//! Token amounts: decimal strings ("200", "0.5") to and from 18-decimal base units,
//! exactly (no floating point anywhere).

use alloy::primitives::U256;
use anyhow::{Context, bail};

/// Decimals of the UNFED token.
pub const DECIMALS: usize = 18;

/// Parses a non-negative decimal token amount such as `"200"` or `"0.5"` into base units.
pub fn parse_amount(text: &str) -> anyhow::Result<U256> {
    let s = text.trim();
    let hint = "write a non-negative decimal number of tokens, e.g. \"200\" or \"0.5\"";
    if s.is_empty() {
        bail!("empty token amount: {hint}");
    }
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        bail!("invalid token amount {text:?}: {hint}");
    }
    if !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        bail!("invalid token amount {text:?}: {hint}");
    }
    if frac.len() > DECIMALS {
        bail!(
            "token amount {text:?} has {} decimal places; the token has {DECIMALS}",
            frac.len()
        );
    }
    let digits = format!("{int}{frac:0<DECIMALS$}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Ok(U256::ZERO);
    }
    U256::from_str_radix(digits, 10).with_context(|| format!("token amount {text:?} is too large"))
}

/// Formats base units as a decimal token amount without trailing zeros ("200", "0.5").
pub fn format_amount(units: U256) -> String {
    let s = units.to_string();
    let s = format!("{s:0>width$}", width = DECIMALS + 1);
    let (int, frac) = s.split_at(s.len() - DECIMALS);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(s: &str) -> U256 {
        U256::from_str_radix(s, 10).unwrap()
    }

    #[test]
    fn parses_whole_and_fractional_amounts_exactly() {
        assert_eq!(parse_amount("200").unwrap(), units("200000000000000000000"));
        assert_eq!(parse_amount("0.5").unwrap(), units("500000000000000000"));
        assert_eq!(parse_amount(".5").unwrap(), units("500000000000000000"));
        assert_eq!(parse_amount("1.").unwrap(), units("1000000000000000000"));
        assert_eq!(parse_amount("0.000000000000000001").unwrap(), U256::from(1));
        assert_eq!(parse_amount("0").unwrap(), U256::ZERO);
        assert_eq!(parse_amount(" 007 ").unwrap(), units("7000000000000000000"));
    }

    #[test]
    fn rejects_malformed_amounts_with_a_hint() {
        for bad in ["", ".", "-1", "1e3", "1.2.3", "abc", "0x10", "1,5"] {
            let err = parse_amount(bad).unwrap_err().to_string();
            assert!(
                err.contains("token amount") || err.contains("empty"),
                "{bad}: {err}"
            );
        }
        let err = parse_amount("0.0000000000000000001")
            .unwrap_err()
            .to_string();
        assert!(err.contains("19 decimal places"), "{err}");
    }

    #[test]
    fn formats_round_trip() {
        for s in [
            "200",
            "0.5",
            "0.000000000000000001",
            "0",
            "1000000",
            "12.345",
        ] {
            assert_eq!(format_amount(parse_amount(s).unwrap()), s);
        }
    }
}
