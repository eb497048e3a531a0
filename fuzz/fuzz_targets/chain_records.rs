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
    let decoded = Index::decode(data);
    if let Some(index) = &decoded {
        let again = index.encode();
        assert_eq!(again.len() as u64, index.encoded_len());
        assert_eq!(Index::decode(&again).as_ref(), Some(index));
    }
    // The streaming scan (what restores use) accepts exactly what the
    // decoder accepts, with the same extents.
    let (scanned, _crc) = scan_index(&mut &data[..], data.len() as u64).unwrap();
    match (&decoded, &scanned) {
        (None, None) => {}
        (Some(full), Some(light)) => {
            assert_eq!(full.removes, light.removes);
            assert_eq!(full.extents, light.extents);
        }
        _ => panic!("decode and scan disagree: {decoded:?} / {scanned:?}"),
    }
});
