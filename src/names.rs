//! Channel and group name rules, as Django Channels checks them. Below both the layer
//! and the store: names become parts of stored keys, and the rules keep them sound
//! (no NUL, at most 99 bytes).

/// A channel, group or prefix name that breaks the rules; the message says how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub(crate) String);

/// Names must be shorter than this many bytes (Django: `len(name) < 100`).
pub(crate) const MAX_NAME_BYTES: usize = 99;

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

fn check_length(kind: &str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError(format!("{kind} name must not be empty")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError(format!(
            "{kind} name is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(())
}

fn check_chars(kind: &str, part: &str) -> Result<(), NameError> {
    match part.bytes().find(|b| !is_name_char(*b)) {
        None => Ok(()),
        Some(_) => Err(NameError(format!(
            "{kind} name may only contain ASCII letters, digits, '_', '.' and '-'{}",
            if kind == "channel" {
                ", with at most one '!' after the first character"
            } else {
                ""
            }
        ))),
    }
}

/// Checks a channel name: `^[A-Za-z0-9_.-]+(![A-Za-z0-9_.-]*)?$`, 1 to 99 bytes.
pub fn check_channel(name: &str) -> Result<(), NameError> {
    check_length("channel", name)?;
    let (head, tail) = match name.split_once('!') {
        Some((head, tail)) => (head, Some(tail)),
        None => (name, None),
    };
    if head.is_empty() {
        return Err(NameError(
            "channel name must not start with '!'".to_string(),
        ));
    }
    check_chars("channel", head)?;
    if let Some(tail) = tail {
        check_chars("channel", tail)?;
    }
    Ok(())
}

/// Checks a group name: `^[A-Za-z0-9_.-]+$`, 1 to 99 bytes.
pub(crate) fn check_group(name: &str) -> Result<(), NameError> {
    check_length("group", name)?;
    check_chars("group", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for ok in [
            "a",
            "chat.room-1_x",
            "specific.abc!def",
            "x!",
            "a.b!",
            &"a".repeat(99),
        ] {
            check_channel(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "!a",
            "a!b!c",
            "a b",
            "é",
            "a\0",
            "a\n",
            "a/b",
            &"a".repeat(100),
        ] {
            assert!(matches!(check_channel(bad), Err(NameError(_))), "{bad:?}");
        }
    }

    #[test]
    fn group_names() {
        check_group("alerts.eu-1_x").unwrap();
        for bad in ["", "a!b", "a!", "a b", &"g".repeat(100)] {
            let err = check_group(bad).unwrap_err().to_string();
            assert!(err.contains("group name"), "{bad:?}: {err}");
        }
        assert!(
            check_group(&"g".repeat(100))
                .unwrap_err()
                .to_string()
                .contains("99")
        );
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_a_name_or_refused_without_panic(name in "\\PC{0,120}|[a-z.!_-]{0,120}") {
            let _ = check_channel(&name);
            let _ = check_group(&name);
        }
    }
}
