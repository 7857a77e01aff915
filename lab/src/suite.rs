//! `rasvmm-lab suite`: runs a directory of scenario files on one or more
//! guest kernels, prints a line per scenario as it finishes, a verdict
//! table per kernel and the matrix of every kernel, and writes JUnit XML and
//! JSON for CI. `rasvmm-lab merge` joins the JSON of shards into one table
//! and one JUnit file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lab::kernels::{self, GuestKernel};
use lab::matrix::{default_file, features_check, plan, Shard, FEATURES_ROW};
use lab::scenarios::{self, ScenarioResult, Status};
use lab::Arch;
use serde::{Deserialize, Serialize};

use crate::{chain, describe, open_lab};

const USAGE: &str = "suite [--arch A] [DIR] [--kernel [NAME=]PATH]... [--kernels FILE | --matrix] [--shard K/N] [--junit FILE] [--json FILE]";

#[derive(Debug)]
struct Options {
    dir: PathBuf,
    kernels: Vec<GuestKernel>,
    shard: Option<Shard>,
    junit: PathBuf,
    json: PathBuf,
}

/// Where results go by default: target/scenario-results/<arch>/.
fn results_dir(arch: Arch) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::canonicalize(&root)
        .unwrap_or(root)
        .join("target/scenario-results")
        .join(arch.name())
}

fn options(arch: Arch, args: &[String]) -> Result<Options, String> {
    let out = results_dir(arch);
    let mut o = Options {
        dir: scenarios::default_dir_for(arch),
        kernels: Vec::new(),
        shard: None,
        junit: out.join("junit.xml"),
        json: out.join("results.json"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value ({USAGE})"));
        match a.as_str() {
            "--junit" => o.junit = PathBuf::from(value()?),
            "--json" => o.json = PathBuf::from(value()?),
            "--kernel" => o.kernels.push(GuestKernel::from_arg(value()?)?),
            "--kernels" => o.kernels.extend(kernels::load_file(Path::new(value()?))?),
            "--matrix" => o.kernels.extend(kernels::load_file(&default_file(arch))?),
            "--shard" => o.shard = Some(Shard::parse(value()?)?),
            s if !s.starts_with('-') => o.dir = PathBuf::from(s),
            s => return Err(format!("unknown option '{s}' ({USAGE})")),
        }
    }
    if o.kernels.is_empty() {
        o.kernels.push(GuestKernel::project());
    }
    for (i, k) in o.kernels.iter().enumerate() {
        if o.kernels[..i].iter().any(|o| o.name == k.name) {
            return Err(format!("two kernels are named '{}'", k.name));
        }
    }
    Ok(o)
}

/// What `suite --json` writes and `merge` reads.
#[derive(Serialize, Deserialize)]
struct Results {
    arch: String,
    kernels: Vec<String>,
    shard: Option<Shard>,
    wall_s: f64,
    results: Vec<ScenarioResult>,
}

/// Runs the suite for `arch`'s guests.
pub fn run(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let o = options(arch, args)?;
    let all = scenarios::load_dir(&o.dir)?;
    let plan = plan(&o.kernels, &all, o.shard)?;
    let total: usize = plan.iter().map(|(_, s)| s.len()).sum();
    let lab = open_lab(arch)?;
    println!("{}", describe(&lab));
    let names: Vec<String> = o.kernels.iter().map(|k| k.name.clone()).collect();
    println!(
        "running {total} {} scenario runs from {} on {} kernel(s): {}{}\n",
        arch.name(),
        o.dir.display(),
        names.len(),
        names.join(", "),
        o.shard
            .map_or(String::new(), |s| format!(" (shard {}/{})", s.k, s.n))
    );
    let mut results = Vec::new();
    let mut wall = 0.0;
    let mut done = 0;
    for (k, mine) in &plan {
        if mine.is_empty() {
            continue;
        }
        let mut on_result = |r: &ScenarioResult| {
            done += 1;
            println!("{}", scenarios::progress_line(r, done, total));
        };
        let (mut rs, w) =
            scenarios::run_on(&lab, mine, k, &mut on_result).map_err(|e| chain(&e))?;
        wall += w;
        if let Some(r) = features_check(k, &rs, mine) {
            rs.push(r);
        }
        println!("\n== {} on {}", arch.name(), k.name);
        print!("{}", scenarios::table(&rs));
        println!();
        results.extend(rs);
    }
    let out = Results {
        arch: arch.name().into(),
        kernels: names,
        shard: o.shard,
        wall_s: wall,
        results,
    };
    finish(arch, &out, &o.junit, &o.json)
}

/// Prints the matrix, writes JUnit and JSON; the exit status.
fn finish(arch: Arch, out: &Results, junit: &Path, json: &Path) -> Result<ExitCode, String> {
    print!("{}", scenarios::matrix(&out.results, &out.kernels));
    for p in [junit, json] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create '{}': {e}", d.display()))?;
        }
    }
    std::fs::write(junit, scenarios::junit(&out.results, out.wall_s, arch))
        .map_err(|e| format!("cannot write '{}': {e}", junit.display()))?;
    let text = serde_json::to_string_pretty(out).map_err(|e| e.to_string())?;
    std::fs::write(json, text + "\n")
        .map_err(|e| format!("cannot write '{}': {e}", json.display()))?;
    println!("results: {} and {}", junit.display(), json.display());
    let failed = out.results.iter().any(|r| r.status() == Status::Failed);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `merge [--junit FILE] [--json FILE] SHARD.json...`: joins the results
/// of shards (of one architecture) into one matrix, JUnit file and JSON.
pub fn merge(args: &[String]) -> Result<ExitCode, String> {
    let usage = "merge [--junit FILE] [--json FILE] SHARD.json...";
    let (mut junit, mut json, mut inputs) = (None, None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or(format!("{a} needs a path ({usage})"))
        };
        match a.as_str() {
            "--junit" => junit = Some(value()?),
            "--json" => json = Some(value()?),
            s if !s.starts_with('-') => inputs.push(PathBuf::from(s)),
            s => return Err(format!("unknown option '{s}' ({usage})")),
        }
    }
    if inputs.is_empty() {
        return Err(format!("no shard results to merge ({usage})"));
    }
    let mut merged: Option<Results> = None;
    for p in &inputs {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read '{}': {e}", p.display()))?;
        let r: Results = serde_json::from_str(&text)
            .map_err(|e| format!("'{}' is not suite results: {e}", p.display()))?;
        match &mut merged {
            None => merged = Some(r),
            Some(m) if m.arch != r.arch => {
                return Err(format!(
                    "'{}' holds {} results, the others {}",
                    p.display(),
                    r.arch,
                    m.arch
                ))
            }
            Some(m) => {
                for k in r.kernels {
                    if !m.kernels.contains(&k) {
                        m.kernels.push(k);
                    }
                }
                m.wall_s += r.wall_s;
                for res in r.results {
                    let same = |o: &&mut ScenarioResult| {
                        (&o.kernel, &o.name, &o.cpu) == (&res.kernel, &res.name, &res.cpu)
                    };
                    match m.results.iter_mut().find(same) {
                        // Each shard checked its own runs of a kernel.
                        Some(o) if o.name == FEATURES_ROW => {
                            o.passed &= res.passed;
                            o.failures.extend(res.failures);
                        }
                        Some(_) => {
                            return Err(format!(
                                "'{}' has {} on {} again: the same shard merged twice?",
                                p.display(),
                                res.name,
                                res.kernel
                            ))
                        }
                        None => m.results.push(res),
                    }
                }
            }
        }
    }
    let mut m = merged.ok_or("nothing merged")?;
    m.shard = None;
    let arch: Arch = m.arch.parse().map_err(|e| chain(&e))?;
    let dir = results_dir(arch);
    let junit = junit.unwrap_or(dir.join("junit.xml"));
    let json = json.unwrap_or(dir.join("results.json"));
    println!(
        "merged {} results of {} shard(s)",
        m.results.len(),
        inputs.len()
    );
    finish(arch, &m, &junit, &json)
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
        assert_eq!(o.kernels, vec![GuestKernel::project()]);
        assert!(options(Arch::X86_64, &["--junit".into()]).is_err());
        assert!(options(Arch::X86_64, &["--frob".into()]).is_err());
        let e = options(Arch::X86_64, &["--kernel".into(), "/nonexistent".into()]);
        assert!(e.unwrap_err().contains("is not a file"));
        let twice = ["--kernel", "default", "--kernel", "default"].map(String::from);
        assert!(options(Arch::X86_64, &twice)
            .unwrap_err()
            .contains("two kernels"));
        let a = options(Arch::Aarch64, &[]).unwrap();
        assert!(a.dir.ends_with("scenarios/aarch64"), "{}", a.dir.display());
    }

    #[test]
    fn shards_split_every_pair_once() {
        for bad in ["0/2", "3/2", "1", "a/b", "1/0", "1/1001"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let all = scenarios::load_dir(&scenarios::default_dir_for(Arch::X86_64)).unwrap();
        let mut two = GuestKernel::project();
        two.name = "other".into();
        two.scenarios = Some(vec![all[0].1.name.clone(), all[3].1.name.clone()]);
        let kernels = vec![GuestKernel::project(), two];
        let whole: usize = plan(&kernels, &all, None)
            .unwrap()
            .iter()
            .map(|(_, s)| s.len())
            .sum();
        assert_eq!(whole, all.len() + 2);
        for n in 1..=4 {
            let mut seen = Vec::new();
            for k in 1..=n {
                for (kern, mine) in plan(&kernels, &all, Some(Shard { k, n })).unwrap() {
                    seen.extend(mine.into_iter().map(|(_, s)| (kern.name.clone(), s.name)));
                }
            }
            let len = seen.len();
            seen.sort();
            seen.dedup();
            assert_eq!((len, seen.len()), (whole, whole), "{n} shards");
        }
        let mut bad = GuestKernel::project();
        bad.scenarios = Some(vec!["no-such-scenario".into()]);
        let e = plan(std::slice::from_ref(&bad), &all, None).unwrap_err();
        assert!(e.contains("no-such-scenario"), "{e}");
    }

    #[test]
    fn shards_merge_into_one_matrix() {
        let dir = std::env::temp_dir().join(format!("rasvmm-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let result = |kernel: &str, name: &str, passed: bool| ScenarioResult {
            name: name.into(),
            kernel: kernel.into(),
            cpu: "amd".into(),
            outcome: "poweroff".into(),
            passed,
            failures: if passed {
                vec![]
            } else {
                vec![format!("{name} failed")]
            },
            not_applicable: vec![],
            features: None,
            retried: None,
            diagnosis: vec![],
            views: Vec::new(),
            seconds: 1.0,
            report: serde_json::Value::Null,
        };
        let shard = |k, results| Results {
            arch: "x86_64".into(),
            kernels: vec!["a".into(), "b".into()],
            shard: Some(Shard { k, n: 2 }),
            wall_s: 10.0,
            results,
        };
        let one = shard(
            1,
            vec![result("a", "s1", true), result("a", FEATURES_ROW, true)],
        );
        let two = shard(
            2,
            vec![result("b", "s1", true), result("a", FEATURES_ROW, false)],
        );
        let path = |n: &str| dir.join(n).display().to_string();
        for (n, r) in [("1.json", &one), ("2.json", &two)] {
            std::fs::write(dir.join(n), serde_json::to_string(r).unwrap()).unwrap();
        }
        let args = |files: &[&str]| {
            let mut a = vec![
                "--junit".to_string(),
                path("j.xml"),
                "--json".into(),
                path("m.json"),
            ];
            a.extend(files.iter().map(|f| path(f)));
            a
        };
        // The failed features check of shard 2 fails the merged row.
        assert_eq!(
            merge(&args(&["1.json", "2.json"])).unwrap(),
            ExitCode::from(1)
        );
        let merged: Results =
            serde_json::from_str(&std::fs::read_to_string(dir.join("m.json")).unwrap()).unwrap();
        assert_eq!(merged.results.len(), 3, "one features row per kernel");
        let row = merged
            .results
            .iter()
            .find(|r| r.name == FEATURES_ROW)
            .unwrap();
        assert!(!row.passed);
        assert_eq!(merged.shard, None);
        let e = merge(&args(&["1.json", "1.json"])).unwrap_err();
        assert!(e.contains("the same shard merged twice"), "{e}");
        std::fs::write(dir.join("x.json"), "{}").unwrap();
        assert!(merge(&args(&["x.json"]))
            .unwrap_err()
            .contains("is not suite results"));
        assert!(merge(&[]).unwrap_err().contains("no shard results"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
