//! The module structure DESIGN.md promises, checked on the source: no import cycles
//! between the crate's top-level modules, and `sample` depends on nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its non-test code names (`crate::x`).
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" || rel.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests (a trailing `mod tests { .. }`) may name anything; only the code
        // itself counts.
        let code = text.split("#[cfg(test)]\nmod tests {").next().unwrap();
        let entry = deps.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                entry.insert(name);
            }
        }
    }
    deps
}

#[test]
fn no_import_cycles_between_modules() {
    let deps = dependencies();
    assert!(deps.len() >= 10, "found the modules: {deps:?}");
    // Depth-first search for a path back to the start.
    fn reaches(deps: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str, seen: &mut BTreeSet<String>) -> bool {
        deps.get(from)
            .into_iter()
            .flatten()
            .any(|next| next == to || (seen.insert(next.clone()) && reaches(deps, next, to, seen)))
    }
    let cycles: Vec<&String> = deps
        .keys()
        .filter(|m| reaches(&deps, m, m, &mut BTreeSet::new()))
        .collect();
    assert!(cycles.is_empty(), "modules on an import cycle: {cycles:?}\n{deps:#?}");
}

#[test]
fn the_row_contract_depends_on_nothing() {
    let deps = dependencies();
    assert_eq!(deps.get("sample"), Some(&BTreeSet::new()), "{deps:#?}");
}
