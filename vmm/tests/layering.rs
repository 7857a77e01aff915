//! The vmm crate's modules import downward only: no module uses one that
//! uses it, directly or through others; no file is over 600 lines; and no
//! x86 port, MSR or register constant is spelled in vmm/src (they live in
//! the arch crate). Read from the sources, so a change that breaks the
//! layering fails here with the cycle named.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The top-level module a source file belongs to (`vm`, `ras_controller`).
fn module_of(p: &Path) -> Option<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = p.strip_prefix(&src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let m = first.trim_end_matches(".rs");
    (!matches!(m, "lib" | "main")).then(|| m.to_string())
}

/// Non-test code of a file: everything before `#[cfg(test)]`.
fn code(text: &str) -> &str {
    ["#[cfg(test)]", "#[cfg(all(test"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .map_or(text, |i| &text[..i])
}

#[test]
fn modules_import_downward_only() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let files = sources();
    let modules: BTreeSet<String> = files.iter().filter_map(|p| module_of(p)).collect();
    for p in &files {
        let Some(m) = module_of(p) else { continue };
        let text = std::fs::read_to_string(p).unwrap();
        let deps = graph.entry(m.clone()).or_default();
        for (i, _) in code(&text).match_indices("crate::") {
            let rest = &code(&text)[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) && name != m {
                deps.insert(name);
            }
        }
        // `use crate::{a, b}` forms.
        for (i, _) in code(&text).match_indices("use crate::{") {
            let rest = &code(&text)[i + "use crate::{".len()..];
            let list = &rest[..rest.find('}').unwrap_or(0)];
            for name in list
                .split(',')
                .map(|s| s.trim().split("::").next().unwrap_or(""))
            {
                if modules.contains(name) && name != m {
                    deps.insert(name.to_string());
                }
            }
        }
    }
    // Depth-first search for a cycle, naming it.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    assert!(graph.len() > 10, "the module graph was read: {graph:?}");
}

#[test]
fn no_file_is_over_600_lines() {
    for p in sources() {
        let n = std::fs::read_to_string(&p).unwrap().lines().count();
        assert!(n <= 600, "{} has {n} lines", p.display());
    }
}

/// Whether `line` holds `word` as a whole token (not inside an identifier
/// or a longer number).
fn has_token(line: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(word).any(|(i, _)| {
        let before = line[..i].chars().next_back().is_none_or(|c| !ident(c));
        let after = line[i + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !ident(c));
        before && after
    })
}

/// Files named after an architecture (machine/x86_64.rs,
/// ras_controller/aarch64.rs) hold that architecture's side of a module.
fn is_arch_file(p: &Path) -> bool {
    p.file_stem()
        .is_some_and(|s| s == "x86_64" || s == "aarch64")
}

#[test]
fn only_arch_files_name_an_architecture() {
    // An architecture is chosen in a module's mod.rs (`#[cfg(target_arch)]`
    // on its arch submodules) and its details are used in those submodules
    // only; everything else in vmm is the same code on every architecture.
    for p in sources().into_iter().filter(|p| !is_arch_file(p)) {
        let text = std::fs::read_to_string(&p).unwrap();
        let is_mod = p.file_name().is_some_and(|n| n == "mod.rs");
        for (n, line) in code(&text).lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            for needle in ["arch::x86_64", "arch::aarch64"] {
                assert!(
                    !l.contains(needle),
                    "{}:{}: architecture code belongs in an arch file: {line}",
                    p.display(),
                    n + 1
                );
            }
            if l.contains("target_arch") {
                let chooses = is_mod
                    && (l.starts_with("#[cfg(target_arch = \"x86_64\")]")
                        || l.starts_with("#[cfg(target_arch = \"aarch64\")]"));
                // A test module whose payloads are one architecture's code.
                let test_only = l.starts_with("#[cfg(all(test, target_arch");
                assert!(
                    chooses || test_only,
                    "{}:{}: choose an architecture only in a mod.rs, on its arch submodules: {line}",
                    p.display(),
                    n + 1
                );
            }
        }
    }
}

#[test]
fn no_x86_port_msr_or_register_constant_in_vmm() {
    // The board's ports, the MSRs rasvmm touches, x86 registers and boot
    // constants.
    let forbidden = [
        "0x3f8", "0x2f8", "0x60", "0x64", "0x70", "0x600", "0x179", "0x17a", "0x17b", "0x400",
        "0x200", "rip", "rsp", "cr0", "cr3", "cr4", "efer", "CR4", "EFER",
    ];
    let msr = "MSR_";
    for p in sources().into_iter().filter(|p| !is_arch_file(p)) {
        let text = std::fs::read_to_string(&p).unwrap();
        for (n, line) in code(&text).lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            for f in forbidden {
                assert!(
                    !has_token(l, f),
                    "{}:{}: '{f}' is an x86 detail; it belongs in arch: {line}",
                    p.display(),
                    n + 1
                );
            }
            assert!(
                !l.contains(msr),
                "{}:{}: an MSR belongs in arch: {line}",
                p.display(),
                n + 1
            );
        }
    }
}

#[test]
fn the_token_matcher_matches_tokens() {
    assert!(has_token("let rip = 1;", "rip"));
    assert!(!has_token("strip_prefix", "rip"));
    assert!(has_token("port 0x3f8,", "0x3f8"));
    assert!(!has_token("0x3f80", "0x3f8"));
}
