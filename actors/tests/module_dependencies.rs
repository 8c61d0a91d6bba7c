//! Dependencies between the actor crate's modules go one way, down (issue 29).
//!
//! This reads the crate's source, not its compiled form: every `crate::...` and `super::...`
//! path in a module's non-test code is a dependency on the module that path names. A module
//! may use its own children and its ancestors (a folder's `mod.rs` re-exports what its parts
//! define, and the parts use their folder's shared types); between siblings, the modules of
//! one folder (the crate's top-level entries, or the parts of `git/`), there must be no cycle:
//! if `a` uses `b`, nothing in `b` may use `a`, directly or through other siblings. A use from
//! deep inside one sibling into deep inside another counts as a use between the two siblings.
//!
//! Test code (`#[cfg(test)] mod tests { ... }` at the end of a file, and test-only modules)
//! and comments are left out: tests may reach across, and a doc comment that names a type is
//! not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path inside the crate: `[]` is the crate root, `["git", "workspace"]` is
/// `crate::steps::git::workspace`.
type ModulePath = Vec<String>;

/// Every module of the crate with its file, test-only modules left out.
fn modules(src: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut found = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let mut segments: Vec<String> = relative
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            let file = segments.pop().unwrap();
            match file.as_str() {
                "lib.rs" if segments.is_empty() => {}
                "mod.rs" => {}
                _ => segments.push(file.trim_end_matches(".rs").to_owned()),
            }
            found.insert(segments, path);
        }
    }
    let test_only: Vec<ModulePath> = found
        .keys()
        .filter(|m| !m.is_empty() && declared_for_tests_only(&found, m))
        .cloned()
        .collect();
    // A test-only module's children are test-only too.
    found.retain(|m, _| !test_only.iter().any(|t| m.starts_with(t)));
    found
}

/// Whether `module`'s parent declares it under `#[cfg(test)]`.
fn declared_for_tests_only(all: &BTreeMap<ModulePath, PathBuf>, module: &ModulePath) -> bool {
    let parent = &module[..module.len() - 1];
    let name = module.last().unwrap();
    let Some(file) = all.get(parent) else {
        return false;
    };
    let text = std::fs::read_to_string(file).unwrap();
    let mut previous = "";
    for line in text.lines().map(str::trim) {
        let declares = line
            .strip_suffix(';')
            .and_then(|l| l.rsplit_once("mod "))
            .is_some_and(|(_, declared)| declared.trim() == name);
        if declares {
            return previous.contains("cfg(test)");
        }
        if !line.is_empty() {
            previous = line;
        }
    }
    false
}

/// A file's code without comments and without its test module.
fn production_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        // A trailing comment; `//` inside a string (a URL) only cuts what follows it on the
        // line, which holds no path of ours.
        let line = match line.find(" //") {
            Some(at) => &line[..at],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The identifier at the start of `text`.
fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The paths that follow `anchor` (`crate::` or `super::`) in `code`, as segments; a brace
/// group (`crate::a::{b::C, d}`) gives one path per item.
fn paths_after(code: &str, anchor: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(anchor) {
        // `other_crate::` or `supercrate::` are not ours.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + anchor.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let mut prefix = Vec::new();
        let mut cursor = rest;
        loop {
            let word = identifier(cursor);
            if word.is_empty() {
                break;
            }
            prefix.push(word.to_owned());
            cursor = &cursor[word.len()..];
            match cursor.strip_prefix("::") {
                Some(next) => cursor = next,
                None => break,
            }
        }
        if let Some(group) = cursor.strip_prefix('{') {
            for item in group_items(group) {
                let mut path = prefix.clone();
                path.extend(
                    item.split("::")
                        .map(|s| identifier(s.trim()).to_owned())
                        .filter(|s| !s.is_empty()),
                );
                paths.push(path);
            }
        } else {
            paths.push(prefix);
        }
    }
    paths
}

/// The items of a brace group whose text starts after its `{`, split at the commas of its own
/// level.
fn group_items(group: &str) -> Vec<String> {
    let (mut depth, mut item, mut items) = (0usize, String::new(), Vec::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    items
        .into_iter()
        .map(|i| i.trim().to_owned())
        .filter(|i| !i.is_empty())
        .collect()
}

/// The module a path names: its longest prefix that is a module.
fn module_of(path: &[String], all: &BTreeMap<ModulePath, PathBuf>) -> Option<ModulePath> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| all.contains_key(prefix))
}

/// The uses between siblings: for each folder (its module path), `from -> {to: an example}`.
type SiblingUses = BTreeMap<ModulePath, BTreeMap<String, BTreeMap<String, String>>>;

fn sibling_uses(all: &BTreeMap<ModulePath, PathBuf>) -> SiblingUses {
    let mut uses = SiblingUses::new();
    for (module, file) in all {
        let code = production_code(&std::fs::read_to_string(file).unwrap());
        let mut targets = Vec::new();
        for path in paths_after(&code, "crate::") {
            targets.push(path);
        }
        // `super::` from `a::b` (a file `a/b.rs`) is `a`; from a folder's `mod.rs` the same.
        if let Some((_, parent)) = module.split_last() {
            for path in paths_after(&code, "super::") {
                targets.push(parent.iter().cloned().chain(path).collect());
            }
        }
        for target in targets {
            let Some(target) = module_of(&target, all) else {
                continue;
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            // Its own parts, or a folder it is part of.
            if common == module.len() || common == target.len() {
                continue;
            }
            uses.entry(module[..common].to_vec())
                .or_default()
                .entry(module[common].clone())
                .or_default()
                .entry(target[common].clone())
                .or_insert_with(|| format!("{} uses {}", module.join("::"), target.join("::")));
        }
    }
    uses
}

/// The cycles among one folder's siblings: each strongly connected group of more than one
/// module (Tarjan's algorithm), sorted.
fn cycles(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    struct Search<'a> {
        edges: &'a BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Search<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            let edges = self.edges;
            for next in edges.get(node).into_iter().flat_map(|e| e.keys()) {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut group = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    group.push(member.to_owned());
                    if member == node {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut search = Search {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in edges.keys() {
        if !search.index.contains_key(node.as_str()) {
            search.visit(node);
        }
    }
    search.found.sort();
    search.found
}

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_uses_a_sibling_that_uses_it_back() {
    let all = modules(&source());
    assert!(
        all.len() > 20,
        "the crate's modules were not found: {:?}",
        all.keys()
    );
    let uses = sibling_uses(&all);
    let mut report = Vec::new();
    for (folder, edges) in &uses {
        for group in cycles(edges) {
            let folder = if folder.is_empty() {
                "crate".to_owned()
            } else {
                format!("crate::{}", folder.join("::"))
            };
            let examples: Vec<&str> = group
                .iter()
                .flat_map(|from| {
                    edges[from]
                        .iter()
                        .filter(|(to, _)| group.contains(to))
                        .map(|(_, example)| example.as_str())
                })
                .collect();
            report.push(format!(
                "in {folder}: {} use each other ({})",
                group.join(", "),
                examples.join("; ")
            ));
        }
    }
    assert!(
        report.is_empty(),
        "dependencies must go one way, down (ARCHITECTURE.md):\n{}",
        report.join("\n")
    );
}

/// The check itself finds what it must: a use across folders is a use between the two
/// top-level siblings, a group import names each module, and a cycle of three is one group.
#[test]
fn the_check_sees_group_imports_deep_uses_and_longer_cycles() {
    let code = production_code(
        "use crate::a::{b::C, d};\n// crate::z is only named here\nfn f() { crate::e::f::g(); }\n\
         #[cfg(test)]\nmod tests { use crate::y; }\n",
    );
    let paths = paths_after(&code, "crate::");
    assert_eq!(
        paths,
        vec![
            vec!["a".to_owned(), "b".into(), "C".into()],
            vec!["a".to_owned(), "d".into()],
            vec!["e".to_owned(), "f".into(), "g".into()],
        ]
    );
    let edge = |to: &str| (to.to_owned(), String::new());
    let edges: BTreeMap<String, BTreeMap<String, String>> = [
        ("a".to_owned(), [edge("b")].into_iter().collect()),
        ("b".to_owned(), [edge("c")].into_iter().collect()),
        ("c".to_owned(), [edge("a"), edge("d")].into_iter().collect()),
        ("d".to_owned(), BTreeMap::new()),
    ]
    .into_iter()
    .collect();
    assert_eq!(cycles(&edges), vec![vec!["a", "b", "c"]]);
    let edges: BTreeMap<String, BTreeMap<String, String>> =
        [("a".to_owned(), [edge("b")].into_iter().collect())]
            .into_iter()
            .collect();
    assert!(cycles(&edges).is_empty());
}
