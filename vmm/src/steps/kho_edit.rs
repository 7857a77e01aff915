//! The `kho-corrupt` step's edits: how a test rewrites the running
//! kernel's hwpoison blob (`append=`, `wrap`, `move-to=`, ...), parsed into
//! [`ras::kho::corrupt::Edit`].

use ras::kho::corrupt::{Edit, Place};

use super::number;

/// Most edits one `kho-corrupt` step makes, and raw entries one `append`
/// adds.
pub(super) const MAX_EDITS: usize = 16;

/// One `kho-corrupt` edit.
pub(super) fn edit(e: &str) -> Result<Edit, String> {
    let (name, value) = match e.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (e, None),
    };
    let num = |what: &str| {
        value
            .and_then(number)
            .ok_or_else(|| format!("{name} takes {what}"))
    };
    let small = |max: u64, what: &str| {
        num(what).and_then(|n| {
            if n <= max {
                Ok(n)
            } else {
                Err(format!("{name} takes {what}"))
            }
        })
    };
    Ok(match (name, value) {
        ("append", Some(list)) => {
            let raw = list
                .split(',')
                .map(number)
                .collect::<Option<Vec<u64>>>()
                .filter(|r| !r.is_empty() && r.len() <= MAX_EDITS)
                .ok_or("append takes 1 to 16 numbers, comma-separated")?;
            Edit::Append(raw)
        }
        ("beyond-ram", None) => Edit::BeyondRam,
        ("wrap", None) => Edit::Wrap,
        ("duplicate", None) => Edit::Duplicate,
        ("bad-type", None) => Edit::BadType(0),
        ("bad-type", Some(_)) => {
            Edit::BadType(u8::try_from(small(0xff, "a type byte")?).unwrap_or(0))
        }
        ("version", Some(_)) => Edit::Version(u16::try_from(small(0xffff, "a u16")?).unwrap_or(0)),
        ("flags", Some(_)) => Edit::Flags(u16::try_from(small(0xffff, "a u16")?).unwrap_or(0)),
        ("nr", Some(_)) => {
            Edit::NrEntries(u32::try_from(small(u64::from(u32::MAX), "a u32")?).unwrap_or(0))
        }
        ("seq", Some(_)) => Edit::Seq(num("a u64")?),
        ("move-to", Some("last-page")) => Edit::MoveTo(Place::LastPage),
        ("move-to", Some(_)) => Edit::MoveTo(Place::Gpa(num("an address or last-page")?)),
        _ => {
            return Err(format!(
                "unknown edit '{e}' (append=, beyond-ram, wrap, duplicate, bad-type[=], version=, \
                 flags=, nr=, seq=, move-to=)"
            ))
        }
    })
}
