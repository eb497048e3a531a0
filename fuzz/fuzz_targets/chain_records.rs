//! Every decoder of the chain format on arbitrary bytes: none may panic, and
//! whatever decodes must encode back to the same bytes.
#![no_main]

use blocksnap::chain::format::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = FileHeader::decode(data) {
        let again = h.encode();
        assert_eq!(FileHeader::decode(&again).unwrap(), h);
    }
    if let Commit::Valid { info, stats, .. } = decode_commit(data) {
        let _ = (info.end(), info.index_start(), stats.changed_bytes);
    }
    if let Some(info) = decode_footer(data) {
        assert_eq!(decode_footer(&encode_footer(&info)), Some(info));
    }
    if let Some(meta) = decode_meta(data) {
        assert_eq!(decode_meta(&encode_meta(&meta)).as_ref(), Some(&meta));
    }
    if let Some(index) = Index::decode(data) {
        let again = index.encode();
        assert_eq!(again.len() as u64, index.encoded_len());
        assert_eq!(Index::decode(&again).as_ref(), Some(&index));
    }
});
