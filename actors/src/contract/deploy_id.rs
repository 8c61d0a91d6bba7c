//! A deploy's id, `{sequence:06}-{commit:12}` (CONTRACT.md, "Deploys and rollback"): it sorts
//! in the order the deploys were made and names its commit. A leaf: a message's `to` is read
//! with it (`message.rs`) as the deploy records are (`deploys.rs`).

/// Characters of the commit id in a deploy id: enough to name a commit in any repository a
/// site has, short enough to read.
const ID_COMMIT_CHARS: usize = 12;

/// The deploy id of the `sequence`th deploy, of `commit`.
pub fn deploy_id(sequence: u64, commit: &str) -> String {
    let short: String = commit.chars().take(ID_COMMIT_CHARS).collect();
    format!("{sequence:06}-{short}")
}

/// Whether `text` is shaped like a deploy id: at least 6 digits, `-`, 12 lower-case hex digits.
pub fn is_deploy_id(text: &str) -> bool {
    let Some((sequence, commit)) = text.split_once('-') else {
        return false;
    };
    (6..=19).contains(&sequence.len())
        && sequence.bytes().all(|b| b.is_ascii_digit())
        && commit.len() == ID_COMMIT_CHARS
        && commit
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The sequence number in a deploy id.
pub fn sequence_of(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

/// The commit prefix in a deploy id.
pub fn commit_prefix_of(id: &str) -> Option<&str> {
    Some(id.split_once('-')?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_ids_sort_in_order_and_name_their_commit() {
        let id = deploy_id(42, "0123456789abcdef0123");
        assert_eq!(id, "000042-0123456789ab");
        assert!(is_deploy_id(&id));
        assert_eq!(sequence_of(&id), Some(42));
        assert_eq!(commit_prefix_of(&id), Some("0123456789ab"));
        assert!(deploy_id(9, "a") < deploy_id(10, "a"));
        for bad in [
            "42-0123456789ab",
            "000042-0123456789AB",
            "000042-0123456789a",
            "000042_0123456789ab",
            "abcdef1",
            "previous",
            "../../x",
        ] {
            assert!(!is_deploy_id(bad), "{bad}");
        }
    }
}
