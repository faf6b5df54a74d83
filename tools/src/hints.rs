//! Hints printed on stderr after an error message: how to allow a parent
//! the parent policy refused, and the `vdisk rebase -u` command that
//! relinks a child to a parent whose identity no longer matches.

/// What the parent search says when the policy refused an existing parent.
pub const REFUSED_PARENT: &str = "outside the directories parents may come from";

/// After a message `msg` on stderr: when it says that the parent policy
/// refused a parent, print (on stderr) how to allow it.
pub fn policy_hint(msg: &str) {
    if msg.contains(REFUSED_PARENT) {
        eprintln!(
            "vdisk: hint: by the parent policy, a parent must lie under the directory of the \
             image opened; add its directory with --parent-dir DIR, or use --allow-any-parent \
             to follow any path the image names"
        );
    }
}

/// After a message `msg` on stderr: when it says that the parent found for
/// a differencing disk does not carry the identity the disk records (VHDX
/// parent_linkage, VHD parent unique id), print (on stderr) the command
/// that relinks it, for when that parent is right after all (it was
/// written without changing what the child reads, or copied).
pub fn linkage_hint(msg: &str) {
    if let Some((child, parent)) = linkage_mismatch(msg) {
        let (c, p) = (shell_quote(&child), shell_quote(&parent));
        eprintln!(
            "vdisk: hint: if {parent} still holds the data {child} was made over, \
             `vdisk rebase -u -b {p} {c}` relinks {child} to it"
        );
    }
}

/// The child and the parent named by a parent identity mismatch in `msg`
/// (the drivers' messages "CHILD: parent PARENT has DataWriteGuid G, but
/// this differencing VHDX expects ..." and "... has unique id U, but this
/// differencing VHD expects ...", perhaps inside the error of a disk
/// further up the chain, "TOP: cannot open the parent P: P: parent ...").
fn linkage_mismatch(msg: &str) -> Option<(String, String)> {
    let at = [" has DataWriteGuid ", " has unique id "]
        .iter()
        .filter_map(|m| msg.rfind(m))
        .max()?;
    let tail = &msg[at..];
    let expects = tail.find(", but this differencing VHD")?;
    if !tail[expects..].contains("expects") {
        return None;
    }
    let head = &msg[..at];
    let i = head.rfind(": parent ")?;
    let parent = &head[i + ": parent ".len()..];
    let child = head[..i].rsplit(": ").next()?;
    (!child.is_empty() && !parent.is_empty()).then(|| (child.to_string(), parent.to_string()))
}

/// `s` as one shell word: as it is when that is safe, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "._-/+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linkage_mismatches_name_child_and_parent() {
        let vhdx = "d/child.avhdx: parent d/base.vhdx has DataWriteGuid {1}, but this \
                    differencing VHDX expects parent_linkage {2}: it is not this disk's parent";
        assert_eq!(
            linkage_mismatch(vhdx),
            Some(("d/child.avhdx".into(), "d/base.vhdx".into()))
        );
        let vhd = "c.vhd: parent my parent.vhd has unique id 1, but this differencing VHD \
                   expects parent unique id 2 (dynamic disk header at offset 0x228): it is not";
        assert_eq!(
            linkage_mismatch(vhd),
            Some(("c.vhd".into(), "my parent.vhd".into()))
        );
        // Further up the chain: the layer whose parent is wrong.
        let nested = "top.avhdx: cannot open the parent d/mid.avhdx: d/mid.avhdx: parent \
                      d/base.vhdx has DataWriteGuid {1}, but this differencing VHDX expects x";
        assert_eq!(
            linkage_mismatch(nested),
            Some(("d/mid.avhdx".into(), "d/base.vhdx".into()))
        );
        // Not a mismatch of identity.
        assert_eq!(linkage_mismatch("x.vhd: parent y.vhd not found"), None);
        assert_eq!(
            linkage_mismatch("c: y.vhdx has DataWriteGuid {1}, but this differencing VHDX expects"),
            None
        );
        assert_eq!(shell_quote("d/base.vhdx"), "d/base.vhdx");
        assert_eq!(shell_quote("my parent.vhd"), "'my parent.vhd'");
        assert_eq!(shell_quote("it's.vhd"), "'it'\\''s.vhd'");
    }
}
