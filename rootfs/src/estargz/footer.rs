//! The footer: an empty gzip member whose Extra field holds the TOC's offset.
//!
//! eStargz (51 bytes): Extra = subfield `S`,`G`, length 22, `%016x` TOC offset + `STARGZ`.
//! Legacy stargz (47 bytes): Extra = the 22 bytes without the subfield header.

use crate::{Error, Result};

/// Size of an eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of a legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: u64 = 47;

const MAGIC: &[u8] = b"STARGZ";
/// A final, empty deflate stored block, then CRC32 and ISIZE of nothing.
const EMPTY_BODY: [u8; 13] = [1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];

/// The eStargz footer pointing at a TOC member starting at `toc_offset`.
pub fn footer(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut out = [0u8; FOOTER_SIZE as usize];
    // Magic, deflate, FEXTRA; mtime 0; XFL 0; OS unknown.
    out[..10].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff]);
    out[10..12].copy_from_slice(&26u16.to_le_bytes());
    out[12..14].copy_from_slice(b"SG");
    out[14..16].copy_from_slice(&22u16.to_le_bytes());
    out[16..32].copy_from_slice(format!("{toc_offset:016x}").as_bytes());
    out[32..38].copy_from_slice(MAGIC);
    out[38..].copy_from_slice(&EMPTY_BODY);
    out
}

/// The TOC offset and footer size of a blob, given its last [`FOOTER_SIZE`] bytes (or all of
/// a shorter blob).
pub fn parse_footer(tail: &[u8]) -> Result<(u64, u64)> {
    if tail.len() >= FOOTER_SIZE as usize {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        if is_gzip_extra(f, 26) && &f[12..14] == b"SG" && f[14..16] == 22u16.to_le_bytes() {
            return Ok((parse_offset(&f[16..38])?, FOOTER_SIZE));
        }
    }
    if tail.len() >= LEGACY_FOOTER_SIZE as usize {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if is_gzip_extra(f, 22) {
            return Ok((parse_offset(&f[12..34])?, LEGACY_FOOTER_SIZE));
        }
    }
    Err(Error::InvalidArchive(
        "not an eStargz layer: no stargz footer at the end of the blob".into(),
    ))
}

fn is_gzip_extra(f: &[u8], xlen: u16) -> bool {
    f[0] == 0x1f && f[1] == 0x8b && f[2] == 8 && f[3] & 4 != 0 && f[10..12] == xlen.to_le_bytes()
}

fn parse_offset(field: &[u8]) -> Result<u64> {
    let bad = || Error::InvalidArchive("not an eStargz layer: malformed stargz footer".into());
    if &field[16..] != MAGIC {
        return Err(bad());
    }
    let hex = std::str::from_utf8(&field[..16]).map_err(|_| bad())?;
    u64::from_str_radix(hex, 16).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn footer_round_trips_and_is_an_empty_gzip_member() {
        let f = footer(0x1234);
        assert_eq!(parse_footer(&f).unwrap(), (0x1234, FOOTER_SIZE));
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&f[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
        let mut longer = vec![7u8; 100];
        longer.extend_from_slice(&f);
        assert_eq!(parse_footer(&longer).unwrap().0, 0x1234);
    }

    #[test]
    fn legacy_footer() {
        let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
        f.extend_from_slice(b"00000000000000ffSTARGZ");
        f.extend_from_slice(&EMPTY_BODY);
        assert_eq!(parse_footer(&f).unwrap(), (0xff, LEGACY_FOOTER_SIZE));
    }

    #[test]
    fn rejects_plain_gzip() {
        let e = parse_footer(&[0u8; 60]).unwrap_err();
        assert!(e.to_string().contains("not an eStargz layer"), "{e}");
        let mut f = footer(1);
        f[33] = b'x';
        assert!(parse_footer(&f).is_err());
    }
}
