//! The ids a worker without real root can give its run slots.
//!
//! Such a worker makes itself root of a user namespace of its own
//! ([`super::namespaces::enter_own_user_namespace_unless_root`]). By itself it may map only its
//! own uid and gid there, so every run would share them. Where the host gives its user a
//! subordinate range (`/etc/subuid` and `/etc/subgid`, as for rootless containers) and has the
//! setuid helpers `newuidmap` and `newgidmap` (Debian's `uidmap` package), the worker maps that
//! range too, once, at start: its own uid becomes 0 and the range becomes 1 to `count`. Each
//! run slot then takes an id of the range, which on the host is a uid no one else holds.
//!
//! Parsing the files and the maps is pure and tested here; the helpers run in a child forked
//! before the worker leaves for its namespace (`sys::become_root_of_own_user_namespace`).

use std::ffi::OsStr;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the helpers are looked for (a worker's `PATH` may be empty).
const HELPER_DIRS: &[&str] = &["/usr/bin", "/bin", "/usr/local/bin"];

/// A subordinate range of ids: `count` ids from `start`, on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// The subordinate ranges of this process's user and the helpers that map them.
#[derive(Debug, Clone)]
pub struct Subordinate {
    uid: u32,
    gid: u32,
    uids: IdRange,
    gids: IdRange,
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

impl Subordinate {
    /// The first ranges `/etc/subuid` and `/etc/subgid` give the user `name` (uid `uid`, gid
    /// `gid`), with the helpers; `Err` says what is missing.
    pub fn find(name: &str, uid: u32, gid: u32) -> Result<Self, String> {
        let range = |path: &str| {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            first_range(&text, name, uid).ok_or_else(|| format!("{path} has no range for {name}"))
        };
        let helper = |name: &str| {
            HELPER_DIRS
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|path| path.is_file())
                .ok_or_else(|| format!("no {name} (the uidmap package) in {HELPER_DIRS:?}"))
        };
        Ok(Self {
            uid,
            gid,
            uids: range("/etc/subuid")?,
            gids: range("/etc/subgid")?,
            newuidmap: helper("newuidmap")?,
            newgidmap: helper("newgidmap")?,
        })
    }

    /// The ranges, as `(uids, gids)`.
    pub fn ranges(&self) -> (IdRange, IdRange) {
        (self.uids, self.gids)
    }

    /// Maps, from outside, the user namespace of process `pid`: 0 to this user's own uid and
    /// gid, and 1 to `count` to the range. Runs the helpers; their own errors go to stderr.
    pub fn map(&self, pid: i32) -> io::Result<()> {
        let run = |helper: &Path, own: u32, range: IdRange| -> io::Result<()> {
            let args = [
                pid.to_string(),
                "0".into(),
                own.to_string(),
                "1".into(),
                "1".into(),
                range.start.to_string(),
                range.count.to_string(),
            ];
            let status = Command::new(helper)
                .args(args.iter().map(OsStr::new))
                .env_clear()
                .status()?;
            if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "{} ended with {status}",
                    helper.display()
                )))
            }
        };
        run(&self.newuidmap, self.uid, self.uids)?;
        run(&self.newgidmap, self.gid, self.gids)
    }
}

/// The first range `text` (in the format of `/etc/subuid`: `owner:start:count` per line, the
/// owner a name or a uid) gives to user `name` or uid `uid`.
fn first_range(text: &str, name: &str, uid: u32) -> Option<IdRange> {
    let uid = uid.to_string();
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        let start = fields.next()?.parse().ok()?;
        let count: u32 = fields.next()?.parse().ok()?;
        let valid = fields.next().is_none() && count > 0 && start > 0;
        (valid && (owner == name || owner == uid)).then_some(IdRange { start, count })
    })
}

/// The lines of a map in `/proc/<pid>/uid_map`'s format: `(inside, outside, count)`.
fn lines(map: &str) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    map.lines().filter_map(|line| {
        let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().ok());
        Some((fields.next()??, fields.next()??, fields.next()??))
    })
}

/// The ids a map maps, as ranges of ids inside.
fn mapped(map: &str) -> Vec<Range<u64>> {
    lines(map)
        .map(|(inside, _, count)| inside..inside + count)
        .collect()
}

/// The ids from `base` upwards, at most `width` of them, that both maps map, without a gap and
/// without 0 (the worker's own id): where run slots may take their uids and gids. Where `base`
/// is not mapped, the first mapped id past 0 is taken instead. `None` when no id past 0 is.
pub fn slot_ids(uid_map: &str, gid_map: &str, base: u32, width: u32) -> Option<Range<u32>> {
    let (uids, gids) = (mapped(uid_map), mapped(gid_map));
    let both = |id: u64| {
        id > 0
            && id <= u64::from(u32::MAX)
            && [&uids, &gids]
                .iter()
                .all(|m| m.iter().any(|r| r.contains(&id)))
    };
    let start = if both(u64::from(base)) {
        u64::from(base)
    } else {
        // The lowest mapped id past 0 of the uid map that the gid map maps too.
        uids.iter()
            .map(|r| r.start.max(1))
            .filter(|&id| both(id))
            .min()?
    };
    let mut end = start;
    while end - start < u64::from(width) && both(end) {
        end += 1;
    }
    Some(start as u32..end as u32)
}

/// The ids run slots may take in this process's user namespace (see [`slot_ids`]).
pub fn own_slot_ids(base: u32, width: u32) -> Option<Range<u32>> {
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let gid_map = std::fs::read_to_string("/proc/self/gid_map").ok()?;
    slot_ids(&uid_map, &gid_map, base, width)
}

/// The host uid behind this process's uid (the same where it runs in the host's namespace).
pub fn host_uid() -> u32 {
    let own = u64::from(nix::unistd::getuid().as_raw());
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let line = lines(&map).find(|&(inside, _, count)| (inside..inside + count).contains(&own));
    line.map_or(own, |(inside, outside, _)| outside + own - inside) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_s_first_range_by_name_or_uid() {
        let text = "alice:100000:65536\nbob:165536:65536\n1002:231072:1000\nbob:300000:10\n";
        let range = |name, uid| first_range(text, name, uid);
        assert_eq!(
            range("bob", 1001),
            Some(IdRange {
                start: 165_536,
                count: 65_536
            })
        );
        assert_eq!(
            range("carol", 1002),
            Some(IdRange {
                start: 231_072,
                count: 1000
            })
        );
        assert_eq!(range("dave", 1003), None);
        // Malformed lines, empty and zero ranges are skipped.
        let odd = "eve:1:2:3\neve:x:10\neve:5000:0\n\neve:0:10\neve:7000:10\n";
        assert_eq!(
            first_range(odd, "eve", 9),
            Some(IdRange {
                start: 7000,
                count: 10
            })
        );
    }

    #[test]
    fn maps_are_read_line_by_line() {
        let map = "         0       1000          1\n         1     100000      65536\nbad line\n";
        assert_eq!(
            lines(map).collect::<Vec<_>>(),
            [(0, 1000, 1), (1, 100_000, 65_536)]
        );
        assert_eq!(mapped(map), [0..1, 1..65_537]);
    }

    #[test]
    fn slots_take_ids_both_maps_give_past_the_worker_s_own() {
        let host = "0 0 4294967295\n";
        assert_eq!(slot_ids(host, host, 64_000, 4096), Some(64_000..68_096));
        // A worker with a subordinate range: its own id is 0, the range 1 to 65536.
        let sub = "0 1000 1\n1 100000 65536\n";
        assert_eq!(slot_ids(sub, sub, 64_000, 4096), Some(64_000..65_537));
        // A smaller range does not reach the base: slots start at its first id.
        let small = "0 1000 1\n1 100000 100\n";
        assert_eq!(slot_ids(small, small, 64_000, 4096), Some(1..101));
        // The gid map bounds it too.
        assert_eq!(slot_ids(sub, small, 64_000, 4096), Some(1..101));
        // Only the worker's own id: no slot ids.
        let own = "0 1000 1\n";
        assert_eq!(slot_ids(own, own, 64_000, 4096), None);
        assert_eq!(slot_ids(sub, own, 64_000, 4096), None);
    }
}
