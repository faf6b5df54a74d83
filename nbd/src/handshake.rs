//! The handshake: "Fixed newstyle negotiation" and option haggling
//! ("Option types", "Option reply types"), up to the export the client
//! chose and what it negotiated for the transmission phase.
//!
//! Every option is read whole into a bounded buffer before it is parsed;
//! its data is decoded with a [`Cursor`] that cannot run past the end. A
//! client that breaks the protocol (wrong magic, unknown client flags, an
//! option too large to skip, too many options) is dropped: the error says
//! why, and the server goes on with its other clients.

use crate::proto::{self, info, opt, rep, tflag, Cursor};
use crate::server::{Export, Shared};
use crate::stream::Stream;
use crate::{Error, Result};
use std::io::Write;

/// Largest option data read and parsed (export names and queries are at
/// most 4096 bytes each).
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Largest option data skipped (read and thrown away) to answer
/// `NBD_REP_ERR_TOO_BIG`; beyond it the client is dropped.
const MAX_OPTION_SKIP: u32 = 1 << 20;
/// Options one connection may send before it is dropped.
const MAX_OPTIONS: usize = 256;
/// Metadata context queries in one option.
const MAX_QUERIES: u32 = 64;
/// The metadata context id of `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negotiated {
    /// Index of the export in [`Shared::exports`].
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// The transmission flags of `e` for a client that did (or did not)
/// negotiate structured replies.
pub(crate) fn transmission_flags(e: &Export, structured: bool) -> u16 {
    // One disk object serves every connection, and its flush covers all of
    // them: multi-connection is safe, read-only or not.
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN | tflag::SEND_CACHE;
    if e.writable {
        f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    } else {
        f |= tflag::READ_ONLY;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}

/// Run the handshake on `s`: `Ok(None)` when the client aborted or left.
pub(crate) fn handshake(s: &mut Stream, shared: &Shared) -> Result<Option<Negotiated>> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting[16..18]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    send(s, &greeting)?;
    let mut cf = [0u8; 4];
    if !s.read_full(&mut cf, "client flags")? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(cf);
    // "the server MUST drop the TCP connection if the client sets an
    // unknown flag".
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut st = State {
        structured: false,
        contexts: None,
    };
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        if !s.read_full(&mut h, "option header")? {
            return Ok(None);
        }
        if proto::be64(&h[0..8]) != proto::IHAVEOPT {
            return Err(Error::protocol(format!(
                "option magic {:#x} is not IHAVEOPT",
                proto::be64(&h[0..8])
            )));
        }
        let option = proto::be32(&h[8..12]);
        let len = proto::be32(&h[12..16]);
        if len > MAX_OPTION_DATA {
            if len > MAX_OPTION_SKIP {
                return Err(Error::protocol(format!(
                    "option {option} has {len} bytes of data (at most {MAX_OPTION_SKIP} \
                     are skipped)"
                )));
            }
            s.skip(u64::from(len), "option data")?;
            reply_err(s, option, rep::ERR_TOO_BIG, "option data too large")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_rest(&mut data, "option data")?;
        if shared.stopping() && option != opt::ABORT {
            reply_err(s, option, rep::ERR_SHUTDOWN, "the server is shutting down")?;
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                // No error reply exists for this option: an unknown export
                // ends the session.
                let name = std::str::from_utf8(&data)
                    .map_err(|_| Error::protocol("export name is not UTF-8".into()))?;
                let Some(i) = shared.find(name) else {
                    return Err(Error::protocol(format!("no export named {name:?}")));
                };
                let e = &shared.exports[i];
                let mut r = Vec::with_capacity(134);
                r.extend_from_slice(&e.disk.virtual_size().to_be_bytes());
                r.extend_from_slice(&transmission_flags(e, st.structured).to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                send(s, &r)?;
                return Ok(Some(st.finish(i, name)));
            }
            opt::ABORT => {
                // The client may close without reading this: ignore errors.
                let _ = s.write_all(&proto::option_reply(option, rep::ACK, &[]));
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_err(s, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in shared.exports.iter() {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&proto::len32(e.name.len()).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    send(s, &proto::option_reply(option, rep::SERVER, &d))?;
                }
                send(s, &proto::option_reply(option, rep::ACK, &[]))?;
            }
            opt::STARTTLS => {
                reply_err(
                    s,
                    option,
                    rep::ERR_POLICY,
                    "TLS is not offered by this server",
                )?;
            }
            opt::INFO | opt::GO => {
                if let Some(i) = info_or_go(s, shared, &st, option, &data)? {
                    if option == opt::GO {
                        let name = shared.exports[i].name.clone();
                        return Ok(Some(st.finish(i, &name)));
                    }
                }
            }
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    st.structured = true;
                    send(s, &proto::option_reply(option, rep::ACK, &[]))?;
                } else {
                    reply_err(
                        s,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(s, shared, &mut st, option, &data)?;
            }
            _ => reply_err(s, option, rep::ERR_UNSUP, "option not supported")?,
        }
    }
    Err(Error::protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// Negotiation state between options.
struct State {
    structured: bool,
    /// The export `NBD_OPT_SET_META_CONTEXT` last named, and whether it
    /// selected `base:allocation`.
    contexts: Option<(String, bool)>,
}

impl State {
    fn finish(&self, export: usize, name: &str) -> Negotiated {
        // Contexts apply only to the export they were selected for.
        let base_allocation = self.structured
            && self
                .contexts
                .as_ref()
                .is_some_and(|(n, sel)| *sel && n == name);
        Negotiated {
            export,
            structured: self.structured,
            base_allocation,
        }
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's index when the reply ended
/// with `NBD_REP_ACK`.
fn info_or_go(
    s: &mut Stream,
    shared: &Shared,
    st: &State,
    option: u32,
    data: &[u8],
) -> Result<Option<usize>> {
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let n = c.u32()?;
        let name = c.string(n)?;
        let count = c.u16()?;
        let mut reqs = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            reqs.push(c.u16()?);
        }
        c.is_empty().then_some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        reply_err(
            s,
            option,
            rep::ERR_INVALID,
            "malformed NBD_OPT_INFO/GO data",
        )?;
        return Ok(None);
    };
    let Some(i) = shared.find(name) else {
        reply_err(
            s,
            option,
            rep::ERR_UNKNOWN,
            &format!("no export named {name:?}"),
        )?;
        return Ok(None);
    };
    let e = &shared.exports[i];
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&info::EXPORT.to_be_bytes());
    export.extend_from_slice(&e.disk.virtual_size().to_be_bytes());
    export.extend_from_slice(&transmission_flags(e, st.structured).to_be_bytes());
    send(s, &proto::option_reply(option, rep::INFO, &export))?;
    // Block sizes are sent whether asked for or not ("The server MAY send
    // information requests back which are not explicitly requested"): any
    // alignment works (the disks read-modify-write partial sectors).
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&crate::MAX_PAYLOAD.to_be_bytes());
    send(s, &proto::option_reply(option, rep::INFO, &bs))?;
    for r in reqs {
        let (kind, text) = match r {
            info::NAME => (info::NAME, e.name.as_str()),
            info::DESCRIPTION => (info::DESCRIPTION, e.description.as_str()),
            _ => continue,
        };
        let mut d = Vec::with_capacity(2 + text.len());
        d.extend_from_slice(&kind.to_be_bytes());
        d.extend_from_slice(text.as_bytes());
        send(s, &proto::option_reply(option, rep::INFO, &d))?;
    }
    send(s, &proto::option_reply(option, rep::ACK, &[]))?;
    Ok(Some(i))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    s: &mut Stream,
    shared: &Shared,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<()> {
    let set = option == opt::SET_META_CONTEXT;
    if set {
        // "Issuing this command replaces all previously-set metadata
        // contexts (including when this command fails)".
        st.contexts = None;
    }
    if !st.structured {
        return reply_err(
            s,
            option,
            rep::ERR_INVALID,
            "negotiate structured replies first",
        );
    }
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let n = c.u32()?;
        let name = c.string(n)?;
        let count = c.u32()?;
        if count > MAX_QUERIES {
            return Some(Err(count));
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let n = c.u32()?;
            queries.push(c.string(n)?);
        }
        c.is_empty().then_some(Ok((name, queries)))
    })();
    let (name, queries) = match parsed {
        None => {
            return reply_err(s, option, rep::ERR_INVALID, "malformed meta context data");
        }
        Some(Err(count)) => {
            return reply_err(
                s,
                option,
                rep::ERR_TOO_BIG,
                &format!("{count} queries (at most {MAX_QUERIES})"),
            );
        }
        Some(Ok(p)) => p,
    };
    if shared.find(name).is_none() {
        return reply_err(
            s,
            option,
            rep::ERR_UNKNOWN,
            &format!("no export named {name:?}"),
        );
    }
    // `base:allocation` matches itself; `base:` (a wildcard) only when
    // listing; no query lists everything and selects nothing.
    let selected = if queries.is_empty() {
        !set
    } else {
        queries
            .iter()
            .any(|q| *q == proto::BASE_ALLOCATION || (!set && *q == "base:"))
    };
    if selected {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut d = Vec::with_capacity(4 + proto::BASE_ALLOCATION.len());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        send(s, &proto::option_reply(option, rep::META_CONTEXT, &d))?;
    }
    if set {
        st.contexts = Some((name.to_string(), selected));
    }
    send(s, &proto::option_reply(option, rep::ACK, &[]))
}

fn reply_err(s: &mut Stream, option: u32, kind: u32, msg: &str) -> Result<()> {
    send(s, &proto::option_reply(option, kind, msg.as_bytes()))
}

fn send(s: &mut Stream, b: &[u8]) -> Result<()> {
    s.write_all(b)
        .map_err(|e| Error::io("sending a handshake reply", e))
}
