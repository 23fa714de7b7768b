//! Text for Kubernetes fields with byte limits: cut at a character boundary, never inside a
//! multi-byte character and never past the limit, so a long or non-ASCII annotation value
//! cannot make every status or Event write fail validation.

/// The longest condition message the controllers write (the API allows 32 KiB).
pub const CONDITION_MESSAGE_BYTES: usize = 32_000;
/// The longest Event note (events.k8s.io/v1 refuses more than 1 KiB).
pub const EVENT_NOTE_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes at a character boundary; when cut, it ends with `…`.
pub fn truncate_bytes(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    const ELLIPSIS: &str = "…";
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_character_boundary_within_the_limit() {
        let cases = [
            ("short", 10, "short"),
            ("exactly10!", 10, "exactly10!"),
            ("abcdefghijk", 10, "abcdefg…"),
            ("ääääää", 10, "äää…"),
            ("€€€€", 8, "€…"),
            ("🙂🙂🙂", 6, "…"),
        ];
        for (s, max, want) in cases {
            let got = truncate_bytes(s, max);
            assert_eq!(got, want, "{s:?} {max}");
            assert!(got.len() <= max, "{got:?} is {} bytes", got.len());
        }
    }
}
