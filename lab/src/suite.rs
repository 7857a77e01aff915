//! `rasvmm-lab suite`: runs a directory of scenario files, prints a verdict
//! table, and writes JUnit XML and JSON for CI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lab::{scenarios, Arch};
use serde_json::Value;

use crate::{chain, describe, open_lab};

struct Options {
    dir: PathBuf,
    junit: PathBuf,
    json: PathBuf,
}

fn options(arch: Arch, args: &[String]) -> Result<Options, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::fs::canonicalize(&root)
        .unwrap_or(root)
        .join("target/scenario-results")
        .join(arch.name());
    let mut o = Options {
        dir: scenarios::default_dir_for(arch),
        junit: out.join("junit.xml"),
        json: out.join("results.json"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or(format!("{a} needs a path"))
        };
        match a.as_str() {
            "--junit" => o.junit = value()?,
            "--json" => o.json = value()?,
            s if !s.starts_with('-') => o.dir = PathBuf::from(s),
            s => {
                return Err(format!(
                    "unknown option '{s}' (suite [DIR] [--junit FILE] [--json FILE])"
                ))
            }
        }
    }
    Ok(o)
}

/// Runs the suite for `arch`'s guests.
pub fn run(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let o = options(arch, args)?;
    let all = scenarios::load_dir(&o.dir)?;
    let lab = open_lab(arch)?;
    println!("{}", describe(&lab));
    println!(
        "running {} {} scenarios from {}\n",
        all.len(),
        arch.name(),
        o.dir.display()
    );
    let (results, wall) = scenarios::run(&lab, &all).map_err(|e| chain(&e))?;
    print!("{}", scenarios::table(&results));
    for p in [&o.junit, &o.json] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create '{}': {e}", d.display()))?;
        }
    }
    std::fs::write(&o.junit, scenarios::junit(&results, wall, arch))
        .map_err(|e| format!("cannot write '{}': {e}", o.junit.display()))?;
    let reports: Vec<&Value> = results.iter().map(|r| &r.report).collect();
    let json = serde_json::to_string_pretty(&reports).unwrap_or_default();
    std::fs::write(&o.json, json + "\n")
        .map_err(|e| format!("cannot write '{}': {e}", o.json.display()))?;
    let passed = results.iter().filter(|r| r.passed).count();
    let failed = results.len() - passed;
    println!("\nresults: {} and {}", o.junit.display(), o.json.display());
    println!("{}: {passed} passed, {failed} failed", arch.name());
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let o = options(
            Arch::X86_64,
            &["dir".into(), "--junit".into(), "j.xml".into()],
        )
        .unwrap();
        assert_eq!(o.dir, PathBuf::from("dir"));
        assert_eq!(o.junit, PathBuf::from("j.xml"));
        assert!(options(Arch::X86_64, &["--junit".into()]).is_err());
        assert!(options(Arch::X86_64, &["--frob".into()]).is_err());
        let a = options(Arch::Aarch64, &[]).unwrap();
        assert!(a.dir.ends_with("scenarios/aarch64"), "{}", a.dir.display());
    }
}
