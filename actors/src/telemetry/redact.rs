//! Redaction of secrets from text that leaves the worker: status events, dead-letter reasons,
//! git errors (and so the log lines that carry them).
//!
//! Two kinds of secret end up in such text. The operator's own: a token embedded in
//! `GIT_REMOTE_TEMPLATE` shows in git's argv and in its error messages. And whatever the agent
//! or a build printed: a key it found in a file, an `.npmrc` line, a header it sent. The pass
//! below rewrites
//!
//! - credentials in URLs, any scheme: `https://user:password@host/...` and
//!   `ssh://token@host/...` become `scheme://***@host/...`;
//! - well-known token shapes, keeping their non-secret prefix so a reader knows what was there:
//!   Anthropic `sk-ant-***`, GitHub `ghp_***` (`gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`),
//!   GitLab `glpat-***`, Slack `xoxb-***` (`xoxa-`, `xoxp-`, `xoxr-`, `xoxs-`), npm `npm_***`,
//!   AWS access key ids `AKIA***` / `ASIA***`;
//! - values assigned to well-known secret names (`aws_secret_access_key = ...`,
//!   `"SecretAccessKey": "..."`, `aws_session_token`, `.npmrc`'s `_authToken=`, `_auth=`,
//!   `_password=`, `ANTHROPIC_API_KEY=`, ...): the name stays, the value becomes `***`;
//! - `Authorization:` header values: `Authorization: Bearer ***`, `Basic ***`;
//! - the body of PEM private key blocks (the `BEGIN`/`END` lines stay).
//!
//! It is a small scanner, not a regex engine (the worker has no regex dependency): each rule
//! looks for a fixed marker (`://`, a prefix, a name) and checks what surrounds it. Every marker
//! and every character a rule stops at is ASCII, so every cut falls on a character boundary.
//! Text with nothing to redact comes back borrowed, unchanged; redacting twice changes nothing
//! more.

use std::borrow::Cow;

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// `text` with every secret this module knows the shape of replaced by `***`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    for rule in RULES {
        if let Some(changed) = rule(&out) {
            out = Cow::Owned(changed);
        }
    }
    out
}

/// `redact` for an owned string: no copy when there is nothing to redact.
pub fn redact_string(text: String) -> String {
    let changed = match redact(&text) {
        Cow::Owned(changed) => Some(changed),
        Cow::Borrowed(_) => None,
    };
    changed.unwrap_or(text)
}

/// Each rule returns the rewritten text, or `None` when it found nothing to change. PEM blocks
/// go first (a key body would otherwise be cut up by the narrower rules).
const RULES: &[fn(&str) -> Option<String>] = &[
    pem_private_keys,
    url_credentials,
    authorization_values,
    secret_assignments,
    token_shapes,
];

/// An edit: replace `text[start..end]` with `with`.
struct Edit {
    start: usize,
    end: usize,
    with: Cow<'static, str>,
}

/// Apply edits (in any order; one that overlaps an earlier one is dropped). `None` when no edit
/// changes anything.
fn apply(text: &str, mut edits: Vec<Edit>) -> Option<String> {
    edits.sort_by_key(|e| (e.start, e.end));
    let mut out = String::new();
    let mut copied = 0;
    let mut changed = false;
    for edit in edits {
        if edit.start < copied || text[edit.start..edit.end] == *edit.with {
            continue;
        }
        if !changed {
            out.reserve(text.len());
            changed = true;
        }
        out.push_str(&text[copied..edit.start]);
        out.push_str(&edit.with);
        copied = edit.end;
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

fn mask(start: usize, end: usize) -> Edit {
    Edit {
        start,
        end,
        with: Cow::Borrowed(MASK),
    }
}

/// Where `needle` occurs in `hay` at or after `from`.
fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if from >= hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i)
}

/// Every position of `needle` in `hay`, ignoring ASCII case (`needle` is lower case).
fn find_all_ci(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.len() > hay.len() {
        return Vec::new();
    }
    (0..=hay.len() - needle.len())
        .filter(|&i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
        .collect()
}

/// The end of the run of bytes matching `pred` that starts at `from`.
fn run_end(bytes: &[u8], from: usize, pred: impl Fn(u8) -> bool) -> usize {
    from + bytes[from..].iter().take_while(|b| pred(**b)).count()
}

/// No letter or digit right before `at`: a name or token starts there.
fn starts_word(bytes: &[u8], at: usize) -> bool {
    at == 0 || !bytes[at - 1].is_ascii_alphanumeric()
}

fn is_quote(b: u8) -> bool {
    matches!(b, b'"' | b'\'' | b'`' | b'\\')
}

/// What ends a secret value: white space, quotes, and the punctuation that separates values in
/// JSON, shell and INI text.
fn ends_value(b: u8) -> bool {
    b.is_ascii_whitespace() || is_quote(b) || matches!(b, b',' | b';' | b'&')
}

/// `-----BEGIN ... PRIVATE KEY-----` ... `-----END ... PRIVATE KEY-----`: the body goes. A block
/// cut short (a log tail) loses everything after its `BEGIN` line.
fn pem_private_keys(text: &str) -> Option<String> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    let bytes = text.as_bytes();
    let mut edits = Vec::new();
    let mut pos = 0;
    while let Some(begin) = find(bytes, pos, BEGIN) {
        let label_start = begin + BEGIN.len();
        let Some(label_end) = find(bytes, label_start, b"-----") else {
            break;
        };
        let label = &text[label_start..label_end];
        if label.contains('\n') || !label.contains("PRIVATE KEY") {
            pos = label_start;
            continue;
        }
        let body_start = label_end + 5;
        let end_line = format!("-----END {label}-----");
        match find(bytes, body_start, end_line.as_bytes()) {
            Some(body_end) => {
                edits.push(Edit {
                    start: body_start,
                    end: body_end,
                    with: Cow::Borrowed("\n***\n"),
                });
                pos = body_end + end_line.len();
            }
            None => {
                edits.push(Edit {
                    start: body_start,
                    end: bytes.len(),
                    with: Cow::Borrowed("\n***"),
                });
                break;
            }
        }
    }
    apply(text, edits)
}

/// `scheme://userinfo@host...` -> `scheme://***@host...`. The authority ends where a URL's
/// path, query or fragment starts, or where the URL itself ends (white space, a quote); its
/// user part is everything before its last `@`.
fn url_credentials(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut edits = Vec::new();
    let mut pos = 0;
    while let Some(sep) = find(bytes, pos, b"://") {
        let start = sep + 3;
        let end = run_end(bytes, start, |b| {
            !(b.is_ascii_whitespace()
                || is_quote(b)
                || matches!(b, b'/' | b'?' | b'#' | b'<' | b'>'))
        });
        if let Some(at) = bytes[start..end].iter().rposition(|b| *b == b'@')
            && at > 0
        {
            edits.push(mask(start, start + at));
        }
        pos = end.max(start);
    }
    apply(text, edits)
}

/// Names whose value is a secret wherever it is assigned (`NAME=value`, `NAME: value`,
/// `"Name": "value"`), compared without case. `_auth`, `_authToken` and `_password` are the
/// credential keys of `.npmrc` (`//registry.example/:_authToken=...`).
const SECRET_NAMES: &[&str] = &[
    "aws_secret_access_key",
    "aws_session_token",
    "secretaccesskey",
    "sessiontoken",
    "_authtoken",
    "_auth",
    "_password",
    "anthropic_api_key",
    "anthropic_auth_token",
    "claude_code_oauth_token",
    "access_token",
    "refresh_token",
    "client_secret",
];

/// After a name at `after`: an optional closing quote, `=` or `:`, an optional opening quote.
/// Returns where the value starts.
fn value_start(bytes: &[u8], after: usize) -> Option<usize> {
    let mut i = run_end(bytes, after, is_quote);
    i = run_end(bytes, i, |b| b == b' ' || b == b'\t');
    if !matches!(bytes.get(i), Some(b'=' | b':')) {
        return None;
    }
    i = run_end(bytes, i + 1, |b| b == b' ' || b == b'\t');
    Some(run_end(bytes, i, is_quote))
}

fn secret_assignments(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut edits = Vec::new();
    for name in SECRET_NAMES {
        for at in find_all_ci(bytes, name.as_bytes()) {
            let after = at + name.len();
            let whole_name = starts_word(bytes, at)
                && !bytes
                    .get(after)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
            if !whole_name {
                continue;
            }
            let Some(start) = value_start(bytes, after) else {
                continue;
            };
            let end = run_end(bytes, start, |b| !ends_value(b));
            if end > start {
                edits.push(mask(start, end));
            }
        }
    }
    apply(text, edits)
}

/// Authentication schemes kept in front of a masked `Authorization` value.
const AUTH_SCHEMES: &[&str] = &[
    "bearer",
    "basic",
    "token",
    "digest",
    "negotiate",
    "aws4-hmac-sha256",
];

/// `Authorization: Bearer abc` -> `Authorization: Bearer ***` (also `Proxy-Authorization`, and
/// `"Authorization": "..."` in JSON).
fn authorization_values(text: &str) -> Option<String> {
    const NAME: &[u8] = b"authorization";
    let bytes = text.as_bytes();
    let mut edits = Vec::new();
    for at in find_all_ci(bytes, NAME) {
        if !starts_word(bytes, at) {
            continue;
        }
        let Some(mut start) = value_start(bytes, at + NAME.len()) else {
            continue;
        };
        let word_end = run_end(bytes, start, |b| b.is_ascii_alphanumeric() || b == b'-');
        let scheme = &bytes[start..word_end];
        if AUTH_SCHEMES
            .iter()
            .any(|s| scheme.eq_ignore_ascii_case(s.as_bytes()))
            && bytes.get(word_end) == Some(&b' ')
        {
            start = run_end(bytes, word_end, |b| b == b' ');
        }
        let end = run_end(bytes, start, |b| !ends_value(b));
        if end > start {
            edits.push(mask(start, end));
        }
    }
    apply(text, edits)
}

/// A token recognised by its prefix: what follows the prefix (at least `min` characters of
/// `body`) is the secret.
struct Shape {
    prefix: &'static str,
    min: usize,
    /// Exactly `min` characters, and no letter or digit after them (AWS key ids).
    exact: bool,
    body: fn(u8) -> bool,
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn alnum_underscore(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}
fn alnum_dash(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}
fn alnum_dash_underscore(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}
fn upper_alnum(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

const fn shape(prefix: &'static str, min: usize, body: fn(u8) -> bool) -> Shape {
    Shape {
        prefix,
        min,
        exact: false,
        body,
    }
}

const SHAPES: &[Shape] = &[
    // Anthropic: sk-ant-api03-..., sk-ant-oat01-...
    shape("sk-ant-", 8, alnum_dash_underscore),
    // GitHub: classic, OAuth, user-to-server, server-to-server, refresh; fine-grained.
    shape("ghp_", 20, alnum),
    shape("gho_", 20, alnum),
    shape("ghu_", 20, alnum),
    shape("ghs_", 20, alnum),
    shape("ghr_", 20, alnum),
    shape("github_pat_", 20, alnum_underscore),
    // GitLab personal access tokens.
    shape("glpat-", 20, alnum_dash_underscore),
    // Slack.
    shape("xoxa-", 10, alnum_dash),
    shape("xoxb-", 10, alnum_dash),
    shape("xoxp-", 10, alnum_dash),
    shape("xoxr-", 10, alnum_dash),
    shape("xoxs-", 10, alnum_dash),
    // npm access tokens (`npm_` + 36): long enough never to be an `npm_config_*` name.
    shape("npm_", 30, alnum),
    // AWS access key ids: long-term and temporary.
    Shape {
        prefix: "AKIA",
        min: 16,
        exact: true,
        body: upper_alnum,
    },
    Shape {
        prefix: "ASIA",
        min: 16,
        exact: true,
        body: upper_alnum,
    },
];

fn token_shapes(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut edits = Vec::new();
    for shape in SHAPES {
        let prefix = shape.prefix.as_bytes();
        let mut pos = 0;
        while let Some(at) = find(bytes, pos, prefix) {
            let start = at + prefix.len();
            pos = start;
            if !starts_word(bytes, at) {
                continue;
            }
            let end = run_end(bytes, start, shape.body);
            let long_enough = if shape.exact {
                end - start == shape.min
                    && !bytes.get(end).is_some_and(|b| b.is_ascii_alphanumeric())
            } else {
                end - start >= shape.min
            };
            if long_enough {
                edits.push(mask(start, end));
                pos = end;
            }
        }
    }
    apply(text, edits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(text: &str) -> String {
        match redact(text) {
            Cow::Owned(s) => s,
            Cow::Borrowed(_) => panic!("nothing was redacted in {text:?}"),
        }
    }

    fn unchanged(text: &str) {
        assert!(
            matches!(redact(text), Cow::Borrowed(_)),
            "{text:?} was changed to {:?}",
            redact(text)
        );
    }

    #[test]
    fn text_without_secrets_is_borrowed_unchanged() {
        for text in [
            "",
            "Updated the homepage title to \"Amelia Stamps - Handcrafted with Love\".",
            "Write src/pages/index.astro; Edit src/layouts/Base.astro; and 3 more",
            "`git push --quiet --porcelain origin refs/heads/thread-t:refs/heads/thread-t` failed",
            "npm_config_cache=/tmp/cache npm_config_registry=https://registry.npmjs.org/",
            "Basic setup of the site; a bearer of good news; authorization needed",
            "see RFC 7235 for the Authorization header",
            "task-ant-colony ghp_short AKIA123 xoxb-1 glpat-x",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "multi-byte: é ü 漢字 → https://例え.jp/パス@x",
            "an email: someone@example.com and user@host:path/repo.git",
        ] {
            unchanged(text);
        }
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        for text in [
            "https://github.com/org/repo.git",
            "fatal: unable to access 'https://127.0.0.1:9/c/p.git/': Failed to connect",
            "ssh://host.example:22/srv/git/c/p.git",
            "file:///srv/git/amelia/stamps.git",
            "http://example.com/path/with@at-sign?q=a@b#frag@x",
            "git://host/repo",
        ] {
            unchanged(text);
        }
    }

    #[test]
    fn credentials_in_urls_are_masked_for_any_scheme() {
        assert_eq!(
            changed("https://x-access-token:s3cr3t@github.com/org/repo.git"),
            "https://***@github.com/org/repo.git"
        );
        assert_eq!(
            changed("fatal: unable to access 'http://user:pa:ss@127.0.0.1:9/c/p.git/': refused"),
            "fatal: unable to access 'http://***@127.0.0.1:9/c/p.git/': refused"
        );
        assert_eq!(
            changed("ssh://deploytoken@host:22/repo"),
            "ssh://***@host:22/repo"
        );
        assert_eq!(
            changed("git://tok@host/repo and git+https://u:p@h"),
            "git://***@host/repo and git+https://***@h"
        );
        // A user part with `@` in it: everything up to the host's `@` goes.
        assert_eq!(
            changed("https://me@example.com:pw@host/x"),
            "https://***@host/x"
        );
        // Inside JSON (escaped quotes) and at the very end of the text.
        assert_eq!(
            changed(r#"{"reason":"clone \"https://u:p@h/r\" failed"}"#),
            r#"{"reason":"clone \"https://***@h/r\" failed"}"#
        );
        assert_eq!(changed("remote https://tok@h"), "remote https://***@h");
    }

    #[test]
    fn anthropic_keys_keep_their_prefix() {
        assert_eq!(
            changed("key sk-ant-api03-AbC_dEf-123456789 used"),
            "key sk-ant-*** used"
        );
        assert_eq!(
            changed("Wrote sk-ant-oat01-abcdefghij.txt."),
            "Wrote sk-ant-***.txt."
        );
    }

    #[test]
    fn github_gitlab_slack_and_npm_tokens_keep_their_prefix() {
        let classic = "ghp_SECRETSECRETSECRETSECRETSECRETSECRET12";
        assert_eq!(changed(classic), "ghp_***");
        for prefix in ["gho_", "ghu_", "ghs_", "ghr_"] {
            let token = format!("token={prefix}abcdefghijklmnopqrstuvwxyz0123456789");
            assert_eq!(changed(&token), format!("token={prefix}***"));
        }
        assert_eq!(
            changed("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
            "github_pat_***"
        );
        assert_eq!(
            changed("PRIVATE-TOKEN: glpat-abcdefghij0123456789"),
            "PRIVATE-TOKEN: glpat-***"
        );
        for prefix in ["xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-"] {
            let token = format!("{prefix}1234567890-abcdef");
            assert_eq!(changed(&token), format!("{prefix}***"));
        }
        assert_eq!(
            changed("npm_abcdefghijklmnopqrstuvwxyz0123456789 is the token"),
            "npm_*** is the token"
        );
    }

    #[test]
    fn aws_key_ids_and_secret_assignments() {
        assert_eq!(
            changed("AKIAIOSFODNN7EXAMPLE and ASIAIOSFODNN7EXAMPLE"),
            "AKIA*** and ASIA***"
        );
        // Not 16 characters: not a key id.
        unchanged("AKIAIOSFODNN7EXAMPLEX AKIASHORT");
        assert_eq!(
            changed("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nregion=x"),
            "aws_secret_access_key = ***\nregion=x"
        );
        assert_eq!(
            changed("AWS_SECRET_ACCESS_KEY=abc/def+ghi AWS_SESSION_TOKEN=IQoJb3JpZ2luX2Vj"),
            "AWS_SECRET_ACCESS_KEY=*** AWS_SESSION_TOKEN=***"
        );
        assert_eq!(
            changed(r#"{"AccessKeyId":"x","SecretAccessKey": "abc/def","SessionToken":"tok"}"#),
            r#"{"AccessKeyId":"x","SecretAccessKey": "***","SessionToken":"***"}"#
        );
        assert_eq!(
            changed("ANTHROPIC_API_KEY=not-a-known-shape-but-named"),
            "ANTHROPIC_API_KEY=***"
        );
    }

    #[test]
    fn npmrc_credentials() {
        assert_eq!(
            changed("//registry.npmjs.org/:_authToken=abcdef123456\nfund=false"),
            "//registry.npmjs.org/:_authToken=***\nfund=false"
        );
        assert_eq!(
            changed(
                "//npm.example.com/:_auth = dXNlcjpwYXNz\n//npm.example.com/:_password=cGFzcw=="
            ),
            "//npm.example.com/:_auth = ***\n//npm.example.com/:_password=***"
        );
        // A variable reference is masked too; harmless.
        assert_eq!(
            changed("//r.example/:_authToken=${NPM_TOKEN}"),
            "//r.example/:_authToken=***"
        );
    }

    #[test]
    fn authorization_header_values() {
        assert_eq!(
            changed("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"),
            "Authorization: Bearer ***"
        );
        assert_eq!(
            changed("curl -H 'authorization: Basic dXNlcjpwYXNz' https://x"),
            "curl -H 'authorization: Basic ***' https://x"
        );
        assert_eq!(
            changed(r#"{"Authorization":"token abc123","x":1}"#),
            r#"{"Authorization":"token ***","x":1}"#
        );
        assert_eq!(
            changed("Proxy-Authorization: opaque-value\r\nHost: x"),
            "Proxy-Authorization: ***\r\nHost: x"
        );
    }

    #[test]
    fn pem_private_key_bodies() {
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc/def+=\n-----END RSA PRIVATE KEY-----";
        assert_eq!(
            changed(&format!("found {key} in .env")),
            "found -----BEGIN RSA PRIVATE KEY-----\n***\n-----END RSA PRIVATE KEY----- in .env"
        );
        assert_eq!(
            changed("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n(cut)"),
            "-----BEGIN OPENSSH PRIVATE KEY-----\n***"
        );
        assert_eq!(
            changed(
                "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----"
            ),
            "-----BEGIN PRIVATE KEY-----\n***\n-----END PRIVATE KEY-----"
        );
    }

    #[test]
    fn redacting_twice_changes_nothing_more() {
        let text = "https://u:ghp_abcdefghijklmnopqrstuvwxyz0123@h/r sk-ant-api03-xxxxxxxxxx \
                    aws_secret_access_key=abc Authorization: Bearer tok AKIAIOSFODNN7EXAMPLE \
                    -----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----";
        let once = changed(text);
        unchanged(&once);
        for secret in [
            "ghp_abc",
            "xxxxxxxxxx",
            "=abc",
            "Bearer tok",
            "IOSFODNN",
            "\nabc\n",
        ] {
            assert!(!once.contains(secret), "{secret} left in {once}");
        }
    }

    #[test]
    fn owned_strings_are_kept_when_clean() {
        let clean = String::from("nothing here");
        let ptr = clean.as_ptr();
        let out = redact_string(clean);
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(
            redact_string("a sk-ant-api03-abcdefgh".into()),
            "a sk-ant-***"
        );
    }

    #[test]
    fn any_text_is_safe_to_scan() {
        // Pieces of every rule, multi-byte characters and cut-off markers, mixed at random
        // (a fixed seed): no panic, and a second pass changes nothing.
        let pieces = [
            "://",
            "@",
            "sk-ant-",
            "ghp_",
            "AKIA",
            "Authorization",
            ": ",
            "=",
            "\"",
            "\\",
            "_authToken",
            "-----BEGIN ",
            "PRIVATE KEY",
            "-----",
            "-----END ",
            "é",
            "漢",
            "x",
            "0123456789abcdef",
            " ",
            "\n",
            "/",
            "Bearer ",
            "'",
            "aws_secret_access_key",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            let mut text = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            let once = redact(&text).into_owned();
            assert_eq!(redact(&once), once, "from {text:?}");
        }
    }
}
