//! Kubernetes resource quantities ("100m", "1Gi", "1e3") as exact nano-unit integers (pure).

use thiserror::Error;

/// A quantity that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid quantity {0:?}")]
pub struct QuantityError(pub String);

/// A parsed quantity, in nano units (1 = 10^-9), so that cpu millis and byte counts both stay exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Nano(pub i128);

const NANO: i128 = 1_000_000_000;

impl Nano {
    /// The value rounded up to whole units (Kubernetes `Quantity.Value()`).
    pub fn value(self) -> i128 {
        ceil_div(self.0, NANO)
    }
    /// The value in thousandths rounded up (Kubernetes `Quantity.MilliValue()`).
    pub fn milli_value(self) -> i128 {
        ceil_div(self.0, 1_000_000)
    }
    /// True when the quantity is zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

fn ceil_div(a: i128, b: i128) -> i128 {
    let q = a / b;
    if a % b != 0 && ((a > 0) == (b > 0)) {
        q + 1
    } else {
        q
    }
}

/// Parses a Kubernetes quantity string.
pub fn parse(s: &str) -> Result<Nano, QuantityError> {
    let err = || QuantityError(s.to_string());
    let t = s.trim();
    if t.is_empty() {
        return Err(err());
    }
    let (neg, body) = match t.as_bytes()[0] {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, suffix) = body.split_at(num_end);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(err());
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    // mantissa as integer with `frac_digits` decimal places
    let digits = format!("{int_part}{frac_part}");
    if digits.len() > 30 {
        return Err(err());
    }
    let mantissa: i128 = digits.parse().map_err(|_| err())?;
    let frac_digits = i32::try_from(frac_part.len()).map_err(|_| err())?;
    // multiplier as (numerator, decimal exponent)
    let (mul, exp10): (i128, i32) = match suffix {
        "" => (1, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        s if s.starts_with(['e', 'E']) => {
            let e: i32 = s[1..].parse().map_err(|_| err())?;
            if !(-30..=30).contains(&e) {
                return Err(err());
            }
            (1, e)
        }
        _ => return Err(err()),
    };
    // value = mantissa * mul * 10^(exp10 - frac_digits) ; in nanos: * 10^9
    let e = exp10 - frac_digits + 9;
    let mut v = mantissa.checked_mul(mul).ok_or_else(err)?;
    if e >= 0 {
        v = v
            .checked_mul(10i128.checked_pow(e.unsigned_abs()).ok_or_else(err)?)
            .ok_or_else(err)?;
    } else {
        // round up sub-nano values like Kubernetes rounds up to its smallest scale
        v = ceil_div(v, 10i128.checked_pow(e.unsigned_abs()).ok_or_else(err)?);
    }
    Ok(Nano(if neg { -v } else { v }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table() {
        let table: &[(&str, i128)] = &[
            ("1", NANO),
            ("100m", 100_000_000),
            ("0.5", 500_000_000),
            ("1Ki", 1024 * NANO),
            ("1Gi", (1 << 30) * NANO),
            ("128Mi", 128 * (1 << 20) * NANO),
            ("1G", 1_000_000_000 * NANO),
            ("1e3", 1000 * NANO),
            ("1.5k", 1500 * NANO),
            ("-2", -2 * NANO),
            ("0", 0),
            ("1n", 1),
        ];
        for (s, want) in table {
            assert_eq!(parse(s), Ok(Nano(*want)), "{s}");
        }
    }

    #[test]
    fn rejects_table() {
        for s in ["", "abc", "1x", "1.2.3", ".", "1Gb", "1e99"] {
            assert!(parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn value_rounds_up() {
        assert_eq!(parse("100m").unwrap().value(), 1);
        assert_eq!(parse("1500m").unwrap().milli_value(), 1500);
        assert_eq!(parse("1Mi").unwrap().value(), 1_048_576);
    }
}
