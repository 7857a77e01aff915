//! The grammar every number rasvmm reads from users follows (steps,
//! control API words, command-line options), and the check that keeps
//! control characters out of steps given as JSON.

/// A number as users write it: decimal digits, or `0x` and hex digits,
/// nothing else (no sign, no underscore, no whitespace, no `0X`); `None`
/// when it is not one or does not fit 64 bits. Every number rasvmm reads
/// from a user goes through here.
pub fn number(v: &str) -> Option<u64> {
    let (digits, radix) = match v.strip_prefix("0x") {
        Some(h) => (h, 16),
        None => (v, 10),
    };
    let valid = !digits.is_empty()
        && digits.bytes().all(|b| match radix {
            16 => b.is_ascii_hexdigit(),
            _ => b.is_ascii_digit(),
        });
    if !valid {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Whether a JSON value holds a control character in any string or key.
pub(super) fn has_control(v: &serde_json::Value) -> bool {
    let bad = |s: &str| s.chars().any(char::is_control);
    match v {
        serde_json::Value::String(s) => bad(s),
        serde_json::Value::Array(a) => a.iter().any(has_control),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| bad(k) || has_control(v)),
        _ => false,
    }
}
