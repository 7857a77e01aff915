//! What rasdaemon recorded in the guest (the rasdaemon guest image), as the
//! agent reads it from rasdaemon's own database: the rows of its
//! `mc_event`, `mce_record` and `memory_failure_event` tables, with the
//! columns a RAS verdict needs.
//!
//! The rows are decoded from `sqlite3 -json`, whose integer columns are
//! signed (an MCi_STATUS with bit 63 set comes back negative) and some of
//! whose "numbers" are text (`pfn` is `0x...`): [`int`] reads either. Every
//! field has a default, so a rasdaemon that adds or drops columns still
//! decodes; text is clipped to [`MAX_TEXT`] bytes and each table to
//! [`MAX_ROWS`] rows.

use serde::{Deserialize, Deserializer, Serialize};

/// Most rows the agent reads from one table (the newest).
pub const MAX_ROWS: usize = 64;
/// Longest text field kept, in bytes.
pub const MAX_TEXT: usize = 512;
/// Most bytes a view takes as JSON: the oldest rows are left out beyond it,
/// so the reply fits one protocol line ([`crate::MAX_LINE`]).
pub const MAX_VIEW_BYTES: usize = 48 * 1024;
/// Longest the agent waits for the rows a request asks for.
pub const MAX_WAIT_MS: u64 = 10_000;

/// rasdaemon's view of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RasdaemonView {
    /// A rasdaemon process runs in the guest.
    pub running: bool,
    /// Its `mc_event` rows: memory errors EDAC reported (on a GHES platform,
    /// CPER memory-error records, through ghes_edac).
    #[serde(default)]
    pub mc_event: Vec<McEvent>,
    /// Its `mce_record` rows (x86): machine-check records.
    #[serde(default)]
    pub mce_record: Vec<MceRecord>,
    /// Its `memory_failure_event` rows: what memory_failure() did to a page.
    #[serde(default)]
    pub memory_failure_event: Vec<MemoryFailureEvent>,
    /// The last lines of rasdaemon's own output, for a person reading why.
    #[serde(default)]
    pub log_tail: Vec<String>,
}

impl RasdaemonView {
    /// Rows in all tables.
    pub fn rows(&self) -> usize {
        self.mc_event.len() + self.mce_record.len() + self.memory_failure_event.len()
    }

    /// Leaves out the oldest rows (from the longest table first) and then
    /// log lines until the view takes at most [`MAX_VIEW_BYTES`] as JSON.
    pub fn fit(&mut self) {
        let size = |v: &Self| serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        while size(self) > MAX_VIEW_BYTES {
            let longest = [
                self.mc_event.len(),
                self.mce_record.len(),
                self.memory_failure_event.len(),
            ];
            match longest.iter().enumerate().max_by_key(|(_, n)| **n) {
                Some((_, 0)) | None => {
                    if self.log_tail.is_empty() {
                        return;
                    }
                    self.log_tail.remove(0);
                }
                Some((0, _)) => {
                    self.mc_event.remove(0);
                }
                Some((1, _)) => {
                    self.mce_record.remove(0);
                }
                Some(_) => {
                    self.memory_failure_event.remove(0);
                }
            }
        }
    }
}

/// One `mc_event` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct McEvent {
    /// When rasdaemon saw it.
    #[serde(deserialize_with = "text")]
    pub timestamp: String,
    /// `Corrected`, `Uncorrected`, `Fatal`, ...
    #[serde(deserialize_with = "text")]
    pub err_type: String,
    /// The error's description.
    #[serde(deserialize_with = "text")]
    pub err_msg: String,
    /// How many errors the event counts.
    #[serde(deserialize_with = "int")]
    pub err_count: u64,
    /// Physical address.
    #[serde(deserialize_with = "int")]
    pub address: u64,
    /// The driver's detail (for ghes_edac, the CPER fields it decoded).
    #[serde(deserialize_with = "text")]
    pub driver_detail: String,
}

/// One `mce_record` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MceRecord {
    /// When rasdaemon saw it.
    #[serde(deserialize_with = "text")]
    pub timestamp: String,
    /// The bank.
    #[serde(deserialize_with = "int")]
    pub bank: u64,
    /// MCi_STATUS.
    #[serde(deserialize_with = "int")]
    pub status: u64,
    /// MCi_ADDR.
    #[serde(deserialize_with = "int")]
    pub addr: u64,
    /// MCi_MISC.
    #[serde(deserialize_with = "int")]
    pub misc: u64,
    /// MCG_STATUS.
    #[serde(deserialize_with = "int")]
    pub mcgstatus: u64,
    /// The CPU that logged it.
    #[serde(deserialize_with = "int")]
    pub cpu: u64,
    /// rasdaemon's decode of the error.
    #[serde(deserialize_with = "text")]
    pub error_msg: String,
    /// rasdaemon's decode of MCi_STATUS.
    #[serde(deserialize_with = "text")]
    pub mcistatus_msg: String,
}

/// One `memory_failure_event` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryFailureEvent {
    /// When rasdaemon saw it.
    #[serde(deserialize_with = "text")]
    pub timestamp: String,
    /// The page frame.
    #[serde(deserialize_with = "int")]
    pub pfn: u64,
    /// The kind of page, as Linux names it (`dirty LRU page`, `reserved
    /// kernel page`, ...).
    #[serde(deserialize_with = "text")]
    pub page_type: String,
    /// What memory_failure() made of it (`Recovered`, `Ignored`, ...).
    #[serde(deserialize_with = "text")]
    pub action_result: String,
}

/// A column that holds an integer: a JSON number (a negative one is the
/// two's complement of a u64 SQLite stored signed) or text in decimal or
/// `0x` hex. Anything else reads as 0.
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Column {
        Unsigned(u64),
        Signed(i64),
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Column::deserialize(d)? {
        Column::Unsigned(v) => v,
        Column::Signed(v) => v as u64,
        Column::Text(t) => {
            let t = t.trim();
            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap_or(0),
                None => t.parse().unwrap_or(0),
            }
        }
        Column::Other(_) => 0,
    })
}

/// A text column, clipped to [`MAX_TEXT`] bytes; null or a number reads as
/// its text form.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Column {
        Text(String),
        Number(serde_json::Number),
        Other(serde::de::IgnoredAny),
    }
    let mut t = match Column::deserialize(d)? {
        Column::Text(t) => t,
        Column::Number(n) => n.to_string(),
        Column::Other(_) => String::new(),
    };
    if t.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_json_rows_decode() {
        // As `sqlite3 -json` prints them: MCi_STATUS stored signed.
        let rows = r#"[{"id":1,"timestamp":"2026-12-01 14:00:00 +0000","mcgcap":3080,
            "mcgstatus":5,"status":-4791830003521158860,"addr":52355072,"misc":140,
            "bank":4,"cpu":0,"error_msg":"Uncorrected error","mcistatus_msg":"Error_overflow=0",
            "new_column":"ignored"}]"#;
        let r: Vec<MceRecord> = serde_json::from_str(rows).unwrap();
        assert_eq!(r[0].status, 0xbd80_0000_0010_0134);
        assert_eq!((r[0].bank, r[0].addr, r[0].mcgstatus), (4, 0x31ee000, 5));
        let m: Vec<MemoryFailureEvent> = serde_json::from_str(
            r#"[{"id":1,"pfn":"0x31ee","page_type":"dirty LRU page","action_result":"Recovered"}]"#,
        )
        .unwrap();
        assert_eq!(m[0].pfn, 0x31ee);
        let e: Vec<McEvent> = serde_json::from_str(
            r#"[{"err_type":"Corrected","address":"52355072","err_count":1,"driver_detail":null}]"#,
        )
        .unwrap();
        assert_eq!(
            (e[0].address, e[0].err_count, e[0].driver_detail.as_str()),
            (0x31ee000, 1, "")
        );
    }

    #[test]
    fn a_view_fits_one_protocol_line() {
        let row = McEvent {
            err_msg: "x".repeat(MAX_TEXT),
            driver_detail: "y".repeat(MAX_TEXT),
            ..McEvent::default()
        };
        let mut v = RasdaemonView {
            running: true,
            mc_event: vec![row; MAX_ROWS],
            log_tail: vec!["z".repeat(MAX_TEXT); 20],
            ..RasdaemonView::default()
        };
        v.fit();
        let len = serde_json::to_vec(&v).unwrap().len();
        assert!(len <= MAX_VIEW_BYTES && MAX_VIEW_BYTES < crate::MAX_LINE);
        assert!(!v.mc_event.is_empty() && v.mc_event.len() < MAX_ROWS);
        assert_eq!(v.log_tail.len(), 20, "rows go before log lines");
    }

    #[test]
    fn hostile_columns_are_bounded() {
        let long = "é".repeat(MAX_TEXT);
        let rows = format!(r#"[{{"err_msg":"{long}","address":[1,2],"err_type":7}}]"#);
        let e: Vec<McEvent> = serde_json::from_str(&rows).unwrap();
        assert!(e[0].err_msg.len() <= MAX_TEXT);
        assert_eq!((e[0].address, e[0].err_type.as_str()), (0, "7"));
    }
}
