//! Reading whole files, transparently un-gzipping them.

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The two magic bytes that start every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Most bytes a gzip data file may decompress to (2 GiB, far above every supported data set):
/// a corrupt or hostile stream must not exhaust the memory.
const MAX_GUNZIPPED: u64 = 1 << 31;

/// Whether `bytes` start with the gzip magic bytes `1f 8b`.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[..2] == GZIP_MAGIC
}

/// Read `path` completely; if its contents are gzip (detected by the magic bytes, not the
/// file name), return the decompressed bytes.
pub(crate) fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if is_gzip(&raw) {
        gunzip(&raw, path)
    } else {
        Ok(raw)
    }
}

/// `bytes` decompressed if they are gzip, else unchanged. `origin` names the source in error
/// messages.
pub(crate) fn maybe_gunzip<'a>(bytes: &'a [u8], origin: &Path) -> Result<Cow<'a, [u8]>> {
    if is_gzip(bytes) {
        gunzip(bytes, origin).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

fn gunzip(bytes: &[u8], origin: &Path) -> Result<Vec<u8>> {
    // The gzip trailer stores the uncompressed size modulo 2^32; use it as a capacity hint,
    // bounded so that a corrupt trailer cannot make us allocate absurd amounts up front.
    let hint = if bytes.len() >= 18 {
        let t = &bytes[bytes.len() - 4..];
        u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize
    } else {
        0
    };
    let cap = hint.min(bytes.len().saturating_mul(64)).min(1 << 30);
    let mut out = Vec::with_capacity(cap);
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_GUNZIPPED + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            Error::data(
                origin,
                format!("corrupt or truncated gzip data ({e}); re-download or re-extract the file"),
            )
        })?;
    if out.len() as u64 > MAX_GUNZIPPED {
        return Err(Error::data(
            origin,
            format!(
                "the gzip data decompresses to more than {MAX_GUNZIPPED} bytes; this is not a \
                 data file of a supported set"
            ),
        ));
    }
    Ok(out)
}
