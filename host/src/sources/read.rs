//! What a source is asked to read ([`RunOptions`]): to the end of its
//! input (`--until-eof`), or a range of it (`sluice backfill`, [`Range`]
//! between two [`Position`]s).

/// How `sluice run` runs its pipelines, as far as sources care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// `--until-eof`: a source with an end (a file) ends its pipeline there,
    /// instead of waiting for more.
    pub until_eof: bool,
    /// `sluice backfill`: the sources read this range of their input and
    /// end there (a source that cannot is refused before it starts).
    pub range: Option<Range>,
}

/// One bound of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The partition's first offset still kept.
    Earliest,
    /// The partition's end offset when the range is resolved.
    Latest,
    /// A record timestamp, in milliseconds since the Unix epoch.
    Time(i64),
    /// An offset per partition (`0:1200,1:1180`), in every topic of the
    /// source. A start leaves the partitions it does not list out of the
    /// range; an end reads those to `latest`.
    Offsets(Vec<(i32, i64)>),
}

impl Position {
    /// Why a range from `from` to `to` is empty for certain, if it is:
    /// `latest` before anything, anything before `earliest`, a time after
    /// a later one, an offset after the end's for the same partition.
    pub fn empty_range(from: &Position, to: &Position) -> Option<String> {
        match (from, to) {
            (Position::Latest, _) => Some("--from latest: the range starts at its end (give a time or offsets)".into()),
            (_, Position::Earliest) => Some("--to earliest: the range ends before its first record".into()),
            (Position::Time(a), Position::Time(b)) if a >= b => {
                Some(format!("--from {from} is not before --to {to} (the end is exclusive)"))
            }
            (Position::Offsets(a), Position::Offsets(b)) => a.iter().find_map(|(p, o)| {
                let end = b.iter().find(|(q, _)| q == p).map(|(_, e)| *e)?;
                (*o >= end).then(|| format!("partition {p}: --from offset {o} is not before --to offset {end}"))
            }),
            _ => None,
        }
    }

    /// The timestamp, when the position is one.
    pub fn time(&self) -> Option<i64> {
        match self {
            Position::Time(ms) => Some(*ms),
            _ => None,
        }
    }

    /// The offset given for `partition`, when the position lists offsets:
    /// `Some(None)` when it does not list the partition.
    pub fn offset(&self, partition: i32) -> Option<Option<i64>> {
        match self {
            Position::Offsets(offsets) => Some(offsets.iter().find(|(p, _)| *p == partition).map(|(_, o)| *o)),
            _ => None,
        }
    }
}

/// `P:OFFSET[,P:OFFSET…]`, if `raw` is written so.
fn parse_offsets(raw: &str) -> Option<Result<Vec<(i32, i64)>, String>> {
    if !raw.contains(':') || raw.contains('T') {
        return None;
    }
    let mut offsets = Vec::new();
    for part in raw.split(',') {
        let parsed = part
            .split_once(':')
            .and_then(|(p, o)| Some((p.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?)));
        match parsed {
            Some((p, o)) if p >= 0 && o >= 0 && !offsets.iter().any(|(q, _)| *q == p) => offsets.push((p, o)),
            _ => {
                return Some(Err(format!(
                    "{raw:?}: {part:?} is not PARTITION:OFFSET (each partition once, both 0 or more)"
                )))
            }
        }
    }
    offsets.sort_unstable();
    Some(Ok(offsets))
}

impl std::str::FromStr for Position {
    type Err = String;

    /// `earliest`, `latest`, an RFC 3339 time (`2019-12-05T06:18:00Z`),
    /// milliseconds since the Unix epoch, or offsets (`0:1200,1:1180`).
    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "earliest" => return Ok(Position::Earliest),
            "latest" => return Ok(Position::Latest),
            _ => {}
        }
        if let Some(offsets) = parse_offsets(raw) {
            return offsets.map(Position::Offsets);
        }
        if let Ok(ms) = raw.parse::<i64>() {
            return Ok(Position::Time(ms));
        }
        let time = humantime::parse_rfc3339_weak(raw).map_err(|e| {
            format!("{raw:?}: {e} (expected earliest, latest, an RFC 3339 time such as 2019-12-05T06:18:00Z, epoch milliseconds, or offsets such as 0:1200,1:1180)")
        })?;
        let ms = match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_millis()).map_err(|_| format!("{raw:?}: too far in the future"))?,
            Err(before) => {
                -i64::try_from(before.duration().as_millis()).map_err(|_| format!("{raw:?}: too far back"))?
            }
        };
        Ok(Position::Time(ms))
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Earliest => f.write_str("earliest"),
            Position::Latest => f.write_str("latest"),
            Position::Offsets(offsets) => {
                let text: Vec<String> = offsets.iter().map(|(p, o)| format!("{p}:{o}")).collect();
                f.write_str(&text.join(","))
            }
            Position::Time(ms) => {
                match u64::try_from(*ms).ok().map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)) {
                    Some(time) => write!(f, "{}", humantime::format_rfc3339_millis(time)),
                    None => write!(f, "{ms}"),
                }
            }
        }
    }
}

/// What to read: every partition of the source's topics from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub from: Position,
    pub to: Position,
    /// At most this many records a second (`None`: as fast as it goes), so
    /// that a backfill does not starve the live pipelines of the broker.
    pub max_rate: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_from_names_times_and_milliseconds() {
        assert_eq!("earliest".parse(), Ok(Position::Earliest));
        assert_eq!("latest".parse(), Ok(Position::Latest));
        assert_eq!("1575526691134".parse(), Ok(Position::Time(1575526691134)));
        assert_eq!("2019-12-05T06:18:11.134Z".parse(), Ok(Position::Time(1575526691134)));
        assert_eq!(Position::Time(1575526691134).to_string(), "2019-12-05T06:18:11.134Z");
        let error = "yesterday".parse::<Position>().unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
        assert_eq!("1:20,0:10".parse(), Ok(Position::Offsets(vec![(0, 10), (1, 20)])));
        assert_eq!(Position::Offsets(vec![(0, 10), (1, 20)]).to_string(), "0:10,1:20");
        assert_eq!("0:7".parse::<Position>().map(|p| p.offset(0)), Ok(Some(Some(7))));
        assert_eq!(Position::Time(1).offset(0), None);
        for bad in ["0:x", "0:1,0:2", "-1:5", "0:1,"] {
            assert!(bad.parse::<Position>().unwrap_err().contains("PARTITION:OFFSET"), "{bad}");
        }
    }

    #[test]
    fn a_range_that_is_empty_for_certain_is_named() {
        let p = |s: &str| s.parse::<Position>().unwrap();
        let empty = |from: &str, to: &str| Position::empty_range(&p(from), &p(to));
        assert!(empty("2020-01-02T00:00:00Z", "2020-01-01T00:00:00Z").unwrap().contains("is not before --to"));
        assert!(empty("1000", "1000").is_some(), "the end is exclusive");
        assert!(empty("0:10,1:5", "1:5").unwrap().contains("partition 1"));
        assert!(empty("latest", "latest").is_some());
        assert!(empty("earliest", "earliest").is_some());
        assert_eq!(empty("earliest", "latest"), None);
        assert_eq!(empty("1000", "2000"), None);
        assert_eq!(empty("0:10", "1:5"), None, "another partition: read to latest");
        assert_eq!(empty("1000", "0:5"), None, "a time and offsets: resolved per partition");
    }
}
